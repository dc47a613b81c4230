"""Sample-level scaling benchmark: greedy vs majority@N vs Best-of-Majority@N, with the exact cost.

1. Trains (or reuses, if OUT/model exists) a tiny model on the arithmetic task's training text
   with `parscale.training.train` — evaluation problems are held out of the training corpus.
2. For N = 1, 2, 4, 8, 16 it samples N answers per held-out problem on the shared-prefill sampler
   and reports, per N: majority-vote accuracy, Best-of-Majority accuracy (scorer: the sample's
   mean log-prob), tokens per problem and FLOPs per problem from the run's own cost ledger; and,
   from the N = 16 run, the exact maj@k over all k-subsets next to pass@k.
3. Early stopping: the N = 16 run again with stopping policies; reports accuracy and the decode
   work / FLOPs they save relative to the full N = 16 run.

    python benchmarks/bench_sampling.py [--out runs/bench-sampling] [--problems 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from parscale.sampling import (best_of_majority, extract_answers, get_task, majority_vote, score_sample_set)
from parscale.sampling.sampler import sample_problems

from _task_model import task_model  # benchmarks/_task_model.py (this script's folder is on sys.path)

NS = [1, 2, 4, 8, 16]


def accuracy(sset, task, aggregate) -> float:
    extract_answers(sset.samples, task.extractor)
    groups = sset.by_problem()
    ok = 0
    for p in sset.problems:
        ok += task.verify(p, aggregate(groups[p.id]).answer)
    return ok / len(sset.problems)


def bom(samples):
    return best_of_majority(samples, scorer=lambda s: s.mean_logprob, top_m=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-sampling")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--difficulty", type=int, default=2)
    ap.add_argument("--train-problems", type=int, default=30000)
    ap.add_argument("--train-tokens", type=int, default=3_000_000)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    task = get_task("arithmetic")
    problems = task.make_problems(args.problems, seed=999, difficulty=args.difficulty)

    model, tok = task_model(task, out, problems, difficulty=args.difficulty, train_problems=args.train_problems,
                            train_tokens=args.train_tokens, threads=args.threads)
    common = dict(max_new_tokens=12, eos_token_id=tok.eos_id, extractor=task.extractor, batch_problems=10,
                  meta={"task": task.name})

    greedy = sample_problems(model, tok, problems, n=1, temperature=0.0, **common)
    g_acc = accuracy(greedy, task, majority_vote)
    gl = greedy.ledger.per_problem(len(problems))
    print(f"\n{len(problems)} held-out arithmetic problems (difficulty {args.difficulty}), model P={model.streams}, "
          f"{model.num_parameters(non_embedding=True):,} non-embedding params")
    print(f"greedy: accuracy {g_acc:.3f}, {gl['tokens']:.1f} tokens/problem, {gl['flops']:.3g} FLOPs/problem")

    print(f"\nsampling at temperature {args.temperature}")
    print(f"{'N':>3} {'majority':>9} {'BoM':>7} {'tokens/prob':>12} {'FLOPs/prob':>11} {'row-steps/prob':>15}")
    runs = {}
    for n in NS:
        sset = sample_problems(model, tok, problems, n=n, temperature=args.temperature, seed=1, **common)
        runs[n] = sset
        c = sset.ledger.per_problem(len(problems))
        print(f"{n:>3} {accuracy(sset, task, majority_vote):>9.3f} {accuracy(sset, task, bom):>7.3f} "
              f"{c['tokens']:>12.1f} {c['flops']:>11.3g} {c['row_steps']:>15.1f}")

    report = score_sample_set(runs[16], task=task.name, strategy="majority", ks=NS, n_boot=200)
    print("\nfrom the N=16 run, exact over all k-subsets (95% bootstrap CI over problems):")
    for r in report.rows:
        print(f"  k={r.k:>2}  pass@k {r.pass_at_k}  maj@k {r.maj_at_k}")

    full = runs[16]
    full_acc = accuracy(full, task, majority_vote)
    fc = full.ledger
    print("\nearly stopping on the N=16 run (majority over the samples that finished):")
    print(f"{'policy':>16} {'accuracy':>9} {'row-steps':>10} {'FLOPs':>10} {'saved':>7}")
    print(f"{'none':>16} {full_acc:>9.3f} {fc.row_steps:>10} {fc.flops:>10.3g} {0:>6.0%}")
    results = {"greedy": g_acc, "majority": {}, "early_stop": {}}
    for n in NS:
        results["majority"][n] = accuracy(runs[n], task, majority_vote)
    for spec in ["agree:2", "agree:3", "posterior:0.9", "first:4"]:
        sset = sample_problems(model, tok, problems, n=16, temperature=args.temperature, seed=1, policy=spec,
                               **common)
        acc = accuracy(sset, task, majority_vote)
        c = sset.ledger
        saved = 1 - c.flops / fc.flops
        results["early_stop"][spec] = {"accuracy": acc, "flops": c.flops, "row_steps": c.row_steps, "saved": saved}
        print(f"{spec:>16} {acc:>9.3f} {c.row_steps:>10} {c.flops:>10.3g} {saved:>6.0%}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out / 'results.json'}")


if __name__ == "__main__":
    main()
