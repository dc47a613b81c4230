"""ParScaleConfig: the one typed configuration of a model, validated on construction.

Field names follow Hugging Face's Qwen2 config where a concept exists there (so a config.json
reads naturally), plus three ParScale fields with our own names:

=================  ===========================  ==========================================
ours               official config.json         meaning
=================  ===========================  ==========================================
``streams``        ``parscale_n``               P, the number of parallel streams
``prefix_tokens``  ``parscale_n_tokens``        learned key/value prefix length per stream
``agg_smoothing``  ``parscale_attn_smooth``     ε in the aggregation ``w·(1-ε) + ε/P``
=================  ===========================  ==========================================

``stream_sets`` lists every P whose prefixes/aggregator the model holds (dynamic P: one frozen
backbone, several stream sets); ``streams`` is the active one. ``prefix_only`` (official key
``parscale_prefix_only``, ours): P = 1 carries one learned prefix and no aggregator — the
prefix-only control beside P > 1 (without it P = 1 is the plain backbone).

Architectures are switches on one backbone: ``attention_bias`` (Qwen2's q/k/v biases),
``qk_norm`` (Qwen3's per-head q/k RMSNorm), ``head_dim`` (explicit in Qwen3) and
``rope_scaling`` (``None`` or Llama-3's ``{"rope_type": "llama3", "factor", "low_freq_factor",
"high_freq_factor", "original_max_position_embeddings"}``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ParScaleError


@dataclass
class ParScaleConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attention_bias: bool = True  # q/k/v projections carry a bias (Qwen2: yes, Llama: no)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # --- ParScale ---
    streams: int = 1
    prefix_tokens: int = 48
    agg_smoothing: float = 0.01
    stream_sets: list[int] = field(default_factory=list)  # filled from `streams` when empty
    quantization: str | None = None  # None: floating-point weights; "int8": parscale.quant's weight-only int8
    prefix_only: bool = False  # P = 1 has a learned prefix (the prefix-only control)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ParScaleError(f"config field '{name}': {msg} (got {getattr(self, name)!r})")

        ints = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "streams", "prefix_tokens"]
        for name in ints:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), name, "must be an integer")
        for name in ints:
            if name == "prefix_tokens":
                need(self.prefix_tokens >= 0, name, "must be >= 0")
            elif name == "streams":
                need(self.streams >= 1, name, "P must be >= 1")
            else:
                need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                 f"must be divisible by num_attention_heads={self.num_attention_heads} "
                 "(or set head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        need(isinstance(self.head_dim, int) and self.head_dim >= 2 and self.head_dim % 2 == 0,
             "head_dim", "must be an even integer >= 2 (RoPE rotates pairs)")
        for name in ["rope_theta", "rms_norm_eps", "initializer_range"]:
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name,
                 "must be a positive number")
        need(isinstance(self.agg_smoothing, (int, float)) and 0.0 <= self.agg_smoothing <= 1.0,
             "agg_smoothing", "must be in [0, 1]")
        for name in ["attention_bias", "qk_norm", "tie_word_embeddings", "prefix_only"]:
            need(isinstance(getattr(self, name), bool), name, "must be true or false")
        for name in ["bos_token_id", "eos_token_id", "pad_token_id"]:
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and 0 <= v < self.vocab_size), name,
                 f"must be null or a token id in [0, {self.vocab_size})")
        need(self.quantization in (None, "int8"), "quantization", 'must be null or "int8"')
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        if self.streams > 1 or self.prefix_only:
            need(self.prefix_tokens >= 1, "prefix_tokens", "must be >= 1 when streams > 1 or prefix_only")
        # a prefix is prefix_tokens extra keys per stream in every layer (snippet prefixes are the
        # backbone's own keys on that many tokens): no longer than the context
        need(self.prefix_tokens <= self.max_position_embeddings, "prefix_tokens",
             f"must be <= max_position_embeddings={self.max_position_embeddings}")
        sets = sorted(set(int(p) for p in self.stream_sets) | {self.streams} | ({1} if self.prefix_only else set()))
        if any(p < 1 for p in sets):
            raise ParScaleError(f"config field 'stream_sets': every P must be >= 1 (got {self.stream_sets!r})")
        self.stream_sets = sets

    # ------------------------------------------------------------------ helpers
    @property
    def n_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> "ParScaleConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParScaleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ParScaleError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)


# Llama-3's frequency-dependent RoPE scaling: the only scaling the backbone implements.
ROPE_SCALING_KEYS = {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
                     "original_max_position_embeddings": int}


def _check_rope_scaling(rs: Any) -> dict[str, Any] | None:
    """Validate ``rope_scaling`` and return it normalised (``rope_type`` first, numbers typed)."""
    def bad(msg: str) -> ParScaleError:
        return ParScaleError(f"config field 'rope_scaling': {msg} (got {rs!r})")

    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise bad("must be null or an object")
    if rs.get("rope_type") != "llama3":
        raise bad(f"rope_type {rs.get('rope_type')!r} is not supported (only 'llama3'; "
                  "null for plain RoPE)")
    unknown = sorted(set(rs) - set(ROPE_SCALING_KEYS) - {"rope_type"})
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for key, kind in ROPE_SCALING_KEYS.items():
        v = rs.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise bad(f"'{key}' must be a positive number")
        if kind is int and v != int(v):
            raise bad(f"'{key}' must be an integer")
        out[key] = kind(v)
    if out["factor"] < 1:
        raise bad("'factor' must be >= 1")
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise bad("'high_freq_factor' must be greater than 'low_freq_factor'")
    return out
