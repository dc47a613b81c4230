"""Weight-only int8 quantisation: int8 weights with one scale per output channel.

``quantize_(model)`` (or ``model.quantize("int8")``, or ``from_pretrained(..., quantize="int8")``)
replaces every decoder projection (q/k/v/o, gate/up/down) and the LM head by ``Int8Linear``: the
weight ``W`` (n×k) becomes ``round(W / s)`` in int8 with ``s = max|W_row| / 127`` per output row,
so ``x Wᵀ ≈ (x Qᵀ) · s``. A tied embedding is quantised with the head (one int8 table, its rows
scaled by the same per-row scales: ``Int8Embedding``), so a tied model stores the table once.
Norms, biases, the ParScale prefixes and the aggregator stay in floating point (they are small).

Kernels: on CPU, 1 to 16 rows (decode at P·B ≤ 16), where ``parscale.kernels`` builds (x86-64
with AVX-512 or AVX2 and a C++ compiler): its int8 kernel, the weight read once for all rows and
widened to int16 in registers against activations as 16-bit fixed point per row (one scale per
row, error at most ``max|x_row| / 65534`` per element), exact integer products (VNNI where the CPU
has it). Otherwise: up to 4 rows
``torch.ops.aten._weight_int8pack_mm`` (bfloat16 activations, float32 accumulation; about as fast
as reading the int8 bytes, but its cost grows with the rows); 5 to 16 rows: each activation row as
two int8 digits and one int8 × int8 product (``torch._int_mm``, flat in the rows;
``_int8x2_matmul``). More rows (prefill): the weight dequantised to bfloat16 and one GEMM. A frozen
compiled step hands every decode product to inductor's int8 template instead (see
``int8_matmul``). Elsewhere (CUDA): dequantise-then-matmul in the input's dtype. torch's CPU
kernels round activations to bfloat16 (to two int8 digits at 5-16 rows);
scales are chosen exactly representable in bfloat16 so that rounding costs nothing extra.

Checkpoints: ``*.weight`` holds the int8 tensor and ``*.weight_scale`` the scales, under the
usual tensor names; ``config.json`` says ``"quantization": "int8"`` (see ``parscale.interop``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import ParScaleError
from .model import PackedLinear, ParScaleForCausalLM, frozen_trace

MODES = ("int8",)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int8 n×k, scale float32 n)`` with ``w ≈ q · scale[:, None]``.

    Scales are rounded up to the next bfloat16 value, so they stay exact in a bfloat16 kernel and
    ``|w / scale| ≤ 127`` still holds."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scale = _bf16_ceil(amax / 127)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value ≥ ``x`` (positive float32 ``x``), as float32."""
    # bfloat16 is float32's top 16 bits: round toward +inf by adding just under one bf16 ulp, then truncate
    bits = x.float().view(torch.int32)
    up = (bits + 0xFFFF) & ~0xFFFF
    return up.view(torch.float32)


_PACK_ROWS = 4  # up to here the bf16-activation kernel; from 5 to _KERNEL_ROWS rows the two-digit one,
_TWO_DIGIT_MIN = 1 << 20  # for weights of at least this many elements (below, its ~15 small ops cost more)
_AMX_MIN_ROWS = 5  # inductor's int8 GEMM template uses AMX (where there is one) from this many rows
_KERNEL_ROWS = 16  # past this (prefill) one bf16 GEMM on the dequantised weight is faster
# From this many rows a frozen graph takes the native int8 kernel (where it runs) rather than
# inductor's int8 GEMM, whose cost grows with the rows. SmolLM2-135M int8 frozen, 2 threads, ms/token,
# inductor vs native: P = 1 7.95 vs 11.10, P = 2 14.67 vs 15.16, P = 4 18.62 vs 15.43, P = 8 38.59 vs 24.94.
_FROZEN_NATIVE_ROWS = 3
_NATIVE_ROWS = (1, 16)  # decode rows for parscale.kernels' int8 kernel where it builds


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                scale_bf16: torch.Tensor | None = None) -> torch.Tensor:
    """``x qᵀ · scale`` for ``x`` (rows k) float, ``q`` (n k) int8, ``scale`` (n): rows n in x's dtype.
    ``scale_bf16``: the scales already in bfloat16 (exact: see ``quantize_weight``), if the caller
    keeps them (``bf16_scale``), which saves a cast per call and lets a compiled graph trace it."""
    if (scale_bf16 is not None and frozen_trace() and x.shape[0] <= _KERNEL_ROWS and _pack_kernel_fits(x, q)
            and not (x.shape[0] >= _FROZEN_NATIVE_ROWS and x.device.type == "cpu"
                     and kernels.int8_usable(x.float(), q, scale) and kernels.available())):
        # a frozen graph: inductor replaces this op by its own int8 GEMM on the constant weight
        # (AMX where the CPU has it), nearly as fast at 8 rows as at 1, so neither of the choices below
        rows = x.shape[0]
        if 1 < rows < _AMX_MIN_ROWS:  # inductor leaves AMX out below 5 rows; padded rows cost nothing there
            x = torch.cat([x, x.new_zeros(_AMX_MIN_ROWS - rows, x.shape[1])])
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale_bf16)
        return out[:rows].to(x.dtype)
    if x.device.type == "cpu" and _NATIVE_ROWS[0] <= x.shape[0] <= _NATIVE_ROWS[1]:
        # parscale's own kernel (parscale.kernels): the weight read once for all rows, activations
        # as 16-bit fixed point per row; None where it does not run
        out = kernels.skinny_linear_int8(x.float(), q, scale.float())
        if out is not None:
            return out.to(x.dtype)
    if torch.compiler.is_compiling() and scale_bf16 is None:  # one opaque op in a compiled decode step
        return torch.ops.parscale.int8_matmul(x, q, scale)
    return _int8_matmul(x, q, scale, scale_bf16)


@torch.library.custom_op("parscale::int8_matmul", mutates_args=())
def _int8_matmul_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # why an op: inductor's lowering of _weight_int8pack_mm asserts on a scale cast inside the graph
    return _int8_matmul(x, q, scale)


@_int8_matmul_op.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


def bf16_scale(owner, scale: torch.Tensor) -> torch.Tensor | None:
    """``scale`` in bfloat16 for the CPU kernel (None off the CPU: no kernel wants it), kept on
    ``owner`` and made again after an in-place change (version counter). In a compiled step the
    copy made by the last eager call is used as it is (``model.ensure_decode_layouts`` makes one
    before every compiled step)."""
    if scale.device.type != "cpu":
        return None
    held = owner.__dict__.get("_scale_bf16")
    if torch.compiler.is_compiling():
        return None if held is None else held[1]
    key = (scale.data_ptr(), scale._version)
    if held is None or held[0] != key:
        held = owner.__dict__["_scale_bf16"] = (key, scale.to(torch.bfloat16))
    return held[1]


def _pack_kernel_fits(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``_weight_int8pack_mm`` takes these operands: it mis-computes (or crashes) when k is
    not a multiple of 16, and wants the weight contiguous."""
    return x.shape[-1] % 16 == 0 and q.is_contiguous()


def _int8_matmul(x, q, scale, scale_bf16=None):
    if x.device.type != "cpu":
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    rows = x.shape[0]
    two_digit = _PACK_ROWS < rows <= _KERNEL_ROWS and q.numel() >= _TWO_DIGIT_MIN
    if rows <= _KERNEL_ROWS and not two_digit and _pack_kernel_fits(x, q):
        # few rows: the CPU kernel wants bf16 activations and scales (the scales are exact in bf16,
        # see above)
        sb = scale.to(torch.bfloat16) if scale_bf16 is None else scale_bf16
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, sb)
        return out.to(x.dtype)
    if rows <= _KERNEL_ROWS:  # the two-digit product (also for shapes the kernel above refuses)
        return _int8x2_matmul(x, q, scale)
    # prefill (many rows): dequantise once (int8 is exact in bf16), bf16 GEMM
    out = F.linear(x.to(torch.bfloat16), q.to(torch.bfloat16)).float() * scale.float()
    return out.to(x.dtype)


def _int8x2_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same product with each activation row written as two int8 digits, ``x ≈ s·(d1 +
    d2/254)`` with ``s = max|x_row| / 127`` (error at most ``max|x_row| / 64516``: finer than bf16's
    8 mantissa bits for the row's large values), multiplied as int8 × int8 with exact int32 sums.

    Why: ``_weight_int8pack_mm``'s cost grows with the rows (5632×1024, 2 threads: 0.23 ms at 1 row,
    0.71 ms at 8), while ``torch._int_mm``'s is flat from 1 to 32 rows (about 0.3 ms); both digit
    rows go through one call, so the weight is read once."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # rows 1
    y = xf * (127 / amax)  # in [-127, 127]
    d1 = torch.round(y)
    d2 = torch.round((y - d1) * 254)  # |y - d1| <= 1/2: |d2| <= 127
    rows = x.shape[0]
    acc = torch._int_mm(torch.cat([d1, d2]).to(torch.int8), q.t()).float()  # (2 rows) n, exact sums
    return ((acc[:rows] + acc[rows:] * (1 / 254)) * ((amax / 127) * scale.float())).to(x.dtype)


class Int8Linear(nn.Module):
    """A weight-only int8 ``nn.Linear``: buffers ``weight`` (n×k int8) and ``weight_scale`` (n)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, device=None,
                 scale_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device, scale_dtype=w.dtype)
        q, s = quantize_weight(w)
        with torch.no_grad():
            m.weight.copy_(q)
            m.weight_scale.copy_(s)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class PackedInt8Linear(PackedLinear):
    """``PackedLinear`` for ``Int8Linear`` layers: one int8 buffer, one scale vector, one kernel call."""

    def __init__(self, linears: list[Int8Linear], prepack: bool = False):
        w0 = linears[0].weight
        self.linears, self.sizes = linears, [lin.out_features for lin in linears]
        self.prepack_requested = prepack  # int8 has its own kernels: nothing to prepack
        n, k = sum(self.sizes), w0.shape[1]
        with torch.inference_mode(False), torch.no_grad():
            buf = torch.empty(n, k, dtype=torch.int8, device=w0.device)
            scale = torch.empty(n, dtype=linears[0].weight_scale.dtype, device=w0.device)
            has_bias = any(lin.bias is not None for lin in linears)
            bias = torch.zeros(n, dtype=scale.dtype, device=w0.device) if has_bias else None
            start = 0
            for lin, size in zip(linears, self.sizes):
                buf[start:start + size].copy_(lin.weight)
                scale[start:start + size].copy_(lin.weight_scale)
                lin.weight, lin.weight_scale = buf[start:start + size], scale[start:start + size]
                if lin.bias is not None:
                    bias[start:start + size].copy_(lin.bias)
                    lin.bias.data = bias[start:start + size]
                start += size
        self.weight, self.scale, self.bias = buf, scale, bias
        self._ptrs = self._pointers()

    _NAMES = ("weight", "weight_scale", "bias")

    def unpack(self) -> None:
        with torch.no_grad():
            for lin in self.linears:
                lin.weight, lin.weight_scale = lin.weight.clone(), lin.weight_scale.clone()
                if lin.bias is not None:
                    lin.bias.data = lin.bias.data.clone()

    def prime(self) -> None:
        """Make the bfloat16 scales a compiled decode step reads (see ``bf16_scale``)."""
        bf16_scale(self, self.scale)

    def _bind(self):
        return kernels.bind(self.weight, self.bias, self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (rows) k
        fast = self.bound()  # eager decode, float32 activations: the bias added in the same call
        out = None if fast is None else fast(x2)
        if out is not None:
            return out.view(*x.shape[:-1], out.shape[-1])
        out = int8_matmul(x2, self.weight, self.scale, bf16_scale(self, self.scale))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])


Int8Linear.packed_type = PackedInt8Linear


class Int8Embedding(nn.Module):
    """An int8 embedding table with per-row scales; with ``tie_word_embeddings`` it is also the LM
    head (``as_head``), so the table is stored once."""

    def __init__(self, num_embeddings: int, dim: int, *, device=None, scale_dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=scale_dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # output dtype: the scales' (they follow model.to(dtype) like every floating tensor)
        return self.weight[ids].to(self.weight_scale.dtype) * self.weight_scale[ids, None]


class TiedInt8Head(nn.Module):
    """The LM head of a tied int8 model: reads the embedding's int8 table (no tensors of its own)."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self._embedding = [embedding]  # a list: not a submodule, so state_dict names it once

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def prime(self) -> None:
        bf16_scale(self, self._embedding[0].weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._embedding[0]
        out = int8_matmul(x.reshape(-1, x.shape[-1]), e.weight, e.weight_scale, bf16_scale(self, e.weight_scale))
        return out.view(*x.shape[:-1], e.num_embeddings)


def _projections(model: ParScaleForCausalLM):
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for owner, name in [(a, "q_proj"), (a, "k_proj"), (a, "v_proj"), (a, "o_proj"),
                            (m, "gate_proj"), (m, "up_proj"), (m, "down_proj")]:
            yield owner, name


def quantize_(model: ParScaleForCausalLM, mode: str = "int8") -> ParScaleForCausalLM:
    """Quantise ``model`` in place (weight-only int8, per-output-channel scales); returns it, in eval
    mode. Already quantised layers are left as they are."""
    if mode not in MODES:
        raise ParScaleError(f"unknown quantization {mode!r} (supported: {', '.join(MODES)})")
    from .model import unpack_all

    unpack_all(model)  # quantise the plain layout, not packed views
    for owner, name in _projections(model):
        lin = getattr(owner, name)
        if isinstance(lin, nn.Linear):
            setattr(owner, name, Int8Linear.from_linear(lin))
    emb = model.model.embed_tokens
    if model.config.tie_word_embeddings:
        if isinstance(emb, nn.Embedding):
            q, s = quantize_weight(emb.weight)
            new = Int8Embedding(emb.num_embeddings, emb.embedding_dim, device=emb.weight.device,
                                scale_dtype=emb.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(q)
                new.weight_scale.copy_(s)
            model.model.embed_tokens = new
            model.lm_head = TiedInt8Head(new)
    elif isinstance(model.lm_head, nn.Linear):
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    model.config.quantization = mode
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())
