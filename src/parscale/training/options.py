"""TrainConfig: every setting of a training run, validated, plus config-file loading.

One flat dataclass whose field names are the ``parscale train`` flags with dashes turned into
underscores (``--kv-heads`` ↔ ``kv_heads``), so a config file, the command line and the Python API
all speak the same names. A config file (TOML always; YAML when pyyaml is installed) holds the
same keys, with dashes or underscores; flags given on the command line override it.

Sizes and budgets:

* ``batch_size`` is the *global* batch in sequences per optimizer step. It is split over the
  data-parallel ranks and then into ``grad_accum`` micro-batches, so changing either never changes
  the maths of a step (only its memory and speed).
* ``tokens`` counts input tokens (``batch_size · seq_len`` per step), not ``P ×`` that: the P
  streams read the same tokens. ``steps`` = ceil(tokens / tokens per step) when ``steps`` is unset.
* Two-stage training (``stage1_tokens`` + ``stage2_tokens``) replaces ``tokens``/``steps``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ParScaleError

# Tiny model shapes for CPU experiments: (layers, hidden, heads, kv_heads, intermediate).
SIZE_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (2, 64, 4, 2, 176),
    "small": (4, 128, 4, 2, 352),
    "base": (8, 256, 8, 4, 688),
    "medium": (12, 512, 8, 4, 1376),
}
SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "intermediate")
SCHEDULES = ("cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16")  # the dtype vocabulary of parscale.dtypes (fp32/bf16 accepted)
STREAM_INITS = ("auto", "snippets", "random")
DEVICES = ("auto", "cpu", "cuda")

# Fields that may differ between a run and its --resume without changing the maths of training.
RESUME_MUTABLE = frozenset({"resume", "quiet", "checkpoint_every", "log_every", "eval_every", "threads",
                            "device", "out", "diversity_windows"})


@dataclass
class TrainConfig:
    # --- model shape (ignored with init_from: the shape comes from the checkpoint) ---
    size: str = "small"
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab_size: int = 2048  # BPE vocabulary trained on the corpus when no --tokenizer is given
    # --- ParScale ---
    streams: int = 1
    prefix_tokens: int = 48
    agg_smoothing: float = 0.01
    prefix_only: bool = False  # P = 1 with one learned prefix: the prefix-only control
    stream_init: str = "auto"  # a new stream set's prefixes: snippets (auto with --init-from) or random
    prefix_init_std: float | None = None  # std of random prefixes at init (None: initializer_range, 0.02)
    agg_init_std: float = 0.0  # std of the aggregator's last Linear at init (0: exactly uniform weights)
    prefix_reparam: bool = False  # train prefixes through the paper's MLP reparameterisation (folded on save)
    reparam_dim: int = 128  # D: the per-stream embedding p' of the reparameterisation
    reparam_hidden: int = 512  # H: the reparameterisation MLP's hidden width
    # the reparameterisation's learning rate as a multiple of lr. Under Adam every MLP weight moves
    # ~lr per step and the output layer's H moves add up coherently in each prefix value, so at 1
    # the prefixes move ~lr·Σ|h| (a few hundred lr) per step where plain ones move ~lr
    reparam_lr_scale: float = 1.0
    # --- batch and optimisation ---
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # --- budget ---
    tokens: int | None = None
    steps: int | None = None
    stage1_tokens: int | None = None
    stage2_tokens: int | None = None
    # --- evaluation, checkpoints, logging ---
    eval_every: int = 100
    eval_tokens: int = 32768
    diversity_windows: int = 4  # held-out windows for the stream-diversity diagnostic at each eval (0: off)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    # --- data and run directory ---
    data: str = "stdlib"
    data_max_bytes: int | None = None  # a fixed, hash-chosen subset of the corpus (quick runs)
    tokenizer: str | None = None
    out: str = "runs/train"
    resume: bool = False
    # --- recipes ---
    init_from: str | None = None
    freeze_backbone: bool = False
    # --- execution ---
    activation_checkpointing: bool = False
    fsdp: bool = False  # shard parameters, gradients and Adam state over torchrun ranks (FSDP2)
    dtype: str = "auto"  # bfloat16 autocast with --init-from (real models), float32 from scratch
    threads: int | None = None
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def _fail(self, name: str, msg: str) -> None:
        v = getattr(self, name)
        got = "" if v is None else f" (got {v!r})"
        raise ParScaleError(f"train option '{name}' (--{name.replace('_', '-')}): {msg}{got}")

    def validate(self) -> None:
        from ..dtypes import ALIASES

        if isinstance(self.dtype, str):  # one dtype vocabulary: bf16 -> bfloat16, fp32 -> float32
            self.dtype = ALIASES.get(self.dtype.strip().lower().removeprefix("torch."), self.dtype)
        types = _field_types()
        for name, kind in types.items():
            v = getattr(self, name)
            optional = kind.endswith("| None")
            base = kind.split("|")[0].strip()
            if v is None:
                if not optional:
                    self._fail(name, "must be set")
                continue
            if base == "int":
                if isinstance(v, float) and v.is_integer():  # "tokens = 4e6" in a config file
                    v = int(v)
                    setattr(self, name, v)
                if not isinstance(v, int) or isinstance(v, bool):
                    self._fail(name, "must be an integer")
            if base == "float":
                if isinstance(v, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
                    try:
                        v = float(v)
                    except ValueError:
                        self._fail(name, "must be a finite number")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    self._fail(name, "must be a finite number")
                setattr(self, name, float(v))
            if base == "bool" and not isinstance(v, bool):
                self._fail(name, "must be true or false")
            if base == "str" and not isinstance(v, str):
                self._fail(name, "must be a string")

        if self.size not in SIZE_PRESETS:
            self._fail("size", f"must be one of {', '.join(SIZE_PRESETS)}")
        positive = ["layers", "hidden", "heads", "kv_heads", "intermediate", "vocab_size", "streams",
                    "seq_len", "batch_size", "grad_accum", "tokens", "steps", "stage1_tokens",
                    "stage2_tokens", "eval_tokens", "threads", "data_max_bytes", "reparam_dim",
                    "reparam_hidden"]
        for name in positive:
            v = getattr(self, name)
            if v is not None and v < 1:
                self._fail(name, "must be >= 1")
        for name in ["warmup_steps", "eval_every", "checkpoint_every", "log_every", "prefix_tokens", "seed",
                     "diversity_windows"]:
            if getattr(self, name) < 0:
                self._fail(name, "must be >= 0")
        if self.seq_len < 2:
            self._fail("seq_len", "must be >= 2 (a window needs a next token to predict)")
        if self.vocab_size < 257:
            self._fail("vocab_size", "must be >= 257 (256 byte symbols + the end-of-text token)")
        if not 0.0 <= self.agg_smoothing <= 1.0:
            self._fail("agg_smoothing", "must be in [0, 1]")
        if self.lr <= 0:
            self._fail("lr", "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            self._fail("min_lr", f"must be in [0, lr={self.lr}]")
        if self.weight_decay < 0:
            self._fail("weight_decay", "must be >= 0")
        if self.grad_clip < 0:
            self._fail("grad_clip", "must be >= 0 (0 turns clipping off)")
        for name, allowed in [("schedule", SCHEDULES), ("dtype", DTYPES), ("device", DEVICES),
                              ("stream_init", STREAM_INITS)]:
            if getattr(self, name) not in allowed:
                self._fail(name, f"must be one of {', '.join(allowed)}")
        if self.batch_size % self.grad_accum:
            self._fail("grad_accum", f"must divide batch_size={self.batch_size}")
        if self.streams > 1 and self.prefix_tokens < 1:  # also with --init-from: its backbone may have none
            self._fail("prefix_tokens", "must be >= 1 when streams > 1")
        if self.prefix_only:
            if self.streams != 1:
                self._fail("prefix_only", f"is the P = 1 control; it needs --streams 1 (got --streams {self.streams})")
            if self.prefix_tokens < 1:
                self._fail("prefix_tokens", "must be >= 1 with --prefix-only")
        if self.stream_init == "snippets" and self.init_from is None and self.stage1_tokens is None:
            self._fail("stream_init", "snippets come from a trained backbone: use it with --init-from "
                                      "or two-stage training (from scratch the init is random)")
        if self.prefix_init_std is not None and self.prefix_init_std <= 0:
            self._fail("prefix_init_std", "must be > 0")
        if self.reparam_lr_scale <= 0:
            self._fail("reparam_lr_scale", "must be > 0")
        if self.agg_init_std < 0:
            self._fail("agg_init_std", "must be >= 0 (0 = exactly uniform weights at the start)")
        random_init = self.new_stream_init == "random"
        if self.prefix_init_std is not None and not random_init:
            self._fail("prefix_init_std", "sets random prefixes, but this run's new prefixes are text snippets "
                                          "(--init-from); add --stream-init random")
        if self.prefix_reparam:
            if self.streams < 2 and not self.prefix_only:
                self._fail("prefix_reparam", "reparameterises learned prefixes: needs --streams >= 2 or --prefix-only")
            if not random_init:
                self._fail("prefix_reparam", "starts from random prefixes, but this run's new prefixes are text "
                                             "snippets (--init-from); add --stream-init random")
            if self.fsdp:
                self._fail("fsdp", "is not supported with --prefix-reparam (the sharded save cannot fold it)")
        if not self.data:
            self._fail("data", "must be 'stdlib' or a path")
        if not self.out:
            self._fail("out", "must be a directory path")

        two_stage = self.stage1_tokens is not None or self.stage2_tokens is not None
        if two_stage:
            if self.stage1_tokens is None or self.stage2_tokens is None:
                self._fail("stage1_tokens" if self.stage1_tokens is None else "stage2_tokens",
                           "two-stage training needs both --stage1-tokens and --stage2-tokens")
            if self.tokens is not None or self.steps is not None:
                self._fail("tokens" if self.tokens is not None else "steps",
                           "cannot be combined with --stage1-tokens/--stage2-tokens")
            if self.streams < 2:
                self._fail("streams", "two-stage training adds a P-stream set in stage 2, so P must be >= 2")
            if self.init_from is not None:
                self._fail("init_from", "two-stage training starts from scratch; use --init-from "
                                        "with --streams for recycling instead")
            if self.freeze_backbone:
                self._fail("freeze_backbone", "two-stage training trains the whole model in both stages")
        elif self.tokens is None and self.steps is None:
            self._fail("tokens", "give a budget: --tokens N or --steps N (or --stage1-tokens with --stage2-tokens)")
        elif self.tokens is not None and self.steps is not None:
            self._fail("steps", "give --tokens or --steps, not both")
        if self.freeze_backbone:
            if self.init_from is None:
                self._fail("freeze_backbone", "needs --init-from (a trained backbone to freeze)")
            if self.streams < 2 and not self.prefix_only:
                self._fail("freeze_backbone", "with --streams 1 there would be nothing to train "
                                              "(add --prefix-only for the P = 1 + one learned prefix control)")
        if self.fsdp and two_stage:
            self._fail("fsdp", "two-stage training adds parameters mid-run; shard a one-stage run "
                               "(or --init-from the stage-1 model)")
        if self.init_from is not None:
            given = [f for f in SHAPE_FIELDS if getattr(self, f) is not None]
            if given:
                self._fail(given[0], "the model shape comes from the --init-from checkpoint; drop this flag")

    # ------------------------------------------------------------------ derived values
    def shape(self) -> dict[str, int]:
        """layers/hidden/heads/kv_heads/intermediate: the preset, overridden by explicit fields."""
        preset = dict(zip(SHAPE_FIELDS, SIZE_PRESETS[self.size]))
        return {f: (getattr(self, f) if getattr(self, f) is not None else preset[f]) for f in SHAPE_FIELDS}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def two_stage(self) -> bool:
        return self.stage1_tokens is not None

    def total_steps(self) -> int:
        if self.two_stage:
            return self.steps_for(self.stage1_tokens) + self.steps_for(self.stage2_tokens)
        return self.steps if self.steps is not None else self.steps_for(self.tokens)

    @property
    def autocast_dtype(self) -> str:
        """The dtype ``dtype="auto"`` resolves to: bfloat16 autocast for a pretrained model
        (``--init-from``; about 1.5x faster on CPU, docs/training.md), float32 from scratch."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.init_from is not None else "float32"

    @property
    def new_stream_init(self) -> str:
        """How a stream set this run adds is initialised (``stream_init="auto"`` resolved)."""
        if self.stream_init != "auto":
            return self.stream_init
        return "snippets" if self.init_from is not None else "random"

    def steps_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.tokens_per_step))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from ``{key: value}`` with dash or underscore keys; unknown keys are an error."""
        return cls(**normalize_keys(values, source))

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None,
                     overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """File values (if any), then ``overrides`` (the flags given on the command line) on top."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(load_config_file(config_file))
        values.update(normalize_keys(overrides or {}, "command line"))
        return cls(**values)


def _field_types() -> dict[str, str]:
    # annotations are strings (``from __future__ import annotations``), e.g. "int | None"
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def normalize_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Map ``kv-heads``/``kv_heads`` to the field name; an unknown key is a ParScaleError naming it."""
    known = set(_field_types())
    out: dict[str, Any] = {}
    for key, v in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ParScaleError(f"{source}: unknown key '{key}'{hint}")
        out[name] = v
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``, needs pyyaml) or JSON (``.json``) file
    into ``{field: value}``, checking keys (not values: TrainConfig does that)."""
    from ..paths import read_text_file

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ParScaleError(f"--config {path}: unknown file type '{suffix}' (use .toml, .yaml or .json)")
    text = read_text_file(path, f"--config {path}")  # missing, binary, not UTF-8: one line
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ParScaleError(f"--config {path}: YAML needs pyyaml (pip install pyyaml), "
                                    "or write the file as TOML") from None
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except ParScaleError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError
        raise ParScaleError(f"--config {path}: cannot parse ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ParScaleError(f"--config {path}: expected a table of key = value pairs at the top level")
    for key, v in data.items():
        if isinstance(v, dict):
            raise ParScaleError(f"--config {path}: key '{key}' is a table; the file is flat (key = value)")
    return normalize_keys(data, f"--config {path}")
