"""`parscale fit`: fit the parallel scaling law to the paper's losses or to your own CSV."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import HelpFormatter
from ..errors import ParScaleError

PAPER_SOURCES = {
    "paper-stack": ("stack", "Stack-V2-Python losses of the paper's runs, arXiv 2505.10475"),
    "paper-pile": ("pile", "Pile losses of the paper's runs, arXiv 2505.10475"),
}

DESCRIPTION = """\
Fit the parallel scaling law of Chen et al. (arXiv 2505.10475)

    L(N, P) = E + (A*1e9 / (N*(k*ln P + 1)))^alpha

to losses measured at N non-embedding parameters and P parallel streams, the way the paper
does: Huber loss (delta 1e-3) on log loss, L-BFGS-B from a 300-point start grid, best result kept.

--data takes paper-stack or paper-pile (the paper's 24 runs, shipped with parscale) or a CSV file
with a header row and the columns params,P,loss (any order, extra columns ignored, '#' comment
lines allowed; at least 4 rows):

    params,P,loss
    535813376,1,1.1722
    538195842,2,1.1507
    ...
"""

EPILOG = """\
examples:
  parscale fit --data paper-stack
      E = 0.6912, A = 0.01131, alpha = 0.1894, k = 0.3935, R^2 = 0.9978 (the paper's constants)
  parscale fit --data runs.csv --json --plot law.png --bootstrap 200
      one JSON object on stdout (E, A, alpha, k, r2, residuals, 95% bootstrap intervals),
      and a PNG of loss against N with the fitted curve per P
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fit the parallel scaling law L(N, P) to measured losses",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--data", required=True, metavar="paper-stack|paper-pile|FILE.csv",
                        help="the paper's data set, or a CSV with columns params,P,loss")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", metavar="OUT.png", help="also write a PNG of the data and fitted curves")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="add 95%% confidence intervals from N bootstrap refits (0: none; each refit takes ~0.05-0.1 s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --bootstrap")
    parser.set_defaults(func=run)


def _load(data: str):
    from ..scaling_law import load_csv, load_paper_data

    if data in PAPER_SOURCES:
        name, label = PAPER_SOURCES[data]
        return load_paper_data(name), f"{data} ({label})"
    return load_csv(data), data


def _notes(fit) -> list[str]:
    import numpy as np

    notes = []
    if np.unique(fit.P).size == 1:
        notes.append("all points share one P, so the data do not determine k")
    if np.unique(fit.N).size == 1:
        notes.append("all points share one N, so the data do not determine E, A and alpha separately")
    return notes


def _text_report(fit, source: str, boot, notes: list[str], plot: Path | None) -> str:
    import numpy as np

    from ..scaling_law import LAW_TEXT

    lines = [
        f"parallel scaling law  {LAW_TEXT}",
        f"data: {source}; {fit.n_points} points",
        f"fit:  sum of Huber losses (delta={fit.delta:g}) on log loss, L-BFGS-B from {fit.n_starts} grid starts",
        "",
    ]
    for name, value in fit.params.items():
        ci = ""
        if boot is not None:
            lo, hi = boot.intervals[name]
            ci = f"   [{boot.level:.0%} CI {lo:.4g} .. {hi:.4g}]"
        lines.append(f"  {name:<9} {value:<12.6g}{ci}".rstrip())
    lines.append(f"  {'R^2':<9} {fit.r2:.5f}")
    lines.append(f"  {'objective':<9} {fit.objective:.6g}")
    ps = [p for p in np.unique(fit.P) if p > 1]
    if ps:
        worth = "  ".join(f"P={p:g}: {m:.3f}x" for p, m in zip(ps, fit.multiplier(np.array(ps))))
        lines += ["", f"  P streams are worth (k*ln P + 1) x the parameters:  {worth}"]
    lines += ["", f"  {'P':>4}  {'params N':>15}  {'loss':>8}  {'predicted':>9}  {'residual':>9}  {'rel.err':>8}"]
    for row in fit.residuals():
        lines.append(f"  {row.P:>4g}  {row.N:>15,.0f}  {row.loss:>8.4f}  {row.predicted:>9.4f}  "
                     f"{row.residual:>+9.4f}  {row.relative_error:>+8.2%}")
    lines.append("  (residual = predicted - loss)")
    for note in notes:
        lines.append(f"note: {note}")
    if plot is not None:
        lines.append(f"plot written to {plot}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ParScaleError(f"--bootstrap: need 0 (off) or at least 2 resamples (got {args.bootstrap})")
    if args.seed < 0:
        raise ParScaleError(f"--seed must be >= 0 (got {args.seed})")
    from ._common import check_count

    check_count("--bootstrap", args.bootstrap, 4 * 8 * 64, "bootstrap refits")  # with --plot's band curves
    from ._common import ensure_writable_file

    plot = Path(args.plot) if args.plot else None
    if plot is not None:  # checked before the (slow) fit and bootstrap
        ensure_writable_file(plot, "--plot", suffixes=(".png",))

    from ..scaling_law import fit_law

    (N, P, loss), source = _load(args.data)
    fit = fit_law(N, P, loss)
    boot = fit.bootstrap(n=args.bootstrap, seed=args.seed) if args.bootstrap else None
    if plot is not None:
        from ..plots.law import plot_law_fit

        plot_law_fit(fit, plot, title=f"parallel scaling law fit: {args.data}", boot=boot)
    notes = _notes(fit)

    if args.json:
        out = {"data": args.data, **fit.to_dict()}
        if boot is not None:
            out["bootstrap"] = boot.to_dict()
        if plot is not None:
            out["plot"] = str(plot)
        if notes:
            out["notes"] = notes
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_text_report(fit, source, boot, notes, plot))
    return 0
