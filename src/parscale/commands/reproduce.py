"""`parscale reproduce`: reproduce the parallel scaling law on this machine (a grid of tiny
training runs, the law's fit, the two-stage recipe, a report); see parscale.reproduce."""

from __future__ import annotations

import argparse
import shlex

from ..cli import HelpFormatter
from ._common import threads_type

DESCRIPTION = """\
Reproduce the parallel scaling law of Chen et al. (arXiv 2505.10475) on a CPU:

    L(N, P) = E + (A*1e9 / (N*(k*ln P + 1)))^alpha

Trains every (model size, P) of a preset on the same data and token budget, fits the law to the
held-out losses (with bootstrap intervals), runs the two-stage recipe in miniature (a P = 1 model
continued at P = 1 vs recycled into P = 4), and writes results.json, report.md and PNG plots into
--out. Each run is a normal training run in OUT/runs/NAME: running the command again skips
finished runs and resumes interrupted ones from their last checkpoint.

presets:
  quick   2 sizes x P in {1, 2, 4}, 3 MB of the stdlib; <= 10 minutes on a 2-core CPU (make demo)
  full    3 sizes x P in {1, 2, 4, 8}, the whole stdlib, 1.75M tokens per run, plus two-stage;
          about 2 hours on an idle 2-core CPU (115 min measured)
  micro   seconds; a smoke test (tiny shapes, a few steps)
"""

EPILOG = """\
examples:
  # what `make demo` runs: 5-7 minutes on a 2-core CPU, then open the report
  parscale reproduce --preset quick --out runs/reproduce-quick
  less runs/reproduce-quick/report.md

  # the real experiment (~2 h on an idle 2-core CPU); kill it any time and run the
  # same command to continue where it stopped
  parscale reproduce --preset full --out runs/reproduce-full

  # with the fair control: a P = 1 + one learned prefix run per size, shown beside every P > 1
  parscale reproduce --preset quick --baseline prefix --out runs/reproduce-quick

  # the full grid with the paper's prefix reparameterisation and the fair control
  parscale reproduce --preset full --prefix-reparam --baseline prefix --out runs/reproduce-full-reparam

  # a smoke test on your own corpus (a directory, a .jsonl or a text file)
  parscale reproduce --preset micro --data my_corpus/ --out /tmp/micro
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="reproduce the parallel scaling law on this CPU (training grid, fit, report)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="quick", metavar="quick|full|micro",
                        help="which experiment to run (see above)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (default: runs/reproduce-PRESET)")
    parser.add_argument("--threads", type=threads_type, default="auto", metavar="N|auto",
                        help="torch CPU threads per run; auto: the cores not busy with other work when "
                             "each run starts (on a shared machine, spare threads slow training down)")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="corpus instead of the preset's stdlib: a directory, .jsonl or text file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--baseline", choices=["prefix"], default=None,
                        help="prefix: add a P = 1 + one learned prefix run per size, reported beside every P > 1")
    recipe = parser.add_argument_group(
        "stream-set recipe", "override the preset's recipe for every P > 1 and prefix-baseline run "
        "(docs/reproduction/diversity/README.md; as parscale train's flags of the same names)")
    recipe.add_argument("--prefix-reparam", action="store_true", default=None,
                        help="learn the prefixes through the paper's MLP reparameterisation "
                             "(folded into plain prefixes in every saved model)")
    recipe.add_argument("--prefix-init-std", type=float, default=None, metavar="STD",
                        help="standard deviation of the prefixes at init (default: the preset's, 0.02)")
    recipe.add_argument("--reparam-lr-scale", type=float, default=None, metavar="F",
                        help="with --prefix-reparam: its learning rate as a multiple of the preset's (default 1)")
    recipe.add_argument("--agg-init-std", type=float, default=None, metavar="STD",
                        help="std of the aggregator's output layer at init; 0 = exactly uniform (the preset's)")
    parser.set_defaults(func=run)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["parscale", "reproduce", "--preset", args.preset]
    for flag, value in (("--out", args.out), ("--threads", args.threads), ("--data", args.data),
                        ("--baseline", args.baseline)):
        if value is not None and value != "auto":
            parts += [flag, str(value)]
    if args.prefix_reparam:
        parts.append("--prefix-reparam")
    for flag, value in (("--prefix-init-std", args.prefix_init_std), ("--agg-init-std", args.agg_init_std),
                        ("--reparam-lr-scale", args.reparam_lr_scale)):
        if value is not None:
            parts += [flag, repr(value)]
    return shlex.join(parts)


def _with_recipe(preset, args: argparse.Namespace):
    """``preset`` with the recipe flags the command line gave (TrainConfig validates them when
    the runs are planned, before any work)."""
    import dataclasses

    changes = {field: getattr(args, field) for field in ("prefix_reparam", "prefix_init_std", "agg_init_std", "reparam_lr_scale")
               if getattr(args, field) is not None}
    return dataclasses.replace(preset, **changes) if changes else preset


def run(args: argparse.Namespace) -> int:
    from ..reproduce import get_preset, reproduce
    from ._common import ensure_writable_dir

    preset = _with_recipe(get_preset(args.preset), args)  # bad flags fail before anything is prepared
    ensure_writable_dir(args.out or f"runs/reproduce-{preset.name}", "--out")
    result = reproduce(preset, args.out, threads=args.threads, data=args.data, progress=not args.quiet,
                       command=_command_line(args), baseline=args.baseline)
    fit = result.fit
    print(f"parscale reproduce: {len(result.trained)} runs trained, {len(result.skipped)} already finished; "
          f"fit E = {fit.E:.4g}, A = {fit.A:.4g}, alpha = {fit.alpha:.4g}, k = {fit.k:.4g}, R^2 = {fit.r2:.4f}")
    print(f"report: {result.report_path}")
    print(f"results: {result.results_path}; plots: {', '.join(str(p) for p in result.plots.values())}")
    return 0
