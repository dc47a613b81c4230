"""Plots of `parscale compare`: accuracy against inference FLOPs per problem (one colour per axis
combination, one marker per method, the frontier as a step line), the frontier alone with its
points named, and accuracy against training FLOPs per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..atomic import atomic_savefig

# colour = which axes a point raises above the base; marker = how its answer was chosen
CATEGORY_COLORS = {
    "base": "black", "parameters": "C0", "streams": "C1", "samples": "C2",
    "parameters+streams": "C3", "parameters+samples": "C4", "streams+samples": "C5",
    "parameters+streams+samples": "C6",
}
METHOD_MARKERS = {"greedy": "o", "sample": "x", "majority": "^", "bom": "s", "bon": "D"}


def _errorbars(ax, pts: Sequence[Mapping[str, Any]], x: str, **kw) -> None:
    xs = [p[x] for p in pts]
    ys = [100 * p["accuracy"] for p in pts]
    lo = [100 * (p["accuracy"] - p["ci"][0]) for p in pts]
    hi = [100 * (p["ci"][1] - p["accuracy"]) for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", elinewidth=0.6, alpha=0.35, **kw)


def _frontier_line(ax, pts: Sequence[Mapping[str, Any]], x: str) -> None:
    if not pts:
        return
    xs = [p[x] for p in pts]
    ys = [100 * p["accuracy"] for p in pts]
    ax.step(xs, ys, where="post", color="grey", lw=1.2, ls="--", label="Pareto frontier", zorder=1)


def plot_inference(points: Sequence[Mapping[str, Any]], frontier_ids: Sequence[str], path: str | Path,
                   title: str = "") -> Path:
    """Accuracy vs inference FLOPs per problem (log x) for every non-oracle point."""
    real = [p for p in points if not p["oracle"]]
    fig = Figure(figsize=(8.5, 5.5), constrained_layout=True)
    ax = fig.subplots()
    _errorbars(ax, real, "inference_flops", color="grey")
    for cat, color in CATEGORY_COLORS.items():
        for method, marker in METHOD_MARKERS.items():
            sel = [p for p in real if p["category"] == cat and p["method"] == method]
            if sel:
                ax.scatter([p["inference_flops"] for p in sel], [100 * p["accuracy"] for p in sel], c=color,
                           marker=marker, s=28, zorder=3, label=f"{cat} · {method}")
    by_id = {p["id"]: p for p in real}
    _frontier_line(ax, [by_id[i] for i in frontier_ids if i in by_id], "inference_flops")
    ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per problem (prefill once + k rows of decode)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2, loc="best")
    ax.set_title(title or "accuracy vs inference compute: colour = axes raised, marker = method", fontsize=9)
    return atomic_savefig(fig, Path(path), dpi=120)


def plot_frontier(points: Sequence[Mapping[str, Any]], frontier_ids: Sequence[str], path: str | Path,
                  x: str = "inference_flops", title: str = "") -> Path:
    """The frontier of one cost alone, each point named (model, method@k)."""
    by_id = {p["id"]: p for p in points}
    pts = [by_id[i] for i in frontier_ids if i in by_id]
    fig = Figure(figsize=(8, 5), constrained_layout=True)
    ax = fig.subplots()
    _errorbars(ax, pts, x, color="black")
    _frontier_line(ax, pts, x)
    for p in pts:
        ax.scatter([p[x]], [100 * p["accuracy"]], c=CATEGORY_COLORS.get(p["category"], "grey"),
                   marker=METHOD_MARKERS.get(p["method"], "o"), s=36, zorder=3)
        ax.annotate(p["id"], (p[x], 100 * p["accuracy"]), xytext=(4, -10), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(x.replace("_", " ") + " per problem")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"Pareto frontier: accuracy vs {x.replace('_', ' ')}", fontsize=9)
    return atomic_savefig(fig, Path(path), dpi=120)


def plot_training(points: Sequence[Mapping[str, Any]], path: str | Path, title: str = "",
                  first_seed: int | None = None) -> Path:
    """Accuracy vs training FLOPs: each model's greedy point and its best sampled point (an arrow
    joins them: what samples add at no training cost). Replicas of another training seed than
    ``first_seed`` are drawn hollow, so the seed spread shows at equal training FLOPs."""
    real = [p for p in points if not p["oracle"] and p.get("train_flops")]
    fig = Figure(figsize=(7.5, 5), constrained_layout=True)
    ax = fig.subplots()
    models = list(dict.fromkeys(p["model"] for p in real))
    for i, name in enumerate(models):
        mine = [p for p in real if p["model"] == name]
        g = [p for p in mine if p["method"] == "greedy"]
        s = [p for p in mine if p["method"] not in ("greedy", "sample")]
        color = CATEGORY_COLORS.get(g[0]["category"] if g else "base", "grey")
        seed = mine[0].get("train_seed")
        replica = first_seed is not None and seed not in (None, first_seed)
        face = "none" if replica else color
        if g:
            ax.scatter([g[0]["train_flops"]], [100 * g[0]["accuracy"]], facecolors=face, edgecolors=color,
                       marker="o", s=36, zorder=3, label=f"{name} greedy" + (f" (seed {seed})" if replica else ""))
            _errorbars(ax, g, "train_flops", color=color)
        if s:
            best = max(s, key=lambda p: p["accuracy"])
            ax.scatter([best["train_flops"]], [100 * best["accuracy"]], facecolors=face, edgecolors=color,
                       marker="^", s=36, zorder=3)
            if g:
                ax.annotate("", (best["train_flops"], 100 * best["accuracy"]),
                            (g[0]["train_flops"], 100 * g[0]["accuracy"]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8})
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (3 x forward FLOPs of the trained tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "accuracy vs training compute (o greedy, ^ best sampled method)", fontsize=9)
    return atomic_savefig(fig, Path(path), dpi=120)
