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

``report`` writes results.json (the runs, the derived numbers, the scale estimate), report.md
(text generated from the numbers) and three plots into ``--docs``.
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
    return dataclasses.replace(base, name="ablate-diversity", description="issue 16: size s on the quick preset's data",
                               sizes=(SIZE,), streams=(1, 2, 4), tokens=tokens,
                               prefix_tokens=16, eval_every=max(1, tokens // (base.batch_size * base.seq_len) // 4),
                               two_stage=None, **recipe)


def recipes(big: float, extras: bool) -> dict[str, dict]:
    out = {"plain-0.02": {}, f"plain-{big:g}": {"prefix_init_std": big},
           "reparam-0.02": {"prefix_reparam": True}, f"reparam-{big:g}": {"prefix_reparam": True, "prefix_init_std": big}}
    if extras:  # the aggregator's last Linear ~ N(0, 0.02) instead of zeros (not exactly uniform)
        out["plain-0.02-agg"] = {"agg_init_std": 0.02}
    return out


def plan(out: Path, tokens: int, seeds: list[int], big: float, extras: bool,
         reparam_baseline: bool = False) -> list[dict]:
    """Every job: {recipe, seed, name, P, kind, config}. Order: seed by seed, cheap first within
    a seed, so a cut session has whole seeds' comparisons. ``reparam_baseline``: the reparam
    recipes get their own P = 1 + one (reparameterised) prefix baseline too."""
    jobs = []
    for seed in seeds:
        for recipe, fields in recipes(big, extras).items():
            preset = dataclasses.replace(ablation_preset(tokens, **fields), seed=seed)
            own = reparam_baseline and fields.get("prefix_reparam", False)
            baseline = "prefix" if recipe == "plain-0.02" or own else None
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
    jobs = plan(out, args.tokens, args.seeds, args.big, args.extras, args.reparam_baseline)
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


# --------------------------------------------------------------------------- the report
PAPER_K = 0.3935  # the paper's fitted k on Stack-V2-Python (parscale.reproduce.PAPER_STACK)


def _mean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(runs: list[dict]) -> dict:
    """Per variant (recipe, P): losses by seed, paired differences to the same seed's prefix
    baseline and P = 1, and the streams' diversity (stream_usage on the held-out windows)."""
    by = {}
    for r in runs:
        by.setdefault((r["kind"], r["recipe"], r["P"]), {})[r["seed"]] = r
    base = by.get(("baseline", "plain-0.02", 1), {})
    p1 = by.get(("p1", "none", 1), {})
    variants = []
    for (kind, recipe, P), seeds in sorted(by.items(), key=lambda kv: (kv[0][0] != "p1", kv[0][0] != "baseline",
                                                                       kv[0][1], kv[0][2])):
        losses = {s: r["val_loss"] for s, r in sorted(seeds.items())}
        v = {"kind": kind, "recipe": recipe, "P": P, "losses": losses, "mean": _mean(losses.values()),
             "vs_baseline": {s: losses[s] - base[s]["val_loss"] for s in losses if s in base},
             "vs_p1": {s: losses[s] - p1[s]["val_loss"] for s in losses if s in p1}}
        if P > 1:
            u = [r["usage"] for r in seeds.values() if "usage" in r]
            for key in ("loss_correlation", "pairwise_js", "combination_gain", "entropy_over_lnP"):
                v[key] = _mean([x[key] for x in u])
        variants.append(v)
    return {"variants": variants}


def best_recipe(variants: list[dict]) -> tuple[str, float]:
    """The recipe whose P > 1 runs are best against the same seed's prefix baseline (mean of the
    paired differences over P and seeds; paired, so a seed missing from one recipe does not bias it)."""
    recipes_ = {}
    for v in variants:
        if v["kind"] == "streams":
            recipes_.setdefault(v["recipe"], []).extend(v["vs_baseline"].values())
    means = {r: _mean(ds) for r, ds in recipes_.items()}
    best = min(means, key=means.get)
    return best, means[best]


def scale_estimate(full: dict, ablations: dict) -> dict:
    """From the committed full run: the streams' own gain (P = 2 minus the P = 1 + one learned
    prefix model, xs and s) as an effective k, extrapolated in ln N to the paper's k."""
    import math

    runs = {r["name"]: r for r in full["runs"]}
    shared = {v["name"]: v["val_loss"] for v in ablations["variants"]}
    sizes = [s for s in ("xs", "s", "m") if f"{s}-p1" in runs]
    N = {s: runs[f"{s}-p1"]["params"] for s in sizes}
    L1 = {s: runs[f"{s}-p1"]["val_loss"] for s in sizes}
    # local slope of the P = 1 loss in ln N (nats per e-fold of N), between neighbouring sizes
    slope = {"xs": (L1["s"] - L1["xs"]) / math.log(N["s"] / N["xs"]),
             "s": (L1["m"] - L1["s"]) / math.log(N["m"] / N["s"])}
    out = {"N": N, "loss_p1": L1, "slope_per_efold": slope, "points": {}, "tokens": runs["s-p1"]["tokens"]}
    for s in ("xs", "s"):
        g = shared[f"{s}-p2-shared"] - runs[f"{s}-p2"]["val_loss"]  # > 0: the streams add something
        # L(N, P) = L(N (k ln P + 1)) locally: gain g = -slope * ln(1 + k ln 2)
        k = (math.exp(-g / slope[s]) - 1) / math.log(2)
        law = -slope[s] * math.log(1 + PAPER_K * math.log(2))
        out["points"][s] = {"streams_gain": g, "k_eff": k, "law_gain_at_paper_k": law}
    kx, ks = out["points"]["xs"]["k_eff"], out["points"]["s"]["k_eff"]
    per_efold = (ks - kx) / math.log(N["s"] / N["xs"])
    out["k_eff_per_efold"] = per_efold
    out["N_at_paper_k"] = N["s"] * math.exp((PAPER_K - ks) / per_efold) if per_efold > 0 else None
    # the seed-to-seed spread of a P = 2 − P = 1 difference at s (committed ablation: sd 0.007)
    sd = 0.007
    lo_hi = []
    for dg in (+sd, -sd):
        k = (math.exp(-(out["points"]["s"]["streams_gain"] + dg) / slope["s"]) - 1) / math.log(2)
        pe = (k - kx) / math.log(N["s"] / N["xs"])
        lo_hi.append(N["s"] * math.exp((PAPER_K - k) / pe) if pe > 0 else None)
    out["N_at_paper_k_range"] = lo_hi
    out["seed_sd_assumed"] = sd
    return out


def _fmt_seeds(d: dict, spec: str = "+.4f") -> str:
    return ", ".join(f"{v:{spec}}" for _, v in sorted(d.items())) if d else "—"


def _held_out_tokens(runs: list[dict]) -> int:
    """Tokens of the held-out windows (as stream_usage counted them)."""
    return max((r["usage"]["tokens"] for r in runs if "usage" in r), default=0)


def render(results: dict) -> str:  # noqa: C901 (one report, top to bottom)
    meta, summ, scale = results["meta"], results["summary"], results["scale"]
    variants = summ["variants"]
    seeds = meta["seeds"]
    best, best_loss = best_recipe(variants)
    lines = [
        "# Stream diversity ablation (size s, paired seeds)", "",
        "Generated by `python experiments/ablate_diversity.py report` from `results.json`; every number "
        "below is computed from it. What the options are: [README.md](README.md).", "",
        f"- Size s (3 layers, hidden 96, 3 heads, 1 kv head, ffn 256); every run {meta['tokens']:,} training "
        f"tokens, seq_len {meta['preset']['seq_len']}, batch {meta['preset']['batch_size']}, "
        f"{meta['preset']['prefix_tokens']} prefix tokens, LR {meta['preset']['lr']:g} constant after "
        f"{meta['preset']['warmup_steps']} warm-up steps; data: {meta['preset']['data']} "
        f"({meta['preset']['data_max_bytes']:,} bytes), vocab {meta['preset']['vocab_size']}.",
        f"- Seeds {', '.join(map(str, seeds))}: a seed fixes the backbone init and the batch order for every "
        "run, so differences within a seed are paired.",
        f"- Held-out loss: nats/token on the fixed held-out windows ({_held_out_tokens(results['runs']):,} tokens: "
        f"the whole held-out split of this data, under the {meta['preset']['eval_tokens']:,}-token cap). ρ, JS "
        "and the gain over the best single stream: `parscale.diagnostics.stream_usage` on the same windows.",
        f"- Machine: {meta['workers']} runs at a time, {meta['threads_per_run']} thread each; load average "
        f"{meta['load_start']} at the start; {meta.get('elapsed_s', float('nan')) / 60:.1f} min wall.", "",
        "## Held-out loss per variant", "",
        "| variant | P | loss per seed | mean | − prefix baseline (per seed) | − P = 1 (per seed) | ρ | JS (nats) "
        "| gain over best stream (nats) | entropy / ln P |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        name = {"p1": "P = 1", "baseline": "P = 1 + one learned prefix"}.get(v["kind"], v["recipe"])
        extra = (f"{v['loss_correlation']:.4f} | {v['pairwise_js']:.5f} | {v['combination_gain']:+.4f} | "
                 f"{v['entropy_over_lnP']:.2f}") if v["P"] > 1 else " | | | "
        lines.append(f"| {name} | {v['P']} | {_fmt_seeds(v['losses'], '.4f')} | {v['mean']:.4f} | "
                     f"{_fmt_seeds(v['vs_baseline']) if v['kind'] != 'baseline' else ''} | "
                     f"{_fmt_seeds(v['vs_p1']) if v['kind'] != 'p1' else ''} | {extra} |")
    streams = [v for v in variants if v["kind"] == "streams"]
    beats = [v for v in streams if v["vs_baseline"] and all(d < 0 for d in v["vs_baseline"].values())]
    mean_d = {(v["recipe"], v["P"]): _mean(v["vs_baseline"].values()) for v in streams}
    best_v = min(streams, key=lambda v: v["mean"])
    rho_plain = _mean([v["loss_correlation"] for v in streams if v["recipe"] == "plain-0.02"])
    lines += ["", "## What it says", ""]
    lines.append(f"- **Best recipe: `{best}`**: its P = 2 and P = 4 runs are on average {best_loss:+.4f} nats "
                 f"from the same seed's P = 1 + prefix baseline; the best single variant is `{best_v['recipe']}` "
                 f"at P = {best_v['P']} (mean loss {best_v['mean']:.4f}).")
    order = sorted({v["recipe"] for v in streams}, key=lambda r: _mean(
        [x for v in streams if v["recipe"] == r for x in v["vs_baseline"].values()]))
    lines.append("- Recipes by mean paired difference to the prefix baseline (P = 2 and 4, every seed): " + ", ".join(
        f"`{r}` {_mean([x for v in streams if v['recipe'] == r for x in v['vs_baseline'].values()]):+.4f} "
        f"(ρ {_mean([v['loss_correlation'] for v in streams if v['recipe'] == r]):.3f}, gain over best stream "
        f"{_mean([v['combination_gain'] for v in streams if v['recipe'] == r]):+.4f})" for r in order) + ".")
    lines.append(f"- Diversity: with today's recipe (`plain-0.02`) the streams' per-token losses correlate at "
                 f"ρ = {rho_plain:.4f}; the lowest ρ here is "
                 f"{min(v['loss_correlation'] for v in streams):.4f} "
                 f"(`{min(streams, key=lambda v: v['loss_correlation'])['recipe']}`, P = "
                 f"{min(streams, key=lambda v: v['loss_correlation'])['P']}). The largest gain of the aggregate "
                 f"over its best single stream is {max(v['combination_gain'] for v in streams):+.4f} nats.")
    base_gain = _mean([d for v in variants if v["kind"] == "baseline" for d in v["vs_p1"].values()])
    kept = {r: _mean([d for v in streams if v["recipe"] == r for d in v["vs_p1"].values()]) for r in order}
    lines.append(f"- Why: at this budget one learned prefix lowers the held-out loss by {-base_gain:.4f} nats from "
                 "P = 1 (the baseline). "
                 "The P > 1 runs of each recipe are, on average over P and seeds, this far from the same seed's "
                 "P = 1: " + ", ".join(f"`{r}` {kept[r]:+.4f} ({kept[r] / base_gain:.0%} of the prefix's gain)"
                                       for r in order) +
                 ".")
    diverse = [v for v in streams if v["loss_correlation"] < rho_plain - 0.005]
    if diverse:
        top_gain = max(v["combination_gain"] for v in diverse)
        worst = min(_mean(v["vs_baseline"].values()) for v in diverse)
        lines.append(f"  The recipes whose streams differ more (ρ below {rho_plain - 0.005:.3f}) are all at least "
                     f"{worst:+.4f} nats from the baseline, and combining their streams buys at most {top_gain:+.4f} "
                     "nats over the best single stream" + (": the streams became different by each becoming worse, "
                                                          "not by erring on different tokens." if top_gain < worst
                                                          else "."))
    curves = {}
    for r in results["runs"]:
        c = [p["loss_correlation"] for p in r.get("curve", []) if "loss_correlation" in p]
        if r["P"] > 1 and len(c) > 1:
            curves.setdefault(r["recipe"], []).append((c[0], c[-1]))
    if curves:
        lines.append("- ρ during training (first held-out windows, first → last evaluation, mean over P and seeds): "
                     + ", ".join(f"`{r}` {_mean([a for a, _ in cs]):.3f} → {_mean([b for _, b in cs]):.3f}"
                                 for r, cs in sorted(curves.items())) + ".")
    if beats:
        lines.append("- **P > 1 beats the P = 1 + prefix baseline in every seed** for: " + ", ".join(
            f"`{v['recipe']}` P = {v['P']} ({_fmt_seeds(v['vs_baseline'])}; its paired difference moves by "
            f"{max(v['vs_baseline'].values()) - min(v['vs_baseline'].values()):.4f} between seeds)" for v in beats)
            + ". Small and from two seeds: consistent in sign, not established.")
    else:
        lines.append("- **No recipe makes P > 1 beat the P = 1 + prefix baseline in every seed.** Paired "
                     "differences (variant − baseline, mean of the seeds): " + ", ".join(
                         f"`{r}` P={P} {d:+.4f}" for (r, P), d in sorted(mean_d.items(), key=lambda kv: kv[1])) + ".")
    spreads = [max(v["losses"].values()) - min(v["losses"].values()) for v in variants if len(v["losses"]) > 1]
    dspread = [max(v["vs_baseline"].values()) - min(v["vs_baseline"].values())
               for v in streams if len(v["vs_baseline"]) > 1]
    if spreads and dspread:
        lines.append(f"- Seed noise: one variant's loss moves by {min(spreads):.4f}–{max(spreads):.4f} nats between "
                     f"the two seeds (median {sorted(spreads)[len(spreads) // 2]:.4f}); its paired difference to the "
                     f"baseline moves less, by {min(dspread):.4f}–{max(dspread):.4f} (median "
                     f"{sorted(dspread)[len(dspread) // 2]:.4f}). A paired difference smaller than that, or whose "
                     "two seeds disagree in sign, is not a finding.")
    pts = scale["points"]
    lines += ["", "## How large would the models have to be? (a rough estimate)", "",
              "From the committed full run (docs/reproduction/results.json and ablations.json: 1.75M tokens, seq "
              "256, 16 prefix tokens), the streams' own gain is P = 2 minus the P = 1 + one learned prefix model "
              "of the same size. If the law held, P = 2 would act like a model with N·(1 + k ln 2) "
              "parameters, so at the local slope of the P = 1 loss in ln N the gain would be "
              "−slope · ln(1 + k ln 2). Inverting that gives an effective k per size:", "",
              "| size | N (P = 1) | P = 1 loss slope (nats per e-fold of N) | streams' gain (nats) | gain the "
              "paper's k = 0.39 predicts | effective k |", "|---|---|---|---|---|---|"]
    for s in ("xs", "s"):
        p = pts[s]
        lines.append(f"| {s} | {scale['N'][s]:,} | {scale['slope_per_efold'][s]:.3f} | {p['streams_gain']:+.4f} | "
                     f"{p['law_gain_at_paper_k']:+.4f} | {p['k_eff']:+.4f} |")
    n_star, rng = scale["N_at_paper_k"], scale["N_at_paper_k_range"]

    def fmt_n(n):
        return "never (no upward trend)" if n is None else f"{n:.1e}"

    law = [pts[x]["law_gain_at_paper_k"] for x in ("xs", "s")]
    tpp = [scale["tokens"] / scale["N"][x] for x in ("xs", "s")]
    sd = scale["seed_sd_assumed"]
    lines += ["", f"Extrapolating the effective k linearly in ln N through these two points "
              f"({scale['k_eff_per_efold']:+.4f} per e-fold of N), it reaches the paper's 0.39 at "
              f"N ≈ {fmt_n(n_star)} non-embedding parameters; moving the s point by one seed standard deviation "
              f"of a paired difference (±{sd} nats, the committed 3-seed ablation) gives {fmt_n(rng[0])} to "
              f"{fmt_n(rng[1])}.", "",
              f"**This is very rough**: two sizes with one seed each, both gains within one seed standard deviation "
              f"of zero, a straight line in ln N assumed, and token budgets of {tpp[0]:.0f} and {tpp[1]:.0f} tokens "
              "per parameter (the paper: 10–80). It is an order-of-magnitude statement at best: nothing at "
              "10^5 parameters points to the effect, and a trend of the measured steepness would need "
              f"around {fmt_n(n_star)} parameters (the paper's models: 0.5B–4.4B). What is firmer: the gain the "
              f"paper's k would give at our sizes is {min(law):.3f}–{max(law):.3f} nats, "
              f"{min(law) / sd:.0f}–{max(law) / sd:.0f}× the seed noise, so the law is not hiding in the noise "
              "here; the streams do not act like extra parameters at this scale."]
    if mean_d:
        top = min(mean_d, key=mean_d.get)
        tv = next(v for v in streams if (v["recipe"], v["P"]) == top)
        move = max(tv["vs_baseline"].values()) - min(tv["vs_baseline"].values())
        big = -mean_d[top] > max(sd, move)
        lines += ["", f"In this ablation (size s, {meta['tokens']:,} tokens) the streams' best paired gain over the "
                  f"prefix baseline is {-mean_d[top]:+.4f} nats (`{top[0]}`, P = {top[1]}; positive = the streams "
                  f"help; it moves by {move:.4f} between the two seeds). That budget differs from the full run's, so "
                  "it is not a third point on the trend; " +
                  ("it is larger than the seed noise, so this recipe would move the s point up." if big else
                   f"it is within the seed noise (±{sd}), so no recipe here moves the s point, and the estimate "
                   "stands as rough as it is.")]
    lines += ["", "The full preset was not re-run with another recipe in this session (2 hours on this "
              "machine, not available): the full run in ../README.md is still the reference run.", ""]
    return "\n".join(lines)


def plot(results: dict, docs: Path) -> list[Path]:
    from matplotlib.figure import Figure

    from parscale.atomic import atomic_savefig

    variants = results["summary"]["variants"]
    runs = results["runs"]
    paths = []
    labels = [("P=1" if v["kind"] == "p1" else "P=1+prefix" if v["kind"] == "baseline" else f"{v['recipe']}\nP={v['P']}")
              for v in variants]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, v in enumerate(variants):
        ys = list(v["losses"].values())
        ax.plot([i] * len(ys), ys, "-", color="0.7", zorder=1)
        for seed, y in v["losses"].items():
            ax.scatter([i], [y], marker="os^D"[int(seed) % 4], color=f"C{int(seed)}", zorder=2,
                       label=f"seed {seed}" if i == 0 else None)
    for kind, ls in (("baseline", "--"), ("p1", ":")):
        for v in variants:
            if v["kind"] == kind:
                ax.axhline(v["mean"], ls=ls, color="0.4", lw=1, label=f"{labels[variants.index(v)]} (mean)")
    ax.set_xticks(range(len(variants)), labels, fontsize=7)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("stream diversity ablation, size s: held-out loss per variant (seed pairs joined)")
    ax.legend(fontsize=8)
    paths.append(atomic_savefig(fig, docs / "loss_per_variant.png", dpi=120))

    streams = [v for v in variants if v["kind"] == "streams"]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    names = [f"{v['recipe']}\nP={v['P']}" for v in streams]
    a1.bar(range(len(streams)), [v["loss_correlation"] for v in streams], color="C0")
    a1.set_ylim(min(v["loss_correlation"] for v in streams) - 0.01, 1.0)
    a1.set_title("ρ: correlation of the streams' per-token losses (1 = copies)")
    a2.bar(range(len(streams)), [v["combination_gain"] for v in streams], color="C1")
    a2.axhline(0, color="k", lw=0.8)
    a2.set_title("aggregate's gain over its best single stream (nats)")
    for a in (a1, a2):
        a.set_xticks(range(len(streams)), [n.replace("\n", " ") for n in names], fontsize=7, rotation=40, ha="right")
    paths.append(atomic_savefig(fig, docs / "diversity_per_variant.png", dpi=120))

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    recipes_ = sorted({r["recipe"] for r in runs if r["P"] > 1})
    for r in runs:
        if r["P"] < 2 or not r.get("curve"):
            continue
        c = [p for p in r["curve"] if "loss_correlation" in p]
        color = f"C{recipes_.index(r['recipe'])}"
        style = "-" if r["P"] == 2 else "--"
        lab = f"{r['recipe']} P={r['P']}" if r["seed"] == min(results["meta"]["seeds"]) else None
        a1.plot([p["tokens"] for p in c], [p["loss_correlation"] for p in c], style, color=color, label=lab,
                marker="o" if r["seed"] == 0 else "x", ms=3)
        a2.plot([p["tokens"] for p in c], [p["combination_gain"] for p in c], style, color=color,
                marker="o" if r["seed"] == 0 else "x", ms=3)
    a1.set_title("ρ during training (first held-out windows; o/x: seeds)")
    a2.set_title("gain over best stream during training (nats)")
    for a in (a1, a2):
        a.set_xlabel("training tokens")
    a1.legend(fontsize=7)
    paths.append(atomic_savefig(fig, docs / "diversity_curves.png", dpi=120))
    return paths


def write_report(results_path: Path, docs: Path, full_results: Path) -> list[Path]:
    raw = json.loads(results_path.read_text())
    full = json.loads(full_results.read_text())
    ablations = json.loads((full_results.parent / "ablations.json").read_text())
    runs = [{k: v for k, v in r.items() if k != "out"} for r in raw["runs"]]
    results = {"meta": raw["meta"], "runs": runs, "summary": summarize(runs), "scale": scale_estimate(full, ablations)}
    docs.mkdir(parents=True, exist_ok=True)
    out = [atomic_write_text(docs / RESULTS, json.dumps(results, indent=1) + "\n"),
           atomic_write_text(docs / "report.md", render(results))]
    return out + plot(results, docs)


def render_check(results: dict) -> str:
    """A longer-budget check of a few variants (``run --only ...``): losses, paired differences to
    the same seed's prefix baseline, ρ and the gain over the best stream."""
    summ = summarize(results["runs"])["variants"]
    tokens = sorted({r["tokens"] for r in results["runs"]})
    lines = [f"# Longer-budget check: {', '.join(f'{t:,}' for t in tokens)} training tokens per run", "",
             "Generated by `python experiments/ablate_diversity.py report-check` from `long_results.json`; the "
             "ablation's other settings (README.md). Held-out loss on the "
             f"{_held_out_tokens(results['runs']):,} held-out tokens.", "",
             "| variant | P | loss per seed | − plain prefix baseline (per seed) | − same-recipe prefix baseline "
             "| ρ | gain over best stream (nats) |",
             "|---|---|---|---|---|---|---|"]
    own = {v["recipe"]: v["losses"] for v in summ if v["kind"] == "baseline"}
    for v in summ:
        plain_base = v["kind"] == "baseline" and v["recipe"] == "plain-0.02"
        name = {"p1": "P = 1", "baseline": f"P = 1 + one learned prefix ({v['recipe']})"}.get(v["kind"], v["recipe"])
        div = f"{v['loss_correlation']:.4f} | {v['combination_gain']:+.4f}" if v["P"] > 1 else " | "
        same = {sd: x - own[v["recipe"]][sd] for sd, x in v["losses"].items()
                if v["kind"] == "streams" and v["recipe"] in own and sd in own[v["recipe"]]}
        lines.append(f"| {name} | {v['P']} | {_fmt_seeds(v['losses'], '.4f')} | "
                     f"{'' if plain_base else _fmt_seeds(v['vs_baseline'])} | {_fmt_seeds(same) if same else ''} | {div} |")
    return "\n".join(lines) + "\n"


def cmd_report_check(args) -> int:
    raw = json.loads((Path(args.out) / RESULTS).read_text())
    runs = [{k: v for k, v in r.items() if k != "out"} for r in raw["runs"]]
    docs = Path(args.docs)
    print(atomic_write_text(docs / "long_results.json", json.dumps({"meta": raw["meta"], "runs": runs}, indent=1) + "\n"))
    print(atomic_write_text(docs / "long.md", render_check({"runs": runs})))
    return 0


def cmd_report(args) -> int:
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
    r.add_argument("--reparam-baseline", action="store_true",
                   help="also a P = 1 + one reparameterised prefix baseline per reparam recipe")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--only", nargs="+", help="only runs whose key (RECIPE/seedK/NAME) contains one of these")
    r.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="results.json, report.md and plots into --docs")
    p.add_argument("--out", required=True)
    p.add_argument("--docs", default="docs/reproduction/diversity")
    p.add_argument("--full", default="docs/reproduction/results.json", help="the committed full run's results")
    p.set_defaults(func=cmd_report)
    c = sub.add_parser("report-check", help="long_results.json and long.md (a longer-budget check) into --docs")
    c.add_argument("--out", required=True)
    c.add_argument("--docs", default="docs/reproduction/diversity")
    c.set_defaults(func=cmd_report_check)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
