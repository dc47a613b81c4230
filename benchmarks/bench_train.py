"""Training throughput of ParScale: tokens/s for P = 1, 2, 4, 8, and the step-time ratio of a
P-stream model at batch B to the plain backbone at batch P·B.

The step is the trainer's (``parscale.training``): forward, float32 cross-entropy over every
position, backward, gradient clipping and an AdamW step. Inputs are random token ids (throughput
does not depend on the text). One small size: 4 layers, hidden 128, seq 128, prefix 48, vocab 2048.

Two numbers per P:

* tokens/s — training tokens (input tokens, not × P) per second at batch B;
* ratio — step time of the P-stream model at batch B over the step time of the P = 1 model at
  batch P·B. Both process P·B sequences through the backbone; ParScale adds the prefix keys (48
  more keys per query) and the aggregator, and saves P − 1 embedding lookups and LM heads. The
  target is ≤ 1.10 (ParScale's extra work should be small next to the backbone's).

Rounds are interleaved (every configuration once per round) and the median step time is used, so
slow phases of a shared machine hit all configurations alike.

    python benchmarks/bench_train.py [--batch 8] [--rounds 5] [--steps 3] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from parscale import ParScaleConfig, ParScaleForCausalLM


def make(P: int, vocab: int, seq: int) -> tuple[ParScaleForCausalLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = ParScaleConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(2048, seq),
                         streams=P, prefix_tokens=48)
    model = ParScaleForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def step(model, opt, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    logits = model(x[:, :-1]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="B: sequences per step of the P-stream model")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable numbers on a shared machine; 0: torch default)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2 steps (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    B, S, V = args.batch, args.seq, args.vocab
    Ps = [1, 2, 4, 8]
    g = torch.Generator().manual_seed(0)
    # configurations: ("par", P) = P streams at batch B; ("dense", P) = P = 1 at batch P·B
    configs = [("par", P) for P in Ps] + [("dense", P) for P in Ps if P > 1]
    setups = {}
    for kind, P in configs:
        model, opt = make(P if kind == "par" else 1, V, S)
        rows = B if kind == "par" else P * B
        x = torch.randint(0, V, (rows, S + 1), generator=g)
        step(model, opt, x)  # warm-up (allocations, first-call overheads)
        setups[(kind, P)] = (model, opt, x)
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            model, opt, x = setups[c]
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(model, opt, x)
                times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(v) for c, v in times.items()}

    print(f"training step, 4 layers, hidden 128, seq {S}, vocab {V}, prefix 48, B = {B}, "
          f"threads {torch.get_num_threads()}, median of {args.rounds}×{args.steps} steps")
    print(f"{'P':>3} {'step ms':>9} {'tokens/s':>10} {'P=1 @ P·B ms':>14} {'ratio':>7}")
    for P in Ps:
        t = med[("par", P)]
        dense = med[("dense", P)] if P > 1 else t
        ratio = t / dense
        flag = "" if P == 1 else ("  ok (<= 1.10)" if ratio <= 1.10 else "  ABOVE 1.10")
        print(f"{P:>3} {t * 1e3:>9.1f} {B * S / t:>10,.0f} {dense * 1e3:>14.1f} {ratio:>7.3f}{flag}")


if __name__ == "__main__":
    main()
