"""Ablations of the full reproduction preset: what changes whether P > 1 streams beat P = 1.

The committed full run (docs/reproduction/) compares P at one seed per cell. This script reruns
single grid cells of the ``full`` preset with one setting changed at a time (the seed, the
aggregation smoothing ε, the prefix length, the learning rate, the token budget) so that the
report can say what was tried and how large each effect is next to the seed-to-seed noise. Each
variant is an ordinary training run in ``OUT/NAME`` (re-running skips finished ones and resumes
interrupted ones), and the script writes ``OUT/ablations.json`` plus a markdown table on stdout.

    python experiments/ablate_streams.py --out runs/ablations               # every variant
    python experiments/ablate_streams.py --out runs/ablations --only s-p2-eps1 s-p1-seed1
    python experiments/ablate_streams.py --out runs/ablations --table       # table only
    python experiments/ablate_streams.py --out x --gaps runs/reproduce-full  # P gap during training
    python experiments/ablate_streams.py --out x --usage runs/reproduce-full  # what the streams do
    python experiments/ablate_streams.py --out x --compare FIRST_RUN SECOND_RUN

Variants named like a grid run (``s-p1``) with no overrides are read from ``--grid`` (a full
reproduction's output directory) when it has them, instead of being trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

from parscale.atomic import atomic_write_text
from parscale.reproduce import get_preset, grid_name, plan_runs
from parscale.reproduce import usage_table as format_usage_by_run
from parscale.training.trainer import train

# (name, size, P, overrides of the full preset's TrainConfig for that grid cell, what it tests).
# The override SHARED_PREFIX is not a TrainConfig option: it ties every stream to stream 0's
# prefix, see shared_prefix().
SHARED_PREFIX = "shared_prefix"
VARIANTS: list[tuple[str, str, int, dict, str]] = [
    ("xs-p1", "xs", 1, {}, "grid cell (baseline)"),
    ("xs-p2", "xs", 2, {}, "grid cell (baseline)"),
    ("s-p1", "s", 1, {}, "grid cell (baseline)"),
    ("s-p2", "s", 2, {}, "grid cell (baseline)"),
    # is the gain over P = 1 parallel scaling, or the learned prefix itself? Every stream uses the
    # same prefix and the weights are uniform (ε = 1), so the P streams are identical: this is a
    # P = 1 model with one learned 16-token prefix per layer (run P times, at P times the cost)
    ("xs-p2-shared", "xs", 2, {"agg_smoothing": 1.0, SHARED_PREFIX: True}, "prefix only (P = 1 + prefix)"),
    ("s-p2-shared", "s", 2, {"agg_smoothing": 1.0, SHARED_PREFIX: True}, "prefix only (P = 1 + prefix)"),
    # seed-to-seed noise: the seed sets the initial weights (the same backbone for every P) and
    # the batch order, so each seed is a paired P = 1 / P = 2 comparison of its own
    ("s-p1-seed1", "s", 1, {"seed": 1}, "seed"),
    ("s-p2-seed1", "s", 2, {"seed": 1}, "seed"),
    ("s-p1-seed2", "s", 1, {"seed": 2}, "seed"),
    ("s-p2-seed2", "s", 2, {"seed": 2}, "seed"),
    # the aggregator's per-token weights are peaked (entropy << ln P); ε = 1 forces the uniform
    # mean of the streams, so every stream gets its full share of the gradient
    ("s-p2-eps1", "s", 2, {"agg_smoothing": 1.0}, "aggregation"),
    # prefix keys dilute attention early in a window (16 extra keys next to 1..256 real ones)
    ("s-p2-prefix4", "s", 2, {"prefix_tokens": 4}, "prefix length"),
    # the learning rate: 3e-3 favoured P = 1 over P > 1 in the quick preset's sweep
    ("s-p1-lr3e-3", "s", 1, {"lr": 3e-3, "min_lr": 3e-4}, "learning rate"),
    ("s-p2-lr3e-3", "s", 2, {"lr": 3e-3, "min_lr": 3e-4}, "learning rate"),
    # the token budget, on the cheapest size: does the streams' gain grow with training?
    ("xs-p1-2x", "xs", 1, {"tokens": 3_500_000}, "token budget"),
    ("xs-p2-2x", "xs", 2, {"tokens": 3_500_000}, "token budget"),
]


@contextlib.contextmanager
def shared_prefix(enabled: bool):
    """While active, every stream of every StreamSet uses stream 0's prefix (the other streams'
    prefixes get no gradient). With ε = 1 the P streams are then the same computation: a P = 1
    model with one learned prefix. Only for this ablation; the library has no such mode."""
    if not enabled:
        yield
        return
    from einops import repeat

    from parscale.model import StreamSet

    original = StreamSet.prefix

    def prefix(self, layer, batch, dtype):
        k = repeat(self.prefix_k[layer, :1], "1 h t d -> (p b) h t d", p=self.streams, b=batch).to(dtype)
        v = repeat(self.prefix_v[layer, :1], "1 h t d -> (p b) h t d", p=self.streams, b=batch).to(dtype)
        return k, v

    StreamSet.prefix = prefix
    try:
        yield
    finally:
        StreamSet.prefix = original


def base_config(size: str, streams: int, out: Path):
    """The full preset's TrainConfig for grid cell (size, P)."""
    for run in plan_runs(get_preset("full"), out):
        if run.experiment == "grid" and run.size.name == size and run.streams == streams:
            return run.config
    raise SystemExit(f"the full preset has no grid cell {size}, P = {streams}")


def _metrics(run_dir: Path) -> tuple[list[tuple[int, float]], float | None]:
    """Held-out curve [(step, loss)] and the mean aggregation entropy of the last 10% of logged steps."""
    curve, ent = [], []
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return curve, None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            curve.append((rec["step"], rec["val_loss"]))
        if "agg_entropy" in rec:
            ent.append(rec["agg_entropy"])
    tail = ent[-max(1, len(ent) // 10):] if ent else []
    return curve, (sum(tail) / len(tail) if tail else None)


def summarize(name: str, size: str, P: int, overrides: dict, what: str, run_dir: Path) -> dict | None:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    curve, ent = _metrics(run_dir)
    return {"name": name, "size": size, "P": P, "overrides": overrides, "tests": what,
            "val_loss": s["val_loss"], "tokens": s["tokens"], "params": s["params"],
            "wall_s": s["wall_s"], "final_agg_entropy": ent,
            "max_agg_entropy": math.log(P) if P > 1 else None, "val_curve": curve, "dir": str(run_dir)}


def table(rows: list[dict]) -> str:
    lines = ["| variant | tests | size | P | changed | held-out loss | vs P = 1 (same settings) | "
             "aggregation entropy / ln P |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # the P = 1 run with the same overrides (ε and prefix length do not exist at P = 1)
        ref_over = {k: v for k, v in r["overrides"].items()
                    if k not in ("agg_smoothing", "prefix_tokens", SHARED_PREFIX)}
        ref = next((q for q in rows if q["size"] == r["size"] and q["P"] == 1
                    and q["overrides"] == ref_over), None)
        delta = "" if r["P"] == 1 or ref is None else f"{r['val_loss'] - ref['val_loss']:+.4f} ({ref['name']})"
        ent = "" if r["final_agg_entropy"] is None else f"{r['final_agg_entropy'] / r['max_agg_entropy']:.2f}"
        changed = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "—"
        lines.append(f"| {r['name']} | {r['tests']} | {r['size']} | {r['P']} | {changed} | "
                     f"{r['val_loss']:.4f} | {delta} | {ent} |")
    # paired P − (P = 1) differences over seeds (seed 0 is the grid cell itself)
    seeds: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        if set(r["overrides"]) <= {"seed"}:
            seeds.setdefault((r["size"], r["P"]), {})[r["overrides"].get("seed", 0)] = r["val_loss"]
    for (size, P), by_seed in sorted(seeds.items()):
        base = seeds.get((size, 1), {})
        diffs = [by_seed[k] - base[k] for k in sorted(by_seed) if k in base]
        if P == 1 or len(diffs) < 2:
            continue
        mean = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
        p1 = [base[k] for k in sorted(base)]
        lines.append(f"\n{size}, P = {P} − P = 1 over {len(diffs)} seeds: "
                     f"{', '.join(f'{d:+.4f}' for d in diffs)}; mean {mean:+.4f}, sd {sd:.4f} "
                     f"(P = 1 alone: {min(p1):.4f}–{max(p1):.4f})")
    return "\n".join(lines)


def gap_table(grid: Path) -> str:
    """Held-out loss of every P > 1 grid run minus the same size's P = 1 run, at each evaluation
    during training (does the streams' effect grow or shrink with tokens?), and the aggregation
    entropy at the end as a fraction of ln P (1 = uniform weights, 0 = one stream takes all)."""
    runs = {}
    for d in sorted((grid / "runs").iterdir()):
        name = d.name
        if name.startswith("twostage") or "-p" not in name:
            continue
        size, p = name.rsplit("-p", 1)
        curve, ent = _metrics(d)
        runs[(size, int(p))] = (dict(curve), ent)
    steps = sorted({s for c, _ in runs.values() for s in c})
    head = "| run | " + " | ".join(f"step {s}" for s in steps) + " | entropy / ln P (end) |"
    lines = [head, "|---" * (len(steps) + 2) + "|"]
    for (size, p), (curve, ent) in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        base = runs.get((size, 1))
        if p == 1 or base is None:
            continue
        cells = [f"{curve[s] - base[0][s]:+.3f}" if s in curve and s in base[0] else "" for s in steps]
        ratio = "" if ent is None else f"{ent / math.log(p):.2f}"
        lines.append(f"| {size}-p{p} − {size}-p1 | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def stream_usage(run_dir: Path, windows: int | None = None) -> dict:
    """``parscale.diagnostics.stream_usage`` of one trained P > 1 run on its own held-out windows
    (so that ``loss`` is the run's reported held-out loss), as a dict with the run's name."""
    from parscale import ParScaleForCausalLM
    from parscale.data import prepare_data, validation_windows
    from parscale.diagnostics import stream_usage as usage

    cfg = json.loads((run_dir / "train_config.json").read_text())
    model = ParScaleForCausalLM.from_pretrained(run_dir / "model")
    data = prepare_data(cfg["data"], tokenizer=run_dir / "model", max_bytes=cfg["data_max_bytes"],
                        progress=False)
    n = windows or max(1, cfg["eval_tokens"] // cfg["seq_len"])
    val = validation_windows(data.validation, seq_len=cfg["seq_len"], n=n)
    return {"run": run_dir.name, **usage(model, val.inputs, val.labels).to_dict()}


def usage_table(grid: Path) -> str:
    """``stream_usage`` of every P > 1 grid run of a reproduction, as a markdown table."""
    rows = []
    for d in sorted((grid / "runs").iterdir()):
        if d.name.startswith("twostage") or d.name.endswith("-p1") or not (d / "model").is_dir():
            continue
        print(f"[usage] {d.name}", file=sys.stderr, flush=True)
        rows.append(stream_usage(d))
    atomic_write_text(grid / "stream_usage.json", json.dumps(rows, indent=1) + "\n")
    return format_usage(rows)


def format_usage(rows: list[dict]) -> str:
    return format_usage_by_run({r["run"]: r for r in rows})


def compare_table(a: Path, b: Path) -> str:
    """Final held-out loss of the grid runs two reproductions share (b − a)."""
    def finals(grid: Path) -> dict[str, float]:
        out = {}
        for d in (grid / "runs").iterdir():
            try:
                out[d.name] = json.loads((d / "summary.json").read_text())["val_loss"]
            except (OSError, json.JSONDecodeError, KeyError):
                pass
        return out

    fa, fb = finals(a), finals(b)
    lines = ["| run | first | second | second − first |", "|---|---|---|---|"]
    for name in sorted(set(fa) & set(fb)):
        lines.append(f"| {name} | {fa[name]:.4f} | {fb[name]:.4f} | {fb[name] - fa[name]:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the ablation runs")
    ap.add_argument("--grid", type=Path, help="a full reproduction's output directory to take baselines from")
    ap.add_argument("--only", nargs="+", help="train only these variants")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    ap.add_argument("--table", action="store_true", help="only collect finished runs and print the table")
    ap.add_argument("--gaps", type=Path, metavar="GRID", help="print the P − (P = 1) gap during training "
                    "for a reproduction's output directory, and stop")
    ap.add_argument("--usage", type=Path, metavar="GRID", help="what the streams of every P > 1 grid run "
                    "do on held-out text (weights, single-stream losses), and stop")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("FIRST", "SECOND"),
                    help="print the final losses of the runs two reproductions share, and stop")
    args = ap.parse_args(argv)
    if args.gaps:
        print(gap_table(args.gaps))
        return 0
    if args.usage:
        print(usage_table(args.usage))
        return 0
    if args.compare:
        print(compare_table(*args.compare))
        return 0
    names = [v[0] for v in VARIANTS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    rows = []
    for name, size, P, overrides, what in VARIANTS:
        run_dir = args.out / name
        if not overrides and args.grid and (args.grid / "runs" / grid_name(size, P) / "summary.json").exists():
            run_dir = args.grid / "runs" / grid_name(size, P)
        elif not args.table and (args.only is None or name in args.only):
            options = {k: v for k, v in overrides.items() if k != SHARED_PREFIX}
            cfg = dataclasses.replace(base_config(size, P, args.out), **options, out=str(run_dir),
                                      threads=args.threads)
            print(f"[ablate] {name}: {overrides or 'grid settings'}", file=sys.stderr, flush=True)
            with shared_prefix(bool(overrides.get(SHARED_PREFIX))):
                train(cfg)
        row = summarize(name, size, P, overrides, what, run_dir)
        if row is not None:
            rows.append(row)
    atomic_write_text(args.out / "ablations.json", json.dumps({"variants": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
