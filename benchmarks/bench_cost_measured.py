"""Measured mode of the cost model: time OUR model and set the numbers beside the predictions.

For a small config, P ∈ {1, 2, 4, 8} and batch ∈ {1, 2, 4, 8}, one ``model.generate`` call
(prefill of ``--input`` tokens, then ``--output`` new tokens, greedy) is timed, and memory is
taken from the tensors actually allocated: parameter bytes of the backbone plus the active
stream set, and the bytes of the KV cache that ``generate`` allocates (``model.new_cache``).
Activations are not measured (PyTorch's CPU allocator keeps no statistics), so the predicted
memory compared here is also weights + KV cache only.

The equal-loss dense model (``parscale.cost.equal_loss_dense``, nearest buildable width) is
built and timed too, so the paper's two numbers — memory and latency increase of ParScale over
the P = 1 model, divided by the dense model's — are measured as well as predicted.

Predictions use a user hardware preset describing this machine *roughly*: its peak is what two
micro-benchmarks reach here (a float32 matmul for FLOP/s, a large tensor sum for bandwidth), and
both efficiencies are 1. A CPU running many small kernels from Python is not a roofline machine
(per-step overhead dominates small decode steps), so expect the ratios, not the absolute times,
to be comparable. All ratios come from one run; rounds are interleaved and the median is used.

    python benchmarks/bench_cost_measured.py [--quick] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from parscale import ParScaleConfig, ParScaleForCausalLM
from parscale.cost import custom_hardware, equal_loss_dense, estimate


def calibrate(threads: int) -> tuple[float, float]:
    """(FLOP/s, bytes/s) this process reaches: best of a few float32 matmuls and tensor sums."""
    a, b = torch.randn(1024, 384), torch.randn(384, 1024)
    for _ in range(3):
        a @ b  # warm-up
    best_f = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best_f = max(best_f, 10 * 2 * 1024 * 384 * 1024 / (time.perf_counter() - t0))
    x = torch.randn(32 * 1024 * 1024)  # 128 MB: far beyond the caches
    x.sum()
    best_b = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best_b = max(best_b, x.numel() * 4 / (time.perf_counter() - t0))
    return best_f, best_b


def weight_bytes(model: ParScaleForCausalLM) -> int:
    """Bytes of the parameters a generate call uses: backbone (tied weights once) + active set."""
    params = list(model.backbone_parameters())
    if model.stream_set is not None:
        params += list(model.stream_set.parameters())
    return sum(p.numel() * p.element_size() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prefix", type=int, default=48)
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 2 only, one round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    Ps = [1, 2, 4, 8]
    batches = [1, 2] if args.quick else [1, 2, 4, 8]
    rounds = 1 if args.quick else args.rounds

    heads = args.hidden // 64
    cfg = ParScaleConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         prefix_tokens=args.prefix, streams=1, stream_sets=Ps)
    model = ParScaleForCausalLM(cfg).eval()
    dense = {P: equal_loss_dense(cfg, P) for P in Ps if P > 1}
    dense_models = {P: ParScaleForCausalLM(d.nearest_config).eval() for P, d in dense.items()}

    flops, bw = calibrate(args.threads)
    cpu = custom_hardware(flops, bw, name="this-cpu", flops_eff=1.0, mem_eff=1.0)
    print(f"config: hidden {args.hidden}, layers {args.layers}, heads {heads}, vocab {args.vocab}, "
          f"prefix {args.prefix}, {args.input}+{args.output} tokens, float32, {args.threads} thread(s)")
    print(f"user preset for this CPU (measured, efficiencies 1): {flops / 1e9:.1f} GFLOP/s, "
          f"{bw / 1e9:.1f} GB/s")
    for P, d in dense.items():
        print(f"equal-loss dense for P={P}: hidden {d.nearest_config.hidden_size}, intermediate "
              f"{d.nearest_config.intermediate_size}, {d.nearest_non_embedding:,} non-embedding params "
              f"(target {d.target_non_embedding:,.0f})")

    def run_once(m: ParScaleForCausalLM, b: int) -> float:
        ids = torch.randint(0, args.vocab, (b, args.input))
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=args.output, do_sample=False)
        dt = time.perf_counter() - t0
        assert out.shape == (b, args.input + args.output)
        return dt

    # memory from allocated tensors
    mem: dict[tuple, int] = {}
    for b in batches:
        for P in Ps:
            model.set_streams(P)
            cache = model.new_cache(b, args.input + args.output)
            mem[("ps", P, b)] = weight_bytes(model) + cache.nbytes()
            del cache
        for P, dm in dense_models.items():
            cache = dm.new_cache(b, args.input + args.output)
            mem[("dense", P, b)] = weight_bytes(dm) + cache.nbytes()

    # latency: rounds interleaved over every configuration, median per configuration
    times: dict[tuple, list[float]] = {}
    with torch.no_grad():
        model.set_streams(1)
        run_once(model, 1)  # warm-up
        for r in range(rounds):
            for b in batches:
                for P in Ps:
                    model.set_streams(P)
                    times.setdefault(("ps", P, b), []).append(run_once(model, b))
                for P, dm in dense_models.items():
                    times.setdefault(("dense", P, b), []).append(run_once(dm, b))
            print(f"round {r + 1}/{rounds} done", flush=True)
    lat = {k: statistics.median(v) for k, v in times.items()}

    def pred(c: ParScaleConfig, P: int, b: int):
        e = estimate(c, P, batch=b, input_tokens=args.input, output_tokens=args.output,
                     dtype="fp32", hardware=cpu)
        return e.weight_bytes + e.kv_cache_bytes, e.latency_s

    print("\nratio to P=1 at the same batch (measured / predicted)")
    print(f"{'P':>3}{'batch':>7}{'memory MB':>11}{'mem ratio':>11}{'pred':>8}"
          f"{'latency s':>11}{'lat ratio':>11}{'pred':>8}")
    for b in batches:
        m1, l1 = mem[("ps", 1, b)], lat[("ps", 1, b)]
        pm1, pl1 = pred(cfg, 1, b)
        for P in Ps:
            m, t = mem[("ps", P, b)], lat[("ps", P, b)]
            pm, pl = pred(cfg, P, b)
            print(f"{P:>3}{b:>7}{m / 1e6:>11.1f}{m / m1:>11.3f}{pm / pm1:>8.3f}"
                  f"{t:>11.3f}{t / l1:>11.2f}{pl / pl1:>8.2f}")

    print("\nParScale increase / equal-loss dense increase (over the P=1 model; <1: ParScale cheaper)")
    print("'noisy': the dense model's latency increase is smaller than the spread of the P=1 runs")
    print(f"{'P':>3}{'batch':>7}{'memory':>10}{'pred':>8}{'ParScale +s':>13}{'dense +s':>10}"
          f"{'latency':>10}{'pred':>8}")
    for b in batches:
        m1, l1 = mem[("ps", 1, b)], lat[("ps", 1, b)]
        spread = max(times[("ps", 1, b)]) - min(times[("ps", 1, b)])
        pm1, pl1 = pred(cfg, 1, b)
        for P in Ps[1:]:
            dc = dense[P].nearest_config
            pm, pl = pred(cfg, P, b)
            dm_, dl = pred(dc, 1, b)
            mr = (mem[("ps", P, b)] - m1) / (mem[("dense", P, b)] - m1)
            ps_inc, dense_inc = lat[("ps", P, b)] - l1, lat[("dense", P, b)] - l1
            noisy = "  noisy" if abs(dense_inc) <= spread else ""
            print(f"{P:>3}{b:>7}{mr:>10.3f}{(pm - pm1) / (dm_ - pm1):>8.3f}{ps_inc:>+13.3f}"
                  f"{dense_inc:>+10.3f}{ps_inc / dense_inc:>10.2f}{(pl - pl1) / (dl - pl1):>8.2f}{noisy}")

if __name__ == "__main__":
    main()
