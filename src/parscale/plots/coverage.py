"""Plot of the coverage law: measured exact coverage against k, the fitted exponentiated power
law with its bootstrap band, the held-out fit, and (optionally) selection by a noisy verifier."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..atomic import atomic_savefig
from ..sampling.coverage import CoverageFit, CoverageReport, SelectionCurve, predict_curves
from .style import MARKERS


def _band(fit: CoverageFit, grid: np.ndarray, level: float):
    if fit.boot_curves is None or len(fit.boot_curves) < 2:
        return None
    curves = predict_curves(fit.boot_curves[:, 0], fit.boot_curves[:, 1], grid)
    return np.quantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)


def plot_coverage(report: CoverageReport, path: str | os.PathLike, title: str | None = None, *,
                  selection: SelectionCurve | None = None) -> Path:
    """Coverage against k (log axis): measured points (filled where the held-out fit saw them),
    the fit on every k with its band out to the largest predicted k, the held-out fit dashed,
    and the noisy verifier's selection@k when given."""
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot()
    ks = np.arange(1, report.n + 1)
    k_top = max([report.n] + [p.k for p in report.predictions])
    grid = np.unique(np.geomspace(1, k_top, 200))
    seen = ks <= (report.holdout_k_max or report.n)
    size = 18 if report.n <= 32 else 7  # dense k: small markers, so open ones stay open
    ax.scatter(ks[seen], np.array(report.measured)[seen], color="C0", marker=MARKERS[0], s=size,
               zorder=3, label="measured (exact pass@k)")
    if not seen.all():
        ax.scatter(ks[~seen], np.array(report.measured)[~seen], facecolors="none", edgecolors="C7",
                   marker=MARKERS[0], s=size, linewidths=0.8, zorder=3,
                   label=f"measured, held out (k > {report.holdout_k_max})")
    fit = report.fit
    label = (f"fit exp(a·k^b), a={fit.a:.3g}, b={fit.b:.3g}" if fit.a is not None
             else f"fit: {fit.status}")
    ax.plot(grid, np.atleast_1d(fit.predict(grid)), color="C1", label=label)
    band = _band(fit, grid, report.level)
    if band is not None:
        ax.fill_between(grid, band[0], band[1], color="C1", alpha=0.2, linewidth=0,
                        label=f"{round(100 * report.level)}% bootstrap band")
    if report.holdout_fit is not None:
        h = report.holdout_fit
        err = report.holdout_max_abs_error
        ax.plot(grid, np.atleast_1d(h.predict(grid)), color="C2", linestyle="--",
                label=f"fit on k ≤ {report.holdout_k_max} only (max error on held-out k {err:.3f})")
    for p in report.predictions:
        if p.k > report.n:
            ax.errorbar([p.k], [p.predicted.estimate],
                        yerr=[[p.predicted.estimate - p.predicted.low], [p.predicted.high - p.predicted.estimate]],
                        color="C1", marker=MARKERS[1], capsize=3, linestyle="none")
    if selection is not None:
        sk = [r.k for r in selection.rows]
        ax.plot(sk, [r.selection.estimate for r in selection.rows], color="C3", marker=MARKERS[2],
                label=f"selection by noisy verifier (FP {selection.fp:g}, FN {selection.fn:g})")
        ax.axhline(selection.selection_limit, color="C3", linestyle=":", linewidth=1,
                   label=f"selection limit k→∞ ({selection.selection_limit:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("samples per problem k")
    ax.set_ylabel("coverage (fraction of problems solved)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"coverage law, {report.problems} problems, n = {report.n}")
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=120)
