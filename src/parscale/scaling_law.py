"""The parallel scaling law and its fit to measured losses.

Chen et al., "Parallel Scaling Law for Language Models" (arXiv 2505.10475) model the loss of a
model with N non-embedding parameters run with P parallel streams as

    L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^alpha

so P streams act like multiplying the parameters by ``k·ln P + 1`` (A is in units of 1e9
parameters, as in the paper). The paper fits E, A, alpha, k by minimising the *sum* of Huber
losses (delta = 1e-3) between log(true loss) and log(predicted loss) with L-BFGS-B (all four
parameters bounded below by 1e-8), started from every point of a 3 x 5 x 5 x 4 = 300 grid; the
best of the 300 results is the fit. ``fit_law`` does the same with an analytic gradient and two
changes that make it fast and start-independent (they move the paper's constants by < 0.1 %):

* **Screen, then polish.** Every grid start first runs a few L-BFGS-B iterations
  (``screen_iters``, default 6); the ``polish`` best of those (default 3) are then run to tight
  convergence and the lowest objective wins. On the paper's data this lands on the same optimum
  as running all 300 starts to convergence (tested), with a fifth of the objective evaluations;
  on 30 simulated noisy data sets the two objectives agreed within 0.1 %, either way round.
  ``screen_iters=None`` runs every start to scipy's default convergence, as the authors' script did.
* **Tight final tolerances.** The objective is tiny (~1e-5) while scipy's default ``ftol`` is
  relative to max(|f|, 1), so a default run stops where the valley is still sloping and the
  constants depend on the start (~0.1 %). The polish uses ftol = 1e-15.

Paper constants reproduced (tests check 0.5 %): Stack-V2-Python E = 0.6912, A = 0.01131,
alpha = 0.1894, k = 0.3935, R^2 = 0.9978; Pile E = 1.2888, A = 0.1974, alpha = 0.1963, k = 0.3345,
R^2 = 0.9987.

User data (``load_csv``) is a CSV file with a header row naming at least the columns
``params,P,loss`` (any order; extra columns are ignored; lines starting with ``#`` and blank
lines are skipped)::

    # my runs
    params,P,loss
    535813376,1,1.1722
    538195842,2,1.1507

``params`` is the non-embedding parameter count N (> 0), ``P`` the number of parallel streams
(>= 1) and ``loss`` the measured loss (> 0). At least 4 rows are needed (4 law parameters).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ParScaleError

PAPER = 'Chen et al., "Parallel Scaling Law for Language Models", arXiv 2505.10475'
LAW_TEXT = "L(N, P) = E + (A*1e9 / (N*(k*ln P + 1)))^alpha"
PARAM_NAMES = ("E", "A", "alpha", "k")

# The paper's multi-start grid (A and E are given as exponents there).
PAPER_GRID: dict[str, tuple[float, ...]] = {
    "E": tuple(math.exp(v) for v in (-1.0, -0.5, 0.0)),
    "A": tuple(math.exp(v) for v in (-4.0, -2.0, 0.0, 2.0, 4.0)),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "k": (0.2, 0.4, 0.6, 0.8),
}
PAPER_DATASETS = {"stack": "stack_v2_python_loss", "pile": "pile_loss"}

_LOG_1E9 = 9.0 * math.log(10.0)
_MAX_EXPONENT = 700.0  # exp(700) ~ 1e304 is still finite: clipping here keeps overflow silent
_BOUNDS = [(1e-8, None)] * 4
_POLISH_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000, "maxfun": 20_000}


# --------------------------------------------------------------------------- the law


def _power_term(N, P, A, alpha, k):
    """(A·1e9 / (N·(k ln P + 1)))^alpha as exp(alpha·log(...)), clipped so it never over/underflows."""
    log_ratio = math.log(A) + _LOG_1E9 - np.log(N) - np.log(k * np.log(P) + 1.0)
    return np.exp(np.clip(alpha * log_ratio, -_MAX_EXPONENT, _MAX_EXPONENT))


def _as_positive(name: str, values: Any, minimum: float = 0.0, inclusive: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    bad = ~np.isfinite(arr) | ((arr < minimum) if inclusive else (arr <= minimum))
    if np.any(bad):
        first = arr[bad].flat[0]
        need = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ParScaleError(f"{name} must be finite and {need} (got {first!r})")
    return arr


def law(N, P, E: float, A: float, alpha: float, k: float) -> np.ndarray:
    """The parallel scaling law L(N, P); N and P broadcast like numpy arrays."""
    N = _as_positive("N (non-embedding parameters)", N)
    P = _as_positive("P (parallel streams)", P, minimum=1.0, inclusive=True)
    checks = [("E", E, math.isfinite(E), "finite"), ("A", A, math.isfinite(A) and A > 0, "> 0"),
              ("alpha", alpha, math.isfinite(alpha) and alpha >= 0, ">= 0"),
              ("k", k, math.isfinite(k) and k >= 0, ">= 0")]
    for name, value, ok, need in checks:
        if not ok:
            raise ParScaleError(f"law parameter {name} must be {need} (got {value!r})")
    return E + _power_term(N, P, A, alpha, k)


# --------------------------------------------------------------------------- results


@dataclass
class ResidualRow:
    """One data point next to its prediction; residual = predicted - loss (the paper's 'Error')."""

    N: float
    P: float
    loss: float
    predicted: float
    residual: float
    relative_error: float

    def to_dict(self) -> dict[str, float]:
        return {"N": self.N, "P": self.P, "loss": self.loss, "predicted": self.predicted,
                "residual": self.residual, "relative_error": self.relative_error}


@dataclass
class BootstrapResult:
    """Percentile confidence intervals from refitting resampled data.

    ``samples`` holds one row (E, A, alpha, k) per resample; ``intervals[name] = (low, high)``.
    """

    level: float
    n: int
    seed: int
    point: dict[str, float]
    samples: np.ndarray = field(repr=False)
    intervals: dict[str, tuple[float, float]]

    def std(self) -> dict[str, float]:
        return {name: float(self.samples[:, i].std(ddof=1)) for i, name in enumerate(PARAM_NAMES)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "n": self.n,
            "seed": self.seed,
            "intervals": {name: [lo, hi] for name, (lo, hi) in self.intervals.items()},
            "std": self.std(),
        }


@dataclass
class LawFit:
    """A fitted parallel scaling law together with the data it was fitted on.

    ``A`` is in the formula's units (A·1e9 parameters); ``r2`` is R^2 on the raw loss;
    ``objective`` is the paper's summed Huber loss on log-loss at the fitted constants.
    """

    E: float
    A: float
    alpha: float
    k: float
    r2: float
    objective: float
    n_points: int
    N: np.ndarray = field(repr=False)
    P: np.ndarray = field(repr=False)
    loss: np.ndarray = field(repr=False)
    delta: float = 1e-3
    n_starts: int = 0
    # Grid starts ranked by their screened objective, best first; bootstrap refits reuse the top ones.
    ranked_starts: np.ndarray = field(default_factory=lambda: np.empty((0, 4)), repr=False)

    @property
    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "k": self.k}

    def predict(self, N, P) -> np.ndarray:
        return law(N, P, self.E, self.A, self.alpha, self.k)

    def multiplier(self, P) -> np.ndarray:
        """How many times more parameters P streams are worth: k·ln P + 1."""
        P = _as_positive("P (parallel streams)", P, minimum=1.0, inclusive=True)
        return self.k * np.log(P) + 1.0

    def equivalent_params(self, N, P) -> np.ndarray:
        """Parameters a single-stream model would need to match N parameters with P streams."""
        return _as_positive("N (non-embedding parameters)", N) * self.multiplier(P)

    def residuals(self) -> list[ResidualRow]:
        predicted = self.predict(self.N, self.P)
        return [
            ResidualRow(float(n), float(p), float(y), float(q), float(q - y), float((q - y) / y))
            for n, p, y, q in zip(self.N, self.P, self.loss, predicted)
        ]

    def bootstrap(self, n: int = 200, seed: int = 0, level: float = 0.95, starts: int = 3) -> BootstrapResult:
        """Percentile CIs: resample the points with replacement ``n`` times and refit each.

        For speed a refit does not rerun the 300-point grid: it polishes from this fit's
        constants and from the ``starts`` grid points that screened best on the full data.
        """
        if n < 2:
            raise ParScaleError(f"bootstrap needs at least 2 resamples (got {n})")
        if not 0 < level < 1:
            raise ParScaleError(f"bootstrap level must be between 0 and 1 (got {level})")
        rng = np.random.default_rng(seed)
        best = np.array([self.E, self.A, self.alpha, self.k])
        initial = [best, *self.ranked_starts[:starts]]
        samples = np.empty((n, 4))
        m = self.n_points
        with _single_thread_blas(), np.errstate(under="ignore"):
            for i in range(n):
                idx = rng.integers(0, m, size=m)
                while np.unique(idx).size < 4:  # degenerate resample: too few distinct points
                    idx = rng.integers(0, m, size=m)
                objective = _make_objective(self.N[idx], self.P[idx], self.loss[idx], self.delta)
                samples[i] = _polish(objective, initial).x
        tail = (1.0 - level) / 2.0 * 100.0
        lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
        intervals = {name: (float(lo[j]), float(hi[j])) for j, name in enumerate(PARAM_NAMES)}
        return BootstrapResult(level, n, seed, self.params, samples, intervals)

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": LAW_TEXT,
            **self.params,
            "r2": self.r2 if math.isfinite(self.r2) else None,  # NaN when all losses are equal
            "objective": self.objective,
            "delta": self.delta,
            "n_points": self.n_points,
            "n_starts": self.n_starts,
            "residuals": [row.to_dict() for row in self.residuals()],
        }


# --------------------------------------------------------------------------- fitting


def _make_objective(N: np.ndarray, P: np.ndarray, loss: np.ndarray, delta: float):
    """Summed Huber loss between log(loss) and log(law) and its analytic gradient (E, A, alpha, k)."""
    log_n, ln_p, y = np.log(N), np.log(P), np.log(loss)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        E, A, alpha, k = theta
        m = k * ln_p + 1.0
        log_ratio = math.log(A) + _LOG_1E9 - log_n - np.log(m)
        exponent = alpha * log_ratio
        # Overflow needs a guard (underflow to 0 is harmless: pred >= E >= 1e-8).
        # np.minimum rather than np.clip: same result, a fraction of the call overhead.
        term = np.exp(np.minimum(exponent, _MAX_EXPONENT))
        pred = E + term
        r = y - np.log(pred)
        c = np.maximum(np.minimum(r, delta), -delta)  # Huber derivative dH/dr
        value = float(np.dot(c, r - 0.5 * c))  # = r²/2 inside ±delta, delta·(|r| - delta/2) outside
        d_pred = -c / pred  # dH/d(pred)
        w = d_pred * term
        if exponent.max() > _MAX_EXPONENT:
            w = w * (exponent <= _MAX_EXPONENT)  # where clipped, the function is flat in A, alpha, k
        grad = np.array([
            d_pred.sum(),
            alpha / A * w.sum(),
            np.dot(w, log_ratio),
            -alpha * np.dot(w, ln_p / m),
        ])
        return value, grad

    return objective


def _polish(objective, initial: Sequence[np.ndarray]):
    from scipy.optimize import minimize

    best = None
    for x0 in initial:
        res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=_BOUNDS, options=_POLISH_OPTIONS)
        if best is None or res.fun < best.fun:
            best = res
    return best


@contextlib.contextmanager
def _single_thread_blas() -> Iterator[None]:
    """Run BLAS single-threaded inside the block, restoring the previous setting after.

    scipy's L-BFGS-B calls BLAS on 4-element vectors; OpenBLAS's thread pool costs far more than
    that arithmetic (a 300-start fit measured 10x slower on a busy 2-core machine).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _grid_starts(grid: Mapping[str, Sequence[float]] | np.ndarray | None) -> np.ndarray:
    if grid is None:
        grid = PAPER_GRID
    if isinstance(grid, Mapping):
        missing = [name for name in PARAM_NAMES if name not in grid]
        if missing:
            raise ParScaleError(f"grid is missing values for {', '.join(missing)} (needs E, A, alpha, k)")
        starts = np.array(list(itertools.product(*(grid[name] for name in PARAM_NAMES))), dtype=float)
    else:
        starts = np.asarray(grid, dtype=float)
        if starts.ndim != 2 or starts.shape[1] != 4 or starts.shape[0] == 0:
            raise ParScaleError(f"grid must be a mapping of E, A, alpha, k values or an (n, 4) array (got shape {starts.shape})")
    if not np.all(np.isfinite(starts)) or np.any(starts < 0):
        raise ParScaleError("grid start values must be finite and >= 0")
    return np.maximum(starts, _BOUNDS[0][0])  # A = 0 would make log(A) undefined


def _validate_data(N, P, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N = _as_positive("N (non-embedding parameters)", N).ravel()
    P = _as_positive("P (parallel streams)", P, minimum=1.0, inclusive=True).ravel()
    loss = _as_positive("loss", loss).ravel()
    if not (N.size == P.size == loss.size):
        raise ParScaleError(f"N, P and loss must have the same length (got {N.size}, {P.size}, {loss.size})")
    if N.size < 4:
        raise ParScaleError(
            f"only {N.size} data point(s): fitting the 4 law parameters (E, A, alpha, k) needs at least 4")
    return N, P, loss


def fit_law(N, P, loss, *, delta: float = 1e-3, grid: Mapping[str, Sequence[float]] | np.ndarray | None = None,
            screen_iters: int | None = 6, polish: int = 3) -> LawFit:
    """Fit E, A, alpha, k to (N, P, loss) the way the paper does (see the module docstring).

    ``grid`` is a mapping {"E": [...], "A": [...], "alpha": [...], "k": [...]} whose product gives
    the starts, or an (n, 4) array of starts; default: the paper's 300-point grid.
    """
    from scipy.optimize import minimize

    N, P, loss = _validate_data(N, P, loss)
    if not (math.isfinite(delta) and delta > 0):
        raise ParScaleError(f"delta must be positive (got {delta})")
    if screen_iters is not None and screen_iters < 1:
        raise ParScaleError(f"screen_iters must be >= 1 or None (got {screen_iters})")
    if polish < 1:
        raise ParScaleError(f"polish must be >= 1 (got {polish})")
    starts = _grid_starts(grid)
    objective = _make_objective(N, P, loss, delta)
    options = {} if screen_iters is None else {"maxiter": screen_iters}
    # Far from the optimum tiny terms may underflow to 0, which is harmless here; keep it quiet
    # even where a caller asked numpy to warn about underflow.
    with _single_thread_blas(), np.errstate(under="ignore"):
        screened = [minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=_BOUNDS, options=options)
                    for x0 in starts]
        scores = np.array([r.fun if np.isfinite(r.fun) else np.inf for r in screened])
        order = np.argsort(scores, kind="stable")
        best = _polish(objective, [screened[i].x for i in order[:polish]])
    E, A, alpha, k = (float(v) for v in best.x)
    predicted = law(N, P, E, A, alpha, k)
    ss_res = float(np.sum((loss - predicted) ** 2))
    ss_tot = float(np.sum((loss - loss.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return LawFit(E=E, A=A, alpha=alpha, k=k, r2=r2, objective=float(best.fun), n_points=int(N.size),
                  N=N, P=P, loss=loss, delta=delta, n_starts=len(starts), ranked_starts=starts[order])


# --------------------------------------------------------------------------- data


def _read_columns(lines: Iterator[str], source: str, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Read the named numeric columns of a CSV (header row, '#' comments), checking every value."""
    header: list[str] | None = None
    index: dict[str, int] = {}
    values: dict[str, list[float]] = {name: [] for name in columns}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        row = next(csv.reader([line]))
        if header is None:
            header = [cell.strip() for cell in row]
            missing = [name for name in columns if name not in header]
            if missing:
                raise ParScaleError(
                    f"{source}: missing column {', '.join(repr(m) for m in missing)} "
                    f"(header on line {line_no} has: {', '.join(header)}; need {','.join(columns)})")
            index = {name: header.index(name) for name in columns}
            continue
        for name in columns:
            i = index[name]
            if i >= len(row) or not row[i].strip():
                raise ParScaleError(f"{source}, line {line_no}: no value in column '{name}'")
            text = row[i].strip()
            try:
                value = float(text)
            except ValueError:
                raise ParScaleError(f"{source}, line {line_no}: column '{name}' value {text!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise ParScaleError(f"{source}, line {line_no}: column '{name}' value {text!r} must be a positive number")
            if name == "P" and value < 1:
                raise ParScaleError(f"{source}, line {line_no}: P = {text} is below 1 (P counts parallel streams)")
            values[name].append(value)
    if header is None:
        raise ParScaleError(f"{source}: no header row (need columns {','.join(columns)})")
    return {name: np.array(v, dtype=float) for name, v in values.items()}


def load_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (N, P, loss) from a CSV with columns params,P,loss (see the module docstring)."""
    from .paths import read_text_file

    path = Path(path)
    if path.is_dir():
        raise ParScaleError(f"{path}: is a directory, not a CSV file")
    text = read_text_file(path, str(path))  # missing, binary, not UTF-8, a device: one line
    data = _read_columns(iter(text.splitlines()), str(path), ("params", "P", "loss"))
    n = data["loss"].size
    if n < 4:
        raise ParScaleError(
            f"{path}: only {n} data row(s); fitting the 4 law parameters (E, A, alpha, k) needs at least 4")
    return data["params"], data["P"], data["loss"]


def load_paper_data(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, P, loss) of the paper's 24 runs: name "stack" (Stack-V2-Python) or "pile"."""
    if name not in PAPER_DATASETS:
        raise ParScaleError(f"unknown paper data set {name!r} (choose from: {', '.join(PAPER_DATASETS)})")
    column = PAPER_DATASETS[name]
    text = resources.files("parscale").joinpath("resources/paper_scaling.csv").read_text(encoding="utf-8")
    data = _read_columns(iter(text.splitlines()), "paper_scaling.csv", ("params", "P", column))
    return data["params"], data["P"], data[column]
