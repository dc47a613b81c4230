"""Helpers every subcommand shares: checked input files, writable outputs, threads, dtypes, text flags.

Each helper turns one class of bad input into a ``ParScaleError`` with one line naming the flag
(or file) and the problem, so a subcommand validates everything *before* it starts work and
leaves nothing behind when it refuses. Nothing here creates a file or a directory: output checks
only look (and probe the nearest existing directory with a temporary file they remove again).
"""

from __future__ import annotations

import argparse

from ..errors import ParScaleError
from ..paths import (check_checkpoint_path, check_utf8_text, ensure_writable_dir,  # noqa: F401 (re-exported)
                     ensure_writable_file, read_json_file, read_text_file, same_path)


# --------------------------------------------------------------------------- flag types


def threads_type(text: str) -> int | str:
    """argparse type of ``--threads``: a positive integer or ``auto``."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return n


def add_threads_argument(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    parser.add_argument("--threads", type=threads_type, default=default, metavar="N|auto",
                        help="torch CPU threads; auto: the cores not busy with other work right now "
                             "(on a shared machine spare threads slow torch down)")


def add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quantize``, ``--prepack`` and ``--compile-decode``: how the loaded weights are multiplied
    (pass them on with ``from_pretrained(..., **kernel_kwargs(args))``)."""
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="weight-only int8 after loading (per-output-channel scales; parscale.quant)")
    parser.add_argument("--prepack", action="store_true",
                        help="faster float32 decode on CPU at P*B > 2 rows, for one more copy of the "
                             "weights in memory (ParScaleForCausalLM.prepack)")
    parser.add_argument("--compile-decode", nargs="?", const="graph", choices=["graph", "frozen"], default=None,
                        help="run decode steps as one torch.compile'd graph: faster per token (SmolLM2 "
                             "int8 about 1.3x), after a first compile of about a minute on a CPU; "
                             "'frozen': weights as graph constants for inductor's own matmul kernels "
                             "(SmolLM2 int8 about 2x eager; one more copy of the weights "
                             "per stream set and batch size) "
                             "(ParScaleForCausalLM.compile_decode)")


def kernel_kwargs(args: argparse.Namespace) -> dict:
    """The ``from_pretrained`` keywords of ``add_kernel_arguments``' flags."""
    return dict(quantize=args.quantize, prepack=args.prepack, compile_decode=args.compile_decode)


def resolve_threads(value: int | str | None) -> int | None:
    """``auto`` -> the free cores now (``parscale.reproduce.auto_threads``); ints pass through."""
    if value == "auto":
        from ..reproduce import auto_threads

        return auto_threads()
    return value


def apply_threads(value: int | str | None) -> int | None:
    """Resolve ``--threads`` and set torch's CPU thread count; returns the number used."""
    n = resolve_threads(value)
    if n is not None:
        import torch

        torch.set_num_threads(n)
    return n


def dtype_type(*, extra: tuple[str, ...] = ()):
    """argparse type of ``--dtype``: float32 | bfloat16 | float16 (fp32/bf16/fp16 accepted),
    returned as the canonical name; ``extra`` spellings (``auto``) pass through."""
    from ..dtypes import canonical_dtype

    def parse(text: str) -> str:
        try:
            return canonical_dtype(text, what="dtype", extra=extra)
        except ParScaleError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("dtype: ")) from None

    parse.__name__ = "dtype"
    return parse


def at_least(flag: str, value, minimum) -> None:
    """``flag`` must be >= ``minimum`` (None passes)."""
    if value is not None and value < minimum:
        raise ParScaleError(f"{flag} must be >= {minimum} (got {value})")


SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling flags a command has (``--temperature``, ``--top-k``, ``--top-p``,
    ``--repetition-penalty``, ``--seed``), checked before any model is loaded: finite, in range."""
    import math

    t = getattr(args, "temperature", None)
    if t is not None and not math.isfinite(t):
        raise ParScaleError(f"--temperature must be a finite number (got {t})")
    if getattr(args, "do_sample", False) and t is not None and not t > 0:
        raise ParScaleError(f"--temperature must be > 0 with --do-sample (got {t})")
    if t is not None and t < 0:
        raise ParScaleError(f"--temperature must be >= 0 (got {t})")
    k = getattr(args, "top_k", None)
    if k is not None and k < 0:
        raise ParScaleError(f"--top-k must be >= 0 (got {k})")
    p = getattr(args, "top_p", None)
    if p is not None and not 0 < p <= 1:
        raise ParScaleError(f"--top-p must be in (0, 1] (got {p})")
    r = getattr(args, "repetition_penalty", None)
    if r is not None and not math.isfinite(r):
        raise ParScaleError(f"--repetition-penalty must be a finite number (got {r})")
    if r is not None and not r > 0:
        raise ParScaleError(f"--repetition-penalty must be > 0 (got {r})")
    seed = getattr(args, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ParScaleError(f"--seed must be in [-2**63, 2**64) (got {seed})")


def check_count(flag: str, n: int, bytes_each: float, what: str) -> None:
    """Refuse a count whose records alone cannot fit in memory (``--n 1e9`` problems)."""
    avail = available_memory()
    if avail is not None and n * bytes_each > avail:
        raise ParScaleError(f"{flag} {n}: {n:,} {what} need ~{n * bytes_each / 2**30:.0f} GiB, more than the "
                            f"{avail / 2**30:.1f} GiB of memory available")


def check_generation_budget(model_config, prompt_tokens: int, max_new_tokens: int, rows: int = 1,
                            *, flag: str = "--max-new-tokens", device=None, dtype_bytes: int = 4) -> None:
    """Refuse a decode that cannot fit before anything is allocated: the context
    (``max_position_embeddings``) and a KV-cache estimate against the memory of ``device``."""
    cfg = model_config
    total = prompt_tokens + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ParScaleError(f"{flag} {max_new_tokens}: prompt ({prompt_tokens} tokens) + new tokens = {total} "
                            f"exceeds the model's context of {cfg.max_position_embeddings} tokens")
    prefix = cfg.prefix_tokens if cfg.streams > 1 else 0
    kv_bytes = (2 * cfg.num_hidden_layers * rows * cfg.streams * cfg.num_key_value_heads * cfg.head_dim
                * (total + prefix) * dtype_bytes)
    avail = available_memory(device)
    if avail is not None and kv_bytes > avail:
        raise ParScaleError(f"{flag} {max_new_tokens}: the KV cache for {rows} row(s) x {total} tokens "
                            f"needs ~{kv_bytes / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB "
                            "of memory available")


def available_memory(device=None) -> int | None:
    """Bytes free to allocate on ``device``: a CUDA device's free memory, else the host's
    (Linux MemAvailable); None when unknown."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
