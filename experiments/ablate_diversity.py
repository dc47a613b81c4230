"""Stream diversity ablation on size s (issue 16): does a recipe that makes the streams differ
let P > 1 beat the P = 1 + one learned prefix baseline?

Grid, with paired seeds (a seed fixes the backbone init and the batch order for every run):

    {plain prefix, reparameterised prefix} x {prefix init std 0.02, BIG} x P in {2, 4}
    + P = 1 and the P = 1 + one learned prefix baseline (plain, 0.02)  [+ optional extras]

Each recipe is a ``parscale.reproduce`` preset (``ablation_preset``: the ``s`` shape, the same data,
tokens and seq_len for every run) planned with ``plan_runs``; every run is an ordinary
``parscale.training.train`` run in ``OUT/runs/RECIPE-seedK/NAME`` (``--resume`` semantics: a
re-run skips finished runs). Runs go two at a time, one torch thread each. After each run
finishes, its ``stream_usage`` on the held-out windows is stored beside it and ``OUT/results.json``
is rewritten with every finished run, so a cut session keeps what finished.

    python experiments/ablate_diversity.py run --out runs/diversity --tokens 400000 --big 1.0
    python experiments/ablate_diversity.py run --out runs/diversity --only seed0   # a subset
    python experiments/ablate_diversity.py report --out runs/diversity --docs docs/reproduction/diversity

``report`` writes results.json, report.md (text generated from the numbers) and plots into
``--docs``; ``parscale.diversity_report`` holds that code.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from parscale.atomic import atomic_write_text
from parscale.reproduce import PRESETS, SizeSpec, plan_runs

SIZE = SizeSpec("s", 3, 96, 3, 1, 256)  # reproduce's "s": 3 layers, hidden 96, 3 heads, 1 kv head
RESULTS = "results.json"
USAGE = "stream_usage.json"


def ablation_preset(tokens: int, **recipe):
    """The quick preset's data (3 MB of stdlib, vocab 1024, seq_len 128) on size s only, with the
    full preset's 16 prefix tokens, P in {1, 2, 4}, no two-stage, and the given stream recipe."""
    base = PRESETS["quick"]
    return dataclasses.replace(base, name="ablate-diversity", sizes=(SIZE,), streams=(1, 2, 4), tokens=tokens,
                               prefix_tokens=16, eval_every=max(1, tokens // (base.batch_size * base.seq_len) // 4),
                               two_stage=None, **recipe)


def recipes(big: float, extras: bool) -> dict[str, dict]:
    out = {"plain-0.02": {}, f"plain-{big:g}": {"prefix_init_std": big},
           "reparam-0.02": {"prefix_reparam": True}, f"reparam-{big:g}": {"prefix_reparam": True, "prefix_init_std": big}}
    if extras:  # the aggregator's last Linear ~ N(0, 0.02) instead of zeros (not exactly uniform)
        out["plain-0.02-agg"] = {"agg_init_std": 0.02}
    return out


def plan(out: Path, tokens: int, seeds: list[int], big: float, extras: bool) -> list[dict]:
    """Every job: {recipe, seed, name, P, kind, config}. Order: seed by seed, cheap first within
    a seed, so a cut session has whole seeds' comparisons."""
    jobs = []
    for seed in seeds:
        for recipe, fields in recipes(big, extras).items():
            preset = dataclasses.replace(ablation_preset(tokens, **fields), seed=seed)
            baseline = "prefix" if recipe == "plain-0.02" else None
            for run in plan_runs(preset, out / f"{recipe}-seed{seed}", threads=1, baseline=baseline):
                if run.streams == 1 and run.experiment == "grid" and recipe != "plain-0.02":
                    continue  # P = 1 has no stream set: one per seed is enough
                kind = "baseline" if run.experiment == "baseline" else ("p1" if run.streams == 1 else "streams")
                jobs.append({"recipe": recipe if kind != "p1" else "none", "seed": seed, "name": run.name,
                             "P": run.streams, "kind": kind, "config": run.config})
    return jobs


def job_key(job: dict) -> str:
    return f"{job['recipe']}/seed{job['seed']}/{job['name']}"


def run_job(job: dict) -> dict:
    """Train (or find finished) one run, then measure its streams on the held-out windows."""
    import torch

    torch.set_num_threads(1)
    from parscale.data import prepare_data, validation_windows
    from parscale.diagnostics import stream_usage
    from parscale.model import ParScaleForCausalLM
    from parscale.training import train

    cfg = job["config"]
    t0 = time.time()
    result = train(cfg)
    rec = {**{k: v for k, v in job.items() if k != "config"}, "val_loss": result.val_loss,
           "train_loss": result.train_loss, "params": result.params, "tokens": result.tokens,
           "wall_s": result.wall_s, "session_s": time.time() - t0, "out": cfg.out,
           "curve": _curve(Path(cfg.out)), "settings": {k: getattr(cfg, k) for k in
                                                        ("prefix_reparam", "prefix_init_std", "agg_init_std",
                                                         "prefix_only", "seed", "seq_len", "tokens")}}
    if job["P"] > 1:
        cache = Path(cfg.out) / USAGE
        if cache.is_file():
            rec["usage"] = json.loads(cache.read_text())
        else:
            data = prepare_data(cfg.data, tokenizer=Path(cfg.out) / "model", max_bytes=cfg.data_max_bytes,
                                progress=False)
            val = validation_windows(data.validation, seq_len=cfg.seq_len, n=max(1, cfg.eval_tokens // cfg.seq_len))
            model = ParScaleForCausalLM.from_pretrained(Path(cfg.out) / "model")
            rec["usage"] = stream_usage(model, val.inputs, val.labels, batch_size=cfg.batch_size).to_dict()
            atomic_write_text(cache, json.dumps(rec["usage"], indent=1) + "\n")
    return rec


def _curve(run_dir: Path) -> list[dict]:
    """The eval records of metrics.jsonl: step, tokens, val_loss and the diversity keys."""
    keys = ("step", "tokens", "val_loss", "loss_correlation", "pairwise_js", "combination_gain", "agg_entropy")
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_loss" in r:
            out.append({k: r[k] for k in keys if k in r})
    return out


def write_results(out: Path, done: dict[str, dict], meta: dict) -> None:
    recs = [done[k] for k in sorted(done)]
    atomic_write_text(out / RESULTS, json.dumps({"meta": meta, "runs": recs}, indent=1) + "\n")


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cmd_run(args) -> int:
    from parscale.data import prepare_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(out, args.tokens, args.seeds, args.big, args.extras)
    if args.only:
        jobs = [j for j in jobs if any(s in job_key(j) for s in args.only)]
    base = jobs[0]["config"]
    prepare_data(base.data, vocab_size=base.vocab_size, max_bytes=base.data_max_bytes, progress=False)  # fill the cache once
    meta = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_start": load_average(), "tokens": args.tokens, "seeds": args.seeds, "big": args.big,
            "workers": args.workers, "threads_per_run": 1, "size": dataclasses.asdict(SIZE),
            "preset": dataclasses.asdict(ablation_preset(args.tokens)), "command": " ".join(sys.argv)}
    prev = out / RESULTS
    done = {}
    if prev.is_file():
        done = {job_key(r): r for r in json.loads(prev.read_text())["runs"]}
    print(f"{len(jobs)} runs, {args.workers} at a time, load {meta['load_start']}", flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, j): j for j in jobs}
        for fut in as_completed(futures):
            j = futures[fut]
            try:
                rec = fut.result()
            except Exception as e:  # one failed run must not lose the others
                print(f"FAILED {job_key(j)}: {type(e).__name__}: {e}", flush=True)
                continue
            rec["load_end"] = load_average()
            done[job_key(j)] = rec
            meta["elapsed_s"] = time.time() - t0
            write_results(out, done, meta)
            u = rec.get("usage", {})
            print(f"[{time.time() - t0:7.0f}s] {job_key(j):42s} val {rec['val_loss']:.4f} "
                  f"train {rec['wall_s']:.0f}s rho {u.get('loss_correlation', float('nan')):.3f} "
                  f"gain {u.get('combination_gain', float('nan')):+.4f} load {rec['load_end']}", flush=True)
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_results(out, done, meta)
    return 0


def cmd_report(args) -> int:
    from parscale.diversity_report import write_report

    paths = write_report(Path(args.out) / RESULTS, Path(args.docs), full_results=Path(args.full))
    for p in paths:
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the ablation's runs (two at a time), writing results.json as they finish")
    r.add_argument("--out", required=True)
    r.add_argument("--tokens", type=int, default=400_000, help="training tokens of every run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--big", type=float, default=1.0, help="the larger prefix init std")
    r.add_argument("--extras", action="store_true", help="also the not-exactly-uniform aggregator init")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--only", nargs="+", help="only runs whose key (RECIPE/seedK/NAME) contains one of these")
    r.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="results.json, report.md and plots into --docs")
    p.add_argument("--out", required=True)
    p.add_argument("--docs", default="docs/reproduction/diversity")
    p.add_argument("--full", default="docs/reproduction/results.json", help="the committed full run's results")
    p.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
