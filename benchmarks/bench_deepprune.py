"""DeepPrune benchmark on a reasoning-trace task: greedy vs majority, the judge's AUROC, and what
DeepPrune / peek save against plain majority beside the agree / posterior / first-finish stops.

1. Trains (or reuses, if OUT/train/model exists) a tiny model on the ``--task``'s training
   text with `parscale.training.train`; the held-out evaluation problems are left out.
2. Samples N = 16 on training-side problems (the first problems of the training corpus) and
   trains the DeepPrune judge on pairs of partial traces cut at fixed token counts (focal loss,
   minority oversampled); saves it to OUT/judge (safetensors + JSON).
3. On the held-out problems: greedy; plain sampling at N = 16 and 32 (majority, pass@k, and
   majority minus greedy with a paired bootstrap interval over problems); the
   judge's AUROC by truncation length on held-out pairs; then every policy at N = 16 and 32 with
   the same seeds: accuracy (majority over the rows that finished; for deepprune / peek also the
   vote that counts each kept row with the rows pruned into it), and generated tokens, decode
   row-steps and FLOPs from the run's own ledger (the policies' own work included: the judge's
   FLOPs, peek's forked rows), with the saving against plain majority at the same N.
4. The coverage law (``parscale.sampling.coverage``): fitted on k <= N/4 of the N = 32 run,
   its prediction checked at every held-out larger k; and on all k, predicted at k = 64, 128.

Costs: FLOPs from the model's cost formulas, and Kinetics' eFLOPs (FLOPs + KV-cache bytes read
× an A100's FLOP/byte), both from the ledger.

Every SampleSet is saved under OUT/samples and reused by a rerun with the same settings.

    python benchmarks/bench_deepprune.py [--out runs/bench-deepprune] [--problems 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from parscale.sampling import (SampleSet, best_of_n, extract_answers, get_task, majority_vote, weighted_vote)
from parscale.sampling.deepprune import (DeepPrune, Peek, cluster_vote_weights, collect_pairs, judge_auroc,
                                         load_judge, train_judge)
from parscale.sampling.estimators import bootstrap_ci, pass_at_k
from parscale.sampling.sampler import sample_problems

from _task_model import task_model  # benchmarks/_task_model.py (this script's folder is on sys.path)


def solved(sset: SampleSet, task, aggregate=majority_vote) -> list[bool]:
    """Per problem (in the set's order): is the aggregated answer right?"""
    extract_answers(sset.samples, task.extractor)
    groups = sset.by_problem()
    return [task.verify(p, aggregate(groups[p.id]).answer) for p in sset.problems]


def accuracy(sset: SampleSet, task, aggregate=majority_vote) -> float:
    right = solved(sset, task, aggregate)
    return sum(right) / len(right)


def confident(samples):
    """Weighted majority: each answer's votes weighted by its sample's mean token log-prob (as a
    probability, exp(mean log-prob), so every weight is in (0, 1])."""
    return weighted_vote(samples, weights=lambda s: math.exp(s.mean_logprob))


def best_logprob(samples):
    return best_of_n(samples, scorer=lambda s: s.mean_logprob)


def cluster_accuracy(sset: SampleSet, task) -> float:
    """Majority where each finished row votes with the weight of the rows pruned into it."""
    extract_answers(sset.samples, task.extractor)
    w = cluster_vote_weights(sset)
    groups = sset.by_problem()
    ok = 0
    for p in sset.problems:
        votes: dict[str, int] = {}
        for s in groups[p.id]:
            if s.answer and w[(s.problem_id, s.index)]:
                votes[s.answer] = votes.get(s.answer, 0) + w[(s.problem_id, s.index)]
        if votes:
            best = max(votes.items(), key=lambda kv: (kv[1], -min(x.index for x in groups[p.id] if x.answer == kv[0])))
            ok += task.verify(p, best[0])
    return ok / len(sset.problems)


def pass_k(sset: SampleSet, task, k: int) -> float:
    extract_answers(sset.samples, task.extractor)
    groups = sset.by_problem()
    vals = []
    for p in sset.problems:
        g = groups[p.id]
        c = sum(task.verify(p, s.answer) for s in g)
        vals.append(pass_at_k(len(g), c, k))
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-deepprune")
    ap.add_argument("--task", default="arithmetic-trace")
    ap.add_argument("--difficulty", type=int, default=4)
    ap.add_argument("--problems", type=int, default=100, help="held-out evaluation problems")
    ap.add_argument("--judge-problems", type=int, default=150, help="training-side problems for the judge")
    ap.add_argument("--train-problems", type=int, default=60000)
    ap.add_argument("--train-tokens", type=int, default=3_000_000)
    ap.add_argument("--size", default="small", help="model size preset (parscale train --size)")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of every policy run")
    ap.add_argument("--also-temperatures", default="0.5,1.0", help="plain majority@16 vs greedy at these too")
    ap.add_argument("--lengths", default="8,16,24,32,40", help="truncation lengths (tokens) for the judge")
    ap.add_argument("--every", type=int, default=8, help="deepprune / peek: decide every this many tokens")
    ap.add_argument("--pairs-per-problem", type=int, default=40, help="judge training pairs per problem and length")
    ap.add_argument("--threshold", type=float, default=0.5, help="deepprune: equivalent at this probability")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    print(f"# uptime at start: {os.popen('uptime').read().strip()}")
    task = get_task(args.task)
    d = args.difficulty
    held = task.make_problems(args.problems, seed=999, difficulty=d)
    side = task.make_problems(args.judge_problems, seed=0, difficulty=d, exclude=[p.prompt for p in held])

    # training problems: seed 0, the same stream the judge's training-side problems start with
    model, tok = task_model(task, out, held, difficulty=d, train_problems=args.train_problems,
                            train_tokens=args.train_tokens, threads=args.threads, size=args.size, seq_len=128,
                            batch_size=16, eval_every=100_000)
    budget = task.trace_budget(d)
    common = dict(max_new_tokens=budget, eos_token_id=tok.eos_id, extractor=task.extractor, batch_problems=10,
                  temperature=args.temperature, seed=1, meta={"task": task.name, "difficulty": d})
    trace_tokens = sum(len(tok.encode(task.reference_solution(p))) for p in held) / len(held)
    print(f"\n{task.name} difficulty {d}: {len(held)} held-out problems, reference traces "
          f"{trace_tokens:.1f} tokens on average (budget {budget}); model P={model.streams}, "
          f"{model.num_parameters(non_embedding=True):,} non-embedding params; temperature {args.temperature}")

    def run(name: str, problems, n: int, **kw) -> SampleSet:
        path = out / "samples" / f"{name}.jsonl"
        if path.exists():
            return SampleSet.load_jsonl(path)
        t0 = time.perf_counter()
        sset = sample_problems(model, tok, problems, n=n, **{**common, **kw})
        sset.meta["bench_wall_s"] = time.perf_counter() - t0
        sset.save_jsonl(path)
        return sset

    greedy = run("greedy", held, 1, temperature=0.0)
    g_acc = accuracy(greedy, task)
    print(f"greedy: accuracy {g_acc:.3f}")

    # ---- the judge, from training-side problems
    lengths = [int(x) for x in args.lengths.split(",")]
    judge_dir = out / "judge"
    side_set = run("judge-side-n16", side, 16)
    if not (judge_dir / "judge.json").exists():
        t0 = time.perf_counter()
        pairs = collect_pairs(side_set, task.extractor, lengths, max_pairs_per_problem=args.pairs_per_problem)
        judge = train_judge(pairs, vocab_size=model.config.vocab_size, epochs=4, log=print)
        judge.save(judge_dir)
        print(f"judge trained on {sum(len(p) for p in pairs.values()):,} pairs in {time.perf_counter() - t0:.0f} s")
    judge = load_judge(judge_dir)

    results: dict = {"greedy": g_acc, "task": task.name, "difficulty": d, "problems": len(held),
                     "temperature": args.temperature, "plain": {}, "policies": {}, "auroc": {}}
    plain = {}
    for n in (16, 32):
        plain[n] = run(f"plain-n{n}", held, n)
        acc = accuracy(plain[n], task)
        c = plain[n].ledger.per_problem(len(held))
        results["plain"][n] = {"majority": acc, "weighted": accuracy(plain[n], task, confident),
                               "best_logprob": accuracy(plain[n], task, best_logprob),
                               "pass@1": pass_k(plain[n], task, 1), f"pass@{n}": pass_k(plain[n], task, n),
                               "generated_tokens": c["generated_tokens"], "flops": c["flops"], "row_steps": c["row_steps"],
                               "eflops": c.get("eflops")}
    print(f"\n{'N':>3} {'majority':>9} {'weighted':>9} {'BoN(lp)':>8} {'pass@1':>7} {'pass@N':>7} {'gen tok/prob':>13} "
          f"{'FLOPs/prob':>11} {'eFLOPs/prob':>12}")
    for n, r in results["plain"].items():
        print(f"{n:>3} {r['majority']:>9.3f} {r['weighted']:>9.3f} {r['best_logprob']:>8.3f} {r['pass@1']:>7.3f} "
              f"{r[f'pass@{n}']:>7.3f} "
              f"{r['generated_tokens']:>13.1f} {r['flops']:>11.3g} {r['eflops'] or float('nan'):>12.3g}")

    results["majority16_by_temperature"] = {args.temperature: results["plain"][16]["majority"]}
    for temp in [float(x) for x in args.also_temperatures.split(",") if x.strip()]:
        results["majority16_by_temperature"][temp] = accuracy(run(f"plain-n16-t{temp}", held, 16, temperature=temp), task)
    print(f"\ngreedy {g_acc:.3f} vs majority@16 by temperature: " + ", ".join(
        f"T={t}: {a:.3f}" for t, a in sorted(results["majority16_by_temperature"].items())))
    # is majority measurably better than greedy? the same problems, so a paired bootstrap over them
    g_right = solved(greedy, task)
    results["majority_minus_greedy"] = {}
    for n in (16, 32):
        diff = [float(m) - float(g) for m, g in zip(solved(plain[n], task), g_right)]
        ci = bootstrap_ci(diff, n_boot=10000)
        results["majority_minus_greedy"][n] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high,
                                               "only_majority": sum(x > 0 for x in diff),
                                               "only_greedy": sum(x < 0 for x in diff)}
        print(f"majority@{n} - greedy at T={args.temperature}: {ci.estimate:+.3f} [95% paired bootstrap over "
              f"problems {ci.low:+.3f}, {ci.high:+.3f}]; solved only by majority {sum(x > 0 for x in diff)}, "
              f"only by greedy {sum(x < 0 for x in diff)} of {len(diff)}")

    held_pairs = collect_pairs(plain[32], task.extractor, lengths)
    results["auroc"] = judge_auroc(judge, held_pairs)
    print("\njudge AUROC on held-out pairs (both partial traces cut at t tokens; rows still running at t):")
    print(f"{'t':>4} {'pairs':>7} {'same answer':>12} {'AUROC':>7}")
    for t, r in results["auroc"].items():
        print(f"{t:>4} {r['pairs']:>7} {r['equivalent']:>12.3f} {r['auroc']:>7.3f}")

    e = args.every
    th = args.threshold
    # deepprune / peek: early and aggressive first, then a stricter threshold and later decisions
    specs = ["agree:3", "posterior:0.9", "first:{q}", f"deepprune:{e}:2:{th}", f"deepprune:{e}:1:{th}",
             f"deepprune:{2 * e}:2:{th}", f"deepprune:{e}:2:0.9", f"deepprune:{2 * e}:2:0.9",
             f"deepprune:{4 * e}:2:{th}", f"deepprune:{5 * e}:2:{th}", f"peek:{e}:2", f"peek:{e}:1",
             f"peek:{3 * e}:2", f"peek:{5 * e}:2"]
    for n in (16, 32):
        base, base_acc = plain[n].ledger, results["plain"][n]["majority"]
        print(f"\nN={n}: against plain majority {base_acc:.3f} ({base.generated_tokens / len(held):.1f} generated "
              f"tokens, {base.flops / len(held):.3g} FLOPs per problem)")
        print(f"{'policy':>22} {'majority':>9} {'cluster':>8} {'Δacc':>6} {'gen tok':>8} {'tok saved':>10} "
              f"{'row-steps':>10} {'FLOPs':>10} {'FLOPs saved':>12} {'eFLOPs saved':>13} {'wall s':>7}")
        for spec in specs:
            spec = spec.format(q=n // 4)
            name, *rest = spec.split(":")
            if name == "deepprune":
                policy = DeepPrune(judge, int(rest[0]), int(rest[1]), float(rest[2]), extractor=task.extractor)
            elif name == "peek":
                policy = Peek(int(rest[0]), int(rest[1]), extractor=task.extractor)
            else:
                policy = spec
            sset = run(f"{spec.replace(':', '-')}-n{n}", held, n, policy=policy)
            acc = accuracy(sset, task)
            cacc = cluster_accuracy(sset, task) if name in ("deepprune", "peek") else float("nan")
            c = sset.ledger
            row = {"majority": acc, "cluster_vote": cacc, "delta": acc - base_acc,
                   "generated_tokens": c.generated_tokens / len(held), "row_steps": c.row_steps / len(held),
                   "flops": c.flops / len(held), "tokens_saved": 1 - c.generated_tokens / base.generated_tokens,
                   "flops_saved": 1 - c.flops / base.flops, "wall_s": sset.meta.get("bench_wall_s")}
            if c.kv_recorded and base.kv_recorded:  # Kinetics' memory-aware cost (A100 FLOP/byte)
                row["eflops"] = c.eflops() / len(held)
                row["eflops_saved"] = 1 - c.eflops() / base.eflops()
            results["policies"][f"{spec}@{n}"] = row
            es = f"{row['eflops_saved']:>12.0%}" if "eflops_saved" in row else f"{'-':>12}"
            print(f"{spec:>22} {acc:>9.3f} {cacc:>8.3f} {row['delta']:>+6.3f} {row['generated_tokens']:>8.1f} "
                  f"{row['tokens_saved']:>9.0%} {row['row_steps']:>10.1f} {row['flops']:>10.3g} "
                  f"{row['flops_saved']:>11.0%} {es} {row['wall_s'] or 0:>7.1f}")

    try:  # the coverage-law fit, when it has landed (issue 18, another branch)
        from parscale.sampling import coverage  # noqa: F401
        results["coverage"] = coverage_check(plain[32], task)
    except ImportError:
        print("\n(coverage fit: parscale.sampling.coverage is not in this checkout)")
    cpu = time.process_time() - cpu_all
    results["wall_s"], results["cpu_s"] = time.perf_counter() - t_all, cpu
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwall {time.perf_counter() - t_all:.0f} s, CPU {cpu / 60:.1f} core-minutes (this process, "
          f"{args.threads} thread(s); reused files cost nothing); uptime at end: {os.popen('uptime').read().strip()}")
    print(f"written {out / 'results.json'}")


def coverage_check(sset: SampleSet, task) -> dict:
    """The coverage law fitted on k <= N/4 of ``sset``, its prediction checked at every larger k."""
    from parscale.sampling.coverage import coverage_report, sample_correctness

    extract_answers(sset.samples, task.extractor)
    rep = coverage_report(sample_correctness(sset, task.name), predict_ks=[64, 128], holdout=4, n_boot=500)
    f, h = rep.fit, rep.holdout_fit
    print(f"\ncoverage law c(k) = exp(a·k^b) on the N={rep.n} run ({rep.problems} problems; {rep.method}):")
    print(f"  fit on k <= {rep.n}: status {f.status}, a {f.a_ci or f.a}, b {f.b_ci or f.b}")
    for pt in rep.predictions:
        print(f"  predicted coverage at k={pt.k}: {pt.predicted}")
    if h is None:
        print("  held-out check: no fit on the small k (too few usable k)")
    else:
        print(f"  held-out check: fit on k <= {rep.holdout_k_max} (a {h.a:.4f}, b {h.b:.4f}), predicted vs measured:")
        for pt in rep.holdout:
            if pt.k in (rep.holdout_k_max + 1, 12, 16, 24, rep.n):
                print(f"    k={pt.k:>2}  measured {pt.measured:.4f}  predicted {pt.predicted}")
        print(f"  max |error| {rep.holdout_max_abs_error:.4f}, mean |error| {rep.holdout_mean_abs_error:.4f}, "
              f"measured inside the {rep.level:.0%} interval at {rep.holdout_in_interval:.0%} of the held-out k")
    return rep.to_dict()


if __name__ == "__main__":
    main()
