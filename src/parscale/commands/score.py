"""``parscale score``: re-score a saved sample file (no model) with every estimator.

Prints pass@k, maj@k and (when samples carry scores) bon@k for each k, each as a mean over
problems with a bootstrap confidence interval; the chosen strategy's accuracy using all n samples
(Wilson interval); and the ledger's cost per problem, in FLOPs and in Kinetics' eFLOPs (FLOPs +
KV-cache bytes read x the hardware's FLOP/byte ratio, ``--hardware``).
"""

from __future__ import annotations

import argparse
import json

from ..errors import ParScaleError

EPILOG = """\
example:
  parscale score runs/arith_n16.jsonl --strategy majority --k 1,2,4,8,16
  parscale score runs/arith_n16.jsonl --strategy bom --min-fraction 0.3 --json > scores.json
  parscale score other.jsonl --task exact --extractor boxed
  parscale score runs/arith_n16.jsonl --scorer min_window:8 --strategy bon --k 1,4,16
  parscale score runs/arith_n16.jsonl --hardware H100     # eFLOPs at H100's FLOP/byte ratio

Answers are re-extracted from each sample's text with the task's extractor unless --extractor
is given (--extractor saved keeps the answers stored in the file).
"""


def register(subparsers) -> None:
    from ..cli import HelpFormatter
    from ..cost import HARDWARE_PRESETS
    from ..sampling.scorers import SCORERS

    p = subparsers.add_parser("score", help="re-score saved samples: pass@k, maj@k, bon@k, strategy accuracy",
                              description=__doc__, formatter_class=HelpFormatter, epilog=EPILOG)
    p.add_argument("samples", help="a sample file written by `parscale sample` (JSONL)")
    p.add_argument("--strategy", default="majority",
                   help="aggregation at full n: majority, weighted, bon, bom, verify, shortest, first")
    p.add_argument("--k", default=None, help="comma-separated k values (default: 1, 2, 4, ... up to n, and n)")
    p.add_argument("--task", default=None, help="task whose verifier decides correctness "
                   "(default: the task named in the file)")
    p.add_argument("--extractor", default=None,
                   help="answer extractor: last_number, first_line, first_line_number, boxed, "
                        "regex:PATTERN, or saved (default: the task's)")
    p.add_argument("--scorer", default=None,
                   help=f"(re)score every sample before aggregating: {' | '.join(SCORERS)} "
                        "(default: the scores saved in the file)")
    p.add_argument("--weights", default="mean_logprob", help="weighted strategy: mean_logprob or min_window")
    p.add_argument("--window", type=int, default=16, help="weighted strategy: window for min_window")
    p.add_argument("--keep", type=float, default=1.0, help="weighted strategy: fraction of most confident samples that vote")
    p.add_argument("--min-fraction", type=float, default=None, help="bom strategy: keep answers with at least this share of votes")
    p.add_argument("--top-m", type=int, default=None, help="bom strategy: keep the M most frequent answers")
    p.add_argument("--threshold", type=float, default=0.5, help="verify strategy: accept samples with score >= this")
    p.add_argument("--hardware", default="A100-80GB",
                   help="accelerator whose FLOP/byte ratio (peak FLOP/s / bandwidth) weights the KV-cache "
                        f"reads in eFLOPs: {', '.join(HARDWARE_PRESETS)}")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def parse_ks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    ks = []
    for part in text.split(","):
        part = part.strip()
        try:
            k = int(part)
        except ValueError:
            raise ParScaleError(f"--k: {part!r} is not an integer (expected e.g. 1,2,4,8)") from None
        if k < 1:
            raise ParScaleError(f"--k: k must be >= 1 (got {k})")
        if k not in ks:
            ks.append(k)
    return ks


def check_flags(args: argparse.Namespace) -> None:
    """Seeds, counts and thresholds of `score` (shared with `sample`), before any work."""
    import math

    from ._common import check_count

    if getattr(args, "seed", 0) < 0:
        raise ParScaleError(f"--seed must be >= 0 (got {args.seed})")
    if hasattr(args, "boot"):
        if args.boot < 1:
            raise ParScaleError(f"--boot must be >= 1 (got {args.boot})")
        check_count("--boot", args.boot, 8 * 64, "bootstrap resamples")
    threshold = getattr(args, "threshold", 0.5)
    if not math.isfinite(threshold):
        raise ParScaleError(f"--threshold must be a finite number (got {threshold})")


def score_hardware(name: str):
    """The ``--hardware`` preset, or a one-line error naming the flag."""
    from ..cost import get_hardware

    try:
        return get_hardware(name)
    except ParScaleError as e:
        raise ParScaleError(f"--hardware: {e}") from None


def strategy_options(args: argparse.Namespace) -> dict:
    if args.strategy == "weighted":
        return {"weights": args.weights, "window": args.window, "keep": args.keep}
    if args.strategy == "bom":
        return {"min_fraction": args.min_fraction, "top_m": args.top_m}
    if args.strategy == "verify":
        return {"threshold": args.threshold}
    return {}


def run(args: argparse.Namespace) -> int:
    from ..sampling.aggregators import NEEDS_SCORES, get_strategy
    from ..sampling.estimators import score_sample_set
    from ..sampling.records import SampleSet

    from ..sampling.scorers import make_scorer, score_samples

    get_strategy(args.strategy)  # fail on a typo before reading the file
    check_flags(args)
    hardware = score_hardware(args.hardware)
    if args.scorer:
        make_scorer(args.scorer, task=args.task or "exact")  # the spec itself; the task comes later
    ks = parse_ks(args.k)
    sset = SampleSet.load_jsonl(args.samples)
    if args.scorer:
        task = args.task or sset.meta.get("task") or None
        score_samples(sset, args.scorer, task=task, extractor=args.extractor)
    if args.strategy in NEEDS_SCORES and any(s.score is None for s in sset.samples):
        raise ParScaleError(f"--strategy {args.strategy} needs sample scores, and {args.samples} has samples "
                            "without one: add --scorer (e.g. mean_logprob, min_window:16, verifier)")
    report = score_sample_set(sset, task=args.task, extractor=args.extractor, strategy=args.strategy,
                              strategy_options=strategy_options(args), ks=ks, n_boot=args.boot,
                              level=args.level, seed=args.seed, hardware=hardware)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return 0
    print_report(report, args.samples, args.level)
    return 0


def print_report(report, label, level: float) -> None:
    """The human-readable table of a ScoreReport (shared with `parscale sample`)."""
    pct = f"{round(100 * level)}%"
    print(f"{label}: {report.problems} problems x n={report.n} samples, task {report.task}, "
          f"extractor {report.extractor}")
    print(f"samples correct {report.sample_accuracy:.4f}, no answer (INVALID) {report.invalid_rate:.4f}")
    header = f"{'k':>5}  {'pass@k':>26}  {'maj@k':>26}"
    if any(r.bon_at_k for r in report.rows):
        header += f"  {'bon@k':>26}"
    print(f"estimates with {pct} bootstrap intervals over problems:")
    print(header)
    for r in report.rows:
        line = f"{r.k:>5}  {str(r.pass_at_k):>26}  {str(r.maj_at_k):>26}"
        if r.bon_at_k:
            line += f"  {str(r.bon_at_k):>26}"
        print(line)
    print(f"strategy {report.strategy} at full n: accuracy {report.strategy_accuracy} ({pct} Wilson)")
    c = report.cost_per_problem
    print(f"cost per problem: {c['tokens']:.1f} tokens ({c['prompt_tokens']:.1f} prompt + "
          f"{c['generated_tokens']:.1f} generated), {c['row_steps']:.1f} row-steps, "
          f"{c['decode_steps']:.1f} decode steps, {c['flops']:.3g} FLOPs, {c['wall_s']:.3f} s "
          f"(P={c['streams']})")
    if c.get("eflops") is None:
        print("eFLOPs per problem: not recorded (the file predates the ledger's kv_read_bytes)")
    else:
        print(f"eFLOPs per problem: {c['eflops']:.3g} = {c['flops']:.3g} FLOPs + "
              f"{c['kv_read_bytes']:.3g} KV-cache bytes read x {c['flop_per_byte']:.0f} FLOP/byte "
              f"({c['hardware']}; Kinetics' memory-aware cost)")
