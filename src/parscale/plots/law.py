"""Plots of the parallel scaling law: a fit against its data, and the parameter multiplier k·ln P + 1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from matplotlib.figure import Figure

from ..atomic import atomic_savefig
from ..errors import ParScaleError
from ..scaling_law import LawFit

KLike = Union[LawFit, float]


def plot_law_fit(fit: LawFit, path: str | Path, title: str | None = None) -> Path:
    """Loss against N (log axis), one colour per P: measured points and the fitted curve."""
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.add_subplot()
    lo, hi = float(fit.N.min()), float(fit.N.max())
    grid = np.geomspace(lo / 1.15, hi * 1.15, 200)
    for i, p in enumerate(np.unique(fit.P)):
        color = f"C{i % 10}"
        here = fit.P == p
        ax.scatter(fit.N[here], fit.loss[here], color=color, zorder=3, label=f"P = {p:g} (data)")
        ax.plot(grid, fit.predict(grid, p), color=color, lw=1.5, label=f"P = {p:g} (fit)")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    constants = (f"E = {fit.E:.4g}, A = {fit.A:.4g}, α = {fit.alpha:.4g}, k = {fit.k:.4g}, "
                 f"R² = {fit.r2:.4f}")
    ax.set_title(f"{title}\n{constants}" if title else constants, fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")


def _k_of(value: KLike) -> float:
    if isinstance(value, LawFit):
        return value.k
    try:
        k = float(value)
    except (TypeError, ValueError):
        raise ParScaleError(f"plot_multiplier: expected a LawFit or a number for k, got {value!r}") from None
    if not np.isfinite(k) or k < 0:
        raise ParScaleError(f"plot_multiplier: k must be finite and >= 0 (got {k})")
    return k


def plot_multiplier(fits_or_k: KLike | Sequence[KLike] | Mapping[str, KLike], path: str | Path, *,
                    p_max: float = 8, title: str | None = None) -> Path:
    """The equivalent-parameter multiplier k·ln P + 1 against P, one line per k.

    ``fits_or_k``: a LawFit or k value, a list of them (labelled by k), or a mapping
    label -> LawFit/k (e.g. {"ours": fit, "paper (Stack-V2)": 0.3935}).
    """
    if isinstance(fits_or_k, Mapping):
        items = [(str(label), _k_of(v)) for label, v in fits_or_k.items()]
    elif isinstance(fits_or_k, (LawFit, int, float, np.floating)):
        items = [(None, _k_of(fits_or_k))]
    else:
        items = [(None, _k_of(v)) for v in fits_or_k]
    if not items:
        raise ParScaleError("plot_multiplier: nothing to plot (no fits or k values given)")
    if not (np.isfinite(p_max) and p_max > 1):
        raise ParScaleError(f"plot_multiplier: p_max must be > 1 (got {p_max})")
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot()
    ps = np.geomspace(1.0, p_max, 200)
    marks = 2.0 ** np.arange(0, int(np.floor(np.log2(p_max))) + 1)
    for i, (label, k) in enumerate(items):
        color = f"C{i % 10}"
        name = f"{label} (k = {k:.3g})" if label else f"k = {k:.3g}"
        ax.plot(ps, k * np.log(ps) + 1.0, color=color, label=name)
        ax.scatter(marks, k * np.log(marks) + 1.0, color=color, zorder=3, s=18)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("parallel streams P")
    ax.set_ylabel("parameter multiplier k·ln P + 1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "P streams act like (k·ln P + 1)× the parameters", fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
