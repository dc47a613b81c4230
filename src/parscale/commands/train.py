"""`parscale train`: train a ParScale model (from scratch, two-stage, recycled, frozen backbone; DDP).

Every flag is a TrainConfig field (``--kv-heads`` ↔ ``kv_heads``). Values come from, in order of
precedence: the flags given on the command line, then ``--config FILE``, then — with ``--resume``
— the settings the run in ``--out`` was started with, then the TrainConfig defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..errors import ParScaleError

EXAMPLE = """\
examples:
  # a tiny model on 2 MB of the Python standard library: about a minute on a laptop CPU
  parscale train --size tiny --streams 2 --data-max-bytes 2000000 --vocab-size 1024 \\
      --seq-len 128 --batch-size 8 --steps 200 --out runs/tiny-p2
  parscale generate --model runs/tiny-p2/model --prompt "def main(" --max-new-tokens 40

  # continue a killed run exactly where its last checkpoint left it (same weights as uninterrupted)
  parscale train --out runs/tiny-p2 --resume

  # two-stage: P = 1 for 2M tokens, then add 4 streams and train 200k more tokens
  parscale train --size small --streams 4 --stage1-tokens 2000000 --stage2-tokens 200000 --out runs/two

  # recycle a trained backbone: freeze it and train only a new 4-stream set (dynamic P); the new
  # prefixes are the backbone's own keys/values on training text (starts at the base's loss), and
  # runs/p4/model is an adapter (stream sets + the base's path and hash; merge-adapter for one dir)
  parscale train --init-from runs/two/model --streams 4 --freeze-backbone --tokens 500000 --out runs/p4

  # the fair control: P = 1 with one learned prefix, the same backbone and tokens
  parscale train --init-from runs/two/model --streams 1 --prefix-only --freeze-backbone \\
      --tokens 500000 --out runs/p1-prefix

  # streams that differ from step one: the paper's prefix reparameterisation, larger random
  # prefixes and a not-exactly-uniform aggregator (metrics.jsonl logs loss_correlation,
  # pairwise_js and combination_gain at every evaluation)
  parscale train --size tiny --streams 4 --prefix-reparam --prefix-init-std 0.5 \\
      --agg-init-std 0.02 --data-max-bytes 2000000 --vocab-size 1024 --seq-len 128 \\
      --batch-size 8 --steps 200 --out runs/tiny-p4-reparam

  # shard parameters, gradients and Adam state over 2 processes (FSDP2; gloo on CPU)
  torchrun --nproc_per_node 2 -m parscale.cli train --init-from runs/two/model --streams 4 \\
      --freeze-backbone --fsdp --tokens 500000 --out runs/p4-fsdp

  # the same settings from a file (flags override it); 2 processes with DDP
  torchrun --nproc_per_node 2 -m parscale.cli train --config run.toml --out runs/ddp
"""

HELP = {
    "size": "model size preset: tiny, small, base, medium (the shape flags override parts of it)",
    "layers": "decoder layers (default: from --size)",
    "hidden": "hidden size (default: from --size)",
    "heads": "attention heads (default: from --size)",
    "kv_heads": "key/value heads, grouped-query attention (default: from --size)",
    "intermediate": "MLP intermediate size (default: from --size)",
    "vocab_size": "BPE vocabulary size when training a tokenizer on the corpus",
    "streams": "P, the number of parallel streams",
    "prefix_tokens": "learned prefix length per stream and layer",
    "agg_smoothing": "ε: aggregation weights become w·(1-ε) + ε/P",
    "prefix_init_std": "standard deviation of random prefixes at init, plain or reparameterised "
                       "(default: the model's initializer_range, 0.02)",
    "agg_init_std": "standard deviation of the aggregator's last Linear at init (0: exactly uniform "
                    "weights at the start)",
    "prefix_reparam": "learn the prefixes through the paper's reparameterisation (per layer a random "
                      "p' of P x --reparam-dim and an MLP -> tanh -> prefix keys/values); folded into "
                      "plain prefixes in every saved model",
    "reparam_dim": "D, the width of the reparameterisation's per-stream embedding p'",
    "reparam_hidden": "H, the reparameterisation MLP's hidden width",
    "reparam_lr_scale": "the reparameterisation's learning rate as a multiple of --lr (1/H moves its "
                        "prefixes about as fast as plain ones under Adam)",
    "diversity_windows": "held-out windows on which every evaluation also logs the streams' "
                         "loss_correlation, pairwise_js and combination_gain (0 = off; P > 1 only)",
    "seq_len": "tokens per training window",
    "batch_size": "global batch in sequences per optimizer step (over all ranks and micro-batches)",
    "grad_accum": "micro-batches per step (splits the batch; the maths of a step stays the same)",
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine schedule",
    "warmup_steps": "linear warm-up steps",
    "schedule": "learning-rate schedule after warm-up: cosine or constant",
    "weight_decay": "AdamW decoupled weight decay (not on norms, biases, prefixes)",
    "grad_clip": "clip the gradient norm to this (0 = off)",
    "tokens": "token budget (input tokens; steps = ceil(tokens / (batch_size·seq_len)))",
    "steps": "optimizer steps (instead of --tokens)",
    "stage1_tokens": "two-stage: tokens at P = 1 before the streams are added",
    "stage2_tokens": "two-stage: tokens at P = --streams after stage 1",
    "eval_every": "evaluate the held-out loss every N steps (0 = only at the end)",
    "eval_tokens": "held-out tokens per evaluation (fixed validation windows)",
    "checkpoint_every": "write OUT/checkpoint every N steps (0 = only at the end)",
    "log_every": "append a metrics.jsonl record every N steps",
    "seed": "seed of the model init and of the batch order",
    "data": "training corpus: 'stdlib' (the Python standard library) or a file, directory or JSONL "
            "path (default with --init-from RUN/model: the parent run's data)",
    "data_max_bytes": "use a fixed subset of the corpus of at most this many bytes (quick runs; "
                      "default with --init-from RUN/model: the parent run's subset)",
    "tokenizer": "directory with a tokenizer.json to use instead of training one",
    "out": "run directory (metrics.jsonl, checkpoint/, model/, summary.json)",
    "resume": "continue the run in --out from its last checkpoint (a finished run: no-op)",
    "init_from": "start from this checkpoint directory (ours or HF Qwen2/Llama); shape flags not allowed",
    "freeze_backbone": "train only the P-stream parameters (needs --init-from)",
    "activation_checkpointing": "recompute activations in the backward pass (less memory, ~30%% slower)",
    "dtype": "auto (bfloat16 with --init-from, float32 from scratch), float32, or bfloat16 autocast "
             "(weights and optimizer stay float32); fp32/bf16 accepted",
    "threads": "torch CPU threads, or auto: the cores not busy with other work (default: auto, or "
               "the resumed run's count; resume bit-exactly with the same number)",
    "device": "auto (cuda if available), cpu or cuda",
    "quiet": "no progress bar or log lines",
}


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ..training.options import DEVICES, DTYPES, SCHEDULES, SIZE_PRESETS, STREAM_INITS, TrainConfig

    p = sub.add_parser("train", help="train a ParScale model (scratch, two-stage, recycling, DDP)",
                       formatter_class=HelpFormatter, epilog=EXAMPLE,
                       description="Train a ParScale language model on a text corpus. Writes "
                                   "metrics.jsonl, checkpoint/ (exact resume), model/ and summary.json "
                                   "into --out. Under torchrun it trains with DistributedDataParallel.")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="TOML/YAML/JSON file whose keys are these flags (dashes or underscores); "
                        "flags given here override it")
    from ._common import dtype_type, threads_type

    choices = {"size": list(SIZE_PRESETS), "schedule": list(SCHEDULES), "device": list(DEVICES),
               "stream_init": list(STREAM_INITS)}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split("|")[0].strip()
        default = f.default
        help_text = HELP.get(f.name, f.name)
        if default is not None and kind != "bool":
            help_text += f" (default: {default})"
        # SUPPRESS: only the flags actually given reach the namespace, so they can override
        # --config and the resumed run's settings without the defaults getting in the way.
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif f.name == "threads":
            p.add_argument(flag, type=threads_type, metavar="N|auto", **common)
        elif f.name == "dtype":
            p.add_argument(flag, type=dtype_type(extra=("auto",)), metavar="|".join(DTYPES), **common)
        else:
            conv = {"int": int, "float": float, "str": str}[kind]
            p.add_argument(flag, type=conv, choices=choices.get(f.name), **common)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """TrainConfig from flags > --config file > the resumed run's saved settings > defaults.

    Two defaults depend on other settings: ``threads`` is ``auto`` (the free cores now) unless
    given or resumed, and with ``--init-from RUN/model`` the data (``data``, ``data_max_bytes``)
    default to the parent run's, read from ``RUN/train_config.json``.
    """
    from ..training.options import TrainConfig, _field_types, load_config_file, normalize_keys
    from ..training.trainer import saved_config
    from ._common import resolve_threads

    fields = set(_field_types())
    given = {k: v for k, v in vars(args).items() if k in fields}
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given)
    if values.get("resume"):
        saved = saved_config(values.get("out", TrainConfig.__dataclass_fields__["out"].default))
        if saved is not None:
            base = normalize_keys({k: v for k, v in saved.items() if k in fields}, "saved train_config.json")
            base.update(values)
            values = base
    if values.get("init_from") and not values.get("resume"):
        inherited = parent_data(values["init_from"], keys=[k for k in ("data", "data_max_bytes")
                                                            if k not in values])
        if inherited and not values.get("quiet"):
            said = ", ".join(f"{k}={v!r}" for k, v in inherited.items())
            print(f"parscale train: using the data of the run {values['init_from']} came from ({said}); "
                  "pass --data/--data-max-bytes to change it", file=sys.stderr)
        values.update(inherited)
    threads = values.get("threads", "auto")
    if isinstance(threads, str) and threads.strip().lower() == "auto":  # also `threads = "auto"` in a file
        values["threads"] = resolve_threads("auto")
    return TrainConfig(**values)


def parent_data(init_from: str, keys: list[str]) -> dict:
    """``keys`` of the train_config.json of the run whose ``model/`` directory ``init_from`` is."""
    from ..training.trainer import CONFIG_NAME, MODEL_DIR, saved_config

    path = Path(init_from)
    if not keys or path.name != MODEL_DIR or not (path.parent / CONFIG_NAME).is_file():
        return {}
    saved = saved_config(path.parent) or {}
    return {k: saved[k] for k in keys if k in saved}


def memory_estimate(cfg) -> tuple[float, float]:
    """Rough bytes a from-scratch run needs: (parameters + gradients + Adam moments, activations
    of one micro-batch). Upper-end figures for float32 on one process; for refusing sizes that
    cannot fit (``--seq-len 1e9``), not for planning."""
    s = cfg.shape()
    h, inter, layers, heads = s["hidden"], s["intermediate"], s["layers"], s["heads"]
    hd = h // heads
    kv = s["kv_heads"] * hd
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + cfg.vocab_size * h
    P = max(cfg.streams, 1)
    rows = cfg.batch_size // cfg.grad_accum * P
    T = cfg.seq_len
    per_token = layers * (12 * h + 3 * inter + heads * T) + 3 * cfg.vocab_size  # floats kept for backward
    rope = 2 * max(2048, T) * hd
    return 16.0 * params, 4.0 * (rows * T * per_token + rope)


def _check_memory(cfg) -> None:
    from ._common import available_memory

    if cfg.init_from is not None:
        return  # the shape comes from the checkpoint
    state, act = memory_estimate(cfg)
    avail = available_memory()
    # the estimate is generous, so refuse only what is far out of reach (not a run that may fit)
    if avail is not None and state + act > 2 * avail:
        raise ParScaleError(
            f"--seq-len {cfg.seq_len}, --batch-size {cfg.batch_size}, --vocab-size {cfg.vocab_size}, "
            f"--size {cfg.size}: training needs roughly {(state + act) / 2**30:.1f} GiB (weights and Adam "
            f"state {state / 2**30:.1f}, activations {act / 2**30:.1f}), far more than the "
            f"{avail / 2**30:.1f} GiB available; lower them or raise --grad-accum")


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import format_summary, train

    cfg = build_config(args)
    _check_memory(cfg)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(format_summary(result))
    return 0
