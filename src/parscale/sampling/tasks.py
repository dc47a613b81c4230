"""Offline tasks with exact verifiers and seeded generators, for sample-level scaling experiments.

Every task renders a problem as a short prompt ``"Q: <question>\\nA:"``; the worked answer follows
as ``" <answer>\\n"`` (so a model trained on ``training_text`` learns to stop at the newline).
Generators are seeded (``random.Random`` seeded with a string, stable across runs and platforms)
and have a ``difficulty`` knob:

``arithmetic``  ``Q: 47+385=`` → ``432``. difficulty d: both operands have exactly d digits
                (d = 1: 0..9); the operator is +, - or * with equal probability (results may be
                negative). Verified by exact integer arithmetic.
``countdown``   ``Q: 3 7 25 50 -> 200`` → an expression such as ``(3+7)*25-50`` that uses
                each given number at most once, only + - * / (also × ÷) and parentheses, and
                equals the target under exact rational arithmetic. difficulty d: d numbers
                (2..6), each 1..20 (default 4); the generator builds a random expression over all
                of them with non-negative integer intermediate values, so every problem is
                solvable, and the target is 1..999. The verifier parses the expression itself
                (a small recursive-descent parser; nothing is ``eval``-ed).
``linear``      ``Q: solve 3x+5=20`` → ``5`` (integer solution). difficulty 1: ``ax+b=c`` with
                a in 2..9, x and b in 0..9; 2: signs allowed, x in -20..20, b in -50..50;
                d >= 3: x on both sides, ``ax+b=cx+e`` with a != c, ranges growing ×10 per level
                above 3. Verified by substituting the answer (exact rationals).
``sudoku``      ``Q: sudoku 1.3./.4../..2./3...`` → the 16 digits of the solved grid, row by row.
                difficulty d = number of blank cells (1..11; default 8). The generator removes
                cells from a random valid grid one by one, keeping the solution unique. The
                verifier checks rows, columns and 2×2 boxes, and agreement with the givens — not a
                stored solution.
``exact``       no generator: verifies a saved problem by exact match with ``Problem.reference``
                after ``canonical_answer``; for sample files of problems from elsewhere.

Problems may repeat (small difficulties have few distinct problems); pass ``exclude`` (a set of
prompts) to hold an evaluation set out of a training corpus.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import ParScaleError
from .answers import INVALID, Invalid, canonical_answer, canonical_number, first_line, get_extractor, parse_number
from ..atomic import atomic_write_text
from .records import Problem


class Task:
    """Base class: a task names its prompt format, generator, verifier and default extractor."""

    name = "task"
    default_difficulty = 1
    min_difficulty = 1
    max_difficulty: int | None = None
    extractor: str | Callable[[str], str | Invalid] = "first_line"

    # --- to implement
    def generate(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict[str, Any]]:
        """One problem: (question, reference answer, meta for the verifier)."""
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> bool:
        raise NotImplementedError

    # --- shared
    @staticmethod
    def prompt(question: str) -> str:
        return f"Q: {question}\nA:"

    def make_problems(self, n: int, seed: int = 0, difficulty: int | None = None, *,
                      exclude: Iterable[str] = ()) -> list[Problem]:
        """``n`` problems with ids 0..n-1; the same (n, seed, difficulty) gives the same list."""
        if not isinstance(n, int) or n < 0:
            raise ParScaleError(f"{self.name}: number of problems must be an integer >= 0 (got {n!r})")
        d = self.default_difficulty if difficulty is None else difficulty
        if not isinstance(d, int) or d < self.min_difficulty or (self.max_difficulty and d > self.max_difficulty):
            top = self.max_difficulty if self.max_difficulty else "..."
            raise ParScaleError(f"{self.name}: difficulty must be an integer in "
                                f"[{self.min_difficulty}, {top}] (got {difficulty!r})")
        rng = random.Random(f"parscale:{self.name}:{seed}:{d}")
        excluded = set(exclude)
        problems: list[Problem] = []
        misses = 0
        while len(problems) < n:
            question, reference, meta = self.generate(rng, d)
            prompt = self.prompt(question)
            if prompt in excluded:
                misses += 1
                if misses > 1000 + 100 * n:
                    raise ParScaleError(f"{self.name}: cannot find {n} problems outside the excluded set "
                                        f"at difficulty {d}")
                continue
            problems.append(Problem(len(problems), self.name, prompt, reference, {"difficulty": d, **meta}))
        return problems

    def verify(self, problem: Problem, answer: str | Invalid | None) -> bool:
        """Exact check of an answer string (as extracted) against the problem's own data."""
        if answer is None or answer is INVALID:
            return False
        if not isinstance(answer, str):
            raise ParScaleError(f"{self.name}: answer must be a string (got {type(answer).__name__})")
        return bool(self.check(problem, answer))

    def reference_solution(self, problem: Problem) -> str:
        return problem.reference

    def extract(self, text: str) -> str | Invalid:
        return get_extractor(self.extractor)(text)

    def training_text(self, problem: Problem) -> str:
        """Prompt, worked answer and the newline that ends it."""
        return f"{problem.prompt} {self.reference_solution(problem)}\n"


# ----------------------------------------------------------------------------- arithmetic
class Arithmetic(Task):
    name = "arithmetic"
    default_difficulty = 3
    max_difficulty = 18
    extractor = "first_line_number"
    OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def generate(self, rng, difficulty):
        lo, hi = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty - 1
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(sorted(self.OPS))
        return f"{a}{op}{b}=", str(self.OPS[op](a, b)), {"a": a, "b": b, "op": op}

    def check(self, problem, answer):
        m = problem.meta
        return canonical_number(answer) == str(self.OPS[m["op"]](m["a"], m["b"]))


# ----------------------------------------------------------------------------- countdown
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/×÷()]))")
_MAX_EXPR_CHARS = 200
_MAX_DEPTH = 50


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Value and literals of an arithmetic expression over non-negative integers.

    Grammar: ``expr := term (("+"|"-") term)*``, ``term := factor (("*"|"/") factor)*``,
    ``factor := INTEGER | "(" expr ")"``; ``×``/``÷`` are accepted for ``*``/``/``; no unary minus.
    Raises ValueError (malformed) or ZeroDivisionError.
    """
    if len(text) > _MAX_EXPR_CHARS:
        raise ValueError("expression too long")
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"unexpected character {text[pos]!r}")
        tokens.append(m.group(1) or {"×": "*", "÷": "/"}.get(m.group(2), m.group(2)))
        pos = m.end()
    literals: list[int] = []
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def expr(depth: int) -> Fraction:
        nonlocal i
        value = term(depth)
        while peek() in ("+", "-"):
            op = tokens[i]
            i += 1
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth: int) -> Fraction:
        nonlocal i
        value = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[i]
            i += 1
            rhs = factor(depth)
            value = value * rhs if op == "*" else value / rhs  # Fraction raises ZeroDivisionError
        return value

    def factor(depth: int) -> Fraction:
        nonlocal i
        if depth > _MAX_DEPTH:
            raise ValueError("parentheses nested too deeply")
        tok = peek()
        if tok is None:
            raise ValueError("expression ends early")
        i += 1
        if tok == "(":
            value = expr(depth + 1)
            if peek() != ")":
                raise ValueError("missing ')'")
            i += 1
            return value
        if tok.isdigit():
            literals.append(int(tok))
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r}")

    if not tokens:
        raise ValueError("empty expression")
    value = expr(0)
    if i != len(tokens):
        raise ValueError(f"unexpected {tokens[i]!r}")
    return value, literals


def countdown_answer(text: str) -> str | Invalid:
    """First line, whitespace removed, a trailing ``=<number>`` dropped (it restates the target)."""
    line = first_line(text)
    if line is INVALID:
        return INVALID
    expr = re.sub(r"\s+", "", line)
    expr = re.sub(r"=-?\d+$", "", expr)
    return expr if expr else INVALID


class Countdown(Task):
    name = "countdown"
    default_difficulty = 4
    min_difficulty = 2
    max_difficulty = 6
    extractor = staticmethod(countdown_answer)
    MAX_NUMBER, MAX_TARGET = 20, 999
    _PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

    def _render(self, node) -> tuple[str, int]:
        """Text and precedence of an expression tree with minimal parentheses."""
        if isinstance(node, int):
            return str(node), 3
        op, left, right = node
        (lt, lp), (rt, rp) = self._render(left), self._render(right)
        p = self._PREC[op]
        if lp < p:
            lt = f"({lt})"
        if rp < p or (rp == p and op in "-/"):  # a-(b-c), a/(b*c) keep their parentheses
            rt = f"({rt})"
        return f"{lt}{op}{rt}", p

    def generate(self, rng, difficulty):
        for _ in range(10_000):
            numbers = [rng.randint(1, self.MAX_NUMBER) for _ in range(difficulty)]
            nodes: list[tuple[Any, int]] = [(x, x) for x in numbers]  # (tree, value)
            ok = True
            while len(nodes) > 1 and ok:
                (ta, a), (tb, b) = nodes.pop(rng.randrange(len(nodes))), nodes.pop(rng.randrange(len(nodes)))
                choices = ["+", "*"] + (["-"] if a >= b else []) + (["/"] if b and a % b == 0 else [])
                op = rng.choice(choices)
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
                ok = value <= 10 * self.MAX_TARGET
                nodes.append(((op, ta, tb), value))
            tree, target = nodes[0]
            if ok and 1 <= target <= self.MAX_TARGET:
                expr = self._render(tree)[0]
                shown = " ".join(map(str, sorted(numbers)))
                return f"{shown} -> {target}", expr, {"numbers": sorted(numbers), "target": target}
        raise ParScaleError(f"countdown: could not generate a problem at difficulty {difficulty}")

    def check(self, problem, answer):
        expr = countdown_answer(answer)
        if expr is INVALID:
            return False
        claimed = first_line(answer).split("=")
        if len(claimed) > 2 or (len(claimed) == 2 and claimed[1].strip() != str(problem.meta["target"])):
            return False  # "expr = N" must state the target, if it states anything
        try:
            value, used = parse_expression(expr)
        except (ValueError, ZeroDivisionError):
            return False
        if Counter(used) - Counter(problem.meta["numbers"]):  # a number used more often than given
            return False
        return value == problem.meta["target"]


# ----------------------------------------------------------------------------- linear equations
def linear_answer(text: str) -> str | Invalid:
    line = first_line(text)
    if line is INVALID:
        return INVALID
    number = canonical_number(re.sub(r"^x\s*=\s*", "", line))
    return INVALID if number is None else number


def _side(coef: int, const: int) -> str:
    if coef == 0:
        return str(const)
    text = {1: "x", -1: "-x"}.get(coef, f"{coef}x")
    if const:
        text += f"{const:+d}"
    return text


class Linear(Task):
    name = "linear"
    default_difficulty = 1
    extractor = staticmethod(linear_answer)

    def generate(self, rng, difficulty):
        # The equation is a·x + b = c·x + e; c = 0 for the one-sided levels.
        sign = lambda: rng.choice((-1, 1))  # noqa: E731
        if difficulty == 1:
            a, x, b, c = rng.randint(2, 9), rng.randint(0, 9), rng.randint(0, 9), 0
        elif difficulty == 2:
            a, x, b, c = sign() * rng.randint(2, 9), rng.randint(-20, 20), rng.randint(-50, 50), 0
        else:
            scale = 10 ** (difficulty - 3)
            a, c = sign() * rng.randint(1, 9 * scale), sign() * rng.randint(1, 9 * scale)
            while c == a:
                c = sign() * rng.randint(1, 9 * scale)
            x, b = rng.randint(-20 * scale, 20 * scale), rng.randint(-50 * scale, 50 * scale)
        e = (a - c) * x + b
        return f"solve {_side(a, b)}={_side(c, e)}", str(x), {"a": a, "b": b, "c": c, "e": e}

    def check(self, problem, answer):
        found = linear_answer(answer)
        x = None if found is INVALID else parse_number(found)
        if x is None:
            return False
        m = problem.meta
        return m["a"] * x + m["b"] == m["c"] * x + m["e"]


# ----------------------------------------------------------------------------- 4x4 sudoku
_BASE_GRID = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
_UNITS = ([[(r, c) for c in range(4)] for r in range(4)] + [[(r, c) for r in range(4)] for c in range(4)]
          + [[(br + i, bc + j) for i in range(2) for j in range(2)] for br in (0, 2) for bc in (0, 2)])


def sudoku_answer(text: str) -> str | Invalid:
    line = first_line(text)
    if line is INVALID:
        return INVALID
    digits = re.sub(r"[\s/|,]", "", line)
    return digits if re.fullmatch(r"[1-4]{16}", digits) else INVALID


def _count_solutions(cells: list[int], limit: int = 2) -> int:
    """Solutions of a 4x4 grid (0 = blank), counting no further than ``limit``."""
    try:
        i = cells.index(0)
    except ValueError:
        return 1
    r, c = divmod(i, 4)
    seen = {cells[4 * rr + cc] for unit in _UNITS if (r, c) in unit for rr, cc in unit}
    found = 0
    for v in range(1, 5):
        if v not in seen:
            cells[i] = v
            found += _count_solutions(cells, limit - found)
            cells[i] = 0
            if found >= limit:
                break
    return found


class Sudoku(Task):
    name = "sudoku"
    default_difficulty = 8
    max_difficulty = 11
    extractor = staticmethod(sudoku_answer)

    def _random_grid(self, rng: random.Random) -> list[int]:
        digits = rng.sample(range(1, 5), 4)
        bands, stacks = rng.sample((0, 2), 2), rng.sample((0, 2), 2)
        rows = [b + i for b in bands for i in rng.sample((0, 1), 2)]
        cols = [s + j for s in stacks for j in rng.sample((0, 1), 2)]
        grid = [[digits[_BASE_GRID[r][c] - 1] for c in cols] for r in rows]
        if rng.random() < 0.5:
            grid = [list(col) for col in zip(*grid)]
        return [v for row in grid for v in row]

    def generate(self, rng, difficulty):
        for _ in range(1000):
            solution = self._random_grid(rng)
            puzzle = list(solution)
            blanks = 0
            for i in rng.sample(range(16), 16):
                if blanks == difficulty:
                    break
                puzzle[i] = 0
                if _count_solutions(puzzle) == 1:
                    blanks += 1
                else:
                    puzzle[i] = solution[i]
            if blanks == difficulty:
                shown = "/".join("".join(str(v) if v else "." for v in puzzle[r:r + 4]) for r in range(0, 16, 4))
                return f"sudoku {shown}", "".join(map(str, solution)), {"givens": "".join(map(str, puzzle))}
        raise ParScaleError(f"sudoku: could not make a uniquely solvable puzzle with {difficulty} blanks")

    def check(self, problem, answer):
        digits = sudoku_answer(answer)
        if digits is INVALID:
            return False
        cells = [int(ch) for ch in digits]
        givens = problem.meta["givens"]
        if any(g != "0" and int(g) != v for g, v in zip(givens, cells)):
            return False
        return all(sorted(cells[4 * r + c] for r, c in unit) == [1, 2, 3, 4] for unit in _UNITS)


# ----------------------------------------------------------------------------- exact match
class ExactMatch(Task):
    """Verifies saved problems from elsewhere by their reference answer; has no generator."""

    name = "exact"
    extractor = "last_number"

    def generate(self, rng, difficulty):
        raise ParScaleError("task 'exact' has no generator; it verifies saved problems by their reference")

    def check(self, problem, answer):
        return canonical_answer(answer) == canonical_answer(problem.reference)


TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), Countdown(), Linear(), Sudoku(), ExactMatch())}
from . import traces as _traces  # noqa: E402  (registers arithmetic-trace, countdown-trace, sum-trace in TASKS)


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise ParScaleError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def write_training_corpus(task: str | Task, n: int, seed: int, difficulty: int | None,
                          path: str | os.PathLike, *, exclude: Iterable[str] = ()) -> Path:
    """JSONL of ``{"text": training_text}`` for n generated problems, written atomically."""
    t = get_task(task)
    problems = t.make_problems(n, seed, difficulty, exclude=exclude)
    lines = [json.dumps({"text": t.training_text(p)}) for p in problems]
    path = Path(path)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def load_problems(path: str | os.PathLike, task: str | Task = "exact") -> list[Problem]:
    """User problems from JSONL, one object per line, for ``parscale sample --problems FILE``.

    A line is either a saved ``Problem`` (``id``, ``task``, ``prompt``, ``reference``, ``meta``:
    what ``parscale tasks --eval-out`` writes) or a plain ``{"question": ..., "answer": ...}``
    (also ``prompt`` instead of ``question``: the prompt as it is; ``reference`` instead of
    ``answer``; optional ``meta``). Plain questions are rendered as ``"Q: <question>\\nA:"``.
    Every problem's own reference answer must pass ``task``'s verifier, so a task that needs
    parameters in ``meta`` (arithmetic's operands, ...) refuses problems that lack them.
    """
    from ..paths import jsonl_objects, read_text_file

    t = get_task(task)
    where = f"--problems {path}"
    text = read_text_file(path, where)
    problems: list[Problem] = []
    for lineno, obj in jsonl_objects(text, where):
        if not isinstance(obj, dict):
            raise ParScaleError(f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if "task" in obj and "id" in obj:  # a saved Problem
            try:
                p = Problem.from_dict(obj)
            except ParScaleError as e:
                raise ParScaleError(f"{where}:{lineno}: {e}") from None
            if p.task != t.name:
                raise ParScaleError(f"{where}:{lineno}: problem of task {p.task!r}, but --task is {t.name!r}")
            p = Problem(len(problems), p.task, p.prompt, p.reference, p.meta)
        else:
            unknown = sorted(set(obj) - {"question", "prompt", "answer", "reference", "meta", "id"})
            if unknown:
                raise ParScaleError(f"{where}:{lineno}: unknown field(s) {', '.join(unknown)} (expected "
                                    "question or prompt, answer or reference, meta)")
            prompt = obj.get("prompt")
            if prompt is None and isinstance(obj.get("question"), str):
                prompt = t.prompt(obj["question"])
            reference = obj.get("answer", obj.get("reference"))
            if not isinstance(prompt, str) or not prompt.strip():
                raise ParScaleError(f"{where}:{lineno}: needs a non-empty string 'question' or 'prompt'")
            if not isinstance(reference, (str, int, float)) or isinstance(reference, bool):
                raise ParScaleError(f"{where}:{lineno}: needs the reference answer as 'answer' (a string)")
            meta = obj.get("meta", {})
            if not isinstance(meta, dict):
                raise ParScaleError(f"{where}:{lineno}: 'meta' must be an object")
            p = Problem(len(problems), t.name, prompt, str(reference), dict(meta))
        try:
            ok = t.verify(p, p.reference)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            ok = False
        if not ok:
            raise ParScaleError(f"{where}:{lineno}: task {t.name!r} cannot verify this problem's own answer "
                                f"{p.reference!r} (missing or wrong 'meta'? use --task exact for plain "
                                "question/answer pairs)")
        problems.append(p)
    if not problems:
        raise ParScaleError(f"{where}: no problems in the file")
    return problems
