"""GGUF import: a llama.cpp model file as a parscale checkpoint (P = 1), exact to its tensors.

``read_gguf(path)`` reads a GGUF file (Llama, Qwen2 or Qwen3 architecture) and returns
everything a checkpoint directory holds: the config from the metadata, the tensors under HF names
(dequantised to float32 by the ``gguf`` package's ``quants``, optional extra ``parscale[gguf]``),
and the tokenizer (``tokenizers`` BPE from the vocabulary, merges and token
types) with its ``tokenizer_config.json`` / ``generation_config.json`` entries. ``convert_gguf``
writes them to a directory; ``load_gguf`` builds the model in memory (what
``ParScaleForCausalLM.from_pretrained("model.gguf")`` calls).

What a GGUF does differently from an HF checkpoint, and what this module does about it:

* dimensions are stored fastest-first (``[in, out]`` for a Linear): reversed here;
* llama.cpp permutes the rows of ``attn_q`` / ``attn_k`` of Llama-architecture files (pairs
  interleaved per head instead of HF's rotate-half halves): undone; Qwen2/Qwen3 files are not
  permuted;
* no ``output.weight`` means the LM head is tied to ``token_embd``;
* ``head_dim`` is ``attention.key_length`` (Qwen3) or ``rope.dimension_count``;
* float metadata (norm epsilon, RoPE base) is float32: written as the shortest decimal that is
  the same float32 (``9.999999747378752e-06`` → ``1e-05``). The model computes the norm in
  float32, where both are the same number, so logits are unchanged;
* Llama-3.1 files carry their RoPE scaling as a tensor of per-frequency divisors
  (``rope_freqs.weight``): the ``llama3`` parameters are recovered from it and checked to
  reproduce every divisor.

Everything is read and checked before anything is written; unsupported architectures, tensor
types, tokenizers or metadata raise one ``ParScaleError`` naming them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from einops import rearrange

from .atomic import atomic_write_text
from .config import ParScaleConfig
from .errors import ParScaleError
from .tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor names (after "blk.{i}.") -> HF names (after "model.layers.{i}.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
ROPE_FREQS = "rope_freqs.weight"

# Pre-tokenizer regexes by tokenizer.ggml.pre (llama.cpp's names), as the original HF tokenizers
# split text. GPT-2's regex is ByteLevel's own (use_regex=True).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class PreTokenizer(NamedTuple):
    split: str | None = None  # the split regex; None: GPT-2's (ByteLevel's own)
    digits: bool = False  # every digit its own piece first (StarCoder / SmolLM)
    nfc: bool = False  # NFC-normalise first (Qwen2)
    ignore_merges: bool = False  # a whole piece that is in the vocabulary is one token (Llama-3)


_GPT2, _DIGITS = PreTokenizer(), PreTokenizer(digits=True)
_LLAMA3, _QWEN2 = PreTokenizer(_LLAMA3_SPLIT, ignore_merges=True), PreTokenizer(_QWEN2_SPLIT, nfc=True)
PRE_TOKENIZERS = {"gpt-2": _GPT2, "default": _GPT2, "smollm": _DIGITS, "starcoder": _DIGITS,
                  "refact": _DIGITS, "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3,
                  "smaug-bpe": _LLAMA3, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
# Control tokens that end a turn or a document: generation stops at any of them (as llama.cpp does).
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@dataclass
class GGUFModel:
    """Everything read from a GGUF file, in parscale's terms (nothing written yet)."""

    config: ParScaleConfig
    tensors: dict[str, torch.Tensor]  # HF names, float32
    tokenizer: Any = None  # tokenizers.Tokenizer, when read
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading
def _gguf():
    try:
        import gguf
    except ImportError:
        raise ParScaleError("reading GGUF files needs the 'gguf' package: pip install 'parscale[gguf]'") from None
    return gguf


@dataclass
class _Tensor:
    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF order: fastest first
    offset: int  # absolute, in the file
    n_bytes: int
    shape: tuple[int, ...] = ()  # numpy / torch order (dims reversed)


class _Header:
    """GGUF's header, read directly (key/values and tensor infos; the data stays on disk).

    Our own reader because ``gguf.GGUFReader`` builds a numpy view per vocabulary string (seconds
    for a 49k-token vocabulary); tensor data is dequantised with ``gguf.quants`` all the same."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                11: "<q", 12: "<d"}
    STRING, ARRAY = 8, 9

    def __init__(self, path: Path):
        import struct

        self.struct, self.path, self.pos, self.size = struct, path, 0, path.stat().st_size
        with open(path, "rb") as self.file:  # buffered small reads: fast for 100k strings
            if self.file.read(4) != b"GGUF":
                raise ParScaleError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
            self.pos = 4
            self._read_header()
        self.buf = np.memmap(path, dtype=np.uint8, mode="r") if self.size else np.zeros(0, np.uint8)
        for t in self.tensors:
            if t.offset + t.n_bytes > self.size:
                raise ParScaleError(f"{path}: truncated: tensor {t.name} ends past the end of the file")

    def _read_header(self) -> None:
        path = self.path
        version = self._scalar(4)
        if version not in (2, 3):
            raise ParScaleError(f"{path}: GGUF version {version} is not supported (2 or 3; "
                                "big-endian files are not supported either)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._scalar(4), key)
        gguf = _gguf()
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._scalar(10) for _ in range(self._scalar(4)))
            type_id, offset = self._scalar(4), self._scalar(10)
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise ParScaleError(f"{path}: tensor {name} has unknown tensor type id {type_id}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = math.prod(dims)
            if not dims or dims[0] % block:
                raise ParScaleError(f"{path}: tensor {name}: {dims} does not fit {qtype.name} blocks of {block}")
            infos.append((name, qtype, dims, offset, n // block * type_size))
        align = self.meta.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1:
            raise ParScaleError(f"{path}: general.alignment must be a positive integer (got {align!r})")
        start = -(-self.pos // align) * align  # tensor data begins at the next multiple of alignment
        self.tensors = [_Tensor(name, qtype, dims, start + offset, n_bytes, tuple(reversed(dims)))
                        for name, qtype, dims, offset, n_bytes in infos]

    def _take(self, n: int) -> bytes:
        if n > self.size - self.pos:  # also guards a corrupt length against a huge allocation
            raise ParScaleError(f"{self.path}: truncated or corrupt: the header ends early (at byte {self.pos})")
        out = self.file.read(n)
        self.pos += n
        return out

    def _scalar(self, type_id: int):
        fmt = self._SCALARS[type_id]
        return self.struct.unpack(fmt, self._take(self.struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        raw = self._take(self._scalar(10))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ParScaleError(f"{self.path}: undecodable string in the header ({raw[:40]!r})") from None

    def _value(self, type_id: int, key: str):
        if type_id == self.STRING:
            return self._string()
        if type_id == self.ARRAY:
            item, count = self._scalar(4), self._scalar(10)
            if item == self.STRING:
                return [self._string() for _ in range(count)]
            if item in self._SCALARS:  # one read for the whole array
                fmt = self._SCALARS[item]
                width = self.struct.calcsize(fmt)
                return np.frombuffer(self._take(width * count), dtype=np.dtype(fmt)).tolist()
            return [self._value(item, key) for _ in range(count)]  # nested arrays
        if type_id not in self._SCALARS:
            raise ParScaleError(f"{self.path}: metadata key {key} has unknown value type {type_id}")
        return self._scalar(type_id)

    def data(self, t: _Tensor) -> np.ndarray:
        """The tensor's raw bytes, shaped ``(*shape[:-1], row_bytes)`` as ``gguf.quants`` wants."""
        raw = self.buf[t.offset:t.offset + t.n_bytes].view(np.ndarray)  # plain view: memmap slices are slow
        return raw.reshape(*t.shape[:-1], -1)


def _open(path: Path) -> _Header:
    if path.is_dir():
        raise ParScaleError(f"{path}: is a directory, expected a .gguf file")
    if not path.is_file():
        raise ParScaleError(f"{path}: no such file")
    try:
        return _Header(path)
    except (OSError, ValueError) as e:
        raise ParScaleError(f"{path}: not a readable GGUF file: {e}") from None


def _float32_decimal(v: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores float32 metadata)."""
    return float(str(np.float32(v)))


def _config(meta: dict[str, Any], names: set[str], freq_factors: np.ndarray | None,
            source: str) -> ParScaleConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ParScaleError(f"{source}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default: Any = ..., kind=int):
        v = meta.get(f"{arch}.{key}", default)
        if v is ...:
            raise ParScaleError(f"{source}: metadata key {arch}.{key} is missing")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ParScaleError(f"{source}: metadata key {arch}.{key} must be a number (got {v!r})")
        return v if v is None else kind(v)

    if get("expert_count", 0):
        raise ParScaleError(f"{source}: mixture-of-experts models ({arch}.expert_count) are not supported")
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise ParScaleError(f"{source}: {arch}.rope.scaling.type={scaling_type!r} is not supported "
                            "(plain RoPE or Llama-3's rope_freqs)")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", None) or get("rope.dimension_count", None) or (
        hidden // heads if heads and hidden % heads == 0 else None)
    for key in ("attention.value_length", "rope.dimension_count"):
        v = get(key, None)
        if v is not None and v != head_dim:
            raise ParScaleError(f"{source}: {arch}.{key}={v} differs from head_dim={head_dim} "
                                "(partial rotary / uneven heads are not supported)")
    theta = _float32_decimal(get("rope.freq_base", 10000.0, float))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", None) or (len(tokens) if tokens else None)

    def token_id(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return v if isinstance(v, int) and vocab and 0 <= v < vocab else None

    rope_scaling = None
    if freq_factors is not None:
        ctx = meta.get(f"{arch}.rope.scaling.original_context_length")
        rope_scaling = llama3_from_freq_factors(freq_factors, head_dim, theta, ctx, source)
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
        rope_theta=theta, rope_scaling=rope_scaling,
        rms_norm_eps=_float32_decimal(get("attention.layer_norm_rms_epsilon", kind=float)),
        max_position_embeddings=get("context_length"),
        attention_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=token_id("bos_token_id"), eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"), streams=1,
    )
    try:
        return ParScaleConfig(**fields)
    except ParScaleError as e:
        raise ParScaleError(f"{source}: metadata gives an invalid model: {e}") from None


def llama3_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float, original: int | None,
                             source: str) -> dict[str, Any] | None:
    """Llama-3 ``rope_scaling`` from llama.cpp's per-frequency divisors (``rope_freqs.weight``).

    Between the two bands the divisor is ``1 / ((1 - s)/factor + s)`` with ``s`` linear in
    ``1/wavelength``; a line through those points gives the band edges. Only the edges matter, so
    ``original_max_position_embeddings`` (absent from such files) is taken as 8192, Llama-3's."""
    f = np.asarray(factors, dtype=np.float64)
    if f.shape != (head_dim // 2,):
        raise ParScaleError(f"{source}: {ROPE_FREQS} has shape {tuple(f.shape)}, expected ({head_dim // 2},)")
    if np.allclose(f, 1.0):
        return None
    factor = float(f.max())
    original = int(original or 8192)
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    medium = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if medium.sum() >= 2:
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv_wavelen[medium], s, 1)  # s = a / wavelen + b
        low = float(f"{-b * original / a:.6g}")
        high = float(f"{low + original / a:.6g}")
    else:  # at most one point between the bands: Llama-3's own edges, checked below
        low, high = 1.0, 4.0
    rs = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
          "high_freq_factor": high, "original_max_position_embeddings": original}
    wavelen = 1 / inv_wavelen
    smooth = (original / wavelen - low) / (high - low)
    expected = np.where(wavelen < original / high, 1.0,
                        np.where(wavelen > original / low, rs["factor"], 1 / ((1 - smooth) / rs["factor"] + smooth)))
    if not np.allclose(expected, f, rtol=1e-4, atol=0):
        raise ParScaleError(f"{source}: {ROPE_FREQS} is not Llama-3 RoPE scaling (no llama3 parameters "
                            "reproduce its divisors); other scalings are not supported")
    return rs


def _hf_name(gguf_name: str, n_layers: int) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers:
        rest = _LAYER_TENSORS.get(parts[2])
        return None if rest is None else f"model.layers.{parts[1]}.{rest}"
    return None


def _check_types(header: _Header, source: str) -> None:
    """Every tensor type must be one gguf's quants module can dequantise (tried on one block)."""
    gguf = _gguf()
    for qtype in sorted({t.qtype for t in header.tensors}):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
        except NotImplementedError:
            user = next(t.name for t in header.tensors if t.qtype == qtype)
            raise ParScaleError(f"{source}: tensor type {qtype.name} (tensor {user}) is not supported: "
                                "gguf cannot dequantise it") from None


def _dequantize(header: _Header, t: _Tensor) -> np.ndarray:
    """float32 values in numpy order (GGUF lists dimensions fastest-first: ``shape`` is reversed)."""
    w = _gguf().quants.dequantize(header.data(t), t.qtype)
    return np.array(w, dtype=np.float32, copy=True).reshape(t.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, pairs (i, i + d/2) interleaved -> HF's halves."""
    return rearrange(w, "(h i two) ... -> (h two i) ...", h=heads, two=2).contiguous()


def read_gguf(path: str | os.PathLike, *, tokenizer: bool = True) -> GGUFModel:
    """Read and check a GGUF file: config, float32 tensors under HF names, tokenizer files."""
    from .model import ParScaleForCausalLM
    from .interop import checkpoint_tensors

    path = Path(path)
    source = str(path)
    header = _open(path)
    meta = header.meta
    by_name = {t.name: t for t in header.tensors}
    if len(by_name) != len(header.tensors):
        raise ParScaleError(f"{source}: duplicate tensor names")
    if ROPE_FREQS in by_name:
        _check_types(header, source)
    freq_factors = _dequantize(header, by_name[ROPE_FREQS]) if ROPE_FREQS in by_name else None
    cfg = _config(meta, set(by_name), freq_factors, source)
    if cfg.attention_bias and not all(f"blk.{i}.attn_{x}.bias" in by_name
                                      for i in range(cfg.num_hidden_layers) for x in "qkv"):
        raise ParScaleError(f"{source}: some but not all of attn_q/k/v carry a bias (not supported)")

    # names and shapes against the model the config describes, before dequantising anything
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in checkpoint_tensors(ParScaleForCausalLM(cfg)).items()}
    mapped = {}
    for name, t in by_name.items():
        if name == ROPE_FREQS:
            continue
        hf = _hf_name(name, cfg.num_hidden_layers)
        if hf is None or hf not in expected:
            raise ParScaleError(f"{source}: unsupported tensor {name} for architecture {meta['general.architecture']}")
        if t.shape != expected[hf]:
            raise ParScaleError(f"{source}: tensor {name} has shape {t.shape}, the metadata says {expected[hf]}")
        mapped[hf] = t
    missing = [n for n in expected if n not in mapped]
    if missing:
        raise ParScaleError(f"{source}: missing tensor(s) for {', '.join(missing[:3])}"
                            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    _check_types(header, source)
    tok = tok_cfg = None
    if tokenizer:
        tok, tok_cfg = _tokenizer(meta, cfg, source)

    permuted = meta["general.architecture"] == "llama"
    tensors = {}
    for hf, t in mapped.items():
        w = torch.from_numpy(_dequantize(header, t))
        if permuted and ".q_proj." in hf:
            w = _unpermute(w, cfg.num_attention_heads)
        elif permuted and ".k_proj." in hf:
            w = _unpermute(w, cfg.num_key_value_heads)
        tensors[hf] = w
    return GGUFModel(cfg, tensors, tok, tok_cfg or {}, _generation_config(meta, cfg))


# --------------------------------------------------------------------------- tokenizer
def _tokenizer(meta: dict[str, Any], cfg: ParScaleConfig, source: str):
    """A byte-level BPE ``tokenizers.Tokenizer`` and the HF tokenizer/generation config dicts."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ParScaleError(f"{source}: tokenizer.ggml.model={kind!r} is not supported "
                            "(byte-level BPE, 'gpt2', only)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ParScaleError(f"{source}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if not isinstance(tokens, list) or not isinstance(merges, list) or len(types) != len(tokens):
        raise ParScaleError(f"{source}: tokenizer.ggml.tokens / merges / token_type missing or inconsistent")
    if len(tokens) != cfg.vocab_size:
        raise ParScaleError(f"{source}: {len(tokens)} tokens in tokenizer.ggml.tokens, vocab_size is {cfg.vocab_size}")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ParScaleError(f"{source}: tokenizer.ggml.tokens has duplicate tokens")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or not a or not b or " " in b:
            raise ParScaleError(f"{source}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((a, b))
    how = PRE_TOKENIZERS[pre]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=how.ignore_merges, fuse_unk=False,
                               byte_fallback=False))
    if how.nfc:
        tok.normalizer = normalizers.NFC()
    steps = []
    if how.split is not None:
        steps.append(pre_tokenizers.Split(Regex(how.split), behavior="isolated"))
    if how.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=how.split is None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    def named(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = named("bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", how is _LLAMA3))  # llama.cpp: Llama-3 adds BOS
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos and bos is None:
        raise ParScaleError(f"{source}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
    post = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:  # the same ids the HF tokenizer adds for add_bos_token / add_eos_token
        eos = named("eos_token_id")
        marks = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos and eos else [])
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"]
                                       + ([f"{eos}:1"] if add_eos and eos else []))
        post.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=marks))
    tok.post_processor = processors.Sequence(post)

    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": named("eos_token_id"),
               "unk_token": named("unknown_token_id"), "pad_token": named("padding_token_id"),
               "add_bos_token": add_bos, "add_eos_token": add_eos,
               "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok, tok_cfg


def _generation_config(meta: dict[str, Any], cfg: ParScaleConfig) -> dict[str, Any]:
    """HF ``generation_config.json`` keys: every id generation should stop at, the file's EOS first."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    eos_ids = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    if len(types) == len(tokens):
        position = {t: i for i, t in enumerate(tokens) if types[i] == _CONTROL}
        eos_ids += [position[t] for t in END_TOKENS if t in position]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if isinstance(i, int) and 0 <= i < cfg.vocab_size))
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos_ids or None, "pad_token_id": cfg.pad_token_id}


# --------------------------------------------------------------------------- model / directory
def _dtype(dtype) -> torch.dtype:
    from .dtypes import torch_dtype

    if dtype is None or dtype == "auto":
        return torch.float32  # dequantised values are float32
    return torch_dtype(dtype)


def _build(g: GGUFModel, dtype: torch.dtype, source: str, device=None):
    from .generation_config import GenerationConfig
    from .interop import _assign
    from .model import ParScaleForCausalLM

    model = ParScaleForCausalLM.empty(g.config).to(dtype=dtype)
    _assign(model, g.tensors, source)
    model.generation_config = GenerationConfig.from_dict(g.generation_config)
    return model.to(device=device).eval()


def load_gguf(path, *, streams: int | None = None, dtype=None, device=None):
    """The model in a GGUF file, built in memory (see :meth:`ParScaleForCausalLM.from_pretrained`)."""
    if streams not in (None, 1):
        raise ParScaleError(f"{path}: a GGUF file holds a P = 1 model (got streams={streams}); "
                            "add a stream set with model.add_stream_set(P)")
    dtype = _dtype(dtype)
    return _build(read_gguf(path, tokenizer=False), dtype, str(path), device)


def check_output_dir(out: str | os.PathLike) -> Path:
    """``out`` must be a directory or creatable as one, and writable (creates nothing)."""
    from .paths import ensure_writable_dir

    return ensure_writable_dir(out, "--out")


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, *, dtype="float32") -> Path:
    """Write ``out``: config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json, each atomically (config.json last). Returns ``out``."""
    out = check_output_dir(out)
    torch_dtype = _dtype(dtype)
    g = read_gguf(path)
    model = _build(g, torch_dtype, str(path))
    out.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_text(out / TOKENIZER_FILE, g.tokenizer.to_str(pretty=False))
        atomic_write_text(out / TOKENIZER_CONFIG_FILE, json.dumps(g.tokenizer_config, indent=2, ensure_ascii=False) + "\n")
        model.save_pretrained(out)  # weights, generation_config.json, then config.json
    except OSError as e:
        raise ParScaleError(f"{out}: cannot write ({e.strerror or e})") from None
    return out
