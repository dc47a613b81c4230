"""Plots of `parscale reproduce` that the law plots (``plots/law.py``) do not cover: held-out loss
against P for each model size, and the held-out loss curves of every run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..atomic import atomic_savefig
from ..errors import ParScaleError


def plot_loss_vs_streams(runs: Sequence[Mapping[str, Any]], path: str | Path, *, fit=None,
                         title: str | None = None) -> Path:
    """Held-out loss against P (log2 axis), one line per size; with ``fit`` (a LawFit) the law's
    prediction at each run's (N, P) is drawn dashed in the same colour.

    ``runs``: dicts with ``size``, ``P``, ``params`` and ``val_loss`` (results.json's runs).
    """
    if not runs:
        raise ParScaleError("plot_loss_vs_streams: no runs to plot")
    sizes: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        sizes.setdefault(str(r["size"]), []).append(r)
    # smallest model first, so colours follow size
    order = sorted(sizes, key=lambda s: min(r["params"] for r in sizes[s]))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, size in enumerate(order):
        rs = sorted(sizes[size], key=lambda r: r["P"])
        P = np.array([r["P"] for r in rs], dtype=float)
        loss = np.array([r["val_loss"] for r in rs], dtype=float)
        color = f"C{i % 10}"
        n1 = min(r["params"] for r in rs)
        ax.plot(P, loss, "o-", color=color, label=f"{size} ({n1:,.0f} params at P = 1)")
        if fit is not None:
            N = np.array([r["params"] for r in rs], dtype=float)
            ax.plot(P, fit.predict(N, P), "--", color=color, alpha=0.7)
    ax.set_xscale("log", base=2)
    ps = sorted({int(r["P"]) for r in runs})
    ax.set_xticks(ps, [str(p) for p in ps])
    ax.set_xlabel("parallel streams P")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "Held-out loss vs P per model size" + (" (dashed: fitted law)" if fit else ""),
                 fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")


def plot_learning_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
                         title: str | None = None) -> Path:
    """Held-out loss against training tokens, one line per run (``{name: [(tokens, loss), ...]}``).

    Runs without evaluations are left out. A run that continues another should count the tokens
    its model saw before (the caller adds them).
    """
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot()
    drawn = 0
    for i, (name, points) in enumerate(curves.items()):
        if not points:
            continue
        t, loss = zip(*sorted(points))
        # ten colours, then the same colours dashed (the full preset has 15 runs)
        ax.plot(t, loss, marker=".", lw=1.2, color=f"C{i % 10}", ls="-" if i < 10 else "--", label=name)
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "no held-out evaluations logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="x-small", ncol=2 if drawn > 6 else 1)
    ax.set_title(title or "Held-out loss during training", fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
