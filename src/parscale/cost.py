"""Cost formulas for the model in ``model.py``: parameter counts, FLOPs, and a roofline model of
inference memory and latency for ParScale versus the equal-loss dense model.

Everything here is arithmetic on a config; nothing imports torch.

* :func:`param_counts` — exact parameter counts for a :class:`ParScaleConfig` and P. For the six
  architectures of the paper (Chen et al., "Parallel Scaling Law for Language Models",
  arXiv 2505.10475; presets :data:`PAPER_PRESETS`) it reproduces the paper's table of
  non-embedding parameter counts exactly.
* :func:`forward_flops` — matmul FLOPs of a forward pass (used by the training/sampling ledgers).
* :func:`estimate` — memory (weights + KV cache + activations) and latency (prefill + decode) of
  one generation call on one accelerator, by a roofline: every step takes
  ``max(FLOPs / (peak · flops_eff), bytes / (bandwidth · mem_eff))``.
* :func:`compare` — base model (P = 1), ParScale (P streams) and the dense model of equal loss
  under the fitted law ``L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^α``: equal loss means equal
  "equivalent parameters", so the dense model has ``N·(k·ln P + 1)`` non-embedding parameters.
  It is built by widening the base architecture (same depth, head layout and I/H ratio) by the
  continuous factor that solves the quadratic "non-embedding params(width) = target" exactly.
* :func:`sweep` — the comparison for batch sizes 1..8, and where ParScale stops winning.
* :func:`decode_kv_read_bytes`, :func:`kinetics_eflops`, :func:`generation_cost` — the
  memory-aware cost of Kinetics (Sadhukhan et al. 2025): KV-cache bytes read per decode step at
  each context length, weighted by the hardware's FLOP/byte ratio (eFLOPs). The sampler's ledger
  records the bytes; ``parscale score`` reports FLOPs and eFLOPs per problem.

``docs/cost-model.md`` states every assumption and compares the results with the paper's own
numbers (22× less memory increase, 6× less latency increase at batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, NamedTuple

from .config import ParScaleConfig
from .errors import ParScaleError

# --------------------------------------------------------------------------- the paper's models
#: The six architectures of the paper's scaling experiments (arXiv 2505.10475, table of model
#: sizes): Qwen-2.5-style, 36 layers, 16 query heads, 2 KV heads, tied embeddings, q/k/v bias,
#: vocabulary 151936, 48 prefix tokens. Names are the paper's rounded non-embedding sizes.
PAPER_PRESETS: dict[str, dict[str, int]] = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864},
    "0.7b": {"hidden_size": 1024, "intermediate_size": 5504},
    "1.1b": {"hidden_size": 1280, "intermediate_size": 6912},
    "1.6b": {"hidden_size": 1536, "intermediate_size": 8320},
    "2.8b": {"hidden_size": 2048, "intermediate_size": 11008},
    "4.4b": {"hidden_size": 2560, "intermediate_size": 13824},
}

_PAPER_COMMON = dict(vocab_size=151936, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
                     prefix_tokens=48)

#: The paper's fit on Stack-V2-Python (arXiv 2505.10475): equivalent params = N·(k·ln P + 1).
DEFAULT_K = 0.3935


def paper_config(name: str, streams: int = 1) -> ParScaleConfig:
    """The config of one of the paper's architectures (``0.5b`` … ``4.4b``) with P = ``streams``."""
    key = str(name).lower()
    if key not in PAPER_PRESETS:
        raise ParScaleError(f"unknown preset {name!r}; choose one of {', '.join(PAPER_PRESETS)}")
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise ParScaleError(f"streams (P) must be an integer >= 1 (got {streams!r})")
    return ParScaleConfig(**_PAPER_COMMON, **PAPER_PRESETS[key], streams=streams)


# --------------------------------------------------------------------------- architecture shape
@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost formulas need. Widths are floats so that a dense model can be widened
    by a continuous factor (the equal-loss dense model); a config gives integers."""

    layers: int
    hidden: float
    heads: int
    kv_heads: int
    head_dim: float
    intermediate: float
    vocab: int
    tied: bool
    attention_bias: bool
    prefix_tokens: int
    qk_norm: bool = False  # Qwen3's per-head q/k RMSNorm scales

    @classmethod
    def from_config(cls, config: ParScaleConfig) -> "ModelShape":
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                   head_dim=config.head_dim, intermediate=config.intermediate_size,
                   vocab=config.vocab_size, tied=config.tie_word_embeddings,
                   attention_bias=config.attention_bias, prefix_tokens=config.prefix_tokens,
                   qk_norm=config.qk_norm)

    def widened(self, scale: float) -> "ModelShape":
        """Every width (hidden, head_dim, intermediate) times ``scale``; depth and heads kept."""
        return replace(self, hidden=self.hidden * scale, head_dim=self.head_dim * scale,
                       intermediate=self.intermediate * scale)

    # per-layer pieces -------------------------------------------------------
    @property
    def q_dim(self) -> float:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> float:
        return self.kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> float:
        """Weight-matrix parameters of one block (q, k, v, o, gate, up, down): the matmuls."""
        h = self.hidden
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * self.intermediate

    @property
    def layer_params(self) -> float:
        """All parameters of one block: the matrices, q/k/v biases, the RMSNorm scales."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        return self.layer_matmul_params + bias + 2 * self.hidden + qk_norm

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        """KV-cache bytes for one token of one row (one stream of one sample), all layers."""
        return 2 * self.layers * self.kv_dim * bytes_per_value


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model with P streams. ``non_embedding`` is what the paper reports:
    everything except the token embedding and (if untied) the LM head."""

    streams: int
    embedding: int  # token embedding, plus the LM head when it is not tied
    backbone_non_embedding: int  # blocks + final norm (what P = 1 has)
    prefix: int  # learned per-stream key/value prefixes (0 for P = 1)
    aggregator: int  # the stream-weighting MLP (0 for P = 1)
    non_embedding: int
    total: int


def _counts(shape: ModelShape, streams: int) -> tuple[float, float, float, float]:
    """(embedding, backbone non-embedding, prefix, aggregator), as numbers (floats for widened shapes)."""
    embedding = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    backbone = shape.layers * shape.layer_params + shape.hidden  # + final RMSNorm
    if streams > 1:
        # 2 (k and v) · L · P · n_kv · prefix_tokens · head_dim
        prefix = 2 * shape.layers * streams * shape.kv_dim * shape.prefix_tokens
        # Linear(P·H → H, bias) → SiLU → Linear(H → P, bias)
        h = shape.hidden
        aggregator = streams * h * h + h + h * streams + streams
    else:
        prefix = aggregator = 0
    return embedding, backbone, prefix, aggregator


def _check_streams(streams) -> int:
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise ParScaleError(f"streams (P) must be an integer >= 1 (got {streams!r})")
    return streams


def param_counts(config: ParScaleConfig, streams: int | None = None) -> ParamCounts:
    """Exact parameter counts of ``config`` with P = ``streams`` (default ``config.streams``)."""
    P = _check_streams(config.streams if streams is None else streams)
    if P > 1 and config.prefix_tokens < 1:
        raise ParScaleError("config field 'prefix_tokens' must be >= 1 when streams > 1")
    emb, backbone, prefix, agg = (int(x) for x in _counts(ModelShape.from_config(config), P))
    non_emb = backbone + prefix + agg
    return ParamCounts(streams=P, embedding=emb, backbone_non_embedding=backbone, prefix=prefix,
                       aggregator=agg, non_embedding=non_emb, total=non_emb + emb)


# --------------------------------------------------------------------------- FLOPs
def _flops(shape: ModelShape, streams: int, tokens: float, context: float) -> float:
    n_prefix = shape.prefix_tokens if streams > 1 else 0
    per_stream = 2 * shape.layers * shape.layer_matmul_params \
        + 4 * shape.layers * shape.q_dim * (context + n_prefix)
    lm_head = 2 * shape.hidden * shape.vocab
    aggregator = 2 * (streams * shape.hidden ** 2 + shape.hidden * streams) if streams > 1 else 0
    return tokens * (streams * per_stream + lm_head + aggregator)


def forward_flops(config: ParScaleConfig, tokens: float, context: float,
                  streams: int | None = None) -> float:
    """Matmul FLOPs of a forward pass over ``tokens`` token positions (summed over the batch),
    each attending to ``context`` earlier-or-same key positions (not counting the prefix).

    Convention (multiply-add = 2 FLOPs; elementwise work — norms, biases, RoPE, softmax, SiLU — is
    left out):

    * the blocks' weight matrices (q, k, v, o, gate, up, down): ``2 · L · params`` per token, for
      each of the P streams;
    * attention scores and the weighted sum of values: ``4 · L · heads · head_dim · (context +
      prefix_tokens)`` per token per stream (prefix only when P > 1);
    * the LM head ``2 · H · vocab`` once per token (it runs after aggregation, not P times);
    * the aggregator ``2 · (P·H·H + H·P)`` once per token (P > 1).

    For a causal prefill of ``s`` tokens pass ``context=(s + 1) / 2`` (the average); for one
    decode step at position ``t`` (0-based) pass ``tokens=batch, context=t + 1``.
    """
    P = _check_streams(config.streams if streams is None else streams)
    if tokens < 0 or context < 0:
        raise ParScaleError(f"tokens and context must be >= 0 (got {tokens}, {context})")
    return _flops(ModelShape.from_config(config), P, tokens, context)


# --------------------------------------------------------------------------- hardware
#: Bytes per stored value (weights and KV cache use the same dtype here).
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}

#: Default efficiencies: the fractions of peak FLOP/s and of HBM bandwidth a real kernel reaches.
#: 0.7 / 0.9 are the values llm-analysis recommends and the paper's cost script used.
DEFAULT_FLOPS_EFF = 0.7
DEFAULT_MEM_EFF = 0.9


@dataclass(frozen=True)
class Hardware:
    """One accelerator: dense fp16/bf16 tensor peak (FLOP/s), HBM bandwidth (bytes/s), memory
    (bytes) and the efficiencies applied to both peaks."""

    name: str
    peak_flops: float
    bandwidth: float
    memory_bytes: float | None = None
    flops_eff: float = DEFAULT_FLOPS_EFF
    mem_eff: float = DEFAULT_MEM_EFF

    @property
    def flops_per_s(self) -> float:
        return self.peak_flops * self.flops_eff

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth * self.mem_eff


#: Datasheet numbers (dense, no sparsity), see docs/cost-model.md for the sources.
HARDWARE_PRESETS: dict[str, Hardware] = {
    "A100-80GB": Hardware("A100-80GB", peak_flops=312e12, bandwidth=2.039e12, memory_bytes=80e9),
    "H100": Hardware("H100", peak_flops=989e12, bandwidth=3.35e12, memory_bytes=80e9),
    "H200": Hardware("H200", peak_flops=989e12, bandwidth=4.8e12, memory_bytes=141e9),
}


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ParScaleError(f"{name} must be a positive number (got {value!r})")
    return float(value)


def get_hardware(name: str | Hardware = "A100-80GB", *, peak_flops: float | None = None,
                 bandwidth: float | None = None, flops_eff: float | None = None,
                 mem_eff: float | None = None) -> Hardware:
    """A preset by name (case-insensitive), with any of its numbers replaced.

    ``peak_flops`` in FLOP/s and ``bandwidth`` in bytes/s; replacing either makes a user preset
    (its name gets a ``custom`` suffix). Efficiencies must be in (0, 1].
    """
    if isinstance(name, Hardware):
        hw = name
    else:
        by_lower = {k.lower(): v for k, v in HARDWARE_PRESETS.items()}
        aliases = {"a100": "a100-80gb", "h100-sxm": "h100", "h200-sxm": "h200"}
        key = aliases.get(str(name).lower(), str(name).lower())
        if key not in by_lower:
            raise ParScaleError(f"unknown hardware {name!r}; choose one of "
                                f"{', '.join(HARDWARE_PRESETS)} (or give peak FLOP/s and bandwidth)")
        hw = by_lower[key]
    changes: dict = {}
    if peak_flops is not None:
        changes["peak_flops"] = _positive(peak_flops, "peak_flops")
    if bandwidth is not None:
        changes["bandwidth"] = _positive(bandwidth, "bandwidth")
    if changes:
        changes["name"] = f"{hw.name}-custom" if not hw.name.endswith("custom") else hw.name
    for key, value in (("flops_eff", flops_eff), ("mem_eff", mem_eff)):
        if value is not None:
            v = _positive(value, key)
            if v > 1:
                raise ParScaleError(f"{key} must be in (0, 1] (got {value!r})")
            changes[key] = v
    return replace(hw, **changes) if changes else hw


def custom_hardware(peak_flops: float, bandwidth: float, *, name: str = "custom",
                    memory_bytes: float | None = None, flops_eff: float = DEFAULT_FLOPS_EFF,
                    mem_eff: float = DEFAULT_MEM_EFF) -> Hardware:
    """A user preset from scratch (FLOP/s, bytes/s)."""
    hw = Hardware(name, _positive(peak_flops, "peak_flops"), _positive(bandwidth, "bandwidth"),
                  memory_bytes)
    return get_hardware(hw, flops_eff=flops_eff, mem_eff=mem_eff)


# --------------------------------------------------------------------------- assumptions
@dataclass(frozen=True)
class CostAssumptions:
    """Switches that decide how a generation call is charged. The defaults are our roofline of
    what ``model.generate`` does; :data:`PAPER_TOOLING` mimics the two choices of the paper's
    cost script (llm-analysis) that move ParScale's numbers (see docs/cost-model.md).

    prefix_as_prompt_tokens
        Prefill runs the ``prefix_tokens`` through every layer as if they were prompt tokens
        (the paper's script passes ``seq_len = input + prefix`` with ``batch = P·batch``). Our
        model never computes the prefix: its keys/values are parameters copied into the cache.
    kv_load_store_full_cache
        Every decode step moves the KV cache of the *final* length twice ("load and store", as
        llm-analysis charges it). Default: a step reads the keys/values attended so far and
        writes the new token's.
    decode_steps_include_first_token
        Charge ``output_tokens`` decode steps after the prefill (llm-analysis). Default: the
        prefill already yields the first new token, so ``output_tokens - 1`` decode steps, as
        ``generate`` runs them.
    """

    prefix_as_prompt_tokens: bool = False
    kv_load_store_full_cache: bool = False
    decode_steps_include_first_token: bool = False


ROOFLINE = CostAssumptions()
PAPER_TOOLING = CostAssumptions(prefix_as_prompt_tokens=True, kv_load_store_full_cache=True,
                                decode_steps_include_first_token=True)


# --------------------------------------------------------------------------- one estimate
@dataclass(frozen=True)
class CostEstimate:
    """Memory and latency of one generation call (``batch`` prompts of ``input_tokens``, then
    ``output_tokens`` new tokens each) on one accelerator. Bytes, seconds, FLOPs."""

    label: str
    streams: int
    batch: int
    input_tokens: int
    output_tokens: int
    non_embedding_params: float
    params: float
    weight_bytes: float
    kv_cache_bytes: float
    activation_bytes: float
    prefill_flops: float
    prefill_bytes: float
    prefill_s: float
    prefill_compute_bound: bool
    decode_steps: int
    decode_flops: float
    decode_bytes: float
    decode_s: float
    decode_compute_bound_steps: int
    hardware: str
    dtype: str

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def latency_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def flops(self) -> float:
        return self.prefill_flops + self.decode_flops

    @property
    def bytes_moved(self) -> float:
        return self.prefill_bytes + self.decode_bytes

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(memory_bytes=self.memory_bytes, latency_s=self.latency_s, flops=self.flops,
                 bytes_moved=self.bytes_moved)
        return d


def _activation_bytes(shape: ModelShape, streams: int, batch: int, input_tokens: int,
                      prefill_tokens: int, b: float) -> float:
    """Peak transient memory: a documented estimate, not a measurement.

    The largest of (a) one block's working set during prefill — residual stream, its normed copy
    and the SwiGLU gate and up outputs, ``rows · s · (2H + 2I)`` values — and (b) the prefill
    logits ``batch · input_tokens · vocab`` (our model returns logits for every prompt position,
    for the aggregated rows only). Attention scores are not materialised (fused attention).
    """
    rows = streams * batch
    block = rows * prefill_tokens * (2 * shape.hidden + 2 * shape.intermediate)
    logits = batch * input_tokens * shape.vocab
    return max(block, logits) * b


def _estimate_shape(shape: ModelShape, streams: int, batch: int, input_tokens: int,
                    output_tokens: int, dtype: str, hw: Hardware, assumptions: CostAssumptions,
                    label: str) -> CostEstimate:
    b = DTYPE_BYTES[dtype]
    P = streams
    emb, backbone, prefix, agg = _counts(shape, P)
    non_emb = backbone + prefix + agg
    params = non_emb + emb
    n_prefix = shape.prefix_tokens if P > 1 else 0
    rows = P * batch
    kv_tok = shape.kv_bytes_per_token(b)
    total_len = n_prefix + input_tokens + output_tokens  # cache capacity, as model.new_cache
    kv_cache = rows * total_len * kv_tok

    # Weights read once per step: all block and aggregator weights plus the LM head matrix. The
    # prefix parameters are read through the cache (counted in KV traffic); the embedding lookup
    # reads only a few rows (ignored unless it is the tied LM head, which is read in full anyway).
    weights_read = (backbone + agg + shape.vocab * shape.hidden) * b

    def step_time(flops: float, nbytes: float) -> tuple[float, bool]:
        t_c, t_m = flops / hw.flops_per_s, nbytes / hw.bytes_per_s
        return max(t_c, t_m), t_c >= t_m

    # Prefill: one step over the prompt. With prefix_as_prompt_tokens the prefix is charged like
    # prompt tokens (processed by every layer, causal attention among all of them).
    if assumptions.prefix_as_prompt_tokens and n_prefix:
        s = input_tokens + n_prefix
        p_flops = rows * s * (2 * shape.layers * shape.layer_matmul_params
                              + 4 * shape.layers * shape.q_dim * (s + 1) / 2) \
            + batch * input_tokens * (2 * shape.hidden * shape.vocab
                                      + 2 * (P * shape.hidden ** 2 + shape.hidden * P))
        prefill_rows_tokens = s
    else:
        p_flops = _flops(shape, P, batch * input_tokens, (input_tokens + 1) / 2)
        prefill_rows_tokens = input_tokens
    # KV traffic of the prefill: write the prompt's keys/values, read prefix + prompt once.
    p_bytes = weights_read + rows * (2 * input_tokens + n_prefix) * kv_tok
    prefill_s, prefill_cb = step_time(p_flops, p_bytes)

    steps = output_tokens if assumptions.decode_steps_include_first_token else output_tokens - 1
    steps = max(steps, 0)
    d_flops = d_bytes = d_s = 0.0
    d_cb = 0
    for j in range(1, steps + 1):
        keys = input_tokens + j  # token keys this step's query attends to (itself included)
        f = _flops(shape, P, batch, keys)
        if assumptions.kv_load_store_full_cache:
            kv_traffic = 2 * kv_cache
        else:
            kv_traffic = rows * (n_prefix + keys) * kv_tok + rows * kv_tok  # read all, write new
        nbytes = weights_read + kv_traffic
        t, cb = step_time(f, nbytes)
        d_flops += f
        d_bytes += nbytes
        d_s += t
        d_cb += cb

    act = _activation_bytes(shape, P, batch, input_tokens, prefill_rows_tokens, b)
    return CostEstimate(label=label, streams=P, batch=batch, input_tokens=input_tokens,
                        output_tokens=output_tokens, non_embedding_params=non_emb, params=params,
                        weight_bytes=params * b, kv_cache_bytes=kv_cache, activation_bytes=act,
                        prefill_flops=p_flops, prefill_bytes=p_bytes, prefill_s=prefill_s,
                        prefill_compute_bound=prefill_cb, decode_steps=steps, decode_flops=d_flops,
                        decode_bytes=d_bytes, decode_s=d_s, decode_compute_bound_steps=d_cb,
                        hardware=hw.name, dtype=dtype)


def _check_int(value, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ParScaleError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return value


def _check_dtype(dtype: str) -> str:
    key = str(dtype).lower()
    if key not in DTYPE_BYTES:
        raise ParScaleError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return key


def _resolve_config(preset_or_config: str | ParScaleConfig) -> ParScaleConfig:
    if isinstance(preset_or_config, ParScaleConfig):
        return preset_or_config
    return paper_config(preset_or_config)


def estimate(preset_or_config: str | ParScaleConfig, streams: int | None = None, batch: int = 1,
             input_tokens: int = 64, output_tokens: int = 64, dtype: str = "fp16",
             hardware: str | Hardware = "A100-80GB",
             assumptions: CostAssumptions = ROOFLINE) -> CostEstimate:
    """Memory and latency of one ``generate`` call with P = ``streams`` (default: the config's)."""
    config = _resolve_config(preset_or_config)
    P = _check_streams(config.streams if streams is None else streams)
    _check_int(batch, "batch", 1)
    _check_int(input_tokens, "input_tokens", 1)
    _check_int(output_tokens, "output_tokens", 1)
    if P > 1 and config.prefix_tokens < 1:
        raise ParScaleError("config field 'prefix_tokens' must be >= 1 when streams > 1")
    hw = get_hardware(hardware)
    return _estimate_shape(ModelShape.from_config(config), P, batch, input_tokens, output_tokens,
                           _check_dtype(dtype), hw, assumptions, label=f"P={P}")


# --------------------------------------------------------------------------- memory-aware cost
# Kinetics (Sadhukhan et al. 2025, "Rethinking test-time scaling laws"): at long generations a
# decode step's cost is dominated by reading the KV cache, not by the 2·N parameter FLOPs, so
# cost is counted in eFLOPs = FLOPs + bytes read · (the hardware's FLOP/byte ratio).
def flop_per_byte(hardware: str | Hardware = "A100-80GB") -> float:
    """The hardware's FLOP/byte ratio at peak, ``peak_flops / bandwidth`` (A100-80GB: 153;
    H100: 295; H200: 206): how many FLOPs cost as much time as moving one byte. The efficiencies
    are left out (Kinetics' convention; they would only scale the ratio by mem_eff / flops_eff)."""
    hw = get_hardware(hardware)
    return hw.peak_flops / hw.bandwidth


def _kv_prefix_tokens(config: ParScaleConfig, streams: int) -> int:
    """Prefix positions each stream's cache holds: P > 1, or the prefix-only P = 1 model."""
    return config.prefix_tokens if streams > 1 or config.prefix_only else 0


def decode_kv_read_bytes(config: ParScaleConfig, fed: Iterable[tuple[int, int]],
                         bytes_per_value: float, streams: int | None = None) -> float:
    """KV-cache bytes read by the decode steps of a set of rows (one sample each).

    ``fed`` has one ``(m, p)`` pair per row: after the prefill the row fed ``m`` tokens back to
    the model (``generated length - 1`` when a finished row leaves the batch, as the sampler
    compacts) and its prompt has ``p`` tokens. The j-th fed token (j = 1..m) is at 0-based
    position ``p + j - 1``, so in every layer and every one of the P streams its query reads the
    keys and values of ``p + j`` token positions plus the stream's ``prefix_tokens``:

        bytes(step j) = layers · 2 · n_kv · head_dim · bytes_per_value · (p + j + prefix) · P

    and the total is ``Σ_rows (m·p + m(m+1)/2 + m·prefix) · 2·layers·n_kv·head_dim·b·P``.

    Only the cache reads are counted: the write of the new position is one position per step,
    and the weights are read once per step for the whole running batch (they amortise over
    rows; a row's cache does not). The prefill is not counted: it attends with a full matmul and
    is compute-bound (its attention is in :func:`forward_flops`). Lengths are the true ones, not
    a left-padded batch width.
    """
    P = _check_streams(config.streams if streams is None else streams)
    b = _positive(bytes_per_value, "bytes_per_value")
    n_prefix = _kv_prefix_tokens(config, P)
    positions = 0
    for m, p in fed:
        if not isinstance(m, int) or not isinstance(p, int) or isinstance(m, bool) \
                or isinstance(p, bool) or m < 0 or p < 0:
            raise ParScaleError(f"fed tokens and prompt length must be integers >= 0 (got {m!r}, {p!r})")
        positions += m * p + m * (m + 1) // 2 + m * n_prefix
    return positions * ModelShape.from_config(config).kv_bytes_per_token(b) * P


def kinetics_eflops(flops: float, kv_read_bytes: float,
                    hardware: str | Hardware = "A100-80GB") -> float:
    """Kinetics' eFLOPs: ``flops + kv_read_bytes · flop_per_byte(hardware)``."""
    if flops < 0 or kv_read_bytes < 0:
        raise ParScaleError(f"flops and kv_read_bytes must be >= 0 (got {flops}, {kv_read_bytes})")
    return flops + kv_read_bytes * flop_per_byte(hardware)


class GenerationCost(NamedTuple):
    """FLOPs, KV-cache bytes read while decoding, and eFLOPs of one sampled problem."""

    flops: float
    kv_read_bytes: float
    eflops: float


def generation_cost(config: ParScaleConfig | str, streams: int | None, prompt_tokens: int,
                    generated_lengths: Iterable[int], hardware: str | Hardware = "A100-80GB",
                    dtype: str = "fp16", compact: bool = True) -> GenerationCost:
    """What sampling ``len(generated_lengths)`` rows from one prompt costs, charged exactly as
    the sampler's ledger charges it (``parscale.sampling.sampler``), so strategies can be ranked
    by FLOPs or by eFLOPs from their lengths alone.

    The prompt (``prompt_tokens`` long) is prefilled once and its cache shared by the rows; the
    first token of each row comes from the prefill. Row r then feeds ``g_r - 1`` tokens back
    (``compact``: a finished row leaves the batch) or, without compaction, every row runs until
    the longest finishes (``max(g) - 1`` steps). FLOPs are :func:`forward_flops` (prefill at the
    mean causal context, each fed token at its own context); KV reads are
    :func:`decode_kv_read_bytes` with the cache in ``dtype`` (a key of :data:`DTYPE_BYTES`).
    ``config`` may be one of the paper's presets by name (``"0.5b"`` ... ``"4.4b"``).
    """
    config = _resolve_config(config)
    P = _check_streams(config.streams if streams is None else streams)
    _check_int(prompt_tokens, "prompt_tokens", 1)
    lengths = list(generated_lengths)
    for g in lengths:
        _check_int(g, "each generated length", 1)
    b = DTYPE_BYTES[_check_dtype(dtype)]
    longest = max(lengths, default=1)
    fed = [(g - 1 if compact else longest - 1, prompt_tokens) for g in lengths]
    flops = forward_flops(config, tokens=prompt_tokens, context=(prompt_tokens + 1) / 2, streams=P)
    n_fed = sum(m for m, _ in fed)
    if n_fed:
        ctx_sum = sum(m * p + m * (m + 1) / 2 for m, p in fed)
        flops += forward_flops(config, tokens=n_fed, context=ctx_sum / n_fed, streams=P)
    kv = decode_kv_read_bytes(config, fed, b, streams=P)
    return GenerationCost(flops, kv, kinetics_eflops(flops, kv, hardware))


# --------------------------------------------------------------------------- equal-loss dense model
@dataclass(frozen=True)
class DenseEquivalent:
    """The dense (P = 1) model whose loss equals the base model's with P streams under the law."""

    target_non_embedding: float  # N · (k·ln P + 1)
    width_scale: float  # hidden, head_dim and intermediate of the base, times this
    hidden_size: float
    intermediate_size: float
    shape: ModelShape
    nearest_config: ParScaleConfig  # integer widths: hidden a multiple of 2·heads
    nearest_non_embedding: int


def equal_loss_dense(config: ParScaleConfig, streams: int, k: float = DEFAULT_K) -> DenseEquivalent:
    """Widen ``config`` (P = 1) until its non-embedding count is ``N·(k·ln P + 1)``.

    Non-embedding params of the widened model are ``a·s² + b·s`` in the width factor ``s`` (the
    matrices grow with s², biases and norm scales with s), so ``s`` is the positive root of that
    quadratic — exact, no search. ``nearest_config`` rounds the width to the nearest valid
    integer architecture for people who want to build it.
    """
    P = _check_streams(streams)
    k = _positive(k, "k")
    base = ModelShape.from_config(config)
    n_base = _counts(base, 1)[1]
    target = n_base * (k * math.log(P) + 1)
    # coefficients from the shape at s = 1: quadratic part = matrices, linear part = the rest
    a = base.layers * base.layer_matmul_params
    b = n_base - a
    scale = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    shape = base.widened(scale)
    # nearest buildable model: head_dim an even integer (RoPE), I keeps the I/H ratio
    head_dim = max(2, 2 * round(base.head_dim * scale / 2))
    if config.hidden_size == config.num_attention_heads * config.head_dim:
        hidden = config.num_attention_heads * head_dim  # the usual layout: H = heads · head_dim
    else:
        hidden = max(1, round(config.hidden_size * scale))
    nearest = config.replace(hidden_size=hidden, head_dim=head_dim,
                             intermediate_size=max(1, round(config.intermediate_size * hidden
                                                            / config.hidden_size)),
                             streams=1, stream_sets=[])
    return DenseEquivalent(target_non_embedding=target, width_scale=scale,
                           hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                           shape=shape, nearest_config=nearest,
                           nearest_non_embedding=param_counts(nearest, 1).non_embedding)


# --------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class CostComparison:
    """Base (P = 1), ParScale (P streams) and the equal-loss dense model, same batch and lengths.

    ``*_increase_ratio`` = (ParScale − base) / (dense − base): the fraction of the dense model's
    extra cost that ParScale pays for the same loss (< 1: ParScale is cheaper). ``*_advantage`` is
    its inverse, the paper's "ParScale uses N× less memory/latency increase".
    """

    base: CostEstimate
    parscale: CostEstimate
    dense: CostEstimate
    dense_model: DenseEquivalent
    k: float
    hardware: Hardware
    assumptions: CostAssumptions

    @property
    def memory_increase_parscale(self) -> float:
        return self.parscale.memory_bytes - self.base.memory_bytes

    @property
    def memory_increase_dense(self) -> float:
        return self.dense.memory_bytes - self.base.memory_bytes

    @property
    def latency_increase_parscale(self) -> float:
        return self.parscale.latency_s - self.base.latency_s

    @property
    def latency_increase_dense(self) -> float:
        return self.dense.latency_s - self.base.latency_s

    @property
    def memory_increase_ratio(self) -> float:
        return _ratio(self.memory_increase_parscale, self.memory_increase_dense)

    @property
    def latency_increase_ratio(self) -> float:
        return _ratio(self.latency_increase_parscale, self.latency_increase_dense)

    @property
    def memory_advantage(self) -> float:
        return _ratio(self.memory_increase_dense, self.memory_increase_parscale)

    @property
    def latency_advantage(self) -> float:
        return _ratio(self.latency_increase_dense, self.latency_increase_parscale)

    @property
    def parscale_wins_memory(self) -> bool:
        return self.parscale.memory_bytes < self.dense.memory_bytes

    @property
    def parscale_wins_latency(self) -> bool:
        return self.parscale.latency_s < self.dense.latency_s

    def to_dict(self) -> dict:
        return {
            "batch": self.base.batch, "streams": self.parscale.streams, "k": self.k,
            "hardware": {"name": self.hardware.name, "peak_flops": self.hardware.peak_flops,
                         "bandwidth": self.hardware.bandwidth, "flops_eff": self.hardware.flops_eff,
                         "mem_eff": self.hardware.mem_eff},
            "assumptions": {k: getattr(self.assumptions, k)
                            for k in self.assumptions.__dataclass_fields__},
            "dense_model": {"target_non_embedding": self.dense_model.target_non_embedding,
                            "width_scale": self.dense_model.width_scale,
                            "hidden_size": self.dense_model.hidden_size,
                            "intermediate_size": self.dense_model.intermediate_size},
            "base": self.base.to_dict(), "parscale": self.parscale.to_dict(),
            "dense": self.dense.to_dict(),
            "memory_increase_parscale": self.memory_increase_parscale,
            "memory_increase_dense": self.memory_increase_dense,
            "latency_increase_parscale": self.latency_increase_parscale,
            "latency_increase_dense": self.latency_increase_dense,
            "memory_increase_ratio": self.memory_increase_ratio,
            "latency_increase_ratio": self.latency_increase_ratio,
            "memory_advantage": self.memory_advantage,
            "latency_advantage": self.latency_advantage,
            "parscale_wins_memory": self.parscale_wins_memory,
            "parscale_wins_latency": self.parscale_wins_latency,
        }


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return math.inf if num > 0 else (0.0 if num == 0 else -math.inf)
    return num / den


def compare(preset_or_config: str | ParScaleConfig, streams: int, batch: int = 1,
            input_tokens: int = 64, output_tokens: int = 64, dtype: str = "fp16",
            hardware: str | Hardware = "A100-80GB", k: float = DEFAULT_K,
            assumptions: CostAssumptions = ROOFLINE) -> CostComparison:
    """Base vs ParScale (P = ``streams``) vs the equal-loss dense model, one generation call each.

    The paper's setting: ``compare("1.6b", 8, 1)`` — 64 input + 64 output tokens, fp16, A100-80GB.
    """
    config = _resolve_config(preset_or_config)
    P = _check_streams(streams)
    if P < 2:
        raise ParScaleError(f"streams (P) must be >= 2 to compare with a dense model (got {P})")
    _check_int(batch, "batch", 1)
    _check_int(input_tokens, "input_tokens", 1)
    _check_int(output_tokens, "output_tokens", 1)
    dtype = _check_dtype(dtype)
    hw = get_hardware(hardware)
    dense = equal_loss_dense(config, P, k)
    shape = ModelShape.from_config(config)
    args = (batch, input_tokens, output_tokens, dtype, hw, assumptions)
    return CostComparison(
        base=_estimate_shape(shape, 1, *args, label="base (P=1)"),
        parscale=_estimate_shape(shape, P, *args, label=f"ParScale (P={P})"),
        dense=_estimate_shape(dense.shape, 1, *args, label="equal-loss dense"),
        dense_model=dense, k=k, hardware=hw, assumptions=assumptions)


@dataclass(frozen=True)
class BatchSweep:
    """Comparisons over batch sizes; the crossovers are the first batch at which ParScale's total
    is no longer below the dense model's (None: it stays below over the whole sweep)."""

    comparisons: list[CostComparison] = field(default_factory=list)

    @property
    def batches(self) -> list[int]:
        return [c.base.batch for c in self.comparisons]

    @property
    def latency_crossover(self) -> int | None:
        return next((c.base.batch for c in self.comparisons if not c.parscale_wins_latency), None)

    @property
    def memory_crossover(self) -> int | None:
        return next((c.base.batch for c in self.comparisons if not c.parscale_wins_memory), None)


def sweep(preset_or_config: str | ParScaleConfig, streams: int,
          batches: Iterable[int] = range(1, 9), **kwargs) -> BatchSweep:
    """:func:`compare` for each batch size (default 1..8); ``kwargs`` go to :func:`compare`."""
    batches = list(batches)
    if not batches:
        raise ParScaleError("batches must not be empty")
    return BatchSweep([compare(preset_or_config, streams, b, **kwargs) for b in batches])
