"""Checkpoint formats: the official ParScale layout (in and out), plain HF Qwen2 / Qwen3 / Llama
(in), and GGUF files (in, converted by :mod:`parscale.gguf`).

Safetensors + JSON only; nothing here unpickles. A checkpoint directory holds ``config.json`` and
either ``model.safetensors`` or shards ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``. Tensor names are HF Qwen2's plus, for the active stream set P:

* ``model.layers.{i}.self_attn.prefix_k`` / ``prefix_v`` — ``(P, n_kv_heads, prefix_tokens, head_dim)``
* ``model.aggregate_layer.0.{weight,bias}``, ``model.aggregate_layer.2.{weight,bias}``

Further stream sets of a dynamic-P model (our extension; the official code ignores them) are
stored as ``parscale.stream_sets.{P}.{prefix_k,prefix_v,aggregate_layer.*}`` with ``prefix_*``
stacked over layers, and listed in the config key ``parscale_stream_sets``.

config.json keys: ``model_type: "qwen2_parscale"`` with ``parscale_n`` (P), ``parscale_n_tokens``
(prefix length) and ``parscale_attn_smooth`` (ε). ε is always read from the file: released
checkpoints use 0.1, the official class default is 0.01 (used only when the key is absent).

Bias-free backbones (Llama, recycled): the official Qwen2 code always builds q/k/v biases, so we
write zero bias tensors, ``attention_bias: true`` and our marker ``parscale_zero_attention_bias:
true``; reading such a file back drops the biases again when they are still exactly zero (a
bias-free model, bit-identical), and keeps them otherwise (someone trained them).

The prefix-only control (P = 1 with one prefix, ``prefix_only``) is written with ``parscale_n: 1``,
its prefix under the official names with P = 1 and ``parscale_prefix_only: true``; the official
code ignores the prefix at P = 1 (it loads the plain backbone).

Architectures other than Qwen2 are saved under the same ``qwen2_parscale`` type with our keys for
their switches: ``qk_norm: true`` (Qwen3, per-head q/k RMSNorm
tensors ``self_attn.q_norm.weight`` / ``k_norm.weight``) and ``rope_scaling`` (Llama-3's
``{"rope_type": "llama3", ...}``, which HF's Qwen2 code also understands). The official code does not know
``qk_norm``: such checkpoints are exact in parscale only (bias-free ones load there, see above).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write, atomic_write_text
from .config import ParScaleConfig
from .errors import ParScaleError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_TYPES = ("qwen2_parscale", "qwen2", "qwen3", "llama")
# Hugging Face defaults per model_type for keys a config.json may omit.
_HF_DEFAULTS = {
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                  max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
                  initializer_range=0.02),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, rope_theta=10000.0, rms_norm_eps=1e-6,
                  max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False,
                  initializer_range=0.02),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
                  attention_bias=False, initializer_range=0.02),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


# --------------------------------------------------------------------------- config.json
def config_from_hf_dict(d: dict[str, Any], source: str = CONFIG_NAME) -> ParScaleConfig:
    """Map an official / HF Qwen2 / HF Llama config dict to a ParScaleConfig."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise ParScaleError(f"{source}: unsupported model_type {mt!r} (expected one of {', '.join(SUPPORTED_TYPES)})")
    base = _HF_DEFAULTS[mt if mt in _HF_DEFAULTS else "qwen2"]
    g = lambda k: d.get(k, base.get(k))  # noqa: E731
    rope_theta, rope_scaling = _rope_from_hf(d, g("rope_theta"), source)
    if d.get("mlp_bias"):
        raise ParScaleError(f"{source}: mlp_bias=true is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ParScaleError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (SwiGLU/silu only)")
    if mt != "llama" and d.get("use_sliding_window"):
        raise ParScaleError(f"{source}: use_sliding_window=true is not supported")
    n_heads = g("num_attention_heads")
    streams = int(d.get("parscale_n", 1)) if mt == "qwen2_parscale" else 1
    eos = d.get("eos_token_id")
    if isinstance(eos, list):  # several EOS ids: the config keeps the first, generate() accepts a list
        eos = eos[0] if eos else None

    def tok(v):
        return v if isinstance(v, int) and 0 <= v < g("vocab_size") else None

    fields = dict(
        vocab_size=g("vocab_size"), hidden_size=g("hidden_size"), intermediate_size=g("intermediate_size"),
        num_hidden_layers=g("num_hidden_layers"), num_attention_heads=n_heads,
        num_key_value_heads=g("num_key_value_heads") or n_heads, head_dim=g("head_dim"),
        rope_theta=float(rope_theta), rms_norm_eps=float(g("rms_norm_eps")),
        max_position_embeddings=g("max_position_embeddings"),
        attention_bias=bool(d.get("attention_bias", base["attention_bias"])),
        qk_norm=mt == "qwen3" or (mt == "qwen2_parscale" and d.get("qk_norm") is True),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(g("tie_word_embeddings")), initializer_range=float(g("initializer_range")),
        bos_token_id=tok(d.get("bos_token_id")), eos_token_id=tok(eos), pad_token_id=tok(d.get("pad_token_id")),
        streams=streams,
        prefix_tokens=int(d.get("parscale_n_tokens", 48)),
        agg_smoothing=float(d.get("parscale_attn_smooth", 0.01)),
        stream_sets=list(d.get("parscale_stream_sets", [])),
        quantization=d.get("quantization"),  # ours: "int8" (parscale.quant)
        prefix_only=d.get("parscale_prefix_only", False),
    )
    if d.get("parscale_zero_attention_bias"):
        fields["attention_bias"] = False  # load_pretrained puts them back if they are not zero
    try:
        return ParScaleConfig(**fields)
    except ParScaleError as e:
        raise ParScaleError(f"{source}: {e}") from None
    except TypeError as e:
        raise ParScaleError(f"{source}: malformed value ({e})") from None


def _rope_from_hf(d: dict[str, Any], rope_theta: Any, source: str) -> tuple[Any, dict | None]:
    """``(rope_theta, rope_scaling)`` from HF's ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5, which nests ``rope_theta`` in it)."""
    rs = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else d.get("rope_scaling")
    if not rs:
        return rope_theta, None
    if not isinstance(rs, dict):
        raise ParScaleError(f"{source}: rope_scaling must be an object or null (got {rs!r})")
    rs = dict(rs)
    rope_theta = rs.pop("rope_theta", rope_theta)
    kind = rs.pop("rope_type", rs.pop("type", "default"))
    if kind == "default":
        return rope_theta, None
    if kind != "llama3":
        raise ParScaleError(f"{source}: rope_type {kind!r} is not supported (plain RoPE or 'llama3')")
    rs.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    return rope_theta, {"rope_type": "llama3", **rs}


def config_to_hf_dict(cfg: ParScaleConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The official ``qwen2_parscale`` config.json for ``cfg`` (plus our dynamic-P extras)."""
    d = {
        "architectures": ["Qwen2ParScaleForCausalLM"],
        "model_type": "qwen2_parscale",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers, "use_cache": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "parscale_n": cfg.streams, "parscale_n_tokens": cfg.prefix_tokens,
        "parscale_attn_smooth": cfg.agg_smoothing,
    }
    if not cfg.attention_bias:  # the official code builds q/k/v biases: save_pretrained writes zeros
        d["attention_bias"] = True
        d["parscale_zero_attention_bias"] = True
    if cfg.qk_norm:
        d["qk_norm"] = True  # ours (a Qwen3 backbone); official code has no q/k norms
    if cfg.prefix_only:
        d["parscale_prefix_only"] = True
    if cfg.stream_sets != [cfg.streams]:
        d["parscale_stream_sets"] = cfg.stream_sets
    if cfg.quantization:
        d["quantization"] = cfg.quantization
    return d


def read_config(path: str | os.PathLike) -> tuple[ParScaleConfig, dict[str, Any]]:
    path = Path(path)
    if not path.is_dir():
        raise ParScaleError(f"{path}: not a checkpoint directory")
    f = path / CONFIG_NAME
    if not f.is_file():
        raise ParScaleError(f"{f}: missing (a checkpoint directory needs config.json)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParScaleError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ParScaleError(f"{f}: expected a JSON object at the top level")
    return config_from_hf_dict(d, str(f)), d


# --------------------------------------------------------------------------- tensor names
def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """Our parameters under checkpoint names (official names for the active stream set)."""
    cfg, out = model.config, {}
    for name, t in model.state_dict().items():
        if name.startswith("stream_sets."):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out[name] = t
    for key, sset in model.stream_sets.items():
        if int(key) == cfg.streams:
            for i in range(cfg.num_hidden_layers):
                out[f"model.layers.{i}.self_attn.prefix_k"] = sset.prefix_k[i]
                out[f"model.layers.{i}.self_attn.prefix_v"] = sset.prefix_v[i]
            if sset.aggregate_layer is not None:  # None: the prefix-only P = 1 set
                for n, t in sset.aggregate_layer.state_dict().items():
                    out[f"model.aggregate_layer.{n}"] = t
        else:
            for n, t in sset.state_dict().items():
                out[f"parscale.stream_sets.{key}.{n}"] = t
    return out


def _assign(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy checkpoint tensors into ``model`` after checking names and shapes."""
    expected = {n: t for n, t in checkpoint_tensors(model).items()}
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ParScaleError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = [n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                  and not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise ParScaleError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:3])}{more}")
    for n, dst in expected.items():
        src = tensors[n]
        if tuple(src.shape) != tuple(dst.shape):
            raise ParScaleError(f"{source}: tensor {n} has shape {tuple(src.shape)}, "
                                f"config says {tuple(dst.shape)}")
    with torch.no_grad():
        for n, dst in expected.items():
            dst.copy_(tensors[n])  # views into the model's parameters (prefix slices included)


def _open_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not f.is_file():
        raise ParScaleError(f"{f}: missing weights file")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ParScaleError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, TypeError) as e:
            raise ParScaleError(f"{index}: malformed index ({e!r}); expected {{'weight_map': {{name: file}}}}") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            part = _open_safetensors(path / shard)
            for name, file in weight_map.items():
                if file == shard and name not in part:
                    raise ParScaleError(f"{path / shard}: missing tensor {name} listed in {INDEX_NAME}")
            tensors.update(part)
        return tensors, str(index)
    return _open_safetensors(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME)


def load_pretrained(path, *, streams: int | None = None, dtype=None, device=None, quantize=None, adapter=None):
    """See :meth:`ParScaleForCausalLM.from_pretrained`. ``dtype``: None → float32 (as HF),
    ``"auto"`` → the stored dtype, or a torch dtype. ``adapter``: an adapter directory to load
    onto this base (``parscale.recycle``); ``path`` may itself be an adapter directory."""
    from .model import ParScaleForCausalLM
    from .quant import MODES, quantize_
    from .recycle import is_adapter, load_adapter

    if quantize is not None and quantize not in MODES:
        raise ParScaleError(f"unknown quantization {quantize!r} (supported: {', '.join(MODES)})")

    if adapter is not None:
        return load_adapter(adapter, base=path, streams=streams, dtype=dtype, device=device, quantize=quantize)
    if is_adapter(path):
        return load_adapter(path, streams=streams, dtype=dtype, device=device, quantize=quantize)
    path = Path(path)
    if path.suffix.lower() == ".gguf" and not path.is_dir():  # a llama.cpp file: converted in memory
        from .gguf import load_gguf

        model = load_gguf(path, streams=streams, dtype=dtype, device=device)
        return model if quantize is None else quantize_(model, quantize)
    cfg, raw = read_config(path)
    tensors, source = read_tensors(path)
    if dtype == "auto":
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ParScaleError(f"unknown dtype {dtype!r} (use one of {', '.join(_DTYPES)} or 'auto')")
        dtype = _DTYPES[dtype]
    if raw.get("parscale_zero_attention_bias"):
        cfg = _restore_zero_biases(cfg, tensors)
    # every parameter is overwritten below (checked); in the target dtype, so float64 stays exact
    model = ParScaleForCausalLM.empty(cfg).to(dtype=dtype or torch.float32)
    _assign(model, tensors, source)
    model = model.to(device=device)
    if quantize is not None and not cfg.quantization:
        quantize_(model, quantize)
    if streams is not None:
        model.set_streams(streams)
    return model.eval()


def _zero_bias_names(cfg: ParScaleConfig) -> list[str]:
    return [f"model.layers.{i}.self_attn.{x}_proj.bias" for i in range(cfg.num_hidden_layers) for x in "qkv"]


def _restore_zero_biases(cfg: ParScaleConfig, tensors: dict[str, torch.Tensor]) -> ParScaleConfig:
    """A file we wrote for a bias-free model carries zero q/k/v biases (for the official code):
    drop them while they are exactly zero (bias-free again); if trained since, keep them."""
    names = [n for n in _zero_bias_names(cfg) if n in tensors]
    if names and all(not bool(tensors[n].any()) for n in names):
        for n in names:
            del tensors[n]
        return cfg
    return cfg.replace(attention_bias=True) if names else cfg


# --------------------------------------------------------------------------- saving
def save_pretrained(model, path, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors weights; each file lands atomically (weights first,
    config last), and weight files of an earlier save that this one does not use are removed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in checkpoint_tensors(model).items()}
    dtype = model.model.norm.weight.dtype  # not the embedding's: int8 when quantised
    if not model.config.attention_bias:  # zero q/k/v biases so the official code loads the file
        cfg = model.config
        sizes = {"q": cfg.num_attention_heads * cfg.head_dim, "k": cfg.num_key_value_heads * cfg.head_dim,
                 "v": cfg.num_key_value_heads * cfg.head_dim}
        for n in _zero_bias_names(cfg):
            tensors[n] = torch.zeros(sizes[n.rsplit(".", 2)[-2][0]], dtype=dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for n, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][n] = t
        size += nbytes
    written = []
    if len(shards) == 1:
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
        written.append(WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / name, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
            weight_map.update({n: name for n in shard})
            written.append(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(path / INDEX_NAME, json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2))
        written.append(INDEX_NAME)
    atomic_write_text(path / CONFIG_NAME, json.dumps(config_to_hf_dict(model.config, dtype), indent=2) + "\n")
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        if stale.name not in written and stale.exists():
            stale.unlink()
