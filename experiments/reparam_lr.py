"""Is the prefix reparameterisation's learning rate what hurts it (issue 16)?

Under Adam every weight moves about ``lr`` per step. The reparameterisation's output layer has H
(512) weights per prefix value and their moves add up coherently, so its prefixes move about
``lr·Σ|h|`` (a few hundred ``lr``) per step where plain prefixes move ``lr``. This trains runs of the full preset's grid
with the reparameterisation at ``--scales`` (its learning rate as a multiple of the preset's;
``1/H`` puts the prefixes' step on a par with plain ones), ``--threads`` torch threads each (1), and prints each
run's held-out loss and its final prefixes' standard deviation (they start at 0.02), next to the
runs of the same names in ``--reference`` reproductions (e.g. the plain-prefix and the unscaled
reparameterised full runs).

    python experiments/reparam_lr.py --out runs/reparam-lr --runs xs-p2 xs-p1-prefix \\
        --scales 0.001953125 0.03125 --plain --reference docs/reproduction runs/reproduce-full-reparam
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time
from pathlib import Path

from parscale.reproduce import get_preset, plan_runs


def prefix_std(model_dir: str) -> float | None:
    """The pooled standard deviation of every stored prefix key/value tensor of a saved model."""
    import torch
    from safetensors import safe_open

    values = []
    for f in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with safe_open(f, "pt") as st:
            values += [st.get_tensor(k).float().flatten() for k in st.keys() if ".prefix_" in k]
    return float(torch.cat(values).std()) if values else None


def reference_loss(root: str, name: str) -> tuple[float | None, float | None]:
    """(held-out loss, prefix std) of run ``name`` in a reproduction folder (results.json; its run
    folder for the std when it is still there)."""
    loss = None
    res = Path(root) / "results.json"
    if res.is_file():
        for r in json.loads(res.read_text()).get("runs", []):
            if r.get("name") == name:
                loss = r.get("val_loss")
    model = Path(root) / "runs" / name / "model"
    if loss is None and (Path(root) / "runs" / name / "summary.json").is_file():
        loss = json.loads((Path(root) / "runs" / name / "summary.json").read_text()).get("val_loss")
    return loss, prefix_std(str(model)) if model.is_dir() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="+", default=["xs-p2", "xs-p1-prefix"])
    ap.add_argument("--scales", nargs="*", type=float, default=[1 / 512])
    ap.add_argument("--reference", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="also train the runs with plain prefixes (no reparameterisation)")
    args = ap.parse_args()

    from parscale.training import train

    rows = []
    for scale in ([None] if args.plain else []) + args.scales:
        preset = dataclasses.replace(get_preset("full"), prefix_reparam=scale is not None,
                                     reparam_lr_scale=1.0 if scale is None else scale)
        out = Path(args.out) / ("plain" if scale is None else f"scale-{scale:g}")
        plan = {r.name: r for r in plan_runs(preset, out, threads=args.threads, baseline="prefix")}
        for name in args.runs:
            t0 = time.perf_counter()
            res = train(plan[name].config)
            rows.append(("plain prefixes" if scale is None else f"reparam x {scale:g}", name, res.val_loss,
                         prefix_std(res.model_dir), time.perf_counter() - t0))
    for root in args.reference:
        for name in args.runs:
            loss, std = reference_loss(root, name)
            rows.append((f"reference {root}", name, loss, std, None))
    print(f"{'recipe':>44} {'run':>14} {'held-out':>9} {'prefix std':>11} {'s':>6}")
    for recipe, name, loss, std, secs in rows:
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{recipe:>44} {name:>14} {f(loss, '.4f'):>9} {f(std, '.3f'):>11} {f(secs, '.0f'):>6}")


if __name__ == "__main__":
    main()
