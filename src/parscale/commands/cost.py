"""`parscale cost`: inference memory and latency of ParScale versus the equal-loss dense model
(roofline estimate, see docs/cost-model.md), with a batch sweep showing where ParScale stops
winning."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import ParScaleError

EXAMPLE = """\
examples:
  # the paper's setting: 1.6B, P = 8, batch 1, 64 + 64 tokens, fp16, A100-80GB
  parscale cost --preset 1.6b --streams 8 --batch 1

  # the same on an H100, as JSON, with the batch-sweep plot
  parscale cost --preset 1.6b --streams 8 --hardware H100 --json --plot cost.png

  # your own accelerator: peak TFLOP/s and TB/s, and the efficiencies reached on it
  parscale cost --preset 2.8b --streams 4 --flops 180 --bandwidth 1.0 --flops-eff 0.5 --mem-eff 0.8

  # charge costs the way the paper's script did (prefix run as prompt tokens, KV load+store)
  parscale cost --preset 1.6b --streams 8 --paper-tooling
"""


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ..cost import DEFAULT_K, HARDWARE_PRESETS, PAPER_PRESETS
    from ._common import dtype_type

    p = sub.add_parser("cost", help="inference memory/latency: ParScale vs the equal-loss dense model",
                       epilog=EXAMPLE, formatter_class=HelpFormatter,
                       description="Roofline estimate of one generation call for the base model "
                                   "(P=1), ParScale (P streams) and the dense model that reaches "
                                   "the same loss under the fitted law N·(k·ln P + 1).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="1.6b",
                     help=f"one of the paper's architectures: {', '.join(PAPER_PRESETS)}")
    src.add_argument("--config", type=Path, help="a ParScaleConfig JSON file instead of a preset")
    p.add_argument("--streams", type=int, default=8, help="P, the number of parallel streams (>= 2)")
    p.add_argument("--batch", type=int, default=1, help="prompts per generation call")
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--dtype", type=dtype_type(extra=("fp8", "int8")), default="float16",
                   help="weights and KV cache dtype: float32, bfloat16, float16 (fp32/bf16/fp16 "
                        "accepted), fp8, int8")
    p.add_argument("--hardware", default="A100-80GB",
                   help=f"accelerator preset: {', '.join(HARDWARE_PRESETS)}")
    p.add_argument("--flops", type=float, help="peak dense TFLOP/s (overrides the preset's)")
    p.add_argument("--bandwidth", type=float, help="memory bandwidth in TB/s (overrides the preset's)")
    p.add_argument("--flops-eff", type=float, default=None,
                   help="fraction of peak FLOP/s reached (default 0.7)")
    p.add_argument("--mem-eff", type=float, default=None,
                   help="fraction of peak bandwidth reached (default 0.9)")
    p.add_argument("--k", type=float, default=DEFAULT_K,
                   help="k of the law N·(k·ln P + 1) (0.3935: the paper's Stack-V2-Python fit)")
    p.add_argument("--max-batch", type=int, default=8, help="sweep batch sizes 1..this")
    p.add_argument("--paper-tooling", action="store_true",
                   help="charge like the paper's llm-analysis script (see docs/cost-model.md)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", type=Path, metavar="OUT.png",
                   help="write memory and latency increase vs batch size (PNG)")
    p.set_defaults(func=run)


MAX_SWEEP = 10_000  # batch sizes in the sweep: ~10 s


def _check(args: argparse.Namespace) -> None:
    def positive_int(name: str, minimum: int = 1) -> None:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value < minimum:
            raise ParScaleError(f"{name} must be >= {minimum} (got {value})")

    positive_int("--streams", 2)
    positive_int("--batch")
    positive_int("--input-tokens")
    positive_int("--output-tokens")
    positive_int("--max-batch")
    if args.max_batch > MAX_SWEEP:
        raise ParScaleError(f"--max-batch {args.max_batch}: the sweep evaluates every batch size 1..N "
                            f"(about a millisecond each); use at most {MAX_SWEEP}")
    for flag in ("--flops", "--bandwidth", "--flops-eff", "--mem-eff", "--k"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ParScaleError(f"{flag} must be a positive number (got {value})")
    for flag in ("--flops-eff", "--mem-eff"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value > 1:
            raise ParScaleError(f"{flag} must be in (0, 1] (got {value})")
    from ..cost import PAPER_PRESETS
    from ._common import ensure_writable_file

    if args.config is None and args.preset.lower() not in PAPER_PRESETS:
        raise ParScaleError(f"--preset: unknown preset {args.preset!r}; choose one of "
                            f"{', '.join(PAPER_PRESETS)}")
    if args.plot is not None:
        ensure_writable_file(args.plot, "--plot", suffixes=(".png",))


# the cost model's own short dtype keys (parscale.cost.DTYPE_BYTES)
_COST_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp8": "fp8", "int8": "int8"}


def _load_config(path: Path):
    from ..config import ParScaleConfig

    from ._common import read_json_file

    data = read_json_file(path, f"--config {path}")  # missing, binary, not UTF-8, not JSON: one line
    try:
        return ParScaleConfig.from_dict(data)
    except ParScaleError as e:
        raise ParScaleError(f"--config {path}: {e}") from None
    except TypeError as e:  # e.g. a list where a number belongs
        raise ParScaleError(f"--config {path}: {e}") from None


def _finite(obj):
    """JSON has no inf/nan: turn them into null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt_ratio(ratio: float, advantage: float) -> str:
    if not math.isfinite(advantage) or advantage <= 0:
        return f"{ratio:.3f}"
    return f"{ratio:.3f} ({advantage:.1f}x less)" if advantage >= 1 else f"{ratio:.3f} ({1 / advantage:.1f}x more)"


def run(args: argparse.Namespace) -> int:
    from .. import cost

    _check(args)
    hw_name = args.hardware
    try:
        hw = cost.get_hardware(
            hw_name,
            peak_flops=None if args.flops is None else args.flops * 1e12,
            bandwidth=None if args.bandwidth is None else args.bandwidth * 1e12,
            flops_eff=args.flops_eff, mem_eff=args.mem_eff)
    except ParScaleError as e:
        if "unknown hardware" in str(e):
            raise ParScaleError(f"--hardware: {e}") from None
        raise
    config = _load_config(args.config) if args.config is not None else cost.paper_config(args.preset)
    name = str(args.config) if args.config is not None else args.preset
    assumptions = cost.PAPER_TOOLING if args.paper_tooling else cost.ROOFLINE
    kw = dict(input_tokens=args.input_tokens, output_tokens=args.output_tokens, dtype=_COST_DTYPE[args.dtype],
              hardware=hw, k=args.k, assumptions=assumptions)
    comp = cost.compare(config, args.streams, args.batch, **kw)
    batches = sorted(set(range(1, args.max_batch + 1)))
    sw = cost.sweep(config, args.streams, batches, **kw)

    if args.plot is not None:
        from ..plots.cost import plot_sweep

        plot_sweep(sw, args.plot)

    if args.json:
        out = {
            "model": name,
            "comparison": comp.to_dict(),
            "sweep": [{"batch": c.base.batch,
                       "memory_increase_parscale": c.memory_increase_parscale,
                       "memory_increase_dense": c.memory_increase_dense,
                       "latency_increase_parscale": c.latency_increase_parscale,
                       "latency_increase_dense": c.latency_increase_dense,
                       "memory_increase_ratio": c.memory_increase_ratio,
                       "latency_increase_ratio": c.latency_increase_ratio,
                       "parscale_wins_memory": c.parscale_wins_memory,
                       "parscale_wins_latency": c.parscale_wins_latency} for c in sw.comparisons],
            "latency_crossover": sw.latency_crossover,
            "memory_crossover": sw.memory_crossover,
            "plot": None if args.plot is None else str(args.plot),
        }
        print(json.dumps(_finite(out), indent=2))
        return 0

    _print_tables(name, comp, sw, hw, assumptions)
    if args.plot is not None:
        print(f"\nplot: {args.plot}")
    return 0


def _print_tables(name, comp, sw, hw, assumptions) -> None:
    b, P, d = comp.base, comp.parscale.streams, comp.dense_model
    print(f"{name}, P={P}, batch {b.batch}, {b.input_tokens} input + {b.output_tokens} output tokens, "
          f"{b.dtype}, {hw.name}: {hw.peak_flops / 1e12:g} TFLOP/s x {hw.flops_eff:g}, "
          f"{hw.bandwidth / 1e12:g} TB/s x {hw.mem_eff:g}")
    n_base = b.non_embedding_params
    print(f"equal-loss dense: N*(k*ln P + 1) = {n_base:.4g} * ({comp.k:g}*ln {P} + 1) = "
          f"{d.target_non_embedding:.4g} non-embedding params (width x{d.width_scale:.3f}, "
          f"hidden {d.hidden_size:.0f}, intermediate {d.intermediate_size:.0f})")
    if assumptions != type(assumptions)():
        print("assumptions: the paper's tooling (prefix charged as prompt tokens, full KV cache "
              "loaded+stored per decode step, output_tokens decode steps)")
    print()
    head = f"{'model':<18}{'non-emb params':>15}{'memory GB':>11}{'latency ms':>12}" \
           f"{'prefill ms':>12}{'decode ms':>11}"
    print(head)
    print("-" * len(head))
    for e in (comp.base, comp.parscale, comp.dense):
        print(f"{e.label:<18}{e.non_embedding_params:>15.4g}{e.memory_bytes / 1e9:>11.3f}"
              f"{e.latency_s * 1e3:>12.1f}{e.prefill_s * 1e3:>12.2f}{e.decode_s * 1e3:>11.1f}")
    print()
    print(f"{'increase over base':<22}{'memory':>14}{'latency':>16}")
    print(f"{comp.parscale.label:<22}{comp.memory_increase_parscale / 1e9:>+11.3f} GB"
          f"{comp.latency_increase_parscale * 1e3:>+13.1f} ms")
    print(f"{'equal-loss dense':<22}{comp.memory_increase_dense / 1e9:>+11.3f} GB"
          f"{comp.latency_increase_dense * 1e3:>+13.1f} ms")
    print(f"ParScale / dense: memory {_fmt_ratio(comp.memory_increase_ratio, comp.memory_advantage)}, "
          f"latency {_fmt_ratio(comp.latency_increase_ratio, comp.latency_advantage)}")
    if hw.memory_bytes is not None and comp.dense.memory_bytes > hw.memory_bytes:
        print(f"note: the dense model needs more than the {hw.memory_bytes / 1e9:g} GB of {hw.name}")

    print()
    print("batch sweep (increase over the P=1 model at the same batch):")
    head = f"{'batch':>5}{'ParScale GB':>13}{'dense GB':>10}{'ParScale ms':>13}{'dense ms':>10}" \
           f"{'latency ratio':>15}  faster"
    print(head)
    print("-" * len(head))
    for c in sw.comparisons:
        print(f"{c.base.batch:>5}{c.memory_increase_parscale / 1e9:>13.3f}{c.memory_increase_dense / 1e9:>10.3f}"
              f"{c.latency_increase_parscale * 1e3:>13.1f}{c.latency_increase_dense * 1e3:>10.1f}"
              f"{c.latency_increase_ratio:>15.2f}  {'ParScale' if c.parscale_wins_latency else 'dense'}")
    last = sw.batches[-1]
    if sw.latency_crossover is None:
        print(f"ParScale is faster than the equal-loss dense model at every batch size 1..{last}.")
    else:
        print(f"ParScale stops winning on latency at batch {sw.latency_crossover}.")
    if sw.memory_crossover is None:
        print(f"ParScale needs less memory than the equal-loss dense model at every batch size 1..{last}.")
    else:
        print(f"ParScale stops winning on memory at batch {sw.memory_crossover}.")
