"""Plot of the inference cost comparison: memory and latency increase over the base model versus
batch size, ParScale against the equal-loss dense model (two panels)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

from ..atomic import atomic_savefig
from ..cost import BatchSweep


def plot_sweep(result: BatchSweep, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the two-panel PNG for ``result`` to ``path`` atomically; returns the path."""
    path = Path(path)
    batches = result.batches
    comps = result.comparisons
    P = comps[0].parscale.streams

    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    series = [
        (ax_m, [c.memory_increase_parscale / 1e9 for c in comps],
         [c.memory_increase_dense / 1e9 for c in comps], "memory increase (GB)"),
        (ax_l, [c.latency_increase_parscale * 1e3 for c in comps],
         [c.latency_increase_dense * 1e3 for c in comps], "latency increase (ms)"),
    ]
    for ax, ps, dense, ylabel in series:
        ax.plot(batches, ps, "o-", label=f"ParScale P={P}")
        ax.plot(batches, dense, "s--", label="equal-loss dense")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_xticks(batches)
        ax.grid(alpha=0.3)
        ax.legend()
    cross = result.latency_crossover
    if cross is not None:
        ax_l.axvline(cross, color="grey", lw=0.8, ls=":")
        ax_l.annotate(f"ParScale slower from batch {cross}", (cross, ax_l.get_ylim()[1]),
                      xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=8)
    c0 = comps[0]
    tooling = "" if c0.assumptions == type(c0.assumptions)() else ", paper-tooling assumptions"
    fig.suptitle(title or f"increase over the P=1 model, {c0.hardware.name}, "
                          f"{c0.base.input_tokens}+{c0.base.output_tokens} tokens, {c0.base.dtype}"
                          f"{tooling}")

    try:
        atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
