"""Coverage-law demo: the Monkeys fit on a freshly sampled SampleSet, checked on held-out k.

1. Trains (or reuses, if OUT/train/model exists) a tiny model on the arithmetic task's training
   text (`parscale.training.train`; the evaluation problems are held out of the corpus).
2. Samples n answers per held-out problem (default 64) at temperature 1 and saves the SampleSet.
3. Fits c(k) = exp(a·k^b) to the exact pass@k at k = 1..n with bootstrap intervals over problems,
   predicts larger k, and refits on k <= n/4 and k <= n/2 to compare with the measured larger k.
4. Selection by a noisy verifier (two FP/FN settings) against coverage, and the run's FLOPs and
   eFLOPs per problem from its ledger. Writes OUT/coverage.png and OUT/results.json.

    python benchmarks/bench_coverage.py [--out /tmp/bench-coverage] [--problems 60] [--n 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import curve_fit

from parscale.plots.coverage import plot_coverage
from parscale.sampling import get_task, score_sample_set
from parscale.sampling.coverage import coverage_report, noisy_verdicts, sample_correctness, selection_curve
from parscale.sampling.estimators import default_ks
from parscale.sampling.sampler import sample_problems

from _task_model import task_model  # benchmarks/_task_model.py (this script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench-coverage")
    ap.add_argument("--problems", type=int, default=60)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--difficulty", type=int, default=2)
    ap.add_argument("--train-problems", type=int, default=30000)
    ap.add_argument("--train-tokens", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    task = get_task("arithmetic")
    problems = task.make_problems(args.problems, seed=999, difficulty=args.difficulty)
    print(f"# load at start: {os.getloadavg()[0]:.2f} (1-min), {args.threads} thread(s)")

    model, tok = task_model(task, out, problems, difficulty=args.difficulty, train_problems=args.train_problems,
                            train_tokens=args.train_tokens, threads=args.threads)

    t0 = time.perf_counter()
    sset = sample_problems(model, tok, problems, n=args.n, temperature=1.0, seed=1, max_new_tokens=12,
                           eos_token_id=tok.eos_id, extractor=task.extractor, batch_problems=4,
                           meta={"task": task.name})
    sset.save_jsonl(out / f"samples_n{args.n}.jsonl")
    print(f"sampled {args.problems} held-out problems (difficulty {args.difficulty}) x n={args.n} in "
          f"{time.perf_counter() - t0:.0f} s -> {out / f'samples_n{args.n}.jsonl'}")

    report = score_sample_set(sset, ks=default_ks(args.n), n_boot=args.boot)
    correct = sample_correctness(sset, task.name)
    c = report.cost_per_problem
    print(f"cost per problem: {c['tokens']:.1f} tokens, {c['flops']:.3g} FLOPs, {c['kv_read_bytes']:.3g} "
          f"KV bytes read, {c['eflops']:.3g} eFLOPs ({c['hardware']}, {c['flop_per_byte']:.0f} FLOP/byte)")
    print(f"samples correct {report.sample_accuracy:.4f}; majority@{args.n} {report.strategy_accuracy}")

    results: dict = {"problems": args.problems, "n": args.n, "cost_per_problem": c}
    for holdout in (4, 2):
        cov = coverage_report(correct, predict_ks=[128, 256, 1024], holdout=holdout, n_boot=args.boot)
        results[f"holdout_{holdout}"] = cov.to_dict()
        if holdout == 4:
            f = cov.fit
            print(f"\ncoverage law on k = 1..{args.n}: status {f.status}, a = {f.a_ci}, b = {f.b_ci} "
                  f"(95% bootstrap over problems, {f.boot_used} resamples)")
            for p in cov.predictions:
                print(f"  predicted coverage at k = {p.k:>4}: {p.predicted}")
            main_cov = cov
        h = cov.holdout_fit
        print(f"\nheld-out check: fit on k <= {cov.holdout_k_max} (a = {h.a:.4f}, b = {h.b:.4f}), "
              f"measured vs predicted at k = {cov.holdout_k_max + 1}..{args.n}: max |error| "
              f"{cov.holdout_max_abs_error:.4f}, mean |error| {cov.holdout_mean_abs_error:.4f}, "
              f"{100 * cov.holdout_in_interval:.0f}% inside the 95% interval")
        shown = set(default_ks(args.n)) | {cov.holdout_k_max + 1}
        for p in cov.holdout:
            if p.k in shown:
                print(f"  k = {p.k:>3}  measured {p.measured:.4f}  predicted {p.predicted}  "
                      f"error {p.predicted.estimate - p.measured:+.4f}")

    # The fitting method, checked: the same held-out fit (k <= n/4) by a bounded nonlinear least
    # squares on c itself (scipy) and by unweighted least squares on log(-log c).
    kmax = main_cov.holdout_k_max
    kk = np.arange(1, kmax + 1)
    cc = np.array(main_cov.measured[:kmax])
    if not ((cc > 0) & (cc < 1)).all():  # nothing solved or everything (fit status all_zero / all_one)
        print(f"\nfitting-method comparison skipped: measured coverage is 0 or 1 at some k <= {kmax}")
    else:
        x, y = np.log(kk), np.log(-np.log(cc))
        slope, intercept = np.polyfit(x, y, 1)
        (na, nb), _ = curve_fit(lambda k, a, b: np.exp(a * k ** b), kk, cc, p0=[-np.exp(intercept), slope],
                                bounds=([-100, -5], [0, 0]))
        h = main_cov.holdout_fit
        print(f"\nfitting method on k <= {kmax}, predicted coverage at k = {args.n} (measured "
              f"{main_cov.measured[-1]:.4f}):")
        for name, (a, b) in (("weighted LS of log(-log c) (ours)", (h.a, h.b)),
                             ("unweighted LS of log(-log c)", (-np.exp(intercept), slope)),
                             ("bounded nonlinear LS on c (scipy)", (na, nb))):
            print(f"  {name:>34}: a = {a:.4f}, b = {b:.4f}, c({args.n}) = {np.exp(a * args.n ** b):.4f}")

    ks = default_ks(args.n)
    results["noisy_verifier"] = {}
    plotted = None
    for fp, fn in ((0.05, 0.1), (0.2, 0.1)):
        sel = selection_curve(correct, noisy_verdicts(sset, correct, fp, fn, seed=0), ks, fp=fp, fn=fn,
                              n_boot=args.boot)
        results["noisy_verifier"][f"{fp},{fn}"] = sel.to_dict()
        print(f"\nnoisy verifier FP {fp}, FN {fn}: selection limit k -> inf {sel.selection_limit:.4f}")
        for r in sel.rows:
            print(f"  k = {r.k:>3}  coverage {r.coverage}  selection {r.selection}")
        plotted = plotted or sel
    plot_coverage(main_cov, out / "coverage.png", f"arithmetic d={args.difficulty}: coverage law, "
                  f"{args.problems} problems, n = {args.n}", selection=plotted)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten {out / 'results.json'} and {out / 'coverage.png'}")
    print(f"# load at end: {os.getloadavg()[0]:.2f} (1-min)")


if __name__ == "__main__":
    main()
