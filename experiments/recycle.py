"""Recycling a real pretrained model into P streams, against the fair control (prefix tuning).

SmolLM2-135M-Instruct (or any ``--base`` checkpoint directory with a tokenizer.json), frozen
backbone, a text corpus split by document (``--data``). Runs, each for every ``--seeds`` seed:

* ``p1-prefix``        P = 1 with one learned prefix (prefix tuning), ``--tokens`` tokens;
* ``p2``, ``p4``       P = 2 and P = 4 stream sets, ``--tokens`` tokens (equal tokens);
* ``p1-prefix-2x``     P = 1 + prefix for 2·``--tokens`` tokens (equal compute to P = 2: a P-stream
                       step costs about P times a P = 1 step on the backbone).

and the base model itself (step 0 of every run evaluates it: ``base_val_loss``). Writes into OUT:
``results.json`` (per run and seed: held-out loss per window, the curve, speed, stream usage),
``report.md`` (table with 95% intervals, usage, generations side by side) and
``loss_vs_tokens.png``. Runs are ordinary ``parscale train`` runs under ``OUT/runs/NAME-sSEED``
(finished ones are skipped, interrupted ones resumed).

    python experiments/recycle.py --base /path/to/smollm2 --data /path/to/texts --out docs/recycling/run \\
        --tokens 16384 --seeds 0 1

Two measurements without training (``--measure``):

* ``init``: held-out loss right after adding a P = 1 / 2 / 4 stream set to the base, for each
  prefix initialisation (random N(0, 0.02); snippet keys/values with keys rotated to -T..-1
  "prepend", to 0..T-1 "overlap", unrotated "none"; snippets sampled from the model; zero values
  with keys opposite the mean query) -> ``OUT/init_methods.json`` and a table;
* ``speed``: frozen-backbone training steps (P = 2, batch x seq) in float32 and in bfloat16
  autocast, interleaved in one process so the machine's load hits both alike -> ``OUT/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from parscale import ParScaleForCausalLM
from parscale.atomic import atomic_write_text
from parscale.diagnostics import stream_usage
from parscale.reproduce import usage_table
from parscale.training import TrainConfig, train

PROMPTS = ["ROMEO. What light is this", "KING. Now, my lords,"]


def run_specs(tokens: int) -> list[tuple[str, dict]]:
    # cheapest first: on a shared machine the P = 4 runs are the ones that may not finish in time
    return [("p1-prefix", dict(streams=1, prefix_only=True, tokens=tokens)),
            ("p2", dict(streams=2, tokens=tokens)),
            ("p1-prefix-2x", dict(streams=1, prefix_only=True, tokens=2 * tokens)),
            ("p4", dict(streams=4, tokens=tokens))]


def window_losses(model, inputs, labels, batch: int = 4, fp32: bool = False) -> list[float]:
    """Mean next-token loss of each held-out window (bf16 autocast as in training, or float32)."""
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32):
        for i in range(0, inputs.shape[0], batch):
            logits = model(inputs[i:i + batch]).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels[i:i + batch].flatten(), reduction="none")
            out += loss.view(logits.shape[0], -1).mean(-1).tolist()
    return out


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def generate(model, tok, prompt: str, n: int) -> str:
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:].tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="pretrained checkpoint directory (with tokenizer.json)")
    ap.add_argument("--data", required=True, help="corpus (directory of documents), split by document")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=16384, help="training tokens per run (P = 1 2x: twice)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prefix-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--usage-windows", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--only", nargs="*", help="run names to train (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-train", action="store_true",
                    help="train nothing: report the runs already finished (the others are listed as missing)")
    ap.add_argument("--render", action="store_true", help="only rewrite report.md and the plot from results.json")
    ap.add_argument("--measure", choices=["init", "speed"], default=None,
                    help="measure init methods or fp32-vs-bf16 speed instead of training")
    ap.add_argument("--windows", type=int, default=12, help="--measure init: held-out windows")
    ap.add_argument("--steps", type=int, default=3, help="--measure speed: timed steps per precision")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.measure == "init":
        return measure_init(args, out)
    if args.measure == "speed":
        return measure_speed(args, out)
    if args.render:  # rewrite report.md and the plot from OUT/results.json
        results = json.loads((out / "results.json").read_text())
        atomic_write_text(out / "report.md", render(results))
        plot(results, out / "loss_vs_tokens.png")
        return 0
    (out / "runs").mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()

    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "runs": {}}
    specs = [s for s in run_specs(args.tokens) if not args.only or s[0] in args.only]
    for name, over in specs:
        for seed in args.seeds:
            cfg = TrainConfig(init_from=args.base, freeze_backbone=True, data=args.data, seq_len=args.seq_len,
                              batch_size=args.batch_size, prefix_tokens=args.prefix_tokens, lr=args.lr,
                              min_lr=args.lr / 10, warmup_steps=2, eval_every=args.eval_every,
                              eval_tokens=args.eval_tokens, checkpoint_every=args.eval_every, log_every=1,
                              seed=seed, threads=args.threads, quiet=True, resume=True,
                              out=str(out / "runs" / f"{name}-s{seed}"), **over)
            t0 = time.time()
            if args.no_train:
                summary = Path(cfg.out) / "summary.json"
                if not summary.is_file():
                    results.setdefault("missing", []).append(f"{name}-s{seed}")
                    continue
                from parscale.training.trainer import TrainResult

                known = TrainResult.__dataclass_fields__
                res = TrainResult(**{k: v for k, v in json.loads(summary.read_text()).items() if k in known})
            else:
                res = train(cfg)
            print(f"{name} seed {seed}: val {res.val_loss:.4f}, {res.tokens_per_s:.0f} tok/s "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            results["runs"][f"{name}-s{seed}"] = {"name": name, "seed": seed, "result": res.to_dict(),
                                                  "curve": _curve(Path(res.out_dir))}

    # per-window held-out losses, stream usage and generations of every final model
    from parscale.data import TokenBatches, corpus_from_spec, load_tokenizer

    tok = load_tokenizer(args.base)
    batches = TokenBatches.build(corpus_from_spec(args.data), tok, seq_len=args.seq_len,
                                 global_batch=args.batch_size, seed=0, progress=False)
    val = batches.validation_windows(max(1, args.eval_tokens // args.seq_len))
    base = ParScaleForCausalLM.from_pretrained(args.base)
    results["base"] = {"window_losses": window_losses(base, val.inputs, val.labels),
                       "generations": [generate(base, tok, p, args.gen_tokens) for p in PROMPTS]}
    del base
    for key, r in results["runs"].items():
        model = ParScaleForCausalLM.from_pretrained(r["result"]["model_dir"])
        r["window_losses"] = window_losses(model, val.inputs, val.labels)
        if model.streams > 1:
            u = val.inputs[: args.usage_windows], val.labels[: args.usage_windows]
            r["usage"] = stream_usage(model, *u, batch_size=2).to_dict()
        if r["seed"] == args.seeds[0]:
            r["generations"] = [generate(model, tok, p, args.gen_tokens) for p in PROMPTS]
        del model
    results["machine"] = {"load_start": load_start, "load_end": os.getloadavg(), "threads": args.threads,
                          "cpus": os.cpu_count()}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    report = render(results)
    atomic_write_text(out / "report.md", report)
    plot(results, out / "loss_vs_tokens.png")
    print(report)
    return 0


def _data(args, batch: int):
    from parscale.data import TokenBatches, corpus_from_spec, load_tokenizer

    tok = load_tokenizer(args.base)
    return TokenBatches.build(corpus_from_spec(args.data), tok, seq_len=args.seq_len, global_batch=batch,
                              seed=0, progress=False)


@torch.no_grad()
def _negative_keys(model, ids: torch.Tensor, P: int, T: int, logit: float = -20.0):
    """Zero values; in each layer and kv head one key opposite the mean (rotated) query of the
    snippets, scaled so that the mean query's attention logit is ``logit``."""
    from einops import rearrange

    from parscale.model import apply_rope

    bb = model.model
    r, t = ids.shape
    x = bb.embed_tokens(ids)
    cos, sin = bb.rotary(torch.arange(t).expand(r, t), x.dtype)
    ks = []
    for layer in bb.layers:
        a = layer.self_attn
        q = apply_rope(rearrange(a.q_proj(layer.input_layernorm(x)), "r t (h d) -> r h t d", d=a.head_dim), cos, sin)
        q = rearrange(q, "r (kv g) t d -> kv (r g t) d", kv=a.n_kv).mean(1)  # kv d
        k = logit * math.sqrt(a.head_dim) * q / q.pow(2).sum(-1, keepdim=True)
        ks.append(k[None, :, None, :].expand(P, -1, T, -1))
        x = layer(x, cos, sin, (None, True))
    k = torch.stack(ks)  # l p h t d
    return k, torch.zeros_like(k)


def measure_init(args, out: Path) -> int:
    """Held-out loss change right after adding a stream set, per prefix initialisation."""
    from parscale.recycle import backbone_kv, snippets_from_tokens

    batches = _data(args, 8)
    val = batches.validation_windows(args.windows)
    model = ParScaleForCausalLM.from_pretrained(args.base)
    T = model.config.prefix_tokens = args.prefix_tokens
    snippets = snippets_from_tokens(batches.batch(0).inputs, 4, T)  # training text, not held-out

    def loss() -> float:
        return sum(window_losses(model, val.inputs, val.labels, fp32=True)) / args.windows

    base = loss()
    res = {"base": base, "windows": args.windows, "seq_len": args.seq_len, "prefix_tokens": T,
           "load_start": os.getloadavg(), "losses": {}}
    for P in (1, 2, 4):
        for name in ("random", "prepend", "overlap", "none", "sampled", "negative-keys"):
            torch.manual_seed(0)
            model.add_stream_set(P, init="snippets" if name == "sampled" else "random")
            kv = None
            if name in ("prepend", "overlap", "none"):
                kv = backbone_kv(model, snippets[:P], rope=name)
            elif name == "negative-keys":
                kv = _negative_keys(model, snippets[:P], P, T)
            if kv is not None:
                with torch.no_grad():
                    model.stream_set.prefix_k.copy_(kv[0])
                    model.stream_set.prefix_v.copy_(kv[1])
            res["losses"][f"P{P}/{name}"] = L = loss()
            print(f"P={P} {name:14s} {L:.4f} ({100 * (L / base - 1):+.2f}%)", file=sys.stderr, flush=True)
            del model.stream_sets[str(P)]
            model.config.prefix_only, model.config.stream_sets = False, [1]
            model.set_streams(1)
    res["load_end"] = os.getloadavg()
    atomic_write_text(out / "init_methods.json", json.dumps(res, indent=1) + "\n")
    print(f"base {base:.4f}")
    print("| init | P = 1 | P = 2 | P = 4 |\n|---|---|---|---|")
    for name in ("random", "prepend", "overlap", "none", "sampled", "negative-keys"):
        cells = [res["losses"][f"P{P}/{name}"] for P in (1, 2, 4)]
        print(f"| {name} | " + " | ".join(f"{c:.4f} ({100 * (c / base - 1):+.2f}%)" for c in cells) + " |")
    return 0


def measure_speed(args, out: Path) -> int:
    """Tokens/s of frozen-backbone P = 2 training steps, float32 vs bfloat16 autocast, interleaved."""
    batches = _data(args, args.batch_size)
    model = ParScaleForCausalLM.from_pretrained(args.base)
    model.config.prefix_tokens = args.prefix_tokens
    model.add_stream_set(2, init="random")
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.stream_parameters(2)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(i: int, bf16: bool) -> float:
        x, y = batches.batch(i)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    load_start = os.getloadavg()
    times = {"float32": [], "bfloat16": []}
    step(0, False), step(0, True)  # warm-up
    for i in range(args.steps):
        for name in times:
            times[name].append(step(i + 1, name == "bfloat16"))
    tokens = args.batch_size * args.seq_len
    res = {"P": 2, "batch": args.batch_size, "seq_len": args.seq_len, "prefix_tokens": args.prefix_tokens,
           "threads": args.threads, "load_start": load_start, "load_end": os.getloadavg(),
           "step_s": times, "tokens_per_s": {k: tokens / (sum(v) / len(v)) for k, v in times.items()}}
    res["bf16_speedup"] = res["tokens_per_s"]["bfloat16"] / res["tokens_per_s"]["float32"]
    atomic_write_text(out / "speed.json", json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    pts = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            pts.append((rec["tokens"], rec["val_loss"]))
    return pts


def _groups(results) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        groups.setdefault(r["name"], []).append(r)
    return groups


def render(results) -> str:
    s = results["settings"]
    m = results["machine"]
    base = results["base"]["window_losses"]
    b_mean = sum(base) / len(base)
    lo, hi = bootstrap_ci(base)
    lines = ["# Recycling SmolLM2-135M-Instruct: P streams vs prefix tuning (frozen backbone)", "",
             f"Budget: {s['tokens']:,} training tokens per run (P = 1 2x: {2 * s['tokens']:,}), batch "
             f"{s['batch_size']} x {s['seq_len']}, prefix {s['prefix_tokens']} tokens, lr {s['lr']}, "
             f"seeds {s['seeds']}; held-out: {len(base)} windows of {s['seq_len']} tokens from "
             f"documents not trained on. Machine: {m['cpus']} CPUs shared, load average "
             f"{m['load_start'][0]:.1f} at the start, {m['load_end'][0]:.1f} at the end; "
             f"{m['threads']} thread(s).", "",
             "Held-out loss (nats/token; mean over seeds and windows, 95% bootstrap interval over "
             "windows x seeds; change vs the base model on the same windows):", "",
             "| run | P | train tokens | held-out loss | 95% interval | vs base | step-0 loss | tok/s |",
             "|---|---|---|---|---|---|---|---|",
             f"| base (no training) | 1 | 0 | {b_mean:.4f} | {lo:.4f}–{hi:.4f} | – | – | – |"]
    for name, runs in _groups(results).items():
        vals = [v for r in runs for v in r["window_losses"]]
        mean = sum(vals) / len(vals)
        lo, hi = bootstrap_ci(vals)
        diffs = [v - b for r in runs for v, b in zip(r["window_losses"], base)]
        d_lo, d_hi = bootstrap_ci(diffs)
        step0 = [r["curve"][0][1] for r in runs if r["curve"] and r["curve"][0][0] == 0]
        P = runs[0]["result"]["streams"]
        tps = sum(r["result"]["tokens_per_s"] for r in runs) / len(runs)
        lines.append(f"| {name} | {P} | {runs[0]['result']['tokens']:,} | {mean:.4f} | {lo:.4f}–{hi:.4f} | "
                     f"{mean - b_mean:+.4f} ({d_lo:+.4f}…{d_hi:+.4f}) | "
                     f"{(sum(step0) / len(step0)) if step0 else float('nan'):.4f} | {tps:.0f} |")
    groups = _groups(results)
    pairs = [("p2", "p1-prefix", "P = 2 vs the control, equal tokens"),
             ("p4", "p1-prefix", "P = 4 vs the control, equal tokens"),
             ("p2", "p1-prefix-2x", "P = 2 vs the control at equal compute (2x tokens)"),
             ("p4", "p1-prefix-2x", "P = 4 vs the control at 2x tokens (P = 4 costs ~2x more)"),
             ("p4", "p2", "P = 4 vs P = 2, equal tokens")]
    rows = []
    for a, b, what in pairs:
        if a in groups and b in groups:
            wa = {r["seed"]: r["window_losses"] for r in groups[a]}
            wb = {r["seed"]: r["window_losses"] for r in groups[b]}
            d = [x - y for seed in sorted(set(wa) & set(wb)) for x, y in zip(wa[seed], wb[seed])]
            per_seed = [sum(x - y for x, y in zip(wa[k], wb[k])) / len(wa[k]) for k in sorted(set(wa) & set(wb))]
            lo, hi = bootstrap_ci(d)
            rows.append(f"| {a} − {b} | {what} | {sum(d) / len(d):+.4f} | {lo:+.4f}…{hi:+.4f} | "
                        f"{', '.join(f'{v:+.4f}' for v in per_seed)} |")
    if rows:
        lines += ["", "Paired differences (same windows, same seed; < 0: the first run is better; 95% bootstrap "
                      "interval over windows x seeds; the seed also changes the batch order and the snippets):", "",
                  "| difference | what | mean (nats) | 95% interval | per seed |", "|---|---|---|---|---|", *rows]
    usage = {k: r["usage"] for k, r in results["runs"].items() if "usage" in r}
    if usage:
        lines += ["", "What the streams do (parscale.diagnostics.stream_usage on the first held-out "
                      "windows):", "", usage_table(usage)]
    if results.get("missing"):
        lines += ["", f"Not finished in the time available (not in the table): {', '.join(results['missing'])}."]
    lines += ["", "Greedy generations (first seed):", ""]
    names = ["base"] + [k for k, r in results["runs"].items() if "generations" in r]
    for i, prompt in enumerate(PROMPTS):
        lines.append(f"Prompt: `{prompt}`")
        lines.append("")
        for k in names:
            g = (results["base"] if k == "base" else results["runs"][k])["generations"][i]
            lines.append(f"* **{k}**: {json.dumps(g)}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"p1-prefix": "tab:blue", "p1-prefix-2x": "tab:cyan", "p2": "tab:orange", "p4": "tab:red"}
    for k, r in results["runs"].items():
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker="o", ms=3, color=colours.get(r["name"], "k"),
                label=r["name"] if r["seed"] == results["settings"]["seeds"][0] else None,
                linestyle="-" if r["seed"] == results["settings"]["seeds"][0] else "--")
    base = results["base"]["window_losses"]
    ax.axhline(sum(base) / len(base), color="grey", linestyle=":", label="base (no training)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("SmolLM2-135M, frozen backbone: held-out loss vs training tokens\n(solid: first seed, dashed: others)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
