"""Decode speed from the thread that loaded the model against a second thread, in one run.

torch's CPU ops run on an OpenMP thread pool that belongs to the thread which first ran parallel
work. When a second thread drives the model, it gets a pool of its own; with more pool threads
than cores, libgomp (GCC's OpenMP runtime, which torch's CPU wheels use) stops spin-waiting
between parallel regions, so every op pays a thread wake-up. That is why ``parscale serve`` runs
its engine loop in the loading thread (``Engine.host``). This script shows the effect without a
server: the same model and the same decode loop (``generation.Decoder``, batch 1, greedy), timed
in the main thread, in a second thread, and in the main thread again, min of ``--rounds``.

    python benchmarks/bench_threads.py                      # SmolLM2-135M's shape, random weights
    python benchmarks/bench_threads.py --model runs/smollm2 --quantize int8 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_decode import CONFIGS, load  # noqa: E402

from parscale import ParScaleConfig, ParScaleForCausalLM  # noqa: E402
from parscale.generation import Decoder  # noqa: E402


def ms_per_step(model, steps: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        dec = Decoder(model)
        dec.add(torch.zeros(1, 8, dtype=torch.long), max_new_tokens=steps + 1, eos_token_id=[])
        dec.step()  # the first token comes from the prefill's logits
        t0, n = time.perf_counter(), 0
        while dec.live:
            dec.step()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint directory (default: SmolLM2-135M's shape, random weights)")
    ap.add_argument("--quantize", choices=["int8"], default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = ParScaleForCausalLM.from_pretrained(args.model, quantize=args.quantize)
    else:
        model = ParScaleForCausalLM(ParScaleConfig(**CONFIGS["smollm2-135m"], max_position_embeddings=4096))
        if args.quantize:
            from parscale.quant import quantize_

            quantize_(model)
    model.eval()
    print(f"bench_threads: torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, {args.model or 'smollm2-135m shape (random)'}"
          f"{', int8' if args.quantize else ''}; {load()}")
    times = {"main thread": ms_per_step(model, args.steps, args.rounds)}
    out = {}
    th = threading.Thread(target=lambda: out.update(t=ms_per_step(model, args.steps, args.rounds)))
    th.start()
    th.join()
    times["second thread"] = out["t"]
    times["main thread again"] = ms_per_step(model, args.steps, args.rounds)
    ref = min(times["main thread"], times["main thread again"])
    print(f"batch 1, {args.steps} greedy decode steps, min of {args.rounds} rounds")
    for k, v in times.items():
        print(f"{k:>18}: {v:7.2f} ms/step   ÷ main {v / ref:5.2f}")
    print(load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
