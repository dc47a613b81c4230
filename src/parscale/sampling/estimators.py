"""Estimators of sample-level scaling curves from one set of n samples per problem.

All ``@k`` estimators average over **every** k-subset of the n samples (never just the first k),
i.e. they are the exact expected value for k samples drawn without replacement from the n:

* ``pass_at_k`` — unbiased pass@k of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``, in their
  numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``.
* ``maj_at_k`` — accuracy of a majority vote over a random k-subset. INVALID never wins (unless
  ``count_invalid``); a subset with no real answer scores 0. **Ties:** a vote tied between several
  answers scores the fraction of the tied answers that are correct — the expected accuracy when
  the tie is broken uniformly at random. (``majority_vote`` breaks ties deterministically towards
  the earliest sample and reports ``details["tied"]``; for exchangeable i.i.d. samples that rule
  has the same expectation.) Computed exactly with integer generating polynomials: for each
  correct answer a and each count j of a in the subset, count subsets in which every other answer
  appears fewer than j times except t answers that appear exactly j times (a t+1-way tie).
* ``bon_at_k`` — accuracy of best-of-k by score over a random k-subset, exact via order
  statistics: the subset's top score level is the level g with probability
  ``(C(L_g + E_g, k) - C(L_g, k)) / C(n, k)`` (L_g samples below it, E_g at it); ties at the top
  are broken uniformly at random, so that level contributes its fraction of correct samples.
  INVALID samples rank below every valid one (as in ``best_of_n``).

Confidence intervals: ``bootstrap_ci`` (percentile bootstrap over problems, seeded) for any
per-problem metric, and ``wilson_ci`` for a plain accuracy.

``score_sample_set`` applies all of it to a saved ``SampleSet`` (what ``parscale score`` prints).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import numpy as np

from ..errors import ParScaleError
from .answers import INVALID, Invalid, extract_answers, get_extractor
from .records import SampleSet


def _check_k(n: int, k: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ParScaleError(f"{what}: k must be an integer >= 1 (got {k!r})")
    if k > n:
        raise ParScaleError(f"{what}: k={k} is larger than the number of samples n={n}")


# ----------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (of n, c correct) is correct."""
    _check_k(n, k, "pass@k")
    if not 0 <= c <= n:
        raise ParScaleError(f"pass@k: correct count c={c} must be in [0, n={n}]")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ----------------------------------------------------------------------------- maj@k
def _answer_table(answers: Sequence[str | Invalid], correct: Sequence[bool],
                  count_invalid: bool) -> tuple[dict[Any, int], dict[Any, bool], int]:
    """Counts per voting answer, their correctness, and the number of non-voting samples."""
    if len(answers) != len(correct):
        raise ParScaleError(f"{len(answers)} answers but {len(correct)} correctness flags")
    counts: Counter = Counter()
    is_right: dict[Any, bool] = {}
    silent = 0
    for a, ok in zip(answers, correct):
        if a is None:
            raise ParScaleError("an answer is None (run extract_answers first)")
        if a is INVALID:
            if ok:
                raise ParScaleError("an INVALID answer is marked correct")
            if not count_invalid:
                silent += 1
                continue
        if is_right.setdefault(a, bool(ok)) != bool(ok):
            raise ParScaleError(f"answer {a!r} is marked both correct and incorrect")
        counts[a] += 1
    return dict(counts), is_right, silent


def _win_share(own: int, others: Sequence[int], free: int, n: int, k: int) -> Fraction:
    """Expected share of the win for one answer with ``own`` samples, over all k-subsets.

    ``others``: sample counts of the competing answers; ``free``: samples that never compete
    (INVALID). A t+1-way tie gives each tied answer 1/(t+1).
    """
    total = Fraction(0)
    for j in range(1, min(own, k) + 1):
        rest = k - j
        below = free + sum(c for c in others if c < j)  # can be picked freely: never reach j
        rivals = [c for c in others if c >= j]
        t_max = min(len(rivals), rest // j)
        # poly[x, t]: ways to pick x samples from the processed groups with t rivals at exactly j
        poly = np.zeros((rest + 1, t_max + 1), dtype=object)
        poly[:, 0] = [math.comb(below, x) for x in range(rest + 1)]
        for c in rivals:
            new = np.zeros_like(poly)
            for i in range(min(j - 1, rest) + 1):  # this rival below j
                new[i:, :] += math.comb(c, i) * poly[: rest + 1 - i, :]
            if j <= rest and t_max >= 1:  # this rival ties at exactly j
                new[j:, 1:] += math.comb(c, j) * poly[: rest + 1 - j, :-1]
            poly = new
        ways = sum(Fraction(int(poly[rest, t]), t + 1) for t in range(t_max + 1))
        total += math.comb(own, j) * ways
    return total / math.comb(n, k)


def maj_at_k_exact(answers: Sequence[str | Invalid], correct: Sequence[bool], k: int, *,
                   count_invalid: bool = False) -> Fraction:
    """``maj_at_k`` as an exact fraction."""
    n = len(answers)
    _check_k(n, k, "maj@k")
    counts, is_right, silent = _answer_table(answers, correct, count_invalid)
    share_by_count: dict[int, Fraction] = {}
    result = Fraction(0)
    for a, own in counts.items():
        if not is_right[a]:
            continue
        if own not in share_by_count:  # answers with equal counts have equal shares
            others = list(counts.values())
            others.remove(own)
            share_by_count[own] = _win_share(own, others, silent, n, k)
        result += share_by_count[own]
    return result


def maj_at_k(answers: Sequence[str | Invalid], correct: Sequence[bool], k: int, *,
             count_invalid: bool = False) -> float:
    """Expected accuracy of a majority vote over a uniformly random k-subset (see module doc).

    ``answers[i]`` is sample i's extracted answer, ``correct[i]`` whether it is right (equal
    answers must agree; INVALID must be incorrect).
    """
    return float(maj_at_k_exact(answers, correct, k, count_invalid=count_invalid))


# ----------------------------------------------------------------------------- best-of-N@k
def bon_at_k_exact(scores: Sequence[float], correct: Sequence[bool], k: int,
                   valid: Sequence[bool] | None = None) -> Fraction:
    n = len(scores)
    _check_k(n, k, "bon@k")
    if len(correct) != n or (valid is not None and len(valid) != n):
        raise ParScaleError("bon@k: scores, correct and valid must have one entry per sample")
    valid = [True] * n if valid is None else [bool(v) for v in valid]
    keys = []
    for s, ok, v in zip(scores, correct, valid):
        if s is None or math.isnan(float(s)):
            raise ParScaleError(f"bon@k: every sample needs a score (got {s!r})")
        if ok and not v:
            raise ParScaleError("bon@k: an INVALID sample is marked correct")
        keys.append((v, float(s)))  # invalid samples rank below every valid one
    levels: dict[tuple[bool, float], list[int]] = {}
    for key, ok in zip(keys, correct):
        levels.setdefault(key, [0, 0])
        levels[key][0] += 1
        levels[key][1] += bool(ok)
    total, below = Fraction(0), 0
    for key in sorted(levels):
        size, right = levels[key]
        p_top = math.comb(below + size, k) - math.comb(below, k)
        total += Fraction(p_top * right, size)
        below += size
    return total / math.comb(n, k)


def bon_at_k(scores: Sequence[float], correct: Sequence[bool], k: int,
             valid: Sequence[bool] | None = None) -> float:
    """Expected accuracy of the top-scored sample of a uniformly random k-subset (see module doc)."""
    return float(bon_at_k_exact(scores, correct, k, valid))


# ----------------------------------------------------------------------------- intervals
@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    level: float = 0.95
    method: str = ""

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_ci(values: Sequence[float], *, statistic: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap over the entries (problems) of ``values``; seeded, so reproducible."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ParScaleError("bootstrap needs a non-empty list of per-problem values")
    if not 0 < level < 1:
        raise ParScaleError(f"confidence level must be in (0, 1) (got {level!r})")
    if n_boot < 1:
        raise ParScaleError(f"n_boot must be >= 1 (got {n_boot!r})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = np.array([statistic(x[row]) for row in idx]) if statistic is not np.mean else x[idx].mean(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(statistic(x)), float(lo), float(hi), level, "bootstrap")


def wilson_ci(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion."""
    if n < 1 or not 0 <= successes <= n:
        raise ParScaleError(f"Wilson interval needs 0 <= successes <= n, n >= 1 (got {successes}/{n})")
    if not 0 < level < 1:
        raise ParScaleError(f"confidence level must be in (0, 1) (got {level!r})")
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level, "wilson")


# ----------------------------------------------------------------------------- a whole SampleSet
@dataclass
class ScoreRow:
    k: int
    pass_at_k: Interval
    maj_at_k: Interval
    bon_at_k: Interval | None  # None when the samples carry no scores


@dataclass
class ScoreReport:
    task: str
    extractor: str
    strategy: str
    problems: int
    n: int  # samples per problem (the smallest count, if they differ)
    rows: list[ScoreRow]
    strategy_accuracy: Interval  # the strategy at full n per problem, Wilson interval
    invalid_rate: float  # fraction of samples with no extractable answer
    sample_accuracy: float  # fraction of samples that are correct
    cost_per_problem: dict[str, Any]  # CostLedger.per_problem: FLOPs, eFLOPs, tokens, ...
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def verify_samples(task, problem, samples) -> list[bool]:
    """Whether each sample's extracted answer is right by ``task.verify`` (each distinct answer
    verified once; INVALID is never right)."""
    verdict: dict[Any, bool] = {}
    for s in samples:
        if s.answer is None:
            raise ParScaleError(f"sample {s.index} of problem {problem.id} has no extracted answer")
        if s.answer not in verdict:
            verdict[s.answer] = s.answer is not INVALID and bool(task.verify(problem, s.answer))
    return [verdict[s.answer] for s in samples]


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks + ([n] if ks[-1] != n else [])


def score_sample_set(sset: SampleSet, *, task: str | None = None, extractor: str | Callable | None = None,
                     strategy: str = "majority", strategy_options: dict[str, Any] | None = None,
                     ks: Sequence[int] | None = None, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0, hardware: Any = "A100-80GB") -> ScoreReport:
    """Score every problem's samples with pass@k, maj@k, bon@k and the chosen strategy.

    The task is ``task`` or ``sset.meta["task"]`` or the problems' common ``task``; answers are
    re-extracted from the text with ``extractor`` (default: the task's), or taken as saved with
    ``extractor="saved"``. Mutates the samples' ``answer`` fields. ``hardware`` (a preset name
    or ``parscale.cost.Hardware``) sets the FLOP/byte ratio of the per-problem eFLOPs.
    """
    from .aggregators import get_strategy
    from .tasks import get_task

    task_name = task or sset.meta.get("task") or _common_task(sset)
    the_task = get_task(task_name)
    groups = sset.by_problem()
    if not sset.problems:
        raise ParScaleError("the sample set has no problems")
    empty = [pid for pid, g in groups.items() if not g]
    if empty:
        raise ParScaleError(f"problem {empty[0]} has no samples")
    n = min(len(g) for g in groups.values())
    ks = default_ks(n) if ks is None else list(ks)
    if not ks:
        raise ParScaleError("no k values given")
    for k in ks:
        _check_k(n, k, "--k")
    aggregate = get_strategy(strategy)
    options = dict(strategy_options or {})

    if extractor == "saved":
        extractor_name = "saved"
        missing = [s for s in sset.samples if s.answer is None]
        if missing:
            raise ParScaleError(f"extractor 'saved': sample {missing[0].index} of problem "
                                f"{missing[0].problem_id} has no saved answer")
    else:
        spec = extractor if extractor is not None else the_task.extractor
        extract = get_extractor(spec)
        extractor_name = spec if isinstance(spec, str) else getattr(extract, "__name__", "custom")
        extract_answers(sset.samples, extract)

    have_scores = all(s.score is not None for s in sset.samples)
    per_k: dict[int, dict[str, list[float]]] = {k: {"pass": [], "maj": [], "bon": []} for k in ks}
    strategy_right = 0
    invalid = right_samples = 0
    for problem in sset.problems:
        samples = groups[problem.id]
        correct = verify_samples(the_task, problem, samples)
        answers = [s.answer for s in samples]
        invalid += sum(a is INVALID for a in answers)
        right_samples += sum(correct)
        for k in ks:
            per_k[k]["pass"].append(pass_at_k(len(samples), sum(correct), k))
            per_k[k]["maj"].append(maj_at_k(answers, correct, k))
            if have_scores:
                per_k[k]["bon"].append(bon_at_k([s.score for s in samples], correct, k,
                                                [a is not INVALID for a in answers]))
        decision = aggregate(samples, **options)
        strategy_right += decision.answer is not INVALID and bool(the_task.verify(problem, decision.answer))

    def ci(values: list[float]) -> Interval:
        return bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed)

    rows = [ScoreRow(k, ci(v["pass"]), ci(v["maj"]), ci(v["bon"]) if have_scores else None)
            for k, v in per_k.items()]
    n_problems, n_samples = len(sset.problems), len(sset.samples)
    return ScoreReport(
        task=task_name, extractor=extractor_name, strategy=strategy, problems=n_problems, n=n, rows=rows,
        strategy_accuracy=wilson_ci(strategy_right, n_problems, level),
        invalid_rate=invalid / n_samples, sample_accuracy=right_samples / n_samples,
        cost_per_problem=sset.ledger.per_problem(n_problems, hardware), meta=dict(sset.meta))


def _common_task(sset: SampleSet) -> str:
    names = sorted({p.task for p in sset.problems})
    if len(names) != 1:
        raise ParScaleError("cannot tell which task verifies these samples "
                            f"(problems name {names or 'no task'}); pass --task")
    return names[0]
