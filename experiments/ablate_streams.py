"""Ablations of the full reproduction preset: what changes whether P > 1 streams beat P = 1.

The committed full run (docs/reproduction/) compares P at one seed per cell. This script reruns
single grid cells of the ``full`` preset with one setting changed at a time (the seed, the
aggregation smoothing ε, the prefix length; learning-rate and token-budget variants are listed,
commented out) so that the report can say what was tried and how large each effect is next to
the seed-to-seed noise. Each variant is an ordinary training run in ``OUT/NAME`` (re-running
skips finished ones and resumes interrupted ones), and the script writes ``OUT/ablations.json``
plus a markdown table on stdout.

    python experiments/ablate_streams.py --out runs/ablations               # every variant
    python experiments/ablate_streams.py --out runs/ablations --only s-p2-eps1 s-p1-seed1
    python experiments/ablate_streams.py --out runs/ablations --table       # table only
    python experiments/ablate_streams.py --out x --gaps runs/reproduce-full  # P gap during training
    python experiments/ablate_streams.py --out x --compare FIRST_RUN SECOND_RUN

Variants named like a grid run (``s-p1``) with no overrides are read from ``--grid`` (a full
reproduction's output directory) when it has them, instead of being trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from parscale.atomic import atomic_write_text
from parscale.reproduce import get_preset, grid_name, plan_runs
from parscale.training.trainer import train

# (name, size, P, overrides of the full preset's TrainConfig for that grid cell, what it tests)
VARIANTS: list[tuple[str, str, int, dict, str]] = [
    ("s-p1", "s", 1, {}, "grid cell (baseline)"),
    ("s-p2", "s", 2, {}, "grid cell (baseline)"),
    # seed-to-seed noise: the seed sets the initial weights (the same backbone for every P) and
    # the batch order, so each seed is a paired P = 1 / P = 2 comparison of its own
    ("s-p1-seed1", "s", 1, {"seed": 1}, "seed"),
    ("s-p2-seed1", "s", 2, {"seed": 1}, "seed"),
    ("s-p1-seed2", "s", 1, {"seed": 2}, "seed"),
    ("s-p2-seed2", "s", 2, {"seed": 2}, "seed"),
    # the aggregator collapses onto one stream within ~50 steps (entropy << ln P); ε = 1 forces
    # the uniform mean of the streams, so every stream gets its full share of the gradient
    ("s-p2-eps1", "s", 2, {"agg_smoothing": 1.0}, "aggregation"),
    # prefix keys dilute attention early in a window (16 extra keys next to 1..256 real ones)
    ("s-p2-prefix4", "s", 2, {"prefix_tokens": 4}, "prefix length"),
    # learning rate and budget: add lines like these (not run for the committed report)
    # ("s-p2-lr1e-3", "s", 2, {"lr": 1e-3, "min_lr": 1e-4}, "learning rate"),
    # ("s-p2-2x", "s", 2, {"tokens": 3_500_000}, "token budget"),
]


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
        ref_over = {k: v for k, v in r["overrides"].items() if k not in ("agg_smoothing", "prefix_tokens")}
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
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("FIRST", "SECOND"),
                    help="print the final losses of the runs two reproductions share, and stop")
    args = ap.parse_args(argv)
    if args.gaps:
        print(gap_table(args.gaps))
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
            cfg = dataclasses.replace(base_config(size, P, args.out), **overrides, out=str(run_dir),
                                      threads=args.threads)
            print(f"[ablate] {name}: {overrides or 'grid settings'}", file=sys.stderr, flush=True)
            train(cfg)
        row = summarize(name, size, P, overrides, what, run_dir)
        if row is not None:
            rows.append(row)
    atomic_write_text(args.out / "ablations.json", json.dumps({"variants": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
