"""Offline tasks whose answers are worked reasoning traces, for DeepPrune-style experiments.

The built-in tasks (``tasks``) answer in ~3 tokens, so there is nothing to prune or to judge
from a partial answer. These variants write the work out — tens to hundreds of tokens — before
the final answer. A trace is **one line** (so the sampler's default ``"\\n"`` stop string, the
training text's ``Q: ...\\nA: ...\\n`` layout and every ``first_line``-style tool still apply):
worked steps, then `` => `` and the final answer. The extractor parses the whole line against the
trace grammar and returns the answer after ``=>``, or ``INVALID`` when the line is not a
well-formed trace (a cut-off trace, a missing ``=>``, garbage between steps). The verifier checks
that final answer exactly, from the problem's own data; ``trace_errors`` also checks each step.

``Problem.reference`` is the final answer (so ``verify(problem, problem.reference)`` holds and
saved problems load like the plain tasks'); ``reference_solution`` (and so ``training_text``)
is the full trace.

``arithmetic-trace``  ``Q: 4738+2965+107=`` → column addition from the units column up, one step
                      per column: the column's digits with the carry as a last addend, their sum,
                      and after ``>`` the digits of the result so far (so the answer is copied, not
                      reassembled from the columns), then the sum::

                          8+5+7=20 > 0 ; 3+6+0+2=11 > 10 ; 7+9+1+1=18 > 810 ; 4+2+0+1=7 > 7810 ; => 7810

                      difficulty d: every operand has exactly d digits (d = 1: 0..9); two or
                      three operands (equally likely). Column sums are checked by ``trace_errors``.
``countdown-trace``   ``Q: 9 14 16 18 -> 283`` → a search: attempts separated by `` | ``, each a
                      chain of steps ``a op b=c`` over the numbers still unused; a failed attempt
                      (it used every number and missed the target) ends with `` no`` and the search
                      backtracks to the start; the last attempt reaches the target, then the
                      expression it spells::

                          16+14=30, 18/9=2, 30*2=60 no | 18-14=4, 9-4=5, 16-5=11 no |
                          18*16=288, 288+9=297, 297-14=283 => 18*16+9-14

                      (one line in reality). difficulty d: d numbers (3..5), each 1..20; 0-2
                      failed attempts. The answer is verified like ``countdown``'s (each number at
                      most once, exact rational value), so any correct expression counts.
``sum-trace``         ``Q: 7+7+1+5+9+8=`` → a running sum that takes the numbers **in a random
                      order** (the training text shows one order per example), one addition per
                      step::

                          9+7=16 ; 16+7=23 ; 23+8=31 ; 31+1=32 ; 32+5=37 ; => 37

                      Every problem has many valid paths whose intermediate sums differ, so sampled
                      rows err on different steps — the setting where a vote over paths beats the
                      single greedy path (self-consistency); the other trace tasks have one path per
                      problem. difficulty d: d numbers (3..9), each 1..9. ``trace_errors`` checks
                      each addition, the running sum and that every number is used once.
"""

from __future__ import annotations

import random
import re
from typing import Any

from ..errors import ParScaleError
from .answers import INVALID, Invalid, canonical_number, first_line
from .records import Problem
from .tasks import TASKS, Countdown, Task

ANSWER_MARK = "=>"  # the trace's last field: what follows is the final answer


def _answer_field(text: str, step_re: re.Pattern, sep: str, end: str = "") -> tuple[list[str], str] | Invalid:
    """Steps and final answer of a one-line trace ``step SEP step ... END => answer``; INVALID if
    the first line does not have that shape (the steps must each match ``step_re``)."""
    line = first_line(text)
    if line is INVALID or line.count(ANSWER_MARK) != 1:
        return INVALID
    body, answer = (part.strip() for part in line.split(ANSWER_MARK))
    if end:
        if not body.endswith(end):
            return INVALID
        body = body[: -len(end)].strip()
    if not body or not answer:
        return INVALID
    steps = [s.strip() for s in re.split(sep, body)]
    if not all(step_re.fullmatch(s) for s in steps):
        return INVALID
    return steps, answer


# ----------------------------------------------------------------------------- arithmetic-trace
_COLUMN = re.compile(r"\d+(?:\+\d+)+=\d+\s*>\s*\d+")


def arithmetic_trace_answer(text: str) -> str | Invalid:
    """The canonical integer after ``=>`` of a well-formed column-addition trace, else INVALID."""
    parsed = _answer_field(text, _COLUMN, r"\s*;\s*", ";")
    if parsed is INVALID:
        return INVALID
    number = canonical_number(parsed[1])
    return INVALID if number is None or not re.fullmatch(r"\d+", parsed[1]) else number


def column_trace(operands: list[int]) -> str:
    """The column-addition trace of ``operands`` (units first; the carry is the last addend)."""
    width = max(len(str(x)) for x in operands)
    digits = [str(x).rjust(width, "0") for x in operands]
    steps, carry, done = [], 0, ""
    for col in range(width - 1, -1, -1):
        addends = [int(d[col]) for d in digits] + ([carry] if carry else [])
        total = sum(addends)
        carry = total // 10
        done = (str(total) if col == 0 else str(total % 10)) + done  # the top column writes its carry
        steps.append("+".join(map(str, addends)) + f"={total} > {done}")
    return " ; ".join(steps) + f" ; {ANSWER_MARK} {sum(operands)}"


class _OperandSum(Task):
    """A trace task whose answer is the sum of ``problem.meta["operands"]``."""

    def check(self, problem, answer):
        if ANSWER_MARK in answer:  # a whole trace: judge its final answer
            answer = self.extract(answer)
            if answer is INVALID:
                return False
        return canonical_number(answer) == str(sum(problem.meta["operands"]))


class ArithmeticTrace(_OperandSum):
    name = "arithmetic-trace"
    default_difficulty = 3
    max_difficulty = 8
    extractor = staticmethod(arithmetic_trace_answer)
    answer_prefix = " ; =>"  # what ends the steps and starts the answer (``peek`` forces it)

    def trace_budget(self, difficulty: int) -> int:
        """Tokens enough for any trace at ``difficulty`` (its characters: a token is >= 1 character)."""
        column = len("9+9+9+2=29 > ; ") + difficulty + 1
        return difficulty * column + len(" => ") + difficulty + 3

    def generate(self, rng, difficulty):
        lo, hi = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty - 1
        operands = [rng.randint(lo, hi) for _ in range(rng.choice((2, 3)))]
        return "+".join(map(str, operands)) + "=", str(sum(operands)), {"operands": operands}

    def reference_solution(self, problem: Problem) -> str:
        return column_trace(list(problem.meta["operands"]))

    def trace_errors(self, problem: Problem, text: str) -> list[str]:
        """What is wrong with a trace, step by step (empty: every column and the answer are right)."""
        parsed = _answer_field(text, _COLUMN, r"\s*;\s*", ";")
        if parsed is INVALID:
            return ["not a well-formed trace"]
        steps, answer = parsed
        operands = list(problem.meta["operands"])
        want = column_trace(operands).split(f" ; {ANSWER_MARK}")[0].split(" ; ")
        errors = [f"column {i + 1}: {got!r}, expected {exp!r}" for i, (got, exp) in enumerate(zip(steps, want))
                  if got.replace(" ", "") != exp.replace(" ", "")]
        if len(steps) != len(want):
            errors.append(f"{len(steps)} columns, expected {len(want)}")
        if not self.check(problem, answer):
            errors.append(f"final answer {answer!r}, expected {sum(operands)}")
        return errors


# ----------------------------------------------------------------------------- countdown-trace
_STEP = r"\d+[-+*/]\d+=\d+"
_ATTEMPT = re.compile(rf"{_STEP}(?:\s*,\s*{_STEP})*(?:\s+no)?")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def countdown_trace_answer(text: str) -> str | Invalid:
    """The expression after ``=>`` of a well-formed search trace (whitespace removed), else INVALID."""
    parsed = _answer_field(text, _ATTEMPT, r"\s*\|\s*")
    if parsed is INVALID:
        return INVALID
    expr = re.sub(r"\s+", "", parsed[1])
    return expr if re.fullmatch(r"[\d+\-*/()]+", expr) else INVALID


class CountdownTrace(Countdown):
    name = "countdown-trace"
    default_difficulty = 4
    min_difficulty = 3
    max_difficulty = 5
    extractor = staticmethod(countdown_trace_answer)
    answer_prefix = " =>"
    MAX_FAILED = 2

    def _combine(self, rng: random.Random, nodes: list[tuple[Any, int]]) -> tuple[list[str], Any, int] | None:
        """A random full reduction of ``nodes`` (tree, value) to one: steps, tree, value; None if
        an intermediate value grows past 10 × the largest target."""
        nodes = list(nodes)
        steps = []
        while len(nodes) > 1:
            (ta, a), (tb, b) = nodes.pop(rng.randrange(len(nodes))), nodes.pop(rng.randrange(len(nodes)))
            if a < b:  # written larger first, so - and / stay non-negative integers
                (ta, a), (tb, b) = (tb, b), (ta, a)
            op = rng.choice(["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else []))
            value = _OPS[op](a, b)
            if value > 10 * self.MAX_TARGET:
                return None
            steps.append(f"{a}{op}{b}={value}")
            nodes.append(((op, ta, tb), value))
        return steps, nodes[0][0], nodes[0][1]

    def trace_budget(self, difficulty: int) -> int:
        """Tokens enough for any trace at ``difficulty`` (its characters: a token is >= 1 character)."""
        steps = (self.MAX_FAILED + 1) * (difficulty - 1) * len("9990-9990=9990, ")
        return steps + (self.MAX_FAILED + 1) * len(" no | ") + len(" => ") + 4 * difficulty + 2 * difficulty + 2

    def generate(self, rng, difficulty):
        for _ in range(10_000):
            numbers = sorted(rng.randint(1, self.MAX_NUMBER) for _ in range(difficulty))
            leaves = [(x, x) for x in numbers]
            found = self._combine(rng, leaves)
            if found is None or not 1 <= found[2] <= self.MAX_TARGET:
                continue
            steps, tree, target = found
            failed = []
            for _ in range(rng.randint(0, self.MAX_FAILED)):
                miss = self._combine(rng, leaves)
                if miss is not None and miss[2] != target:
                    failed.append(", ".join(miss[0]) + " no")
            expr = self._render(tree)[0]
            trace = " | ".join(failed + [", ".join(steps)]) + f" {ANSWER_MARK} {expr}"
            shown = " ".join(map(str, numbers))
            return f"{shown} -> {target}", expr, {"numbers": numbers, "target": target, "trace": trace}
        raise ParScaleError(f"countdown-trace: could not generate a problem at difficulty {difficulty}")

    def reference_solution(self, problem: Problem) -> str:
        trace = problem.meta.get("trace")
        if not isinstance(trace, str):
            raise ParScaleError(f"countdown-trace: problem {problem.id} has no trace in its meta")
        return trace

    def check(self, problem, answer):
        if ANSWER_MARK in answer:
            answer = countdown_trace_answer(answer)
            if answer is INVALID:
                return False
        return super().check(problem, answer)

    def trace_errors(self, problem: Problem, text: str) -> list[str]:
        """Wrong steps (bad arithmetic, a number not available), a failed attempt not marked
        ``no``, a final attempt that misses the target, or a wrong final answer."""
        parsed = _answer_field(text, _ATTEMPT, r"\s*\|\s*")
        if parsed is INVALID:
            return ["not a well-formed trace"]
        attempts, answer = parsed
        target, errors = problem.meta["target"], []
        for i, attempt in enumerate(attempts):
            pool = list(problem.meta["numbers"])
            last = None
            for step in re.split(r"\s*,\s*", attempt.removesuffix(" no").strip()):
                a, op, b, c = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", step).groups()
                a, b, c = int(a), int(b), int(c)
                for x in (a, b):
                    if x in pool:
                        pool.remove(x)
                    else:
                        errors.append(f"attempt {i + 1}: {x} is not available in {step!r}")
                if (op == "/" and (b == 0 or a % b)) or _OPS[op](a, b) != c:
                    errors.append(f"attempt {i + 1}: {step!r} is wrong")
                pool.append(c)
                last = c
            failed = attempt.endswith(" no")
            if failed == (last == target) or (i == len(attempts) - 1) == failed:
                errors.append(f"attempt {i + 1}: ends at {last} but is marked {'failed' if failed else 'final'}")
        if not self.check(problem, answer):
            errors.append(f"final answer {answer!r} does not reach {target}")
        return errors


# ----------------------------------------------------------------------------- sum-trace
_ADD = re.compile(r"\d+\+\d+=\d+")


def sum_trace_answer(text: str) -> str | Invalid:
    """The canonical integer after ``=>`` of a well-formed running-sum trace, else INVALID."""
    parsed = _answer_field(text, _ADD, r"\s*;\s*", ";")
    if parsed is INVALID or not re.fullmatch(r"\d+", parsed[1]):
        return INVALID
    return canonical_number(parsed[1])


class SumTrace(_OperandSum):
    name = "sum-trace"
    default_difficulty = 6
    min_difficulty = 3
    max_difficulty = 9
    extractor = staticmethod(sum_trace_answer)
    answer_prefix = " ; =>"

    def trace_budget(self, difficulty: int) -> int:
        """Tokens enough for any trace: each step is at most ``dd+d=dd ; `` (10 characters)."""
        return 10 * difficulty + 12

    def generate(self, rng, difficulty):
        operands = [rng.randint(1, 9) for _ in range(difficulty)]
        return "+".join(map(str, operands)) + "=", str(sum(operands)), {"operands": operands}

    def reference_solution(self, problem: Problem) -> str:
        """One path: the numbers in an order drawn from the problem itself (deterministic per
        problem, different between problems, so a training corpus shows every order)."""
        operands = list(problem.meta["operands"])
        random.Random(f"{problem.id}|{problem.prompt}").shuffle(operands)
        total, steps = operands[0], []
        for x in operands[1:]:
            steps.append(f"{total}+{x}={total + x}")
            total += x
        return " ; ".join(steps) + f" ; {ANSWER_MARK} {total}"

    def trace_errors(self, problem: Problem, text: str) -> list[str]:
        """Each addition, the running sum, every number used exactly once, the final answer."""
        parsed = _answer_field(text, _ADD, r"\s*;\s*", ";")
        if parsed is INVALID:
            return ["not a well-formed trace"]
        steps, answer = parsed
        errors, used, total = [], [], None
        for i, step in enumerate(steps):
            a, b, c = (int(x) for x in re.split(r"[+=]", step))
            if total is None:
                used.append(a)
            elif a != total:
                errors.append(f"step {i + 1}: starts from {a}, the running sum is {total}")
            if a + b != c:
                errors.append(f"step {i + 1}: {a}+{b} is {a + b}, not {c}")
            used.append(b)
            total = c
        if sorted(used) != sorted(problem.meta["operands"]):
            errors.append(f"numbers used {sorted(used)}, expected {sorted(problem.meta['operands'])}")
        if not self.check(problem, answer):
            errors.append(f"final answer {answer!r}, expected {sum(problem.meta['operands'])}")
        return errors


TRACE_TASKS: dict[str, Task] = {t.name: t for t in (ArithmeticTrace(), CountdownTrace(), SumTrace())}
TASKS.update(TRACE_TASKS)  # get_task("arithmetic-trace") etc.; the names are stable
