"""The coverage law of Large Language Monkeys, and selection by an imperfect verifier.

Coverage is pass@k averaged over problems: the chance that at least one of k samples is right.
Brown et al. (2024, "Large Language Monkeys") find it grows with k as an exponentiated power law

    c(k) ≈ exp(a · k^b),   a < 0, b < 0   (equivalently  -log c = -a · k^b),

which lets one predict what more samples would buy. Here:

* :func:`coverage_matrix` — the exact pass@k (``estimators.pass_at_k``, every k-subset) of each
  problem at k = 1..n; its column means are the measured coverage curve.
* :func:`fit_coverage_law` — the fit, with percentile-bootstrap intervals over problems for a, b
  and every prediction. **Method:** weighted least squares of the straight line
  ``log(-log c) = log(-a) + b · log k``. It has a closed form, so it needs no start values and
  cannot fail to converge — every bootstrap resample is refitted the same way, thousands in
  milliseconds (a bounded nonlinear fit of c on each resample could stop anywhere). Weights come
  from the delta method, ``Var(log(-log ĉ)) ≈ Var(ĉ) / (c·log c)²``, with the Bernoulli bound
  ``Var(ĉ) <= c(1-c)/m`` over m problems: weight ``c·(log c)² / (1-c)`` (m cancels). That damps
  the points near saturation (c → 1), where log(-log c) blows small differences up without
  bound. Points with c = 1 exactly carry no information about the line and are left out.
* :func:`coverage_report` — fit on all k, predictions at larger k, and the **held-out check**:
  fit on k <= n / holdout only and compare the prediction with the measured exact pass@k at every
  larger k (absolute errors, and whether each measured value falls in the prediction's interval).
* :func:`noisy_verdicts` / :func:`selection_curve` — a verifier with false-positive rate ``fp`` and
  false-negative rate ``fn`` (one seeded draw per sample, independent of order and batching), and
  best-of-k selection by it: the sample picked uniformly among the accepted ones of a k-subset
  (among all k when none is accepted), exact over every k-subset (``estimators.bon_at_k`` with
  the 0/1 verdict as score). Against coverage it shows the paper's point: with an imperfect
  verifier, selection plateaus at the verifier's precision while coverage keeps rising.

Degenerate inputs give a clear status instead of NaN: ``all_zero`` (no problem ever solved:
coverage 0 at every k), ``all_one`` (every sample right: 1), ``flat`` (every problem all-right or
all-wrong: coverage constant, b = 0). Too few usable k is a one-line ParScaleError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import ParScaleError
from .estimators import Interval, bon_at_k, pass_at_k
from .records import SampleSet

STATUSES = ("ok", "flat", "all_zero", "all_one")


# ----------------------------------------------------------------------------- measured coverage
def _check_counts(correct: Mapping[int, Sequence[bool]]) -> int:
    if not correct:
        raise ParScaleError("coverage needs at least one problem")
    empty = [pid for pid, c in correct.items() if len(c) == 0]
    if empty:
        raise ParScaleError(f"problem {empty[0]} has no samples")
    return min(len(c) for c in correct.values())


def coverage_matrix(correct: Mapping[int, Sequence[bool]], k_max: int | None = None) -> np.ndarray:
    """Exact pass@k of each problem (rows, in the mapping's order) at k = 1..k_max (columns).

    ``correct[pid]`` lists whether each sample of problem ``pid`` is right; ``k_max`` defaults to
    the smallest sample count n (pass@k is only estimable for k <= n)."""
    n = _check_counts(correct)
    k_max = n if k_max is None else k_max
    if not 1 <= k_max <= n:
        raise ParScaleError(f"coverage: k_max={k_max} must be in [1, n={n}]")
    out = np.empty((len(correct), k_max))
    cache: dict[tuple[int, int], np.ndarray] = {}
    for row, flags in enumerate(correct.values()):
        key = (len(flags), int(sum(bool(f) for f in flags)))
        if key not in cache:
            cache[key] = np.array([pass_at_k(key[0], key[1], k) for k in range(1, k_max + 1)])
        out[row] = cache[key]
    return out


def sample_correctness(sset: SampleSet, task: str | None = None) -> dict[int, list[bool]]:
    """Whether each sample of each problem is right, by the task's verifier (answers must be
    extracted already, as ``score_sample_set`` leaves them)."""
    from .estimators import _common_task, verify_samples
    from .tasks import get_task

    the_task = get_task(task or sset.meta.get("task") or _common_task(sset))
    groups = sset.by_problem()
    return {p.id: verify_samples(the_task, p, groups[p.id]) for p in sset.problems}


# ----------------------------------------------------------------------------- the fit
@dataclass
class CoverageFit:
    """``c(k) = exp(a · k^b)`` fitted on the measured coverage at ``ks``.

    ``a``/``b`` are None only for ``all_zero`` (coverage 0: no finite a). Intervals are percentile
    bootstrap over problems (None without a bootstrap)."""

    status: str  # one of STATUSES
    a: float | None
    b: float | None
    ks: list[int]  # the k values the line was fitted on (c = 1 points excluded)
    problems: int
    a_ci: Interval | None = None
    b_ci: Interval | None = None
    boot_used: int = 0  # resamples that gave a fit (degenerate all-0 / all-1 ones count for predictions)
    boot_curves: np.ndarray | None = field(default=None, repr=False)  # (B, 2): a, b of each resample

    def predict(self, k) -> np.ndarray | float:
        """Fitted coverage at ``k`` (a number or an array)."""
        k_arr = np.asarray(k, dtype=float)
        if np.any(k_arr < 1):
            raise ParScaleError(f"coverage prediction needs k >= 1 (got {k!r})")
        out = np.zeros_like(k_arr) if self.a is None else np.exp(self.a * k_arr ** self.b)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        ci = lambda iv: None if iv is None else asdict(iv)  # noqa: E731
        return {"status": self.status, "a": self.a, "b": self.b, "ks": list(self.ks),
                "problems": self.problems, "a_ci": ci(self.a_ci), "b_ci": ci(self.b_ci),
                "boot_used": self.boot_used}


def _wls_line(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``log(-log c) = log(-a) + b·x`` per row of ``c`` (B, K) by weighted least squares.

    Returns (a, b, usable) with ``usable`` False where a row has fewer than 2 points with
    0 < c < 1 (a and b are then NaN and must not be used)."""
    valid = (c > 0) & (c < 1)
    safe = np.where(valid, c, 0.5)
    y = np.log(-np.log(safe))
    w = np.where(valid, safe * np.log(safe) ** 2 / (1 - safe), 0.0)
    sw, sx, sy = w.sum(1), (w * x).sum(1), (w * y).sum(1)
    sxx, sxy = (w * x * x).sum(1), (w * x * y).sum(1)
    den = sw * sxx - sx * sx
    usable = (valid.sum(1) >= 2) & (den > 0)
    den = np.where(usable, den, 1.0)
    b = (sw * sxy - sx * sy) / den
    intercept = (sy - b * sx) / np.where(usable, sw, 1.0)
    a = -np.exp(intercept)
    return np.where(usable, a, np.nan), np.where(usable, b, np.nan), usable


def _status(counts: np.ndarray, sizes: np.ndarray) -> str:
    if not counts.any():
        return "all_zero"
    if (counts == sizes).all():
        return "all_one"
    if ((counts == 0) | (counts == sizes)).all():
        return "flat"
    return "ok"


def _fit_rows(curves: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, usable) of each measured curve (B, K), with the degenerate ones filled in: an
    all-zero curve predicts 0 (a = -inf), an all-one curve 1 (a = b = 0), a constant one its
    constant (b = 0)."""
    a, b, usable = _wls_line(np.log(ks.astype(float)), curves)
    zero = (curves <= 0).all(1)
    one = (curves >= 1).all(1)
    const = ~zero & ~one & np.isclose(curves.max(1), curves.min(1), rtol=0, atol=1e-12)
    a = np.where(zero, -np.inf, np.where(one, 0.0, a))
    b = np.where(zero | one, 0.0, b)
    with np.errstate(divide="ignore"):
        a = np.where(const, np.log(np.clip(curves[:, 0], 1e-300, 1)), a)
    b = np.where(const, 0.0, b)
    return a, b, usable | zero | one | const


def predict_curves(a: np.ndarray, b: np.ndarray, k: np.ndarray) -> np.ndarray:
    """exp(a · k^b) for each (a, b) row and each k: (B, len(k)); a = -inf gives 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.exp(a[:, None] * np.asarray(k, float)[None, :] ** b[:, None])
    return np.where(np.isneginf(a)[:, None], 0.0, out)


def _interval(est: float, values: np.ndarray, level: float) -> Interval | None:
    values = values[np.isfinite(values)]
    if values.size < 2:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(est), float(lo), float(hi), level, "bootstrap")


def _check_boot(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ParScaleError(f"n_boot must be an integer >= 0 (got {n_boot!r})")
    if not 0 < level < 1:
        raise ParScaleError(f"confidence level must be in (0, 1) (got {level!r})")


def fit_coverage_law(correct: Mapping[int, Sequence[bool]], *, k_max: int | None = None,
                     n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> CoverageFit:
    """Fit ``c(k) = exp(a·k^b)`` to the exact coverage at k = 1..k_max (default: n), with
    bootstrap intervals over problems (``n_boot`` resamples, seeded; 0: none). See the module
    doc for the method."""
    _check_boot(n_boot, level)
    matrix = coverage_matrix(correct, k_max)
    ks = np.arange(1, matrix.shape[1] + 1)
    sizes = np.array([len(c) for c in correct.values()])
    counts = np.array([sum(bool(f) for f in c) for c in correct.values()])
    status = _status(counts, sizes)
    measured = matrix.mean(0)
    if status == "ok" and int(((measured > 0) & (measured < 1)).sum()) < 2:
        usable_ks = [int(k) for k, c in zip(ks, measured) if 0 < c < 1]
        raise ParScaleError(f"coverage fit needs at least 2 values of k with 0 < coverage < 1 "
                            f"(k <= {len(ks)} gives {usable_ks or 'none'}: coverage "
                            f"{'saturates at 1' if measured[-1] >= 1 else 'has too few k'}; "
                            f"sample more per problem or fit on more k)")
    a, b, _ = _fit_rows(measured[None, :], ks)
    a0, b0 = float(a[0]), float(b[0])
    fit_ks = [int(k) for k, c in zip(ks, measured) if 0 < c < 1] if status == "ok" else [int(k) for k in ks]
    fit = CoverageFit(status=status, a=None if math.isinf(a0) else a0, b=None if math.isinf(a0) else b0,
                      ks=fit_ks, problems=len(correct))
    if n_boot:
        rng = np.random.default_rng(seed)
        m = matrix.shape[0]
        idx = rng.integers(0, m, size=(n_boot, m))
        # each resample's curve as (multiplicity of each problem) @ matrix: B x K, never B x m x K
        weights = np.zeros((n_boot, m))
        np.add.at(weights, (np.arange(n_boot)[:, None], idx), 1.0)
        ba, bb, ok = _fit_rows(weights @ matrix / m, ks)
        fit.boot_used = int(ok.sum())
        fit.boot_curves = np.stack([ba[ok], bb[ok]], axis=1)
        if fit.a is not None:
            fit.a_ci = _interval(fit.a, ba[ok], level)
            fit.b_ci = _interval(fit.b, bb[ok], level)
    return fit


def prediction_interval(fit: CoverageFit, ks: Sequence[int], level: float = 0.95) -> list[Interval]:
    """The fitted coverage at each k with its bootstrap percentile interval (the estimate alone,
    low = high, when the fit has no bootstrap)."""
    ks = np.asarray(list(ks), dtype=float)
    est = np.atleast_1d(fit.predict(ks))
    if fit.boot_curves is None or len(fit.boot_curves) < 2:
        return [Interval(float(e), float(e), float(e), level, "none") for e in est]
    curves = predict_curves(fit.boot_curves[:, 0], fit.boot_curves[:, 1], ks)
    lo, hi = np.quantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return [Interval(float(e), float(l), float(h), level, "bootstrap") for e, l, h in zip(est, lo, hi)]


# ----------------------------------------------------------------------------- the report
@dataclass
class CoveragePoint:
    k: int
    measured: float | None  # exact coverage (None beyond n)
    predicted: Interval


@dataclass
class CoverageReport:
    problems: int
    n: int
    measured: list[float]  # exact coverage at k = 1..n
    fit: CoverageFit  # on every k <= n
    predictions: list[CoveragePoint]  # at the requested k (any k >= 1)
    holdout_k_max: int | None  # the held-out fit used k <= this (None: n too small to hold out)
    holdout_fit: CoverageFit | None
    holdout: list[CoveragePoint]  # every k in (holdout_k_max, n]: measured vs predicted
    level: float = 0.95
    method: str = ("weighted least squares of log(-log c) on log k, weights c*log(c)^2/(1-c); "
                   "percentile bootstrap over problems")

    @property
    def holdout_errors(self) -> list[float]:
        return [p.predicted.estimate - p.measured for p in self.holdout]

    @property
    def holdout_max_abs_error(self) -> float | None:
        return max(map(abs, self.holdout_errors)) if self.holdout else None

    @property
    def holdout_mean_abs_error(self) -> float | None:
        e = self.holdout_errors
        return sum(map(abs, e)) / len(e) if e else None

    @property
    def holdout_in_interval(self) -> float | None:
        """Share of held-out k whose measured coverage lies in the prediction's interval."""
        if not self.holdout:
            return None
        return sum(p.predicted.low <= p.measured <= p.predicted.high for p in self.holdout) / len(self.holdout)

    def to_dict(self) -> dict[str, Any]:
        return {"problems": self.problems, "n": self.n, "level": self.level, "method": self.method,
                "measured": [{"k": k, "coverage": c} for k, c in enumerate(self.measured, 1)],
                "fit": self.fit.to_dict(),
                "predictions": [asdict(p) for p in self.predictions],
                "holdout": None if self.holdout_fit is None else {
                    "k_max": self.holdout_k_max, "fit": self.holdout_fit.to_dict(),
                    "points": [dict(asdict(p), error=p.predicted.estimate - p.measured)
                               for p in self.holdout],
                    "max_abs_error": self.holdout_max_abs_error,
                    "mean_abs_error": self.holdout_mean_abs_error,
                    "share_in_interval": self.holdout_in_interval}}


def coverage_report(correct: Mapping[int, Sequence[bool]], *, predict_ks: Sequence[int] = (),
                    holdout: int = 4, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> CoverageReport:
    """The fit on every k <= n, predictions at ``predict_ks``, and the held-out check: a second
    fit on k <= max(2, n // holdout) compared with the measured coverage at every larger k
    (skipped when n < 3, or when that fit is degenerate for too few usable k)."""
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 2:
        raise ParScaleError(f"coverage holdout must be an integer >= 2: fit on k <= n/holdout (got {holdout!r})")
    for k in predict_ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ParScaleError(f"coverage prediction needs integers k >= 1 (got {k!r})")
    n = _check_counts(correct)
    if n < 2:
        raise ParScaleError(f"coverage fit needs n >= 2 samples per problem (got n={n})")
    matrix = coverage_matrix(correct)
    measured = [float(c) for c in matrix.mean(0)]
    fit = fit_coverage_law(correct, n_boot=n_boot, level=level, seed=seed)
    preds = [CoveragePoint(int(k), measured[k - 1] if k <= n else None, iv)
             for k, iv in zip(predict_ks, prediction_interval(fit, predict_ks, level))]
    k_hold = max(2, n // holdout)
    hold_fit, hold_pts = None, []
    if k_hold < n:
        try:
            hold_fit = fit_coverage_law(correct, k_max=k_hold, n_boot=n_boot, level=level, seed=seed)
        except ParScaleError:  # too few usable k at small k: no held-out check, said in the report
            hold_fit = None
        if hold_fit is not None:
            later = list(range(k_hold + 1, n + 1))
            hold_pts = [CoveragePoint(k, measured[k - 1], iv)
                        for k, iv in zip(later, prediction_interval(hold_fit, later, level))]
    return CoverageReport(problems=len(correct), n=n, measured=measured, fit=fit, predictions=preds,
                          holdout_k_max=k_hold if hold_fit is not None else None,
                          holdout_fit=hold_fit, holdout=hold_pts, level=level)


# ----------------------------------------------------------------------------- imperfect verifier
def parse_noisy_verifier(text: str) -> tuple[float, float]:
    """``"FP,FN"`` (e.g. ``"0.1,0.05"``) -> (false-positive rate, false-negative rate), each in
    [0, 1]; one-line error otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ParScaleError(f"noisy verifier: expected FP,FN (two rates, e.g. 0.1,0.05), got {text!r}")
    rates = []
    for name, part in zip(("false-positive", "false-negative"), parts):
        try:
            r = float(part)
        except ValueError:
            raise ParScaleError(f"noisy verifier: {name} rate {part!r} is not a number") from None
        if not 0 <= r <= 1:  # also rejects nan
            raise ParScaleError(f"noisy verifier: {name} rate must be in [0, 1] (got {part})")
        rates.append(r)
    return rates[0], rates[1]


def noisy_verdicts(sset_or_keys, correct: Mapping[int, Sequence[bool]], fp: float, fn: float,
                   seed: int = 0) -> dict[int, list[bool]]:
    """What a verifier with false-positive rate ``fp`` and false-negative rate ``fn`` says about
    each sample: a right sample is accepted with probability 1 - fn, a wrong one with
    probability fp. One uniform draw per sample from ``(seed, problem id, sample index)``, so the
    verdict of a sample does not depend on the order or on the other samples.

    ``sset_or_keys`` is the SampleSet the flags came from (its samples' indices are used) or a
    mapping problem id -> sample indices aligned with ``correct``."""
    for name, r in (("fp", fp), ("fn", fn)):
        if not 0 <= r <= 1:
            raise ParScaleError(f"noisy verifier: {name} must be in [0, 1] (got {r!r})")
    if isinstance(sset_or_keys, SampleSet):
        groups = sset_or_keys.by_problem()
        keys = {pid: [s.index for s in groups[pid]] for pid in correct}
    else:
        keys = {pid: list(sset_or_keys[pid]) for pid in correct}
    out: dict[int, list[bool]] = {}
    for pid, flags in correct.items():
        if len(keys[pid]) != len(flags):
            raise ParScaleError(f"problem {pid}: {len(keys[pid])} sample indices for {len(flags)} flags")
        out[pid] = [noisy_verdict(ok, fp, fn, seed, pid, index) for index, ok in zip(keys[pid], flags)]
    return out


def noisy_verdict(ok: bool, fp: float, fn: float, seed: int, problem_id: int, index: int) -> bool:
    """One sample's verdict (see :func:`noisy_verdicts`): one uniform draw from
    ``(seed, problem id, sample index)``; a right sample passes when it is >= fn, a wrong one when
    it is < fp."""
    u = np.random.default_rng([seed, problem_id & 0xFFFFFFFF, index]).random()
    return bool(u >= fn) if ok else bool(u < fp)


@dataclass
class SelectionRow:
    k: int
    coverage: Interval  # pass@k: some sample of the k is right
    selection: Interval  # the verifier's pick of the k is right


@dataclass
class SelectionCurve:
    fp: float
    fn: float
    seed: int
    rows: list[SelectionRow]
    selection_limit: float  # k -> infinity: mean over problems of the verifier's precision
    accepted_right: int  # verdict counts, for the record: true / false positives and negatives
    accepted_wrong: int
    rejected_right: int
    rejected_wrong: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def selection_at_k(correct: Sequence[bool], verdicts: Sequence[bool], k: int) -> float:
    """Expected accuracy over every k-subset of picking uniformly among its accepted samples
    (among all k when the verifier accepts none)."""
    return bon_at_k([float(v) for v in verdicts], [bool(c) for c in correct], k)


def selection_curve(correct: Mapping[int, Sequence[bool]], verdicts: Mapping[int, Sequence[bool]],
                    ks: Sequence[int], *, fp: float = 0.0, fn: float = 0.0, seed: int = 0,
                    n_boot: int = 1000, level: float = 0.95, boot_seed: int = 0) -> SelectionCurve:
    """Coverage (pass@k) against best-of-k selection by the given verdicts at each k, with
    bootstrap intervals over problems, and the plateau selection reaches as k -> infinity with
    a verifier of rates ``fp``/``fn`` (``seed`` is recorded as given)."""
    from .estimators import bootstrap_ci

    n = _check_counts(correct)
    if not ks:
        raise ParScaleError("selection curve: no k values given")
    for k in ks:
        if not 1 <= k <= n:
            raise ParScaleError(f"selection curve: k={k} must be in [1, n={n}]")
    per_k: dict[int, tuple[list[float], list[float]]] = {k: ([], []) for k in ks}
    limits = []
    tally = dict(accepted_right=0, accepted_wrong=0, rejected_right=0, rejected_wrong=0)
    for pid, flags in correct.items():
        v = list(verdicts[pid])
        if len(v) != len(flags):
            raise ParScaleError(f"problem {pid}: {len(v)} verdicts for {len(flags)} samples")
        c = int(sum(map(bool, flags)))
        for k in ks:
            per_k[k][0].append(pass_at_k(len(flags), c, k))
            per_k[k][1].append(selection_at_k(flags, v, k))
        # k -> infinity: some sample is accepted, and the pick is right with the verifier's
        # precision at this problem's solve rate p, p(1-fn) / (p(1-fn) + (1-p)fp)
        p = c / len(flags)
        hits, false_hits = p * (1 - fn), (1 - p) * fp
        limits.append(hits / (hits + false_hits) if hits + false_hits > 0 else p)
        for ok, yes in zip(flags, v):
            tally[f"{'accepted' if yes else 'rejected'}_{'right' if ok else 'wrong'}"] += 1
    rows = [SelectionRow(k, bootstrap_ci(cov, n_boot=max(n_boot, 1), level=level, seed=boot_seed),
                         bootstrap_ci(sel, n_boot=max(n_boot, 1), level=level, seed=boot_seed))
            for k, (cov, sel) in per_k.items()]
    return SelectionCurve(fp=fp, fn=fn, seed=seed, rows=rows,
                          selection_limit=float(np.mean(limits)), **tally)
