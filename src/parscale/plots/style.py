"""What every parscale plot shares: the loss unit, the P axis, and markers that keep coinciding
curves apart."""

from __future__ import annotations

from collections.abc import Iterable

LOSS_UNIT = "nats/token"
# one marker per series, so two curves drawn on top of each other still show both
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def loss_label(what: str = "held-out loss") -> str:
    return f"{what} ({LOSS_UNIT})"


def p_axis(ax, ps: Iterable[float], label: str = "parallel streams P") -> None:
    """A log2 P axis with a tick at each given P, written as a plain integer (1, 2, 4, 8)."""
    from matplotlib.ticker import NullLocator

    ticks = sorted({float(p) for p in ps})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{p:g}" for p in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)


def tokens_axis(ax, label: str = "training tokens") -> None:
    """Token counts as 250k / 1.5M with few ticks, so narrow panels do not overlap their labels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def fmt(x, _pos):
        if abs(x) >= 1e6:
            return f"{x / 1e6:g}M"
        if abs(x) >= 1e3:
            return f"{x / 1e3:g}k"
        return f"{x:g}"

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
    ax.xaxis.set_major_formatter(FuncFormatter(fmt))
    ax.set_xlabel(label)


def coincident(values: list[float], rel: float = 1e-3) -> dict[int, int]:
    """For each index whose value equals (within ``rel``) an earlier one: the earlier index."""
    out: dict[int, int] = {}
    for i, v in enumerate(values):
        for j in range(i):
            if abs(v - values[j]) <= rel * max(abs(v), abs(values[j]), 1e-12):
                out[i] = j
                break
    return out
