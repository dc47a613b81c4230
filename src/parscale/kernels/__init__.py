"""Native CPU kernels for batch-1 decode, built on first use with the machine's C++ compiler.

* ``skinny_linear(x, w, b)``: float32 ``x Wᵀ + b`` for 1..16 rows of ``x`` (``skinny.cpp``). A
  decode step multiplies P·B rows by every weight; on a CPU that should cost one read of the
  weights whatever the rows, and torch's float32 paths do not get there (174M shape, 2 threads,
  all 64 weights of a step, streamed from memory: 8 rows take 2.4× one row's time through
  ``F.linear`` and 2.0× through ``W @ xᵀ``; this kernel 1.25×; ``benchmarks/bench_decode.py``).
* ``skinny_linear_int8(x, q, scale)``: the same for weight-only int8 weights (widened to float32
  in registers; float32 activations), a quarter of the bytes to read; ``skinny_linear`` takes
  bfloat16 too (float32 sums), half the bytes: pair products (AVX512_BF16), or on AMX tiles where
  the CPU has them (the ``amx`` build: 8 rows cost what one does).
* ``decode_attention(q, k, v, mask)``: one query per row and head against the cache, float32 or
  bfloat16 (``attention.cpp``), where torch's fused CPU attention spends most of a call setting up.

The sources ship with the package and are compiled once per machine (a few seconds: no torch
headers) into ``$PARSCALE_KERNEL_CACHE`` or ``~/.cache/parscale/kernels``, under a name that hashes
the sources and the flags; the library is loaded with ``ctypes`` and uses the OpenMP runtime torch
already loaded (the same thread pool, ``torch.get_num_threads()`` threads). It is used only where it
can run: Linux on x86-64 with AVX-512 or AVX2 + FMA (``torch.backends.cpu.get_cpu_capability()``;
the same sources built for 16 or 8 float lanes, ``simd.h``), a C++ compiler
(``$CXX``, else ``c++`` or ``g++``), and ``$PARSCALE_NATIVE`` not ``0``. Anywhere else (CUDA
tensors included), or if the build or its self-check fails (with one warning), the three
functions return None and the caller uses torch's own kernels; ``disabled()`` does the same for a
block.

Inside ``torch.compile`` the kernels are the custom ops ``parscale::skinny_linear``,
``parscale::skinny_linear_int8`` and ``parscale::decode_attention`` (one opaque call each in the
graph); eager calls go to the library
directly, since the dispatcher adds about 13 µs per call, and a narrow layer's product takes tens.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # the kernel's limit on rows of x (M = P·B of a decode step)
_FLOATS = (torch.float32, torch.bfloat16)
_SOURCES = [Path(__file__).with_name(n) for n in ("skinny.cpp", "attention.cpp", "elementwise.cpp", "blocks.cpp")]
_HEADERS = [Path(__file__).with_name("simd.h")]
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
          "-ffp-contract=off"]  # roundings as written (torch rounds each op); fma() where meant
# one build per instruction set (simd.h picks 16 or 8 lanes from these); explicit flags rather
# than -march=native, since a cache directory may be shared between machines
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"]
_BF16 = [*_AVX512, "-mavx512vnni", "-mavx512bf16"]  # bfloat16 and int16 pair products
_ISA_FLAGS = {"amx": [*_BF16, "-mamx-tile", "-mamx-bf16"],  # and bfloat16 products on AMX tiles
              "avx512bf16": _BF16,
              "avx512vnni": [*_AVX512, "-mavx512vnni"],
              "avx512": _AVX512,
              "avx2": ["-mavx2", "-mfma", "-mf16c"]}
# the CPU flags (/proc/cpuinfo) each AVX-512 build needs beyond torch's AVX512 capability
_ISA_CPU_FLAGS = {"amx": {"amx_tile", "amx_bf16", "avx512_bf16", "avx512_vnni"},
                  "avx512bf16": {"avx512_bf16", "avx512_vnni"}, "avx512vnni": {"avx512_vnni"}, "avx512": set()}
# the build to try where one cannot load (an older compiler without AMX, a kernel that grants no tiles)
_FALLBACK = {"amx": "avx512bf16"}

_lock = threading.Lock()
_state: dict = {"off": False}  # "lib": the loaded _Library, or None once it is known not to load


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("c++") or shutil.which("g++")


def _cache_dir() -> Path:
    env = os.environ.get("PARSCALE_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "parscale" / "kernels"


def _isa() -> str | None:
    """The instruction set the kernels are built for here ("amx", "avx512bf16", "avx512vnni",
    "avx512", "avx2"), or None where they do not run. torch's own CPU capability check decides
    between AVX-512 and AVX2 (AVX2 there includes FMA); the CPU's flags add VNNI and bfloat16 dot
    products, and AMX tiles for bfloat16 products (``$PARSCALE_AMX=0``: not the tiles)."""
    if (os.environ.get("PARSCALE_NATIVE", "1") == "0" or sys.platform != "linux"
            or platform.machine() not in ("x86_64", "AMD64")):
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX2":
        return "avx2"
    if cap not in ("AVX512", "AMX"):
        return None
    flags = _cpu_flags()
    amx = os.environ.get("PARSCALE_AMX", "1") != "0"
    return next(isa for isa, need in _ISA_CPU_FLAGS.items() if need <= flags and (amx or isa != "amx"))


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), read once; empty where there is no such file."""
    flags = _state.get("cpu_flags")
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                line = next((ln for ln in f if ln.startswith("flags")), "")
            flags = set(line.split(":", 1)[-1].split())
        except OSError:
            flags = set()
        _state["cpu_flags"] = flags
    return flags


def _build(cxx: str, isa: str) -> Path:
    """The compiled library, from the cache or compiled now (written under a temporary name and
    renamed, so another process never loads half a file)."""
    flags = [*_FLAGS, *_ISA_FLAGS[isa]]
    source = b"\0".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(source + "\0".join([cxx, *flags]).encode()).hexdigest()[:16]
    for root in (_cache_dir(), Path(tempfile.gettempdir()) / f"parscale-kernels-{os.getuid()}"):
        lib = root / f"skinny-{isa}-{key}.so"
        if lib.is_file():
            return lib
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=root, prefix=".skinny-", suffix=".so")
            os.close(fd)
        except OSError:
            continue  # an unwritable cache: the next place
        try:
            done = subprocess.run([cxx, *flags, *map(str, _SOURCES), "-o", tmp], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, lib)
            return lib
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable directory for the compiled kernel (tried {_cache_dir()})")


class _Library:
    """The loaded library's entry points."""

    def __init__(self, path: Path, isa: str):
        self.isa = isa
        lib = ctypes.CDLL(str(path))
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.linear = lib.parscale_skinny_linear
        self.linear.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i32]
        self.linear.restype = i32
        self.linear_int8 = lib.parscale_skinny_linear_int8
        self.linear_int8.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i32]
        self.linear_int8.restype = i32
        self.linear_bf16 = lib.parscale_skinny_linear_bf16
        self.linear_bf16.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i32]
        self.linear_bf16.restype = i32
        self.rms_norm = lib.parscale_rms_norm
        self.rms_norm.argtypes = [i64, i64, ptr, i64, ptr, ctypes.c_float, ptr, i64, i32]
        self.rms_norm.restype = i32
        self.silu_mul = lib.parscale_silu_mul
        self.silu_mul.argtypes = [i64, i64, ptr, i64, ptr, i64, i32]
        self.silu_mul.restype = i32
        self.rope_kv = lib.parscale_rope_kv
        self.rope_kv.argtypes = [i64] * 4 + [ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ptr, i64, i64, i32]
        self.rope_kv.restype = i32
        self.attention = lib.parscale_decode_attention
        self.attention.argtypes = ([i64] * 5 + [ptr, i64, i64] + [ptr, i64, i64, i64] * 2 + [ptr, i64, i64]
                                   + [ctypes.c_float, ptr, i32, i32])
        self.attention.restype = i32
        self.mlp_block = lib.parscale_mlp_block
        self.mlp_block.argtypes = [i64, i64, i64, ptr, ptr, ctypes.c_float, i32] + [ptr, i64, ptr, ptr] * 2 + [ptr, i32]
        self.mlp_block.restype = i32
        self.attention_block = lib.parscale_attention_block
        self.attention_block.argtypes = ([i64] * 5 + [ptr, ptr, ctypes.c_float, i32] + [ptr, i64, ptr, ptr] * 2
                                         + [ptr, ptr, i64] + [ptr, i64, i64, i64] * 2 + [i64, ptr, i64, i64]
                                         + [ctypes.c_float, ptr, i32])
        self.attention_block.restype = i32
        if isa == "amx" and lib.parscale_amx_enable() != 0:
            raise RuntimeError("the kernel grants no AMX tile state to this process")


def _load():
    cxx, isa = _compiler(), _isa()
    if isa is None or cxx is None:
        return None
    while True:
        try:
            lib = _Library(_build(cxx, isa), isa)
            _self_check(lib)
            return lib
        except Exception as e:  # a broken compiler or library must not break decoding: torch's kernels remain
            if isa in _FALLBACK:
                isa = _FALLBACK[isa]  # quietly: the next build down is what this CPU had without them
                continue
            warnings.warn(f"parscale: the native decode kernels are not used ({e}); "
                          "decode steps use torch's own", RuntimeWarning, stacklevel=3)
            return None


def _self_check(lib) -> None:
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 37, 45), (5, 70, 64), (16, 19, 131)):
        x, w, b = (torch.randn(*s, generator=g) for s in ((m, k), (n, k), (n,)))
        got = _call(lib, x, w, b)
        want = F.linear(x.double(), w.double(), b.double())
        if not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4):
            raise RuntimeError(f"self-check failed: linear {m}x{n}x{k}")
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        want = F.linear(xb.double(), wb.double(), bb.double())
        if not torch.allclose(_call(lib, xb, wb, bb).double(), want, rtol=1e-2, atol=1e-2):
            raise RuntimeError(f"self-check failed: bfloat16 linear {m}x{n}x{k}")
    x, q8, sc = torch.randn(6, 40, generator=g), torch.randint(-127, 128, (21, 40), generator=g, dtype=torch.int8), torch.rand(21, generator=g)
    want = F.linear(x.double(), q8.double()) * sc.double()
    if not ((_call_int8(lib, x, q8, sc).double() - want).abs() <= int8_error_bound(x, q8, sc)).all():
        raise RuntimeError("self-check failed: int8 linear")
    q, k, v = torch.randn(3, 4, 1, 32, generator=g), torch.randn(3, 2, 21, 32, generator=g), torch.randn(3, 2, 21, 32, generator=g)
    mask = torch.rand(3, 1, 1, 21, generator=g) > 0.3
    mask[..., -1] = True
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    if not torch.allclose(_attend(lib, q, k, v, mask).double(), want, rtol=1e-5, atol=1e-5):
        raise RuntimeError("self-check failed: attention")


def _library():
    lib = _state.get("lib", False)
    if lib is False:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
            lib = _state["lib"]
    return lib


def available() -> bool:
    """Whether the kernels run here (builds them on the first call)."""
    return _library() is not None


def isa() -> str | None:
    """The instruction set of the loaded kernels (see ``_isa``), or None where they do not run
    (builds them on the first call)."""
    # a compiled step reads what the eager preparation loaded (as ``_dispatch`` does)
    lib = _state.get("lib") if torch.compiler.is_compiling() else _library()
    return None if lib is None else lib.isa


def cpu_has_bf16_dot() -> bool:
    """Whether the CPU multiplies bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` in
    /proc/cpuinfo): there torch's own bfloat16 products are fast past one row."""
    if _state.get("cpu_flags") is None and torch.compiler.is_compiling():
        return False  # read by an eager step first (ensure_decode_layouts)
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def bf16_dot() -> bool:
    """Whether the loaded kernels multiply bfloat16 pairs natively (the ``amx`` and ``avx512bf16``
    builds): then the bfloat16 product costs half the float32 one's instructions at any row count
    (on AMX tiles, 8 rows cost what one does)."""
    return isa() in ("amx", "avx512bf16")


def bf16_past_one_row() -> bool:
    """Whether bfloat16 decode products of more than one row take the native kernel: where it
    multiplies bfloat16 pairs natively, or where the CPU cannot (then torch's bfloat16 products are
    slow too). With bfloat16 dot products on the CPU but a kernel built without them, torch's
    ``W @ xᵀ`` is the faster form past one row."""
    return bf16_dot() or not cpu_has_bf16_dot()


def enabled() -> bool:
    """Whether they run here and are not switched off (``disabled``)."""
    return not _state["off"] and available()


@contextlib.contextmanager
def disabled():
    """Inside the block every entry point returns None: torch's own kernels (A/B benchmarks, tests).
    A compiled decode step keeps what it was compiled with."""
    before, _state["off"] = _state["off"], True
    try:
        yield
    finally:
        _state["off"] = before


def usable(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the kernel takes this product: float32 or bfloat16 alike on CPU, 1..MAX_ROWS rows,
    last dimensions contiguous. Does not build it (see ``available``)."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.dim() == 2 and w.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS
            and x.shape[1] == w.shape[1] and x.stride(1) == 1 and w.stride(1) == 1
            and (b is None or (b.dtype == x.dtype and b.is_contiguous() and b.shape == (w.shape[0],))))


def _call(lib, x, w, b):
    m, n = x.shape[0], w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    fn = lib.linear_bf16 if x.dtype == torch.bfloat16 else lib.linear
    rc = fn(m, n, w.shape[1], x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0),
            None if b is None else b.data_ptr(), y.data_ptr(), n, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"skinny_linear: shapes out of range: x {tuple(x.shape)}, w {tuple(w.shape)}")
    return y


def _dispatch(takes: bool, op: str, call, *args) -> torch.Tensor | None:
    """The path every entry point shares: None where the kernel does not take these operands
    (``takes``) or is switched off; inside ``torch.compile`` the custom op ``parscale::<op>``, if
    an eager step loaded the library before (``ensure_decode_layouts`` does); else the library."""
    if _state["off"] or not takes:
        return None
    if torch.compiler.is_compiling():
        return getattr(torch.ops.parscale, op)(*args) if _state.get("lib") is not None else None
    lib = _library()
    return None if lib is None else call(lib, *args)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, w, b)`` (x: rows k, w: n k) through the native kernel, or None where it does
    not run (see the module docstring and ``usable``). bfloat16 sums in float32 and rounds once,
    as torch's bfloat16 ``F.linear``."""
    return _dispatch(usable(x, w, b), "skinny_linear", _call, x, w, b)


def _call_int8(lib, x, q, scale):
    m, n = x.shape[0], q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.linear_int8(m, n, q.shape[1], x.data_ptr(), x.stride(0), q.data_ptr(), q.stride(0), scale.data_ptr(),
                         None, y.data_ptr(), n, torch.get_num_threads())  # no bias: Int8Linear adds its own
    if rc != 0:
        raise ValueError(f"skinny_linear_int8: shapes out of range: x {tuple(x.shape)}, q {tuple(q.shape)}")
    return y


class Bound:
    """The native product ``x Wᵀ (· scale) (+ b)`` for one fixed weight, its operands checked once
    (``bind``): a call checks only ``x``, and returns None where the kernel does not take it (then
    the caller's general path runs). Eager decode steps of narrow layers spend as long in checks
    and wrappers as in the product (SmolLM2-135M int8, 576 × 576: 11 µs for the library call,
    41 µs through the general path), so the decode layouts (``model.PackedLinear``) hold one.
    The tensors are held, so the pointers stay valid; in-place writes to them are seen."""

    __slots__ = ("fn", "n", "k", "x_dtype", "w", "b", "scale", "any_rows", "ptrs", "mode")

    def __init__(self, fn, w, b, scale, x_dtype, any_rows):
        self.fn, self.w, self.b, self.scale = fn, w, b, scale
        # the product's form, as blocks.cpp names it: 0 float32, 1 bfloat16, 2 int8 weights
        self.mode = 2 if scale is not None else 1 if x_dtype == torch.bfloat16 else 0
        self.n, self.k = w.shape
        self.x_dtype, self.any_rows = x_dtype, any_rows  # y comes out in x's dtype
        self.ptrs = (w.data_ptr(), w.stride(0), None if scale is None else scale.data_ptr(),
                     None if b is None else b.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x``: rows k. None where the kernel does not take it (or ``disabled``, or compiling)."""
        rows = x.shape[0]
        if (_state["off"] or x.dtype != self.x_dtype or not x.is_cpu or x.dim() != 2 or not 1 <= rows <= MAX_ROWS
                or x.shape[1] != self.k or x.stride(1) != 1 or (rows > 1 and not self.any_rows)
                or torch.compiler.is_compiling()):
            return None
        n = self.n
        y = torch.empty(rows, n, dtype=self.x_dtype)
        w, ldw, scale, b = self.ptrs
        if scale is None:
            rc = self.fn(rows, n, self.k, x.data_ptr(), x.stride(0), w, ldw, b, y.data_ptr(), n, torch.get_num_threads())
        else:
            rc = self.fn(rows, n, self.k, x.data_ptr(), x.stride(0), w, ldw, scale, b, y.data_ptr(), n,
                         torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"native product: shapes out of range: x {tuple(x.shape)}, w {tuple(self.w.shape)}")
        return y


def mlp_block(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up: Bound, down: Bound) -> torch.Tensor | None:
    """``x + down(silu(g) · u)`` with ``g, u`` the halves of ``gate_up(rms_norm(x))``: a decoder
    layer's pre-norm SwiGLU MLP and residual for a decode step's rows (``x``: ``r 1 h``, contiguous)
    in one native call (``blocks.cpp``), bit for bit the per-op path (``rms_norm``, the two bound
    products, ``silu_mul``, torch's add); None where it does not run (then that path does)."""
    if _state["off"] or not _few_rows(x) or x.dtype != gate_up.x_dtype or down.mode != gate_up.mode:
        return None
    h, rows = x.shape[-1], x.numel() // x.shape[-1]
    inter = down.k
    if (gate_up.k != h or gate_up.n != 2 * inter or down.n != h or (rows > 1 and not (gate_up.any_rows and down.any_rows))
            or norm_weight.dtype != x.dtype or norm_weight.shape != (h,) or not norm_weight.is_contiguous()
            or not norm_weight.is_cpu):
        return None
    lib = _state.get("lib") or _library()
    if lib is None:
        return None
    out = torch.empty_like(x)
    rc = lib.mlp_block(rows, h, inter, x.data_ptr(), norm_weight.data_ptr(), eps, gate_up.mode, *gate_up.ptrs,
                       *down.ptrs, out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


def attention_block(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv: Bound, o: Bound, heads: int,
                    kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor | None:
    """``x + o(attention)`` of a decode step's rows (``x``: ``r 1 h``, contiguous) with the pre-norm,
    the fused q/k/v product (``qkv``: ``(hq + 2 hkv) d`` outputs), RoPE, the cache write and the
    attention in one native call (``blocks.cpp``), bit for bit ``rms_norm``, the bound product,
    ``rope_kv``, ``decode_attention``, the ``o`` product and torch's add. ``k`` / ``v``: the layer's
    cache up to and including this step's slot (the last position, ``r hkv L d``: ``KVCache.so_far``);
    ``mask`` as ``decode_attention``'s. None (nothing written) where it does not run."""
    if _state["off"] or not _few_rows(x) or x.dtype != qkv.x_dtype or o.mode != qkv.mode:
        return None
    h, rows = x.shape[-1], x.numel() // x.shape[-1]
    d = k.shape[-1]
    if (qkv.k != h or qkv.n != (heads + 2 * kv_heads) * d or o.k != heads * d or o.n != h
            or (rows > 1 and not (qkv.any_rows and o.any_rows)) or norm_weight.dtype != x.dtype
            or norm_weight.shape != (h,) or not norm_weight.is_contiguous() or not norm_weight.is_cpu):
        return None
    act = torch.bfloat16 if qkv.mode == 1 else torch.float32  # the activations' (and the cache's) dtype
    if (k.dim() != 4 or k.shape[1] != kv_heads or not _keys_ok(rows, heads, d, act, k, v, mask)
            or not _rope_ok(rows, d, act, cos, sin, kv_heads, k[:, :, -1:], v[:, :, -1:])):
        return None
    lib = _state.get("lib") or _library()
    if lib is None:
        return None
    out = torch.empty_like(x)
    ks, vs = k.stride(), v.stride()
    rc = lib.attention_block(rows, h, heads, kv_heads, d, x.data_ptr(), norm_weight.data_ptr(), eps, qkv.mode,
                             *qkv.ptrs, *o.ptrs, cos.data_ptr(), sin.data_ptr(), d if cos.shape[0] > 1 else 0,
                             k.data_ptr(), ks[0], ks[1], ks[2], v.data_ptr(), vs[0], vs[1], vs[2], k.shape[2],
                             *_mask_args(mask), d ** -0.5, out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


def bind(w: torch.Tensor, b: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> Bound | None:
    """A ``Bound`` product for weight ``w`` (n k; float32 or bfloat16, or int8 with a float32
    ``scale`` per row) and bias ``b`` (n, float32 for int8, else w's dtype), or None where the
    kernels do not run here or do not take these tensors (builds the kernels on the first call).
    bfloat16 takes more than one row only where ``bf16_past_one_row``."""
    if torch.compiler.is_compiling() or w.device.type != "cpu" or w.dim() != 2 or w.stride(1) != 1:
        return None
    lib = _library()
    if lib is None:
        return None
    if scale is not None:
        ok = (w.dtype == torch.int8 and scale.dtype == torch.float32 and scale.is_contiguous()
              and scale.shape == (w.shape[0],) and scale.device.type == "cpu")
        fn, x_dtype, any_rows = lib.linear_int8, torch.float32, True
    else:
        ok = w.dtype in (torch.float32, torch.bfloat16)
        fn, x_dtype = (lib.linear_bf16, torch.bfloat16) if w.dtype == torch.bfloat16 else (lib.linear, torch.float32)
        any_rows = w.dtype == torch.float32 or bf16_past_one_row()
    if not ok or (b is not None and (b.dtype != x_dtype or not b.is_contiguous() or b.shape != (w.shape[0],)
                                     or b.device.type != "cpu")):
        return None
    return Bound(fn, w, b, scale, x_dtype, any_rows)


def int8_usable(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether ``skinny_linear_int8`` takes these: float32 ``x`` (rows k, 1..MAX_ROWS rows), int8
    ``q`` (n k), float32 ``scale`` (n), on CPU, last dimensions contiguous."""
    return (x.device.type == q.device.type == scale.device.type == "cpu" and x.dtype == torch.float32
            and q.dtype == torch.int8 and scale.dtype == torch.float32 and x.dim() == 2 and q.dim() == 2
            and 1 <= x.shape[0] <= MAX_ROWS and x.shape[1] == q.shape[1] and x.stride(1) == 1
            and q.stride(1) == 1 and scale.is_contiguous() and scale.shape == (q.shape[0],))


def skinny_linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``(x qᵀ) · scale`` for weight-only int8 (``parscale.quant``), or None where the kernel does
    not run (``int8_usable``). The int8 weights are widened to int16 in registers; each row of
    ``x`` is rounded to 16-bit fixed point (``x ≈ d · s``, ``s = max|x_row| / 32767``, ``|d| ≤
    32767``), and the products are exact integers summed in int32 (VNNI's pair products where the
    CPU has them): twice the multiplies per instruction of float32, at an error within
    ``int8_error_bound``."""
    return _dispatch(int8_usable(x, q, scale), "skinny_linear_int8", _call_int8, x, q, scale)


def int8_error_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The largest difference between ``skinny_linear_int8(x, q, scale)`` and the exact product
    (float64, rows × n): half a fixed-point step per element of x, ``max|x_row| / 65534``, times
    ``Σ_k |q[n, k]| · scale[n]``, plus float32 rounding of the sum and the scaling."""
    xd, qd, sd = x.double(), q.double(), scale.double()
    step = xd.abs().amax(dim=1, keepdim=True) / 32767
    rounding = step / 2 * (qd.abs().sum(dim=1) * sd)
    exact = (xd.abs() @ qd.abs().t()) * sd
    return rounding + 4 * 2.0 ** -24 * (exact + rounding) + 1e-30


@torch.library.custom_op("parscale::skinny_linear_int8", mutates_args=())
def _skinny_linear_int8_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _call_int8(_library(), x, q, scale)


@_skinny_linear_int8_op.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


@torch.library.custom_op("parscale::skinny_linear", mutates_args=())
def _skinny_linear_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _call(_library(), x, w, b)


@_skinny_linear_op.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


# --------------------------------------------------------------------------- decode attention
def attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``decode_attention`` takes these: CPU, float32 or bfloat16 alike, one query per row
    (q ``r hq 1 d``, k / v ``r hkv l d`` sharing the position stride, hq a multiple of hkv up to
    8×), d a multiple of 16 up to 256, last dimensions contiguous; mask None or bool ``(r|1) 1 1 l``."""
    if not (q.is_cpu and q.dtype in _FLOATS and q.dim() == 4 and q.shape[2] == 1 and q.stride(3) == 1):
        return False
    return _keys_ok(q.shape[0], q.shape[1], q.shape[3], q.dtype, k, v, mask)


def _keys_ok(r: int, hq: int, d: int, dtype: torch.dtype, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None) -> bool:
    """The keys, values and mask side of ``attention_usable`` for ``r`` rows of ``hq`` query heads of ``d``."""
    if not (k.is_cpu and v.is_cpu and k.dtype == v.dtype == dtype and k.dim() == v.dim() == 4):
        return False
    if k.shape != v.shape or k.shape[0] != r or k.shape[3] != d or k.shape[2] < 1:
        return False
    hkv = k.shape[1]
    if hq % hkv or hq // hkv > 8 or d % 16 or d > 256 or k.stride(3) != 1 or v.stride(3) != 1:
        return False
    if k.stride(2) != v.stride(2):
        return False
    if mask is not None:
        if (mask.dtype != torch.bool or not mask.is_cpu or mask.dim() != 4
                or mask.shape[0] not in (1, r) or mask.shape[1:] != (1, 1, k.shape[2])):
            return False
    return True


def _mask_args(mask: torch.Tensor | None) -> tuple:
    if mask is None:
        return None, 0, 0
    return mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(3)


def _attend(lib, q, k, v, mask):
    r, hq, _, d = q.shape
    out = torch.empty(r, hq, 1, d, dtype=q.dtype)
    ks, vs = k.stride(), v.stride()
    mask_args = _mask_args(mask)
    rc = lib.attention(r, hq, k.shape[1], k.shape[2], d, q.data_ptr(), q.stride(0), q.stride(1),
                       k.data_ptr(), ks[0], ks[1], ks[2], v.data_ptr(), vs[0], vs[1], vs[2], *mask_args,
                       d ** -0.5, out.data_ptr(), int(q.dtype == torch.bfloat16), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"decode_attention: shapes out of range: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` for one query per
    row (a decode step), through the native kernel, or None where it does not run (see
    ``attention_usable``). Rows whose keys are all hidden give zeros."""
    return _dispatch(attention_usable(q, k, v, mask), "decode_attention", _attend, q, k, v, mask)


@torch.library.custom_op("parscale::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _attend(_library(), q, k, v, mask)


@_decode_attention_op.register_fake
def _(q, k, v, mask):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- decode-step elementwise
def _few_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` is a decode step's few rows for the elementwise kernels: CPU float32 or
    bfloat16, contiguous, 1..MAX_ROWS rows of its last dimension, outside ``torch.compile``. The
    cheap tests first (decode steps call this a few times a layer: 174M, 16 layers; each µs here
    is 0.1 ms a step)."""
    return (x.is_cpu and x.dtype in _FLOATS and x.dim() >= 1 and x.is_contiguous()
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and not torch.compiler.is_compiling())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of a decode step's rows (``weight · cast(x · rsqrt(mean(x²) + eps))``, statistics
    in float32) in one call (``elementwise.cpp``), or None where the kernel does not take it: up to
    MAX_ROWS contiguous rows, ``weight`` of x's dtype, eager (a compiled step fuses torch's own ops)."""
    if _state["off"] or weight.dtype != x.dtype or not _few_rows(x):
        return None
    d = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != d or weight.stride(0) != 1 or not weight.is_cpu:
        return None
    lib = _state.get("lib") or _library()
    if lib is None:
        return None
    y = torch.empty_like(x)
    lib.rms_norm(x.numel() // d, d, x.data_ptr(), d, weight.data_ptr(), eps, y.data_ptr(), d,
                 int(x.dtype == torch.bfloat16))
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(g) * u`` for ``g, u = gu.chunk(2, -1)``, a decode step's rows, in one call, or None
    where the kernel does not take it (as ``rms_norm``)."""
    if _state["off"] or gu.shape[-1] % 2 or not _few_rows(gu):
        return None
    lib = _state.get("lib") or _library()
    if lib is None:
        return None
    d = gu.shape[-1]
    half = d // 2
    y = torch.empty(*gu.shape[:-1], half, dtype=gu.dtype)
    lib.silu_mul(gu.numel() // d, half, gu.data_ptr(), d, y.data_ptr(), half, int(gu.dtype == torch.bfloat16))
    return y


def _rope_ok(r: int, d: int, dtype: torch.dtype, cos: torch.Tensor, sin: torch.Tensor, kv_heads: int,
             k_slot: torch.Tensor, v_slot: torch.Tensor) -> bool:
    """The cos / sin and cache-slot side of ``rope_kv``'s checks."""
    return not (d % 2 or cos.dtype != dtype or sin.dtype != dtype or k_slot.dtype != dtype or v_slot.dtype != dtype
                or not (cos.is_cpu and sin.is_cpu and k_slot.is_cpu and v_slot.is_cpu)
                or cos.shape != sin.shape or cos.dim() != 4 or cos.shape[0] not in (1, r) or cos.shape[1:] != (1, 1, d)
                or not cos.is_contiguous() or not sin.is_contiguous()
                or k_slot.shape != (r, kv_heads, 1, d) or v_slot.shape != k_slot.shape
                or k_slot.stride(3) != 1 or v_slot.stride(3) != 1)


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
            k_slot: torch.Tensor, v_slot: torch.Tensor) -> torch.Tensor | None:
    """A decode step's RoPE and cache write in one call: ``qkv`` (``r 1 ((hq + 2 hkv) d)``, the
    fused projection's output) split into q, k, v; q and k rotated as ``apply_rope`` does (each
    product and the sum rounded as torch's ops round them), k and v written into the cache slots
    ``k_slot`` / ``v_slot`` (``r hkv 1 d`` views of the cache); returns q (``r hq 1 d``). None
    (nothing written) where the kernel does not take these: eager CPU float32 or bfloat16 alike,
    cos / sin ``(r|1) 1 1 d`` contiguous, rows and heads of the slots strided, d contiguous."""
    if (_state["off"] or not qkv.is_cpu or qkv.dtype not in _FLOATS or qkv.dim() != 3 or qkv.shape[1] != 1
            or qkv.stride(2) != 1 or torch.compiler.is_compiling()):
        return None
    r, d = qkv.shape[0], k_slot.shape[-1]
    if qkv.shape[2] != (heads + 2 * kv_heads) * d or not _rope_ok(r, d, qkv.dtype, cos, sin, kv_heads, k_slot, v_slot):
        return None
    lib = _state.get("lib") or _library()
    if lib is None:
        return None
    q = torch.empty(r, heads, 1, d, dtype=qkv.dtype)
    rc = lib.rope_kv(r, heads, kv_heads, d, qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
                     d if cos.shape[0] > 1 else 0, q.data_ptr(), k_slot.data_ptr(), k_slot.stride(0), k_slot.stride(1),
                     v_slot.data_ptr(), v_slot.stride(0), v_slot.stride(1), int(qkv.dtype == torch.bfloat16))
    return q if rc == 0 else None
