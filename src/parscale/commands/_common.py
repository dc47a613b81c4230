"""Helpers every subcommand shares: checked input files, writable outputs, threads, dtypes, text flags.

Each helper turns one class of bad input into a ``ParScaleError`` with one line naming the flag
(or file) and the problem, so a subcommand validates everything *before* it starts work and
leaves nothing behind when it refuses. Nothing here creates a file or a directory: output checks
only look (and probe the nearest existing directory with a temporary file they remove again).
"""

from __future__ import annotations

import argparse

from ..errors import ParScaleError
from ..paths import (check_utf8_text, ensure_writable_dir, ensure_writable_file,  # noqa: F401 (re-exported)
                     read_json_file, read_text_file, same_path)


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


def check_count(flag: str, n: int, bytes_each: float, what: str) -> None:
    """Refuse a count whose records alone cannot fit in memory (``--n 1e9`` problems)."""
    avail = available_memory()
    if avail is not None and n * bytes_each > avail:
        raise ParScaleError(f"{flag} {n}: {n:,} {what} need ~{n * bytes_each / 2**30:.0f} GiB, more than the "
                            f"{avail / 2**30:.1f} GiB of memory available")


def check_generation_budget(model_config, prompt_tokens: int, max_new_tokens: int, rows: int = 1,
                            *, flag: str = "--max-new-tokens") -> None:
    """Refuse a decode that cannot fit before anything is allocated: the context
    (``max_position_embeddings``) and a KV-cache memory estimate against available memory."""
    cfg = model_config
    total = prompt_tokens + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ParScaleError(f"{flag} {max_new_tokens}: prompt ({prompt_tokens} tokens) + new tokens = {total} "
                            f"exceeds the model's context of {cfg.max_position_embeddings} tokens")
    prefix = cfg.prefix_tokens if cfg.streams > 1 else 0
    kv_bytes = (2 * cfg.num_hidden_layers * rows * cfg.streams * cfg.num_key_value_heads * cfg.head_dim
                * (total + prefix) * 4)
    avail = available_memory()
    if avail is not None and kv_bytes > avail:
        raise ParScaleError(f"{flag} {max_new_tokens}: the KV cache for {rows} row(s) x {total} tokens "
                            f"needs ~{kv_bytes / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB "
                            "of memory available")


def available_memory() -> int | None:
    """Bytes of memory available to allocate (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
