"""Plots of `parscale reproduce` that the law plots (``plots/law.py``) do not cover: held-out loss
against P for each model size, the held-out loss curves of every run, and the effect of P (loss
minus the same size's P = 1 loss) during training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..atomic import atomic_savefig
from ..errors import ParScaleError
from .style import MARKERS, loss_label, p_axis, tokens_axis


# line style and marker per P, so that a size keeps one colour across its P (P = 1 solid) and
# curves that lie on top of each other still show apart
_P_STYLES = {1: "-", 2: "--", 4: "-.", 8: ":"}
_P_MARKERS = {1: "o", 2: "s", 4: "^", 8: "D"}
# the two-stage continuations: open markers, one shape per role
_ROLE_MARKERS = {"continued": "P", "recycled": "X"}


def _style(P: int) -> str | tuple:
    return _P_STYLES.get(int(P), (0, (5, 1, 1, 1)))


def _marker(P: int) -> str:
    return _P_MARKERS.get(int(P), MARKERS[int(P) % len(MARKERS)])


def _size_colors(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """One colour per size, smallest model first (``runs``: dicts with size and params)."""
    first: dict[str, float] = {}
    for r in runs:
        first[str(r["size"])] = min(first.get(str(r["size"]), math.inf), float(r.get("params", 0)))
    return {size: f"C{i % 10}" for i, size in enumerate(sorted(first, key=first.get))}


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
    colors = _size_colors(runs)  # smallest model first, the same colours as the other plots
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for size, color in colors.items():
        rs = sorted(sizes[size], key=lambda r: r["P"])
        P = np.array([r["P"] for r in rs], dtype=float)
        loss = np.array([r["val_loss"] for r in rs], dtype=float)
        n1 = min(r["params"] for r in rs)
        ax.plot(P, loss, "-", marker=MARKERS[list(colors).index(size) % len(MARKERS)], color=color,
                label=f"{size} ({n1:,.0f} params at P = 1)")
        if fit is not None:
            N = np.array([r["params"] for r in rs], dtype=float)
            ax.plot(P, fit.predict(N, P), "--", color=color, alpha=0.7)
    p_axis(ax, {int(r["P"]) for r in runs})
    ax.set_ylabel(loss_label())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "Held-out loss vs P per model size" + (" (dashed: fitted law)" if fit else ""),
                 fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")


def plot_learning_curves(runs: Sequence[Mapping[str, Any]], path: str | Path, *,
                         title: str | None = None) -> Path:
    """Held-out loss against training tokens, one line per run: one colour per size, one line
    style and marker per P (solid P = 1, dashed 2, dash-dot 4, dotted 8); the two-stage
    continuations of another run (``role`` continued / recycled) get their own markers (plus,
    cross) and say their role in the legend.

    ``runs``: dicts with ``name``, ``size``, ``P``, ``params``, optional ``role``, and ``curve``:
    ``[(tokens, loss), ...]``, where a continuation counts the tokens its model saw before (the
    caller adds them). Runs without evaluations are left out.
    """
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot()
    colors = _size_colors(runs)
    drawn = 0
    for r in runs:
        if not r.get("curve"):
            continue
        t, loss = zip(*sorted(r["curve"]))
        role = r.get("role")
        cont = role in _ROLE_MARKERS
        ax.plot(t, loss, marker=_ROLE_MARKERS[role] if cont else _marker(r["P"]), ms=6 if cont else 3.5,
                lw=1.2, color=colors[str(r["size"])], ls=_style(r["P"]),
                label=f"{r['name']} (two-stage: {role} at P = {r['P']})" if cont else r["name"])
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "no held-out evaluations logged", ha="center", va="center", transform=ax.transAxes)
    tokens_axis(ax)
    ax.set_ylabel(loss_label())
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="x-small", ncol=2 if drawn > 6 else 1)
    ax.set_title(title or "Held-out loss during training (colour: size; line style and marker: P)",
                 fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")


def plot_stream_gap(runs: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Held-out loss of every P > 1 run minus its size's P = 1 run, at each evaluation during
    training (one panel per size, one line per P; below zero: the streams help).

    Why: a final loss is one number per run; the gap over training shows whether the streams'
    effect grows, holds or fades as the models learn. ``runs``: as for ``plot_learning_curves``
    (continuations are ignored).
    """
    grid = [r for r in runs if r.get("role") not in ("continued", "recycled") and r.get("curve")]
    colors = _size_colors(grid)
    sizes = [s for s in colors if any(r["size"] == s and r["P"] == 1 for r in grid)
             and any(r["size"] == s and r["P"] > 1 for r in grid)]
    if not sizes:
        raise ParScaleError("plot_stream_gap: no size has both a P = 1 run and a P > 1 run with evaluations")
    fig = Figure(figsize=(3.2 * len(sizes) + 0.6, 3.6))
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    for ax, size in zip(axes, sizes):
        base = dict(next(r for r in grid if r["size"] == size and r["P"] == 1)["curve"])
        for r in sorted((r for r in grid if r["size"] == size and r["P"] > 1), key=lambda r: r["P"]):
            pts = sorted((t, loss - base[t]) for t, loss in r["curve"] if t in base)
            if pts:
                t, gap = zip(*pts)
                ax.plot(t, gap, marker=_marker(r["P"]), ms=3.5, color=colors[size], ls=_style(r["P"]),
                        label=f"P = {r['P']}")
        ax.axhline(0.0, color="0.4", lw=0.8)
        ax.set_title(f"{size}", fontsize="medium")
        tokens_axis(ax)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel(f"held-out loss − same size at P = 1\n(nats/token)")
    fig.suptitle(title or "Effect of P during training (below 0: the streams help)", fontsize="medium")
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
