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
examples:
  parscale score runs/arith_n16.jsonl --strategy majority --k 1,2,4,8,16
  parscale score runs/arith_n16.jsonl --strategy bom --min-fraction 0.3 --json > scores.json
  parscale score other.jsonl --task exact --extractor boxed
  parscale score runs/arith_n16.jsonl --scorer min_window:8 --strategy bon --k 1,4,16
  parscale score runs/arith_n16.jsonl --hardware H100     # eFLOPs at H100's FLOP/byte ratio
  parscale score runs/arith_n64.jsonl --coverage-fit --coverage-predict 256 1024 --plot cov.png
      fits c(k) = exp(a*k^b) to the exact pass@k, predicts k = 256 and 1024, and checks a fit
      on k <= 16 against the measured k = 17..64
  parscale score runs/arith_n64.jsonl --noisy-verifier 0.1,0.05 --k 1,4,16,64 --out score.json
      best-of-k by a verifier with 10% false positives and 5% false negatives, against coverage

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
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="also write the report (with the coverage fit and noisy verifier) as JSON, atomically")
    cov = p.add_argument_group("coverage law (Large Language Monkeys): c(k) = exp(a*k^b)")
    cov.add_argument("--coverage-fit", action="store_true",
                     help="fit the exponentiated power law to the exact pass@k at k = 1..n, with bootstrap "
                          "intervals over problems, and check it on held-out k")
    cov.add_argument("--coverage-predict", type=int, nargs="+", default=[], metavar="K",
                     help="predict coverage at these k (any k >= 1, e.g. beyond n; implies --coverage-fit)")
    cov.add_argument("--coverage-holdout", type=int, default=4, metavar="H",
                     help="held-out check: refit on k <= n/H and compare with the measured larger k (H >= 2)")
    cov.add_argument("--plot", default=None, metavar="OUT.png",
                     help="write measured vs fitted coverage (and the noisy verifier's selection) as a PNG "
                        "(needs --coverage-fit)")
    cov.add_argument("--noisy-verifier", default=None, metavar="FP,FN",
                     help="simulate a verifier with false-positive rate FP and false-negative rate FN "
                          "(each in [0, 1], e.g. 0.1,0.05) and report best-of-k selection by it against coverage")
    cov.add_argument("--verifier-seed", type=int, default=0,
                     help="seed of the noisy verifier's per-sample draws")
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


def check_coverage_flags(args: argparse.Namespace):
    """The coverage and noisy-verifier flags, before any work: (fp, fn) or None."""
    from ..paths import ensure_writable_file
    from ..sampling.coverage import parse_noisy_verifier

    if args.coverage_predict:
        args.coverage_fit = True
    bad = [k for k in args.coverage_predict if k < 1]
    if bad:
        raise ParScaleError(f"--coverage-predict: k must be >= 1 (got {bad[0]})")
    if args.coverage_holdout < 2:
        raise ParScaleError(f"--coverage-holdout must be >= 2 (got {args.coverage_holdout})")
    noisy = None
    if args.noisy_verifier is not None:
        try:
            noisy = parse_noisy_verifier(args.noisy_verifier)
        except ParScaleError as e:
            raise ParScaleError(f"--noisy-verifier: {e}") from None
    if args.verifier_seed < 0:
        raise ParScaleError(f"--verifier-seed must be >= 0 (got {args.verifier_seed})")
    if args.plot is not None:
        if not args.coverage_fit:
            raise ParScaleError("--plot draws the coverage fit: add --coverage-fit")
        ensure_writable_file(args.plot, "--plot", suffixes=(".png",))
    if args.out is not None:
        ensure_writable_file(args.out, "--out", suffixes=(".json",))
    return noisy


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
    noisy = check_coverage_flags(args)
    if args.scorer:
        make_scorer(args.scorer, task=args.task or "exact")  # the spec itself; the task comes later
    ks = parse_ks(args.k)
    sset = SampleSet.load_jsonl(args.samples)
    if args.coverage_fit and sset.samples:  # before the (slow, for large n) estimators
        n = min(len(g) for g in sset.by_problem().values())
        if n < 2:
            raise ParScaleError(f"--coverage-fit needs n >= 2 samples per problem ({args.samples} has n={n})")
    if args.scorer:
        task = args.task or sset.meta.get("task") or None
        score_samples(sset, args.scorer, task=task, extractor=args.extractor)
    if args.strategy in NEEDS_SCORES and any(s.score is None for s in sset.samples):
        raise ParScaleError(f"--strategy {args.strategy} needs sample scores, and {args.samples} has samples "
                            "without one: add --scorer (e.g. mean_logprob, min_window:16, verifier)")
    report = score_sample_set(sset, task=args.task, extractor=args.extractor, strategy=args.strategy,
                              strategy_options=strategy_options(args), ks=ks, n_boot=args.boot,
                              level=args.level, seed=args.seed, hardware=hardware)
    coverage, selection = coverage_and_selection(sset, report, args, noisy)
    result = report.to_dict()
    if coverage is not None:
        result["coverage"] = coverage.to_dict()
    if selection is not None:
        result["noisy_verifier"] = selection.to_dict()
    if args.plot is not None:
        from ..plots.coverage import plot_coverage

        plot_coverage(coverage, args.plot, f"{report.task}: coverage law, {report.problems} problems, "
                      f"n = {report.n}", selection=selection)
    if args.out is not None:
        from ..atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print_report(report, args.samples, args.level)
    if coverage is not None:
        print_coverage(coverage)
    if selection is not None:
        print_selection(selection)
    for flag, path in (("--plot", args.plot), ("--out", args.out)):
        if path is not None:
            print(f"{flag}: wrote {path}")
    return 0


def coverage_and_selection(sset, report, args: argparse.Namespace, noisy):
    """The coverage fit and the noisy verifier's selection curve the flags ask for (or None)."""
    from ..sampling.coverage import coverage_report, noisy_verdicts, sample_correctness, selection_curve

    if not (args.coverage_fit or noisy):
        return None, None
    correct = sample_correctness(sset, report.task)  # answers were extracted by score_sample_set
    coverage = selection = None
    if args.coverage_fit:
        coverage = coverage_report(correct, predict_ks=args.coverage_predict, holdout=args.coverage_holdout,
                                   n_boot=args.boot, level=args.level, seed=args.seed)
    if noisy:
        fp, fn = noisy
        verdicts = noisy_verdicts(sset, correct, fp, fn, seed=args.verifier_seed)
        selection = selection_curve(correct, verdicts, [r.k for r in report.rows], fp=fp, fn=fn,
                                    seed=args.verifier_seed, n_boot=args.boot, level=args.level,
                                    boot_seed=args.seed)
    return coverage, selection


def print_coverage(cov) -> None:
    from ..sampling.estimators import default_ks

    pct = f"{round(100 * cov.level)}%"
    fit = cov.fit
    print(f"coverage law c(k) = exp(a*k^b), fitted on k = 1..{cov.n} by {cov.method}; {pct} intervals:")
    if fit.a is None:
        print(f"  status {fit.status}: no problem was ever solved, so coverage is 0 at every k")
    else:
        a = fit.a_ci if fit.a_ci is not None else f"{fit.a:.4f}"
        b = fit.b_ci if fit.b_ci is not None else f"{fit.b:.4f}"
        note = {"ok": "", "all_one": " (every sample right: coverage 1 at every k)",
                "flat": " (every problem all-right or all-wrong: coverage constant)"}[fit.status]
        print(f"  status {fit.status}{note}: a = {a}, b = {b}")
    for p in cov.predictions:
        seen = "" if p.measured is None else f" (measured {p.measured:.4f})"
        print(f"  predicted coverage at k = {p.k}: {p.predicted}{seen}")
    if cov.holdout_fit is None:
        print(f"  held-out check: skipped (n = {cov.n} is too small, or coverage leaves fewer than 2 "
              f"usable k below n/H)")
        return
    h = cov.holdout_fit
    ab = f"status {h.status}" if h.a is None else f"a = {h.a:.4f}, b = {h.b:.4f}"
    print(f"  held-out check: fit on k <= {cov.holdout_k_max} only ({ab}), predicting "
          f"k = {cov.holdout_k_max + 1}..{cov.n}: max |error| {cov.holdout_max_abs_error:.4f}, "
          f"mean |error| {cov.holdout_mean_abs_error:.4f}, {100 * cov.holdout_in_interval:.0f}% of measured "
          f"values inside the {pct} interval")
    shown = {p.k for p in cov.holdout} & set(default_ks(cov.n)) | {cov.holdout[0].k}
    print(f"  {'k':>6}  {'measured':>9}  {'predicted [' + pct + ']':>26}  {'error':>8}")
    for p in cov.holdout:
        if p.k in shown:
            print(f"  {p.k:>6}  {p.measured:>9.4f}  {str(p.predicted):>26}  {p.predicted.estimate - p.measured:>+8.4f}")


def print_selection(sel) -> None:
    print(f"noisy verifier FP {sel.fp:g}, FN {sel.fn:g} (seed {sel.seed}): accepted {sel.accepted_right} right "
          f"+ {sel.accepted_wrong} wrong samples, rejected {sel.rejected_right} right + {sel.rejected_wrong} wrong")
    print(f"  {'k':>5}  {'coverage (pass@k)':>26}  {'selection@k':>26}")
    for r in sel.rows:
        print(f"  {r.k:>5}  {str(r.coverage):>26}  {str(r.selection):>26}")
    print(f"  selection limit as k -> infinity (the verifier's precision): {sel.selection_limit:.4f}")


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
