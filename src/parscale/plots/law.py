"""Plots of the parallel scaling law: a fit against its data, and the parameter multiplier k·ln P + 1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from matplotlib.figure import Figure

from ..atomic import atomic_savefig
from ..errors import ParScaleError
from ..scaling_law import LawFit, _power_term
from .style import MARKERS, coincident, loss_label, p_axis

KLike = Union[LawFit, float]


def _band(fit: LawFit, boot, grid: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Pointwise percentile band of the law over ``grid`` at P = ``p`` from bootstrap refits."""
    samples = getattr(boot, "samples", None)
    if samples is None or len(samples) < 2:
        return None
    curves = np.array([E + _power_term(grid, p, A, alpha, k) for E, A, alpha, k in samples])
    tail = (1.0 - boot.level) / 2 * 100
    return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)


def plot_law_fit(fit: LawFit, path: str | Path, title: str | None = None, *, boot=None) -> Path:
    """Loss against N (log axis), one colour and marker per P: measured points, the fitted curve
    and, with ``boot`` (a BootstrapResult), its pointwise bootstrap band."""
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.add_subplot()
    lo, hi = float(fit.N.min()), float(fit.N.max())
    grid = np.geomspace(lo / 1.15, hi * 1.15, 200)
    ps = list(np.unique(fit.P))
    curves = [fit.predict(grid, p) for p in ps]
    # a fit with k ~ 0 gives every P the same curve: say so, and dash the later ones so all show
    same: dict[int, int] = {}  # curve index -> the first earlier curve it lies on
    for i in range(len(ps)):
        j = next((j for j in range(i) if np.allclose(curves[i], curves[j], rtol=1e-4, atol=0)), None)
        if j is not None:
            same[i] = j
    styles = ["-", "--", "-.", ":"]
    for i, p in enumerate(ps):
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        here = fit.P == p
        ax.scatter(fit.N[here], fit.loss[here], color=color, marker=marker, zorder=3, label=f"P = {p:g} (data)")
        note = f", same curve as P = {ps[same[i]]:g}" if i in same else ""
        ax.plot(grid, curves[i], color=color, lw=1.5, ls=styles[i % len(styles)] if i in same else "-",
                label=f"P = {p:g} (fit{note})")
        band = _band(fit, boot, grid, float(p)) if boot is not None and i not in same else None
        if band is not None:
            ax.fill_between(grid, *band, color=color, alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(loss_label("loss"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    constants = (f"E = {fit.E:.4g}, A = {fit.A:.4g}, α = {fit.alpha:.4g}, k = {fit.k:.4g}, "
                 f"R² = {fit.r2:.4f}")
    if boot is not None and getattr(boot, "samples", None) is not None:
        constants += f"; shaded: {boot.level:.0%} bootstrap band ({boot.n} refits)"
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
                    p_max: float = 8, title: str | None = None,
                    bands: Mapping[str, tuple[float, float]] | None = None,
                    trained_p: float | None = None) -> Path:
    """The equivalent-parameter multiplier k·ln P + 1 against P, one line per k.

    ``fits_or_k``: a LawFit or k value, a list of them (labelled by k), or a mapping
    label -> LawFit/k (e.g. {"ours": fit, "paper (Stack-V2)": 0.3935}). ``bands``: label ->
    (k_low, k_high), e.g. a bootstrap interval of k, drawn as a shaded band (k·ln P + 1 grows with
    k, so the interval of k is the interval of the multiplier at every P). ``trained_p``: the
    largest P the fits saw; beyond it the curves are dotted and the region is marked as
    extrapolation. Lines that coincide are drawn with different markers and said so in the legend.
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
    if trained_p is not None and not (np.isfinite(trained_p) and trained_p >= 1):
        raise ParScaleError(f"plot_multiplier: trained_p must be >= 1 (got {trained_p})")
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot()
    edge = min(trained_p, p_max) if trained_p is not None else p_max
    inside = np.geomspace(1.0, edge, 200)
    beyond = np.geomspace(edge, p_max, 100) if edge < p_max else None
    marks = 2.0 ** np.arange(0, int(np.floor(np.log2(p_max))) + 1)
    same = coincident([k for _, k in items])
    n = len(items)
    for i, (label, k) in enumerate(items):
        color = f"C{i % 10}"
        name = f"{label} (k = {k:.3g})" if label else f"k = {k:.3g}"
        if i in same:
            other = items[same[i]][0] or f"k = {items[same[i]][1]:.3g}"
            name += f", on top of {other}"
        lw = 1.2 + 1.2 * (n - 1 - i)  # earlier lines wider, so a coinciding later one shows inside
        ax.plot(inside, k * np.log(inside) + 1.0, color=color, lw=lw, label=name, zorder=2 + i)
        if beyond is not None:
            ax.plot(beyond, k * np.log(beyond) + 1.0, color=color, lw=lw, ls=":", zorder=2 + i)
        ax.scatter(marks, k * np.log(marks) + 1.0, color=color, zorder=3 + i, s=22,
                   marker=MARKERS[i % len(MARKERS)])
        if bands and label in bands:
            k_lo, k_hi = sorted(float(v) for v in bands[label])
            ps = np.geomspace(1.0, p_max, 200)
            ax.fill_between(ps, k_lo * np.log(ps) + 1.0, k_hi * np.log(ps) + 1.0, color=color, alpha=0.15,
                            lw=0, label=f"{label}: k interval {k_lo:.3g}–{k_hi:.3g}")
    if beyond is not None:
        ax.axvspan(edge, p_max, color="0.5", alpha=0.08, lw=0)
        ax.axvline(edge, color="0.4", lw=0.8, ls="--")
        ax.annotate(f"extrapolated\n(trained up to P = {edge:g})", (edge, 1.0), xytext=(4, 4),
                    textcoords="offset points", fontsize="x-small", color="0.3")
    p_axis(ax, marks)
    ax.set_ylabel("parameter multiplier k·ln P + 1")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "P streams act like (k·ln P + 1)× the parameters", fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
