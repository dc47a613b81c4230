"""Decode benchmark: batch-1 ms/token for P = 1, 2, 4, 8 in float32 / bfloat16 / int8, against the
bandwidth roofline measured in the same run.

A decode step at batch 1 reads every weight once, whatever P is, so on a memory-bound machine P
streams should cost almost nothing: ``roofline = bytes read per step / streaming-read
bandwidth``, the bytes being every weight once (the stream set's aggregator included) plus the KV
cache the step attends to (P·B rows of prefix and tokens: the part that does grow with P). This script measures that bandwidth (the fastest of sum, dot and gemv over a 512 MB
buffer, the same threads as the model), then for three shapes (random weights; the real SmolLM2 is only its shape here):

* ``174M``: hidden 1024, 16 layers, 8 heads / 2 KV heads, intermediate 2816, vocab 8192;
* ``33M``:  hidden 512, 12 layers, 8 / 2 heads, intermediate 1408, vocab 8192;
* ``smollm2-135m``: hidden 576, 30 layers, 9 / 3 heads, intermediate 1536, vocab 49152, tied;

all with 48 prefix tokens, it prints

1. ms per new token (model forward with the KV cache holding 64 tokens plus the prefix) for each
   dtype and P, the ratio to float32 P = 1 and to the same dtype's P = 1, and the share of the
   roofline reached; beside it the step's arithmetic (2 FLOP per weight element and row) timed at
   the rate the variant's own decode product reaches at P·B rows with its weight in cache (a
   1.5 MB weight, less the same call on 16 rows of it: the arithmetic alone, measured in the
   same run, per dtype: bfloat16 and int8 multiply pairs, float32 one product per lane), and the
   share of the larger of the two bounds (``% bound``): where P·B rows cost more arithmetic than
   the memory reads hide, the step is compute-bound, and no kernel makes P free there;
2. time to first token (the prefill forward) for a 512-token prompt, P = 1 and P = 8;
3. a batch sweep B = 1, 2, 4, 8, 16 at P = 8 vs P = 1 (174M): where P stops being nearly free.

Timings are interleaved (every variant once per round) and the minimum over rounds is reported,
so a shared machine's slow phases hit every variant alike; the load (``uptime``) is printed
before and after. Ratios within one run are the numbers to compare.

    python benchmarks/bench_decode.py                 # the full set (~5-8 min on 2 cores)
    python benchmarks/bench_decode.py --quick         # fewer rounds/steps, one config, short prompt
    python benchmarks/bench_decode.py --threads 1 --configs 33M --dtypes float32 bfloat16
    python benchmarks/bench_decode.py --configs smollm2-135m --dtypes int8 int8+compile --ttft 0 --batches
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import statistics
import time

import torch
from torch import nn

from parscale import ParScaleConfig, ParScaleForCausalLM, kernels
from parscale.model import _decode_linear
from parscale.quant import Int8Linear, quantize_

CONFIGS = {
    "174M": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=2816, vocab_size=8192, tie_word_embeddings=True),
    "33M": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, vocab_size=8192, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         attention_bias=False, rope_theta=100000.0),
}
PS = [1, 2, 4, 8]


def load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def rss_mb() -> float:
    """This process's resident memory in MB (Linux /proc; nan elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return float("nan")


def bandwidth(threads: int, mbytes: int = 512, rounds: int = 7) -> tuple[float, dict[str, float]]:
    """Streaming-read bandwidth in bytes/s: the fastest of three read-only kernels over a buffer far
    larger than the caches (min time of ``rounds`` each). No single kernel saturates the memory bus
    everywhere (a torch ``sum`` is compute-limited at 2 threads here), so the best is the bound."""
    buf = torch.ones(mbytes * 2 ** 20 // 4)
    mat = buf.view(4096, -1)
    vec = torch.ones(mat.shape[1])
    kernels = {"sum": lambda: buf.sum(), "dot": lambda: torch.dot(buf, buf), "gemv": lambda: torch.mv(mat, vec)}
    rates = {}
    for name, fn in kernels.items():
        fn()
        rates[name] = buf.numel() * 4 / min(_timed(fn) for _ in range(rounds))
    return max(rates.values()), rates


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_tensors(model: ParScaleForCausalLM) -> list[torch.Tensor]:
    """The tensors a batch-1 decode step reads: every weight except the embedding table (one row),
    plus the active stream set's aggregation (prefixes are read from the cache, counted with it)."""
    out, seen = [], set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name.startswith("stream_sets.") or "rotary" in name:
            continue
        seen.add(id(t))
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        out.append(t)
    if model.stream_set is not None:
        out += list(model.stream_set.aggregate_layer.parameters())
    return out


def step_bytes(model: ParScaleForCausalLM) -> int:
    return sum(t.numel() * t.element_size() for t in step_tensors(model))


def step_flops(model: ParScaleForCausalLM, rows: int) -> int:
    """Multiply-adds × 2 of a decode step's products: every weight element once per row (P·B)."""
    return 2 * rows * sum(t.numel() for t in step_tensors(model))


def matmul_peak(rounds: int = 5) -> float:
    """float32 FLOP/s of a cache-friendly square product (torch.mm, 1024²): the machine's phase."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    return 2 * 1024 ** 3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(rounds))


_RATES: dict = {}


def product_rate(variant: str, rows: int, rounds: int = 9, calls: int = 32) -> float:
    """FLOP/s of the arithmetic alone in ``variant``'s decode product at ``rows`` rows: the product
    the model's decode step makes (``_decode_linear``: the native kernel, int8's own path, or torch's
    under ``+torchmm``) on a 1.5 MB weight of 1024 columns that stays in cache (each core's share fits
    its L2), less the same call on 16 rows of it (the per-call cost), the median over ``rounds`` of
    ``calls`` each."""
    dtype = variant.partition("+")[0]
    key = (dtype, variant.endswith("+torchmm"), rows)
    if key not in _RATES:
        n = {"float32": 384, "bfloat16": 768, "int8": 1536}[dtype]  # 1.5 MB whatever the dtype

        def make(out: int) -> nn.Module:
            lin = nn.Linear(1024, out, bias=False).eval()
            return lin.to(torch.bfloat16) if dtype == "bfloat16" else Int8Linear.from_linear(lin) if dtype == "int8" else lin

        x = torch.randn(rows, 1, 1024, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)

        def calls_s(lin: nn.Module) -> float:
            return _timed(lambda: [_decode_linear(lin, x) for _ in range(calls)]) / calls

        big, small = make(n), make(16)
        with torch.inference_mode(), matmuls(variant):
            calls_s(big), calls_s(small)
            # the two interleaved round by round (a shared machine's phases hit both), the median difference
            t = statistics.median(calls_s(big) - calls_s(small) for _ in range(rounds))
        _RATES[key] = 2 * rows * 1024 * (n - 16) / t if t > 0 else float("nan")
    return _RATES[key]


def variants(base: ParScaleForCausalLM, dtypes: list[str]) -> dict[str, ParScaleForCausalLM]:
    """One model per variant: a dtype, optionally ``+prepack`` (``ParScaleForCausalLM.prepack``,
    float32 only), ``+torchmm`` (torch's kernels only, the native kernels of ``parscale.kernels``
    switched off: its A/B), ``+compile`` (``ParScaleForCausalLM.compile_decode``)
    or ``+frozen`` (``compile_decode(freeze=True)``)."""
    out = {}
    for d in dtypes:
        dtype, _, extra = d.partition("+")
        if (extra not in ("", "prepack", "torchmm", "compile", "frozen")
                or (extra == "prepack" and dtype != "float32")):
            raise SystemExit(f"unknown variant {d}")
        if dtype == "float32":
            m = copy.deepcopy(base) if extra else base
        elif dtype == "bfloat16":
            m = copy.deepcopy(base).to(torch.bfloat16).eval()
        elif dtype == "int8":
            m = quantize_(copy.deepcopy(base)).eval()
        else:
            raise SystemExit(f"unknown variant {d}")
        if extra in ("compile", "frozen"):
            m.compile_decode(freeze=extra == "frozen")
        out[d] = m.prepack() if extra == "prepack" else m
    return out


def matmuls(variant: str):
    """The context a variant's steps run in: ``+torchmm`` switches the native kernels off."""
    return kernels.disabled() if variant.endswith("+torchmm") else contextlib.nullcontext()


def compiled(variant: str) -> bool:
    """Whether a variant name runs compiled decode steps (``+compile`` / ``+frozen``)."""
    return variant.endswith(("+compile", "+frozen"))


def prepacked_mb(model: ParScaleForCausalLM) -> float:
    """MB held by prepacked weight copies (for oneDNN's opaque layout: its logical size)."""
    from parscale.model import PackedLinear

    total = 0
    for m in model.modules():
        for v in m.__dict__.values():
            if isinstance(v, PackedLinear) and v._blocked is not None:
                t = v._blocked[1]
                total += t.numel() * t.element_size()
    return total / 1e6


class Stepper:
    """One variant's decode state: a KV cache holding ``filled`` token slots (zeros: their values
    do not change the time), kept across rounds so nothing is prefilled between timings. ``variant``
    names the context its steps run in (``matmuls``)."""

    def __init__(self, model, P: int, batch: int, filled: int, capacity: int, variant: str = ""):
        self.model, self.P, self.variant = model, P, variant
        model.set_streams(P)
        self.cache = model.new_cache(batch, filled + capacity)
        self.cache.advance_positions(None, filled)  # a prompt's worth of slots, as the model would
        self.cache.length += filled
        self.tok = torch.zeros(batch, 1, dtype=torch.long)
        t0 = time.perf_counter()
        with torch.inference_mode(), matmuls(variant):  # the first step: for a compiled variant, its compile
            model(self.tok, cache=self.cache)
        self.first_s = time.perf_counter() - t0
        # the keys and values a step reads (prefix and tokens so far, every layer): P·B rows' worth
        c = self.cache
        self.kv_bytes = sum(2 * k[..., :c.n_prefix + c.length, :].numel() * k.element_size() for k in c.k)

    @torch.inference_mode()
    def ms(self, steps: int) -> float:
        """ms per decode step over ``steps`` steps (after one untimed step)."""
        self.model.set_streams(self.P)
        with matmuls(self.variant):
            self.model(self.tok, cache=self.cache)
            t0 = time.perf_counter()
            for _ in range(steps):
                self.model(self.tok, cache=self.cache)
            return (time.perf_counter() - t0) / steps * 1e3


@torch.inference_mode()
def prefill_ms(model, P: int, prompt: int) -> float:
    model.set_streams(P)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, prompt + 1)
    t0 = time.perf_counter()
    model(ids, cache=cache)
    return (time.perf_counter() - t0) * 1e3


def build(name: str, weights: str | None = None) -> ParScaleForCausalLM:
    torch.manual_seed(0)
    if weights:  # real weights (a checkpoint directory or a .gguf); random stream sets for P > 1
        model = ParScaleForCausalLM.from_pretrained(weights)
        if model.config.prefix_tokens != 48:
            model.config.prefix_tokens = 48
        for P in PS[1:]:
            if str(P) not in model.stream_sets:
                model.add_stream_set(P)
        return model.set_streams(1).eval()
    cfg = ParScaleConfig(**CONFIGS[name], prefix_tokens=48, streams=1, stream_sets=PS,
                         max_position_embeddings=4096)
    return ParScaleForCausalLM(cfg).eval()


def run_config(name: str, args, bw: float) -> None:
    base = build(name, args.smollm2 if name == "smollm2-135m" else None)
    nonemb = base.set_streams(1).num_parameters(non_embedding=True)
    models = variants(base, args.dtypes)
    source = "real weights" if name == "smollm2-135m" and args.smollm2 else "random weights"
    print(f"\n== {name} ({source}): hidden {base.config.hidden_size}, {base.config.num_hidden_layers} layers, "
          f"heads {base.config.num_attention_heads}/{base.config.num_key_value_heads}, "
          f"intermediate {base.config.intermediate_size}, vocab {base.config.vocab_size}, "
          f"{nonemb / 1e6:.1f}M non-embedding params; {load()}")
    keys = [(d, P) for d in models for P in PS]
    _RATES.clear()  # measured again beside each config's timings: the machine's phase drifts
    each = "; ".join(f"{d} " + " ".join(f"{P}:{product_rate(d, P) / 1e9:.0f}" for P in PS) for d in models)
    print(f"arithmetic rate of each variant's product with its weight in cache, GFLOP/s at P rows: {each}")
    room = args.rounds * (args.steps + 1) + 2
    rss0 = rss_mb()
    steppers = {(d, P): Stepper(models[d], P, 1, args.prompt, room, d) for d, P in keys}
    print(f"resident memory: {rss0:.0f} MB with the variants loaded, {rss_mb():.0f} MB after their first "
          "steps (compiled graphs, frozen weight copies, caches)")
    first = {k: st.first_s for k, st in steppers.items()}
    kv = {k: st.kv_bytes for k, st in steppers.items()}
    times = {k: [] for k in keys}
    for _ in range(args.rounds):
        for k in keys:
            times[k].append(steppers[k].ms(args.steps))
    del steppers
    best = {k: min(v) for k, v in times.items()}
    ref = best.get(("float32", 1))
    print(f"1. decode, batch 1, {args.prompt} tokens in the cache, min of {args.rounds} rounds × {args.steps} steps")
    print(f"{'variant':>16} {'P':>2} {'ms/token':>9} {'÷ fp32 P=1':>11} {'÷ own P=1':>10} "
          f"{'MB/step':>8} {'roofline ms':>12} {'% roofline':>11} {'GFLOP':>6} {'compute ms':>11} {'% bound':>8}")
    for d, P in keys:
        m = models[d].set_streams(P)
        nbytes = step_bytes(m) + kv[(d, P)]
        roof = nbytes / bw * 1e3
        flops = step_flops(m, P)
        arith = flops / product_rate(d, P) * 1e3
        t = best[(d, P)]
        print(f"{d:>16} {P:>2} {t:>9.2f} {t / ref if ref else float('nan'):>11.2f} "
              f"{t / best[(d, 1)]:>10.2f} {nbytes / 1e6:>8.1f} {roof:>12.2f} {100 * roof / t:>10.0f}% "
              f"{flops / 1e9:>6.2f} {arith:>11.2f} {100 * max(roof, arith) / t:>7.0f}%")
    for d in models:
        if compiled(d):
            graph = models[d].__dict__.get("_decode_graph")
            firsts = ", ".join(f"P={P} {first[(d, P)]:.0f} s" for P in PS)
            print(f"{d:>16}: first step (torch.compile) {firsts}; graph {graph.state if graph else 'none'}")
        if d.endswith("+prepack"):
            print(f"{d:>16}: prepacked copies {prepacked_mb(models[d]):.0f} MB beside the {step_bytes(models[d]) / 1e6:.0f} MB "
                  "of weights (oneDNN blocked layout)")
    if args.ttft and name == args.configs[0]:
        print(f"2. time to first token (prefill), batch 1, {args.ttft}-token prompt, min of 2")
        for d in [x for x in models if not compiled(x) and not x.endswith("+torchmm")]:  # prefill: not compiled, no native kernel
            row = []
            for P in (1, 8):
                row.append(min(prefill_ms(models[d], P, args.ttft) for _ in range(2)))
            print(f"{d:>16}  P=1 {row[0]:8.0f} ms   P=8 {row[1]:8.0f} ms   ratio {row[1] / row[0]:.2f}")
    if args.batches and name == args.configs[0]:
        print(f"3. batch sweep, ms per step (all rows), {args.prompt} tokens in the cache, min of "
              f"{max(2, args.rounds // 2)} rounds × {args.steps} steps")
        print(f"{'variant':>16} {'B':>3} {'P=1 ms':>8} {'P=8 ms':>8} {'P=8 ÷ P=1':>10}")
        rounds = max(2, args.rounds // 2)
        for d in [x for x in models if x != "int8" and not compiled(x)]:  # a compile per B: minutes
            for B in args.batches:
                st = {P: Stepper(models[d], P, B, args.prompt, rounds * (args.steps + 1) + 2, d) for P in (1, 8)}
                r = {P: [] for P in (1, 8)}
                for _ in range(rounds):
                    for P in (1, 8):
                        r[P].append(st[P].ms(args.steps))
                r = {P: min(v) for P, v in r.items()}
                print(f"{d:>16} {B:>3} {r[1]:>8.2f} {r[8]:>8.2f} {r[8] / r[1]:>10.2f}")
                del st
    del models, base
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--dtypes", nargs="+",
                    default=["float32", "float32+torchmm", "bfloat16", "int8"],
                    help="variants: float32 (also float32+prepack: one more copy of the weights; "
                         "any dtype +torchmm: torch's kernels only, without parscale's native ones), bfloat16, "
                         "int8 (weight-only); any of them +compile (compile_decode: a torch.compile per "
                         "config and P, tens of seconds each; not in the prefill and batch-sweep parts) "
                         "or +frozen (compile_decode(freeze=True): weights as graph constants)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the timed decode steps")
    ap.add_argument("--ttft", type=int, default=512, help="prompt length for time to first token (0: skip)")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8, 16], help="batch sweep (none: skip)")
    ap.add_argument("--smollm2", metavar="PATH", help="real SmolLM2-135M weights (checkpoint directory "
                    "or .gguf) for the smollm2-135m row; default: random weights of its shape")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds × 4 steps, 33M only, short prompts")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.ttft, args.batches = 2, 4, 64, [1, 4]
        args.configs = ["33M"]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_decode: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, {load()}")
    t0 = time.perf_counter()
    bw, rates = bandwidth(torch.get_num_threads())
    each = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())
    print(f"streaming-read bandwidth (512 MB buffer, best of sum / dot / gemv, min of 7): {bw / 1e9:.1f} GB/s "
          f"({each} GB/s)")
    peak = matmul_peak()
    print(f"float32 matmul peak (torch.mm 1024², best of 5): {peak / 1e9:.1f} GFLOP/s; native kernels: "
          f"{kernels.isa() or 'none (torch only)'}")
    for name in args.configs:
        run_config(name, args, bw)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; {load()}")


if __name__ == "__main__":
    main()
