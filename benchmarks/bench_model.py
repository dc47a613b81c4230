"""Model benchmark: decode-step latency vs P at batch 1, and ParScale's forward overhead.

Prints ratios measured in one run (the machine is noisy, absolute times are not comparable
across runs):
  1. decode-step latency at batch 1 for P = 1, 2, 4, 8, as a ratio to P = 1;
  2. forward time of a P-stream model at batch B versus the plain backbone (P = 1) at batch P·B —
     the same number of rows, so the ratio isolates what ParScale adds (prefix keys, the
     aggregator, the repeat of the embedding).
Measurements are interleaved round by round and the median is reported.

    python benchmarks/bench_model.py [--hidden 256 --layers 4 --seq 128 --rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from parscale import ParScaleConfig, ParScaleForCausalLM


def timed(fn, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prefix", type=int, default=48)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    Ps = [1, 2, 4, 8]
    cfg = ParScaleConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), prefix_tokens=args.prefix,
                         streams=1, stream_sets=Ps)
    model = ParScaleForCausalLM(cfg).eval()
    print(f"config: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}, prefix {args.prefix}, "
          f"threads {args.threads}; non-embedding params at P=1: {model.set_streams(1).num_parameters(True):,}")

    # 1. decode-step latency, batch 1 (prompt of 32 tokens, then `steps` single-token steps)
    prompt = torch.randint(0, args.vocab, (1, 32))
    decode = {P: [] for P in Ps}
    with torch.no_grad():
        for _ in range(args.rounds):
            for P in Ps:
                model.set_streams(P)
                cache = model.new_cache(1, 32 + args.steps + 1)
                model(prompt, cache=cache)
                tok = torch.zeros(1, 1, dtype=torch.long)
                decode[P].append(timed(lambda: model(tok, cache=cache), args.steps))
    base = statistics.median(decode[1])
    print("\n1. decode step at batch 1 (median over rounds)")
    print(f"{'P':>3} {'ms/step':>9} {'ratio to P=1':>13}")
    for P in Ps:
        m = statistics.median(decode[P])
        print(f"{P:>3} {m * 1e3:>9.2f} {m / base:>13.2f}")

    # 2. forward overhead: P streams at batch B vs plain backbone at batch P·B
    print(f"\n2. forward (no grad), seq {args.seq}: P streams at batch {args.batch} vs plain backbone at batch P·{args.batch}")
    print(f"{'P':>3} {'parscale ms':>12} {'plain ms':>9} {'overhead':>9}")
    with torch.no_grad():
        for P in Ps[1:]:
            x_ps = torch.randint(0, args.vocab, (args.batch, args.seq))
            x_plain = torch.randint(0, args.vocab, (P * args.batch, args.seq))
            ps, plain = [], []
            for _ in range(args.rounds):
                model.set_streams(P)
                ps.append(timed(lambda: model(x_ps)))
                model.set_streams(1)
                plain.append(timed(lambda: model(x_plain)))
            a, b = statistics.median(ps), statistics.median(plain)
            print(f"{P:>3} {a * 1e3:>12.1f} {b * 1e3:>9.1f} {a / b:>9.3f}")
    print("\nNote: the plain backbone at batch P·B computes the LM head P·B times; ParScale only B times "
          "(after aggregation), which can make the overhead ratio < 1 when the vocabulary is large.")


if __name__ == "__main__":
    main()
