"""The model: a plain-PyTorch Qwen2/Qwen3/Llama decoder, and ParScale as a small diff on top of it.

Backbone (``Backbone`` + ``ParScaleForCausalLM`` with P = 1): token embedding, ``L`` pre-norm blocks of
grouped-query attention (RoPE, ``scaled_dot_product_attention``) and a SwiGLU MLP, a final RMSNorm
and the LM head. Tensor names equal Hugging Face Qwen2's, so checkpoints map one to one. The
architectures differ only by config switches: q/k/v biases (Qwen2), per-head q/k RMSNorm
(``qk_norm``, Qwen3), Llama-3 frequency scaling of RoPE (``rope_scaling``).

ParScale (P > 1) adds exactly three things, all held by one ``StreamSet`` module per P:

1. the batch is stream-major, ``(p b)``: row ``p·B + b`` is stream ``p`` of sample ``b``; the token
   embedding is computed once and repeated P times;
2. in every layer, stream ``p`` attends to its own learned prefix of ``prefix_tokens`` keys/values
   (not rotated by RoPE, visible to every query; real tokens keep positions 0, 1, 2, …);
3. after the final norm, an MLP over the feature-interleaved streams ``b s (h p)`` gives per-token
   softmax weights over P (smoothed: ``w·(1−ε) + ε/P``), the P hidden states are summed with those
   weights, and the LM head runs once.

Several stream sets can live on one backbone (dynamic P): ``set_streams(P)`` picks the active one.
A P = 1 stream set (config ``prefix_only``) holds a prefix and no aggregator: the prefix-only
control, one learned prefix on the plain backbone (the weighted sum of one stream is the identity).
Without it, P = 1 is exactly the plain backbone.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .cache import KVCache, StaticSlots
from .config import ParScaleConfig
from .errors import ParScaleError
from .generation_config import GenerationConfig


# --------------------------------------------------------------------------- backbone pieces
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dim() == 3 and x.shape[1] == 1:  # a decode step: one call
            out = kernels.rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
        # float32 statistics, cast back before the weight: the same rounding as HF Qwen2/Llama.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.head_dim
        with torch.no_grad():
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            if self.scaling is not None:  # validated by the config: rope_type "llama3"
                inv_freq = llama3_inv_freq(inv_freq, self.scaling)
            self.inv_freq.copy_(inv_freq)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (b s) -> cos, sin: (b 1 s d), computed in float32 like HF
        freqs = positions[..., None].float() * self.inv_freq.float()  # b s d/2
        emb = torch.cat([freqs, freqs], dim=-1)  # b s d
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3 RoPE scaling: wavelengths longer than ``original / low_freq_factor`` are slowed by
    ``factor``, shorter than ``original / high_freq_factor`` kept, the band between interpolated."""
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / lo, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / hi) & (wavelen <= original / lo)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------- inference matmuls
# Batch-1 decode multiplies a few rows (M = P·B) by each weight, so the BLAS path chosen for
# skinny products, not the FLOPs, sets the speed. Measured on an AVX-512 machine's MKL,
# weights n×k as stored, 1 thread, M = 1 / 2 / 8 rows:
#   float32  F.linear, 5632×1024      0.82 / 0.82 / 2.45 ms   (about M× the M = 1 time past 2 rows)
#   float32  W @ xᵀ                   0.82 / 1.57 / 1.61 ms   (flat from 2 rows on)
#   bfloat16 F.linear                 0.76 / 0.82 / 0.81 ms
#   bfloat16 W @ xᵀ                   0.77 / 0.54 / 0.54 ms   (one row padded to two: 0.56 ms)
# That holds for weights streamed from memory. A float32 weight that fits in the L2 caches (≤ 4 MiB:
# 2 MiB per core here) is cheap to re-read, and F.linear is the faster form at any row count:
# 1536×512, 2 threads, 8 rows: 68 µs against W @ xᵀ's 135 µs (33M at P = 8: 22.5 → 20.0 ms/step).
# Where it builds (x86-64 with AVX-512 or AVX2 and a C++ compiler), float32 takes neither: parscale's own
# kernel (``parscale.kernels``) reads each weight once for all rows and keeps the arithmetic
# behind the reads (174M's 64 weights, 2 threads, 8 rows: 1.25× the one-row time; F.linear 2.4×,
# W @ xᵀ 2.0×), in eager and compiled steps alike. The forms below are its fallback.
# So decode steps (one position, ≤ _SKINNY_ROWS rows) take the faster form per dtype and rows,
# and projections that read the same input (q/k/v, gate/up) share one n×k buffer: one matmul
# instead of two or three. The parameters become contiguous row slices of that buffer (no extra
# memory; names, state_dict and in-place loads unchanged). Prefill and full forwards take the
# plain layers, so those stay bit-identical to the training path and to transformers.
# Opt-in (``ParScaleForCausalLM.prepack``): one more copy of each float32 buffer in oneDNN's
# blocked layout, whose cost grows less with the rows than W @ xᵀ's: 2816×1024, 2 threads,
# 8 rows: 0.46 ms against F.linear's 0.72 ms (1 row: 0.29 ms).
_SKINNY_ROWS = 16
_CACHED_FP32_BYTES = 4 * 2 ** 20  # float32 weights up to this size take F.linear at any row count


class PackedLinear:
    """One or more ``nn.Linear`` layers with the same input, laid out for fast decode.

    Building one moves the layers' weights (and biases) into one n×k buffer and makes each
    parameter a contiguous row slice of it; calling it on ``x`` (≤ ``_SKINNY_ROWS`` rows) gives
    the layers' outputs, concatenated, from one matmul. ``valid`` says whether the parameters
    still live there (``model.to(...)`` or ``train()`` replaces them; the owner then packs again)."""

    def __init__(self, linears: list[nn.Linear], prepack: bool = False):
        w0 = linears[0].weight
        self.linears, self.sizes = linears, [lin.out_features for lin in linears]
        self.prepack_requested = prepack
        self._blocked: tuple | None = None  # (key, the BLAS's own layout of ``weight``): see _blocked_weight
        if len(linears) == 1:  # nothing to fuse: the layer's own tensors
            self.weight, self.bias = w0, linears[0].bias
        else:
            n, k = sum(self.sizes), w0.shape[1]
            has_bias = any(lin.bias is not None for lin in linears)
            # ordinary tensors even under inference_mode: the parameters must stay usable for training
            with torch.inference_mode(False), torch.no_grad():
                buf = torch.empty(n, k, dtype=w0.dtype, device=w0.device)
                bias = torch.zeros(n, dtype=w0.dtype, device=w0.device) if has_bias else None
                start = 0
                for lin, size in zip(linears, self.sizes):
                    buf[start:start + size].copy_(lin.weight)
                    lin.weight.data = buf[start:start + size]
                    if lin.bias is not None:
                        bias[start:start + size].copy_(lin.bias)
                        lin.bias.data = bias[start:start + size]
                    start += size
            self.weight, self.bias = buf, bias
        self._ptrs = self._pointers()

    _NAMES = ("weight", "bias")  # the tensors of each layer whose storage the layout holds

    def _pointers(self) -> tuple:
        # read from the modules' own dicts: nn.Module.__getattr__ costs ~1 µs a lookup, and every
        # decode step checks every layout (174M: 64 times)
        return tuple(_ptr(lin, n) for lin in self.linears for n in self._NAMES)

    def valid(self) -> bool:
        return self._pointers() == self._ptrs

    def __deepcopy__(self, memo):
        return None  # a copy's parameters get their own storage; its first forward packs again

    def __getstate__(self):
        # pickling (torch.save of a whole model, multiprocessing): the bound product holds ctypes
        # pointers; the unpickled layout binds again on its first call
        return {**self.__dict__, "_bound": False}

    def unpack(self) -> None:
        """Give every parameter its own storage again (for training)."""
        if len(self.linears) == 1:
            return
        with torch.no_grad():
            for lin in self.linears:
                lin.weight.data = lin.weight.data.clone()
                if lin.bias is not None:
                    lin.bias.data = lin.bias.data.clone()

    def _versions(self) -> tuple:
        # in-place writes (optimizer steps, load_state_dict) bump these; a prepacked copy must follow
        return tuple((lin.weight._version, None if lin.bias is None else lin.bias._version) for lin in self.linears)

    def _blocked_weight(self) -> torch.Tensor:
        """``weight`` in oneDNN's blocked layout (one copy, for every row count), made on first use
        and again after the parameters change in place."""
        key = self._versions()
        if self._blocked is None or self._blocked[0] != key:
            self._blocked = None  # free the stale copy before making the new one
            with torch.no_grad():
                self._blocked = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight, _SKINNY_ROWS))
        return self._blocked[1]

    _bound = False  # the native product bound to this buffer (kernels.bind), None where there is none

    def bound(self) -> "kernels.Bound | None":
        """The native product for this layout's buffer, made on the first eager call."""
        if self._bound is False:
            if torch.compiler.is_compiling():
                return None
            self._bound = self._bind()
        return self._bound

    def _bind(self):
        return kernels.bind(self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (rows) k
        fast = self.bound()  # eager decode: the checks made once (None past its rows or dtype)
        out = None if fast is None else fast(x2)
        if out is not None:
            return out.view(*lead, out.shape[-1])
        w, b, rows = self.weight, self.bias, x2.shape[0]
        if self.prepack_requested and rows > 2 and can_prepack(w) and not torch.compiler.is_compiling():
            # prepacked (opt-in): oneDNN's blocked weight; row-major output. 174M, 2 threads, P = 8:
            # 82.8 -> 70.1 ms per step (docs/benchmarks/decode.txt)
            out = torch.ops.mkldnn._linear_pointwise(x2, self._blocked_weight(), b, "none", [], "")
            return out.view(*lead, out.shape[-1])
        if (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and not frozen_trace()
                                         and (rows == 1 or kernels.bf16_past_one_row()))):
            # the native kernel, at every row count (float32 frozen graphs too: faster than
            # inductor's templates there, and no autotuning). MKL's one-row product ran at half the
            # memory's speed on a Zen 4 (174M P = 1: 62.8 ms against the kernel's 2 rows' 43.2).
            # bfloat16: torch's products read the weights well under the memory's speed (174M P = 1:
            # 136 ms against the kernel's 55 on Zen 1; 42.6 ms at 39% of the roofline on an AMX
            # machine). Where the CPU has bfloat16 dot products but the kernels were built without
            # them (an older compiler), torch's W @ xᵀ was flat in the rows (P = 8 at 1.11× P = 1),
            # which a kernel that widens to float32 is not: rows ≥ 2 stay with torch there
            out = kernels.skinny_linear(x2, w, b)  # None where the native kernel does not run
            if out is not None:
                return out.view(*lead, out.shape[-1])
        # float32 up to 2 rows or cache-sized, other devices, fp64, or a frozen graph: F.linear is as
        # fast (or the only sane form; a frozen graph's GEMM template packs the weight itself)
        if (w.device.type != "cpu" or w.dtype == torch.float64 or frozen_trace()
                or (w.dtype == torch.float32 and (rows <= 2 or w.numel() * 4 <= _CACHED_FP32_BYTES))):
            out = F.linear(x2, w, b)
        else:
            if rows == 1:  # MKL's two-column product beats its one-column (gemv) path
                x2 = torch.cat([x2, x2])
            # rows n, row-major: a transposed view (or ``view + bias``, which keeps the view's
            # strides) would hand attention a last dim of stride != 1 and push SDPA off its fused
            # kernel onto the math path (measured: 45% of a bf16 P = 8 step)
            out = (w @ x2.t()).t()[:rows].contiguous()
            out = out + b if b is not None else out
        return out.view(*lead, out.shape[-1])


def _ptr(module: nn.Module, name: str) -> int | None:
    """The data pointer of ``module``'s parameter or buffer ``name`` (None if it is None)."""
    params = module._parameters
    t = params[name] if name in params else module._buffers.get(name)
    return None if t is None else t.data_ptr()


_FREEZING = [False]  # True while a frozen compiled decode step runs (compile_decode(freeze=True))


def frozen_trace() -> bool:
    """Whether the code being traced is a frozen compiled decode step: its weights become constants
    that inductor repacks for its own GEMM templates (on CPU: AMX / AVX-512 micro-kernels), which
    want the plain product (``F.linear``, ``_weight_int8pack_mm``) rather than the eager layouts."""
    return torch.compiler.is_compiling() and _FREEZING[0]


def can_prepack(w: torch.Tensor) -> bool:
    """Whether ``ParScaleForCausalLM.prepack`` does anything for weights like ``w`` here: float32
    on CPU with oneDNN, where the native kernels (``parscale.kernels``) do not run: they are faster
    without a copy (174M P = 8: 50.1 ms, against 60.0 prepacked in an earlier run). (bfloat16's
    decode product, ``W @ xᵀ``, is already flat in the rows: a blocked bf16 copy measured the
    same, so it is not made.)"""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and not kernels.enabled())


def packed(owner: nn.Module, name: str, x: torch.Tensor) -> PackedLinear | None:
    """The decode layout ``name`` held by ``owner`` (of the layers ``owner.DECODE_LAYOUTS[name]``
    names: they read the same input), or None when the forward pass must use the plain layers: training, gradients wanted, or ``x`` (``r s k``) is not a
    decode step (one position, at most ``_SKINNY_ROWS`` rows). Prefill and full forwards stay the
    plain computation, bit for bit that of training and of transformers."""
    if torch.is_grad_enabled() or owner.training or x.shape[-2] != 1 or x.numel() > _SKINNY_ROWS * x.shape[-1]:
        return None
    p = owner.__dict__.get(name)  # a plain attribute, not a submodule or buffer
    if torch.compiler.is_compiling():  # a compiled decode step: the layouts were made before it (eagerly)
        return p
    prepack = owner.__dict__.get("_prepack", False)  # set by ParScaleForCausalLM.prepack
    if p is None or not p.valid() or p.prepack_requested != prepack:
        linears = [getattr(owner, n) for n in owner.DECODE_LAYOUTS[name]]
        # layers other than nn.Linear (e.g. parscale.quant's) name their own packed layout
        kind = getattr(type(linears[0]), "packed_type", PackedLinear if type(linears[0]) is nn.Linear else None)
        if kind is None:
            return None
        p = kind(linears, prepack=prepack)
        owner.__dict__[name] = p
    return p


def ensure_decode_layouts(model: nn.Module, rows: int) -> None:
    """Make (or remake, where stale) every decode layout (``DECODE_LAYOUTS``) of ``model`` and its
    layers for a decode step of ``rows`` rows, and what they keep beside (``prime``). A compiled
    decode step reads them as they are: it cannot check data pointers or version counters."""
    kernels.available()  # builds / loads the native kernels now: a compiled step only reads whether they loaded
    kernels.cpu_has_bf16_dot()  # and the CPU's flags, read from /proc
    x = torch.empty(rows, 1, 1, device="meta")  # packed() looks only at the shape
    owners = [model, *(m for layer in model.model.layers for m in (layer.self_attn, layer.mlp))]
    made = [model.lm_head] + [packed(o, name, x) for o in owners for name in o.DECODE_LAYOUTS]
    for p in made:  # state a compiled step reads but cannot make (int8's bfloat16 scales)
        prime = getattr(p, "prime", None)
        if prime is not None:
            prime()


class _DecodeGraph:
    """A model's compiled decode step (``ParScaleForCausalLM.compile_decode``). If compiling fails
    the first time (no C++ compiler, an op inductor cannot lower), it warns once and the model
    decodes eagerly through the same static-cache math from then on.

    ``freeze``: the graph is compiled with inductor's freezing, so the weights are constants of the
    graph (repacked once for its GEMM templates). Such a graph is only valid for the weights it was
    made from: it keeps their (data pointer, version) pairs (``stale``), and it is compiled from a
    code object of its own, because dynamo files graphs under the code object and another model (or
    this one with new weights) must not pick up these constants."""

    def __init__(self, model: nn.Module, options: dict, freeze: bool):
        body = type(model)._body
        self.freeze, self.state = freeze, "new"  # new -> ok | failed
        # inductor settings patched around each call, where (re)compiles happen: given to
        # torch.compile(options=...) instead, freezing did not take
        self.settings = contextlib.nullcontext
        if freeze:
            import torch._inductor.config as inductor_config

            inductor = {"freezing": True, "max_autotune": True}
            if model.model.norm.weight.device.type == "cpu":
                inductor["max_autotune_gemm_backends"] = "CPP,ATEN"
            # autotuning prints a table per matmul shape and a deprecation warning of its own:
            # noise in a user's terminal, not a result
            quiet = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
            inductor.update({k: v for k, v in quiet.items() if hasattr(inductor_config, k)})
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning,
                                    module=r"torch\._inductor")
            self.settings = functools.partial(inductor_config.patch, inductor)
            body = types.FunctionType(body.__code__.replace(), body.__globals__, body.__name__,
                                      body.__defaults__, body.__closure__)
            self.sources = [*model.parameters(), *model.buffers()]
            self.key = self._key()
        self.fn = torch.compile(types.MethodType(body, model), **options)

    def _key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.sources)

    def stale(self) -> bool:
        """Whether the weights moved or changed since this (frozen) graph took them."""
        return self.freeze and self._key() != self.key

    def __deepcopy__(self, memo):
        return None  # a copy compiles its own

    def __call__(self, args, eager):
        if self.state != "failed":
            try:
                _FREEZING[0] = self.freeze
                with self.settings():
                    out = self.fn(*args)
                self.state = "ok"
                return out
            except Exception as e:
                if self.state == "ok":  # it compiled and ran before: an error of this step
                    raise
                self.state = "failed"
                first_line = (str(e).strip().splitlines() or [""])[0]
                warnings.warn(f"compile_decode: torch.compile failed ({type(e).__name__}: {first_line}); "
                              "decoding eagerly", RuntimeWarning, stacklevel=3)
            finally:
                _FREEZING[0] = False
        return eager(*args)


def unpack_all(model: nn.Module, stale_only: bool = False) -> None:
    """Undo every ``packed`` layout under ``model`` (training wants plain contiguous weights);
    ``stale_only``: just forget the layouts whose parameters moved (frees their buffers)."""
    for m in model.modules():
        for key in [k for k, v in list(m.__dict__.items()) if isinstance(v, PackedLinear)]:
            if m.__dict__[key].valid():
                if stale_only:
                    continue
                m.__dict__[key].unpack()
            del m.__dict__[key]


class Attention(nn.Module):
    # decode layouts (see ``packed``): layers that read one input, multiplied as one buffer
    DECODE_LAYOUTS = {"_qkv": ("q_proj", "k_proj", "v_proj"), "_o": ("o_proj",)}

    def __init__(self, cfg: ParScaleConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's d features, weights shared by the heads
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, prefix=None, cache: KVCache | None = None):
        rows, s, _ = x.shape
        qkv = packed(self, "_qkv", x)
        # inference without q/k norms: one matmul for q, k and v
        y = qkv(x) if qkv is not None and not self.qk_norm else None
        q = None
        if y is not None and isinstance(cache, KVCache):
            # an eager decode step: RoPE and the cache write in one native call (None: nothing
            # written; a compiled step's cache is a StaticSlots, its graph fuses torch's ops)
            q = kernels.rope_kv(y, cos, sin, self.n_heads, self.n_kv, *cache.slots(self.layer_idx, s))
        if q is not None:
            k, v = cache.so_far(self.layer_idx, s)
        else:
            q, k, v = self._rotated(x, y, qkv, cos, sin)
            if cache is not None:  # the cache already holds the prefix in its first slots
                k, v = cache.update(self.layer_idx, k, v)
            elif prefix is not None:  # prefix keys are not rotated: they have no position
                k = torch.cat([prefix[0], k], dim=2)
                v = torch.cat([prefix[1], v], dim=2)
        attn_mask, is_causal = mask
        out = None
        if cache is not None and s == 1 and not torch.is_grad_enabled():
            # a decode step: the native kernel (None where it does not run). torch's fused kernel
            # spends most of a call setting up, at one row too (174M bfloat16 P = 1 on a Zen 4: 140 µs
            # a layer, 2.2 ms of a 19 ms step)
            out = kernels.decode_attention(q, k, v, attn_mask)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 enable_gqa=self.n_kv != self.n_heads)
        out = rearrange(out, "r h s d -> r s (h d)")
        o = packed(self, "_o", out)
        return self.o_proj(out) if o is None else o(out)


    def residual_block(self, x, norm: "RMSNorm", cos, sin, mask, prefix=None, cache: KVCache | None = None):
        """``x + self(norm(x), ...)``: in an eager decode step one native call (``kernels.attention_block``:
        the pre-norm, q/k/v, RoPE, the cache write, attention, o and the residual, bit for bit these ops),
        else these ops."""
        if (isinstance(cache, KVCache) and not self.qk_norm and x.shape[1] == 1 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            qkv, o = packed(self, "_qkv", x), packed(self, "_o", x)  # packed() reads only the rows of its input
            a, b = (None, None) if qkv is None or o is None else (qkv.bound(), o.bound())
            if a is not None and b is not None:
                k, v = cache.so_far(self.layer_idx, 1)
                out = kernels.attention_block(x, norm.weight, norm.eps, a, b, self.n_heads, self.n_kv, cos, sin,
                                              k, v, mask[0])
                if out is not None:
                    return out
        return x + self(norm(x), cos, sin, mask, prefix, cache)

    def _rotated(self, x, y, qkv, cos, sin):
        """q, k, v (``r h s d``) of ``x`` with RoPE on q and k, through torch's ops. ``y``: the fused
        projection's output, where it was made (a decode layout, no q/k norms)."""
        if y is not None:  # one RoPE call for q and k
            qk, v = y.split([(self.n_heads + self.n_kv) * self.head_dim, self.n_kv * self.head_dim], -1)
            qk = apply_rope(rearrange(qk, "r s (h d) -> r h s d", d=self.head_dim), cos, sin)
            q, k = qk.split([self.n_heads, self.n_kv], dim=1)
            return q, k, rearrange(v, "r s (h d) -> r h s d", d=self.head_dim)
        if qkv is not None:
            q, k, v = qkv(x).split([self.n_heads * self.head_dim, *[self.n_kv * self.head_dim] * 2], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (rearrange(t, "r s (h d) -> r h s d", d=self.head_dim) for t in (q, k, v))
        if self.qk_norm:  # prefix keys are stored as used: not normalised here
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    DECODE_LAYOUTS = {"_gate_up": ("gate_proj", "up_proj"), "_down": ("down_proj",)}

    def __init__(self, cfg: ParScaleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate_up = packed(self, "_gate_up", x)
        if gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gu = gate_up(x)
        h = kernels.silu_mul(gu)  # one call; None where the native kernel does not run
        if h is None:
            g, u = gu.chunk(2, dim=-1)
            h = F.silu(g) * u
        return packed(self, "_down", h)(h)

    def residual_block(self, x: torch.Tensor, norm: "RMSNorm") -> torch.Tensor:
        """``x + self(norm(x))``: in an eager decode step one native call (``kernels.mlp_block``, bit
        for bit these ops), else these ops."""
        gate_up = None if torch.compiler.is_compiling() else packed(self, "_gate_up", x)  # a graph: its own fusion
        if gate_up is not None:
            down = packed(self, "_down", x)  # packed() reads only the rows of its input
            a, b = gate_up.bound(), None if down is None else down.bound()
            if a is not None and b is not None:
                out = kernels.mlp_block(x, norm.weight, norm.eps, a, b)
                if out is not None:
                    return out
        return x + self(norm(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ParScaleConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, prefix=None, cache=None):
        x = self.self_attn.residual_block(x, self.input_layernorm, cos, sin, mask, prefix, cache)
        return self.mlp.residual_block(x, self.post_attention_layernorm)


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.*`` tensors)."""

    def __init__(self, cfg: ParScaleConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


# --------------------------------------------------------------------------- the ParScale diff
class StreamSet(nn.Module):
    """Everything that depends on P: per-layer, per-stream prefixes and the aggregator.

    Initialisation here (the official code leaves prefixes as ``torch.empty`` — garbage, often
    NaN): prefix keys/values ~ N(0, initializer_range), different per stream so the streams differ
    from step one; the aggregator's first Linear ~ N(0, initializer_range) and its last Linear all
    zeros, so training starts from uniform weights 1/P, i.e. the mean of the P streams. That suits
    training from scratch. On a *pretrained* backbone near-zero prefix keys pull attention mass
    off the real tokens (+24% loss on SmolLM2-135M at P = 2, 48 tokens), so
    ``ParScaleForCausalLM.add_stream_set`` overwrites the prefixes with keys/values of real text
    snippets by default (``parscale.recycle``; docs/recycling.md).

    P = 1 (the prefix-only control) has prefixes and no aggregator.

    ``reparam`` (None unless training with the paper's prefix reparameterisation,
    ``parscale.training.reparam``): a module whose ``forward(layer)`` makes that layer's prefixes;
    saving folds it into ``prefix_k``/``prefix_v`` (``reparam_folded``).
    """

    def __init__(self, cfg: ParScaleConfig, streams: int):
        super().__init__()
        if streams < 1:
            raise ParScaleError(f"a stream set needs P >= 1 (got {streams})")
        self.streams, self.smoothing = streams, cfg.agg_smoothing
        shape = (cfg.num_hidden_layers, streams, cfg.num_key_value_heads, cfg.prefix_tokens, cfg.head_dim)
        self.prefix_k = nn.Parameter(torch.zeros(shape))  # l p h t d
        self.prefix_v = nn.Parameter(torch.zeros(shape))
        h = cfg.hidden_size
        self.aggregate_layer = (nn.Sequential(nn.Linear(streams * h, h), nn.SiLU(), nn.Linear(h, streams))
                                if streams > 1 else None)
        self.reparam: nn.Module | None = None

    def reset_parameters(self, std: float, agg_std: float = 0.0, hidden_std: float | None = None) -> None:
        """Prefixes ~ N(0, ``std``); the aggregator's first Linear ~ N(0, ``hidden_std``, default
        ``std``) and its last ~ N(0, ``agg_std``) (0: all zeros, exactly uniform weights at the start)."""
        with torch.no_grad():
            nn.init.normal_(self.prefix_k, std=std)
            nn.init.normal_(self.prefix_v, std=std)
            if self.aggregate_layer is None:
                return
            nn.init.normal_(self.aggregate_layer[0].weight, std=std if hidden_std is None else hidden_std)
            nn.init.zeros_(self.aggregate_layer[0].bias)
            if agg_std > 0:
                nn.init.normal_(self.aggregate_layer[2].weight, std=agg_std)
            else:  # no RNG draw: the draws after it stay what they always were
                nn.init.zeros_(self.aggregate_layer[2].weight)
            nn.init.zeros_(self.aggregate_layer[2].bias)

    def prefix(self, layer: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s prefix for a stream-major batch: two ``(p b) h t d`` tensors."""
        k, v = (self.prefix_k[layer], self.prefix_v[layer]) if self.reparam is None else self.reparam(layer)
        k = repeat(k, "p h t d -> (p b) h t d", b=batch).to(dtype)
        v = repeat(v, "p h t d -> (p b) h t d", b=batch).to(dtype)
        return k, v

    def weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token stream weights ``b s p`` (float32, smoothed) from hidden states ``(p b) s h``."""
        mixed = rearrange(hidden, "(p b) s h -> b s (h p)", p=self.streams)  # feature-interleaved
        first, act, last = self.aggregate_layer
        w = torch.softmax(_decode_linear(last, act(_decode_linear(first, mixed))).float(), dim=-1)
        return w * (1 - self.smoothing) + self.smoothing / self.streams

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.aggregate_layer is None:  # P = 1: one stream, nothing to mix
            return hidden, None
        w = self.weights(hidden)
        streams = rearrange(hidden, "(p b) s h -> b s p h", p=self.streams)
        return (streams * w[..., None]).sum(dim=2).to(hidden.dtype), w


def _decode_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)``; for a decode step's few rows (no gradients) through the native kernel, which
    reads the weight once for all rows (the aggregator's first layer is P·h × h: 33 MB at 174M,
    P = 8, 1.6 ms a step through F.linear on a Zen 4)."""
    if not torch.is_grad_enabled() and x.shape[-2] == 1 and x.numel() <= _SKINNY_ROWS * x.shape[-1]:
        x2 = x.reshape(-1, x.shape[-1])  # rows k  (one position: longer forwards stay F.linear, bit for bit)
        out = kernels.skinny_linear(x2 if x2.stride(-1) == 1 else x2.contiguous(), lin.weight, lin.bias)
        if out is not None:
            return out.view(*x.shape[:-1], out.shape[-1])
    return lin(x)


@contextlib.contextmanager
def reparam_folded(model: nn.Module):
    """While active, every stream set of ``model`` that trains through a prefix reparameterisation
    holds the prefixes it makes in ``prefix_k``/``prefix_v`` and has no ``reparam`` child: what is
    saved then is the official format. The reparams are put back afterwards (training goes on)."""
    held = {key: s.reparam for key, s in model.stream_sets.items() if s.reparam is not None}
    with torch.no_grad():
        for key, r in held.items():
            s = model.stream_sets[key]
            for layer in range(s.prefix_k.shape[0]):
                k, v = r(layer)
                s.prefix_k[layer].copy_(k)
                s.prefix_v[layer].copy_(v)
            s.reparam = None
    try:
        yield model
    finally:
        for key, r in held.items():
            model.stream_sets[key].reparam = r


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # b s v
    loss: torch.Tensor | None = None
    agg_weights: torch.Tensor | None = None  # b s p, float32 (None when P = 1)
    cache: KVCache | None = None


def build_mask(key_valid: torch.Tensor | None, q_start: int, q_len: int, n_prefix: int,
               device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """Attention mask ``(b|1) 1 q (t + k)`` as (mask, is_causal) for ``scaled_dot_product_attention``.

    Queries are token slots ``q_start … q_start+q_len-1``; keys are ``n_prefix`` prefix slots (always
    visible) followed by token slots ``0 … k-1``, visible when causal and valid. A query always sees
    itself, so a padding row never has an empty softmax (its output is ignored anyway).
    """
    n_keys = q_start + q_len
    if key_valid is None:
        if q_len == 1:
            return None, False  # one new token sees the prefix and everything before it
        if n_prefix == 0 and q_start == 0:
            return None, True  # plain causal: the fused path
    qi = torch.arange(q_start, n_keys, device=device)[:, None]
    kj = torch.arange(n_keys, device=device)[None, :]
    mask = (kj <= qi)[None]  # 1 q k
    if key_valid is not None:
        mask = (mask & key_valid[:, None, :n_keys]) | (kj == qi)[None]  # b q k
    if n_prefix:
        mask = torch.cat([mask.new_ones(mask.shape[0], q_len, n_prefix), mask], dim=-1)
    return mask[:, None], False


class ParScaleForCausalLM(nn.Module):
    """A causal LM with P parallel streams (P = 1: exactly the plain backbone)."""

    DECODE_LAYOUTS = {"_head": ("lm_head",)}

    def __init__(self, config: ParScaleConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The backbone draws its init before any stream set exists, so under one seed every P
        # starts from the same backbone: P = 1 vs P > 1 comparisons are paired.
        self._init_backbone()
        self.stream_sets = nn.ModuleDict()
        for p in config.stream_sets:
            if p > 1 or config.prefix_only:
                self.stream_sets[str(p)] = StreamSet(config, p)
                self.stream_sets[str(p)].reset_parameters(config.initializer_range)
        self.gradient_checkpointing = False
        self.name_or_path = ""  # set by from_pretrained (HF's attribute of the same name)
        self.generation_config = GenerationConfig.from_model_config(config)
        if config.quantization:  # a quantised config builds the quantised layers (loaders fill them)
            self.quantize(config.quantization)

    # ------------------------------------------------------------------ Hugging Face habits
    @property
    def device(self) -> torch.device:
        """Where the parameters live (inputs go here)."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the compute dtype (the embedding may be int8)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recompute each layer's activations in the backward pass (training mode only)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ setup
    def train(self, mode: bool = True) -> "ParScaleForCausalLM":
        if mode:  # decode steps pack weights into fused buffers; training wants each its own storage
            unpack_all(self)
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        unpack_all(self, stale_only=True)  # after .to(...): the old buffers are not kept alive
        graph = self.__dict__.get("_decode_graph")
        if graph is not None and graph.freeze:  # nor a frozen graph's copies of the old weights
            self.__dict__["_decode_graph"] = None
        return out

    def reset_parameters(self) -> None:
        """Re-initialise everything: the backbone, then each stream set."""
        self._init_backbone()
        for s in self.stream_sets.values():
            s.reset_parameters(self.config.initializer_range)

    def _init_backbone(self) -> None:
        std = self.config.initializer_range
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=std)
                elif isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
            if not self.config.tie_word_embeddings:
                nn.init.normal_(self.lm_head.weight, std=std)

    @property
    def streams(self) -> int:
        return self.config.streams

    @property
    def stream_set(self) -> StreamSet | None:
        return self.stream_sets[str(self.streams)] if str(self.streams) in self.stream_sets else None

    def set_streams(self, streams: int) -> "ParScaleForCausalLM":
        """Pick the active stream set (dynamic P). P = 1 is always available: the backbone alone
        (or, in a ``prefix_only`` model, the backbone with its one learned prefix)."""
        if not isinstance(streams, int) or streams < 1:
            raise ParScaleError(f"streams must be an integer >= 1 (got {streams!r})")
        if streams > 1 and str(streams) not in self.stream_sets:
            raise ParScaleError(f"this model has no stream set for P={streams} (available: "
                                f"{sorted({1, *map(int, self.stream_sets)})}); add one with "
                                f"model.add_stream_set({streams}) or train one with "
                                f"`parscale train --init-from DIR --streams {streams}`")
        self.config.streams = streams
        return self

    def add_stream_set(self, streams: int, *, init: str = "snippets", snippets: torch.Tensor | None = None,
                       std: float | None = None, agg_std: float = 0.0) -> StreamSet:
        """Add (and activate) a new stream set for P = ``streams`` on this backbone; P = 1 adds the
        prefix-only control (one learned prefix, no aggregator).

        ``init="snippets"`` (default): stream p's prefix is the backbone's own keys/values on text
        snippet p (``snippets``: token ids ``p t``, e.g. from the training data; None: sampled from
        the model itself), so the recycled model starts at its base loss (docs/recycling.md).
        ``init="random"``: prefixes ~ N(0, ``std``, default ``initializer_range``), the from-scratch
        init. The aggregator starts uniform (its last Linear zero), or nearly so with ``agg_std`` > 0
        (that Linear ~ N(0, ``agg_std``)).
        """
        from .recycle import INITS, snippet_prefixes

        if not isinstance(streams, int) or streams < 1:
            raise ParScaleError(f"streams must be an integer >= 1 (got {streams!r})")
        if init not in INITS:
            raise ParScaleError(f"unknown stream-set init {init!r} (use one of {', '.join(INITS)})")
        if self.config.prefix_tokens < 1:
            raise ParScaleError("config field 'prefix_tokens' must be >= 1 to add a stream set")
        ref = self.model.norm.weight  # the compute dtype (the embedding may be int8)
        s = StreamSet(self.config, streams).to(device=ref.device, dtype=ref.dtype)
        s.reset_parameters(self.config.initializer_range if std is None else std, agg_std,
                           hidden_std=self.config.initializer_range)
        if init == "snippets":
            k, v = snippet_prefixes(self, streams, snippets)
            with torch.no_grad():
                s.prefix_k.copy_(k)
                s.prefix_v.copy_(v)
        self.stream_sets[str(streams)] = s
        if streams == 1:
            self.config.prefix_only = True
        self.config.stream_sets = sorted(set(self.config.stream_sets) | {streams})
        return self.set_streams(streams).stream_set

    def backbone_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("stream_sets.")]

    def stream_parameters(self, streams: int | None = None):
        sets = self.stream_sets.values() if streams is None else [self.stream_sets[str(streams)]]
        return [p for s in sets for p in s.parameters()]

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None) -> CausalLMOutput:
        """Logits ``b s v`` for ``input_ids`` ``b s``.

        ``attention_mask`` (``b s``, 1 = token, 0 = padding; left padding for generation) covers the
        tokens passed in; with a ``cache`` the cache remembers the earlier ones. ``labels`` (``b s``)
        give the mean next-token cross-entropy, ignoring -100 (shifted inside, as in HF).
        """
        if input_ids.dim() != 2:
            raise ParScaleError(f"input_ids must be 2-D (batch, seq); got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ParScaleError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                f"{tuple(input_ids.shape)}")
        P, sset = self.streams, self.stream_set
        n_prefix = self.config.prefix_tokens if sset is not None else 0

        # positions count from each row's first real token; the prefix takes none
        if cache is not None:
            if cache.batch != b:
                raise ParScaleError(f"cache holds {cache.batch} rows, input has {b}")
            if (s == 1 and self.__dict__.get("_compile_decode") is not None and not self.training
                    and not torch.is_grad_enabled()):
                return self._compiled_step(input_ids, attention_mask, cache)
            positions, key_valid = cache.advance_positions(attention_mask, s)
            q_start = cache.length
        else:
            if attention_mask is None:
                positions, key_valid = torch.arange(s, device=input_ids.device).expand(b, s), None
            else:
                am = attention_mask.bool()
                positions = (am.long().cumsum(-1) - 1).clamp(min=0)
                key_valid = None if bool(am.all()) else am
            q_start = 0
        mask, is_causal = build_mask(key_valid, q_start, s, n_prefix, input_ids.device)
        if mask is not None and P > 1 and mask.shape[0] > 1:
            mask = repeat(mask, "b 1 q k -> (p b) 1 q k", p=P)
        logits, weights = self._body(input_ids, positions, (mask, is_causal), cache)
        if cache is not None:
            cache.length += s

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, agg_weights=weights, cache=cache)

    def _body(self, input_ids, positions, mask, cache):
        """Embedding, the layers, the final norm, the stream aggregation and the LM head: logits
        ``b s v`` and the stream weights. ``mask``: (attention mask, is_causal) for every row."""
        b = input_ids.shape[0]
        P, sset = self.streams, self.stream_set
        x = self.model.embed_tokens(input_ids)  # b s h: computed once for all streams
        cos, sin = self.model.rotary(positions, x.dtype)
        if P > 1:
            x = repeat(x, "b s h -> (p b) s h", p=P)
            if b == 1 and not torch.compiler.is_compiling():  # a stride-0 view: the decode kernels want rows
                x = x.contiguous()  # (a compiled step keeps its graph as traced: this copy made it specialise)
            if b > 1:  # one sample's cos/sin broadcast over its P rows as they are
                cos, sin = (repeat(t, "b 1 s d -> (p b) 1 s d", p=P) for t in (cos, sin))

        for i, layer in enumerate(self.model.layers):
            prefix = sset.prefix(i, b, x.dtype) if (sset is not None and cache is None) else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, prefix, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, prefix, cache)
        x = self.model.norm(x)

        weights = None
        if sset is not None:
            x, weights = sset(x)  # (p b) s h -> b s h
        head = packed(self, "_head", x)
        logits = self.lm_head(x) if head is None else head(x)
        return logits, weights

    def _compiled_step(self, input_ids, attention_mask, cache: KVCache) -> CausalLMOutput:
        """One decode step through the ``torch.compile``'d ``_body`` (see :meth:`compile_decode`).

        The graph must not recompile from step to step: the step writes its keys/values at a slot
        given as a tensor (``StaticSlots``), and attends over the buffers' first slots (prefix +
        the tokens so far), a window whose size, like the buffers' capacity, the graph takes as
        dynamic. Attending over the whole capacity instead made a step's cost grow with
        ``max_new_tokens`` (SmolLM2 int8 P = 4: 16 ms at capacity 64, 49 ms at 2048)."""
        b = input_ids.shape[0]
        positions, _ = cache.advance_positions(attention_mask, 1)
        valid = cache.key_valid[:, : cache.length + 1]  # b n: the token slots so far, this step's included
        if cache.n_prefix:
            valid = torch.cat([valid.new_ones(b, cache.n_prefix), valid], dim=-1)
        mask = valid[:, None, None, :]  # b 1 1 (t + n)
        if self.streams > 1 and b > 1:
            mask = repeat(mask, "b 1 q k -> (p b) 1 q k", p=self.streams)
        # the attended window grows every step and caches differ in capacity: both sizes are
        # dynamic from the first compile on, so no step recompiles (nor copies a frozen graph's
        # weights again) for a new length or capacity
        from torch._dynamo import maybe_mark_dynamic

        maybe_mark_dynamic(mask, 3)
        for t in (*cache.k, *cache.v):
            maybe_mark_dynamic(t, 2)
        slot = torch.full((1,), cache.n_prefix + cache.length, dtype=torch.long, device=input_ids.device)
        graph = self.__dict__.get("_decode_graph")
        remake = graph is None or graph.stale()  # first step, a deep copy (which compiles its own), new weights
        if remake or not graph.freeze:
            # eagerly: the compiled graph only reads them (a frozen graph's weights did not move)
            ensure_decode_layouts(self, self.streams * b)
        if remake:
            options = dict(self.__dict__["_compile_decode"])
            freeze = options.pop("freeze")
            graph = self.__dict__["_decode_graph"] = None  # free a stale graph's constants first
            graph = self.__dict__["_decode_graph"] = _DecodeGraph(self, options, freeze)
        logits, weights = graph((input_ids, positions, (mask, False), StaticSlots(cache.k, cache.v, slot, mask)),
                                eager=self._body)
        cache.length += 1
        return CausalLMOutput(logits=logits, agg_weights=weights, cache=cache)

    # ------------------------------------------------------------------ cache / generation
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` samples and ``capacity`` tokens, prefixes pre-filled."""
        ref = self.model.norm.weight  # the compute dtype (the embedding may be int8)
        cfg, sset = self.config, self.stream_set
        cache = KVCache(cfg.num_hidden_layers, batch, self.streams, cfg.num_key_value_heads,
                        cfg.head_dim, capacity, cfg.prefix_tokens if sset is not None else 0,
                        dtype=ref.dtype, device=ref.device)
        if sset is not None:
            with torch.no_grad():
                for i in range(cfg.num_hidden_layers):
                    cache.set_prefix(i, *sset.prefix(i, batch, ref.dtype))
        return cache

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Hugging Face-style generation: returns the prompt followed by the new tokens.

        See :func:`parscale.generation.generate` for the arguments.
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def empty(cls, config: ParScaleConfig, device="cpu") -> "ParScaleForCausalLM":
        """A model with uninitialised parameters (no random init: built on the meta device, then
        allocated), for loaders that overwrite every parameter. Ties and buffers are restored."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        if config.tie_word_embeddings and not config.quantization:  # to_empty untied the two names
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary.reset_parameters()
        return model

    @classmethod
    def from_pretrained(cls, path, *, streams: int | None = None, dtype=None, device=None, torch_dtype=None,
                        quantize: str | None = None, adapter=None, prepack: bool = False,
                        compile_decode: bool | str = False):
        """Load a checkpoint directory: ours / official ParScale (``qwen2_parscale``) or plain HF
        Qwen2 / Qwen3 / Llama (as P = 1), or a GGUF file (``*.gguf``, as P = 1). ``streams`` picks
        a stored stream set (dynamic P). ``dtype`` (``torch_dtype`` is the Hugging Face name for
        it): a torch dtype, float32 / bfloat16 / float16 (fp32 / bf16 / fp16), or ``"auto"`` for the
        stored one. ``quantize="int8"``: weight-only int8 after loading (see :mod:`parscale.quant`;
        a checkpoint saved quantised loads quantised anyway). ``generation_config`` comes from
        ``generation_config.json`` when the directory has one. ``adapter``: a frozen-backbone run's
        stream sets to load onto this base; ``path`` may also be an adapter directory itself (its
        recorded base is loaded, the base's hash checked). ``prepack=True``: see :meth:`prepack`;
        ``compile_decode=True`` (or ``"graph"``), ``"frozen"``: see :meth:`compile_decode` (``freeze``)."""
        from .dtypes import ALIASES
        from .interop import load_pretrained

        if compile_decode not in (False, True, None, "graph", "frozen"):  # before loading anything
            raise ParScaleError(f"from_pretrained: compile_decode={compile_decode!r}: expected True, False, "
                                "'graph' or 'frozen'")

        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ParScaleError(f"from_pretrained: dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree")
            dtype = torch_dtype
        if isinstance(dtype, str):
            dtype = ALIASES.get(dtype.strip().lower().removeprefix("torch."), dtype)
        model = load_pretrained(path, streams=streams, dtype=dtype, device=device, quantize=quantize,
                                adapter=adapter)
        if not str(path).lower().endswith(".gguf"):  # a GGUF file brings its own (every EOS id)
            model.generation_config = GenerationConfig.load(path, model.config)
        model.name_or_path = str(path)  # as in HF: where it came from (its tokenizer, for recycling)
        if compile_decode:
            model.compile_decode(freeze=compile_decode == "frozen")
        return model.prepack() if prepack else model

    def prepack(self, enabled: bool = True) -> "ParScaleForCausalLM":
        """Opt-in faster float32 decode on CPU for one more copy of the weights in memory: decode
        steps of more than 2 rows (P·B) multiply by a copy of every projection (and the LM head)
        in oneDNN's blocked layout, made on first use. On the 174M benchmark shape at P = 8 a step
        goes from 82.8 to 70.1 ms (docs/benchmarks/decode.txt). Prefill and training are
        unchanged (plain weights: bit for bit as without); decode rounds like any other fp32 GEMM
        order (within the incremental-decode tolerance). No-op on other devices and dtypes
        (bfloat16's decode product is already flat in the rows; int8 has its own kernels).
        Returns self; ``prepack(False)`` frees the copies."""
        for m in self.modules():
            m.__dict__["_prepack"] = enabled  # read by model.packed; not a parameter, buffer or config
        if not enabled:
            unpack_all(self)
        return self

    def compile_decode(self, enabled: bool = True, *, freeze: bool = False, **options) -> "ParScaleForCausalLM":
        """Opt-in: run every decode step (one new position per row, with a KV cache, no gradients)
        as one ``torch.compile``'d graph: the layers, the norm, the aggregation and the head, with
        the elementwise work fused and no Python between ops. The graph attends over the slots
        written so far (``StaticSlots``), with the length and the cache's capacity as dynamic sizes.

        The first step compiles (tens of seconds on a CPU; bench_decode reports it), and again for a
        new stream set, batch size or dtype, not for a new length or capacity. Batch sizes: a batch
        of 1 has its own graph; from the second size on torch makes the size dynamic, but the
        matmul form chosen by the row count (``PackedLinear``) splits the sizes into a few ranges,
        2 to 4 graphs in all (counted for P = 1, 2, 4 up to 16 rows, float32, bfloat16, int8).
        ``parscale.generation.warm_up`` compiles the sizes 1 and 2 up front (``parscale serve`` does).
        Prefill, training and saving are unchanged. Works with every dtype, int8 and ``prepack``
        (whose blocked copies the graph does not use). ``options`` go to ``torch.compile`` (e.g.
        ``mode="max-autotune-no-cudagraphs"``). If compiling fails it warns and decodes eagerly.

        ``freeze=True``: compile with inductor's freezing and GEMM autotuning. The weights become
        constants of the graph, repacked once into the layout of inductor's own matmul kernels (on
        CPU with AMX, its AMX micro-kernels for bfloat16 and int8), whose cost barely grows with
        the rows: on the 174M benchmark shape bfloat16 P = 8 costs 1.15–1.25× its P = 1 (two runs), and
        int8 P = 1 is 1.8× faster than eager (docs/benchmarks/decode_frozen.txt). The price: each compiled graph (stream set,
        batch size) holds its own packed copy of the weights beside the model's, and the
        compile takes longer (autotuning). After the weights change (``load_state_dict``, an
        optimizer step, ``.to()``) the next decode step compiles again.

        Returns self; ``compile_decode(False)`` turns it off."""
        import torch._dynamo

        if enabled:
            # every model instance, stream set and shape is its own entry under _body's code object
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # older torch
            setattr(cfg, name, max(getattr(cfg, name), 64))
            if freeze and "mode" in options:
                raise ParScaleError("compile_decode: freeze=True sets its own inductor options; "
                                    f"drop mode={options['mode']!r}")
        self.__dict__["_compile_decode"] = dict(options, freeze=freeze) if enabled else None
        self.__dict__["_decode_graph"] = None
        return self

    def quantize(self, mode: str = "int8") -> "ParScaleForCausalLM":
        """Weight-only int8 in place (see :mod:`parscale.quant`); returns self."""
        from .quant import quantize_

        return quantize_(self, mode)

    def save_pretrained(self, path, *, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` + safetensors in the official ParScale format (atomically per file)."""
        from .interop import save_pretrained

        with reparam_folded(self):  # a reparameterised prefix is saved as the plain prefix it makes
            save_pretrained(self, path, max_shard_bytes=max_shard_bytes)
        if self.generation_config != GenerationConfig.from_model_config(self.config):  # e.g. an HF model's
            self.generation_config.save(path)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.backbone_parameters())
        if self.stream_set is not None:  # a training-only prefix reparam is not counted: it folds away
            n += sum(p.numel() for name, p in self.stream_set.named_parameters() if not name.startswith("reparam."))
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        return n
