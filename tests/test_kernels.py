"""The native decode kernels (``parscale.kernels``): the float32 skinny product and the
single-query attention against float64 references over every row count, ragged shapes, head
groupings, masks, strides, dtypes and thread counts; where they are and are not used; the build
cache; and the fallbacks (no compiler, a failed build or self-check, switched off), which must
leave torch's kernels in charge rather than break decoding."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from parscale import kernels

# where it can build (Linux, x86-64 with AVX-512 or AVX2, a C++ compiler) it must: a broken kernel or
# build would otherwise only show as skipped tests
CAN_BUILD = kernels._isa() is not None and kernels._compiler() is not None
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="no AVX-512 or AVX2 CPU, or no C++ compiler here")
# every build this CPU can run: an AVX-512 machine also checks the AVX2 build that laptops get
_ORDER = ["amx", "avx512bf16", "avx512vnni", "avx512", "avx2"]  # each CPU that runs one runs those after it
ISAS_HERE = _ORDER[_ORDER.index(kernels._isa()):] if CAN_BUILD else []
needs_amx = pytest.mark.skipif("amx" not in ISAS_HERE, reason="no AMX bfloat16 tiles here")


@needs_kernel
def test_the_kernel_builds_and_passes_its_self_check_where_it_can():
    assert kernels.available() and kernels.isa() == kernels._isa()


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_every_build_this_cpu_runs_matches_float64_references(isa):
    """Each instruction set's build (16 or 8 lanes, ``simd.h``) directly, whichever the loader
    picked: every row count, ragged k (the lane tails), int8 and both attention dtypes."""
    lib = kernels._Library(kernels._build(kernels._compiler(), isa), isa)
    kernels._self_check(lib)
    g = torch.Generator().manual_seed(7)
    for rows in range(1, 17):
        for n, k in ((5, 3), (37, 45), (64, 131)):
            x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            torch.testing.assert_close(kernels._call(lib, x, w, b).double(), reference(x, w, b),
                                       rtol=1e-5, atol=1e-5 * k ** 0.5)
            q8, sc = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g)
            torch.testing.assert_close(kernels._call_int8(lib, x, q8, sc).double(), fixed_point_reference(x, q8, sc),
                                       rtol=1e-5, atol=1e-4 * k ** 0.5)
            xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
            torch.testing.assert_close(kernels._call(lib, xb, wb, bb).double(), reference(xb, wb, bb),
                                       rtol=1e-2, atol=1e-2 * k ** 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hq, hkv, d, length in ((1, 1, 1, 16, 1), (3, 8, 2, 64, 29), (2, 6, 6, 256, 130)):
            q = torch.randn(rows, hq, 1, d, generator=g).to(dtype)
            k, v = (torch.randn(rows, hkv, length, d, generator=g).to(dtype) for _ in range(2))
            mask = torch.rand(rows, 1, 1, length, generator=g) > 0.3
            mask[..., -1] = True
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(kernels._attend(lib, q, k, v, mask).double(), sdpa64(q, k, v, mask), **tol)


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def fixed_point_reference(x, q, scale):
    """The int8 kernel's product computed independently in float64: each row of x rounded to
    16-bit fixed point (d = round(x / s), s = max|x_row| / 32767), then exact products."""
    amax = x.float().abs().amax(dim=1, keepdim=True)  # float32 steps, as the kernel's
    inv = torch.full_like(amax, 32767) / amax  # a float32 division (the scalar form multiplies by a reciprocal)
    d = torch.round(x.float() * inv).clamp(-32767, 32767)  # to nearest, ties to even
    return (d.double() @ q.double().t()) * (amax / 32767).double() * scale.double()


@needs_kernel
@pytest.mark.parametrize("rows", range(1, 17))
@pytest.mark.parametrize("n,k", [(1, 1), (3, 15), (33, 17), (70, 64), (130, 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_products_match_a_float64_reference(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = kernels.skinny_linear(x, w, b)
    assert got.shape == (rows, n) and got.dtype == torch.float32 and got.is_contiguous()
    # float32 sums of k terms in another order than F.linear: rounding of order k·eps·|terms|
    torch.testing.assert_close(got.double(), reference(x, w, b), rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13, 16])
@pytest.mark.parametrize("n,k", [(3, 15), (70, 64), (130, 300)])
def test_bfloat16_products_round_the_float32_sums_once(rows, n, k):
    """bfloat16 x, W and b, float32 sums, one rounding at the end: within half a bfloat16 step
    (2^-8 relative) of the exact product of the bfloat16 values, and a row alone equals it batched."""
    g = torch.Generator().manual_seed(rows * 31 + n + k)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((rows, k), (n, k), (n,)))
    got = kernels.skinny_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), reference(x, w, b), rtol=2 ** -8, atol=1e-5 * k ** 0.5)
    assert torch.equal(kernels.skinny_linear(x[-1:], w, b), got[-1:])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_strides_and_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        xs = torch.randn(5, 200, generator=g)[:, 3:131]  # rows 200 apart, last dim contiguous
        ws = torch.randn(50, 160, generator=g)[:, 16:144]
        b = torch.randn(50, generator=g)
        assert not xs.is_contiguous() and xs.stride(1) == 1
        torch.testing.assert_close(kernels.skinny_linear(xs, ws, b).double(), reference(xs, ws, b),
                                   rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_a_row_alone_gives_the_same_bits_as_in_a_batch():
    """Each output is one row of x against one row of W: the other rows cannot change it (a
    request batched with others equals it alone)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 96, generator=g), torch.randn(40, 96, generator=g)
    batch = kernels.skinny_linear(x, w)
    for i in range(8):
        assert torch.equal(kernels.skinny_linear(x[i:i + 1], w), batch[i:i + 1])


@needs_amx
def test_amx_tiles_take_bfloat16_products_exactly_where_they_should():
    """The tiles' path (K a multiple of 32, N ≥ 16): within half a bfloat16 step of the exact
    product at every row count; a row alone equals it batched; the thread count changes no bit;
    the last N mod 16 rows (the vector kernel's) equal the vector build's bits, and the tiles' rows
    are not the vector build's (a different order of terms: the tiles did run)."""
    amx = kernels._Library(kernels._build(kernels._compiler(), "amx"), "amx")
    vec = kernels._Library(kernels._build(kernels._compiler(), "avx512bf16"), "avx512bf16")
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(3)
    differs = 0
    try:
        for rows in range(1, 17):
            for n, k in ((16, 32), (70, 64), (203, 96), (48, 1024)):
                x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((rows, k), (n, k), (n,)))
                torch.set_num_threads(2)
                got = kernels._call(amx, x, w, b)
                torch.testing.assert_close(got.double(), reference(x, w, b), rtol=2 ** -8, atol=1e-5 * k ** 0.5)
                assert torch.equal(kernels._call(amx, x[-1:], w, b), got[-1:])
                tail = n // 16 * 16
                want = kernels._call(vec, x, w, b)
                assert torch.equal(got[:, tail:], want[:, tail:])
                differs += int((got[:, :tail] != want[:, :tail]).sum())
                for t in (1, 3):
                    torch.set_num_threads(t)
                    assert torch.equal(kernels._call(amx, x, w, b), got)
    finally:
        torch.set_num_threads(before)
    assert differs > 0


@needs_amx
def test_amx_tiles_keep_a_non_finite_row_to_itself():
    g = torch.Generator().manual_seed(4)
    amx = kernels._Library(kernels._build(kernels._compiler(), "amx"), "amx")
    x, w = torch.randn(4, 64, generator=g).bfloat16(), torch.randn(40, 64, generator=g).bfloat16()
    clean = kernels._call(amx, x, w, None)
    x[1, 7], x[2, 9] = float("nan"), float("inf")
    got = kernels._call(amx, x, w, None)
    assert got[1].isnan().all() and not got[2].isfinite().any()
    assert torch.equal(got[[0, 3]], clean[[0, 3]])


@needs_amx
def test_a_build_without_tiles_falls_back_quietly_to_the_vector_one(tmp_path, monkeypatch):
    """An older compiler without AMX (here: a flag it rejects) loads the bfloat16 vector build,
    with no warning; ``PARSCALE_AMX=0`` asks for that build directly."""
    monkeypatch.setenv("PARSCALE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setitem(kernels._ISA_FLAGS, "amx", [*kernels._ISA_FLAGS["amx"], "-mno-such-flag"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels._load().isa == "avx512bf16"
    monkeypatch.setenv("PARSCALE_AMX", "0")
    assert kernels._isa() == "avx512bf16"


def test_products_it_does_not_take_return_none():
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    for args in [(torch.randn(17, 32), w, None),                 # more rows than MAX_ROWS
                 (torch.randn(0, 32), w, None),                  # no rows
                 (x.double(), w.double(), None),                 # not float32
                 (x.bfloat16(), w, None),                        # mixed dtypes
                 (x.bfloat16(), w.bfloat16(), torch.randn(8)),   # a float32 bias on bfloat16
                 (x.half(), w.half(), None),                     # float16
                 (torch.randn(32, 4).t(), w, None),              # last dim not contiguous
                 (x, torch.randn(32, 8).t(), None),
                 (x, w, torch.randn(16)[::2]),                   # bias not contiguous
                 (x, w, torch.randn(7)),                         # bias of the wrong size
                 (torch.randn(4, 31), w, None),                  # k mismatch
                 (x.reshape(2, 2, 32), w, None)]:                # not 2-D
        assert kernels.skinny_linear(*args) is None


@needs_kernel
def test_disabled_hands_back_to_torch_and_restores():
    x, w = torch.randn(3, 32), torch.randn(8, 32)
    with kernels.disabled():
        assert kernels.skinny_linear(x, w) is None
    assert kernels.skinny_linear(x, w) is not None


@needs_kernel
def test_build_is_cached_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = kernels._build(kernels._compiler(), kernels._isa())
    assert lib.parent == tmp_path / "cache" and lib.name.startswith("skinny-") and lib.suffix == ".so"
    stamp = lib.stat().st_mtime_ns
    assert kernels._build(kernels._compiler(), kernels._isa()) == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in lib.parent.iterdir()) == [lib.name]


@needs_kernel
def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PARSCALE_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    lib = kernels._build(kernels._compiler(), kernels._isa())
    assert lib.is_file() and str(lib).startswith(str(tmp_path / "tmp"))
    assert blocker.read_text() == "not a directory"


def test_no_compiler_or_switched_off_means_torch_quietly(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels._load() is None
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PARSCALE_NATIVE", "0")
    assert kernels._isa() is None


@needs_kernel
def test_a_failing_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: "/bin/false")
    with pytest.warns(RuntimeWarning, match="native decode kernels are not used"):
        assert kernels._load() is None
    assert os.listdir(tmp_path) == []  # nothing half-written


@needs_kernel
def test_a_failing_self_check_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_call", lambda fn, x, w, b: torch.zeros(x.shape[0], w.shape[0]))
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        assert kernels._load() is None


@needs_kernel
def test_the_compiled_op_matches_the_direct_call():
    x, w, b = torch.randn(6, 48), torch.randn(20, 48), torch.randn(20)
    op = torch.ops.parscale.skinny_linear(x, w, b)
    assert torch.equal(op, kernels.skinny_linear(x, w, b))
    f = torch.compile(lambda x: kernels.skinny_linear(x, w, b) * 2, backend="eager", fullgraph=True)
    assert torch.equal(f(x), op * 2)


# --------------------------------------------------------------------------- decode attention
def sdpa64(q, k, v, mask):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hq,hkv,d", [(1, 1, 1, 16), (3, 4, 2, 64), (8, 8, 2, 128), (2, 9, 3, 64),
                                           (2, 8, 1, 32), (1, 6, 6, 256), (4, 14, 2, 48)])
@pytest.mark.parametrize("length", [1, 15, 17, 130])
@pytest.mark.parametrize("masking", ["none", "per row", "broadcast"])
def test_attention_matches_a_float64_reference(dtype, rows, hq, hkv, d, length, masking):
    g = torch.Generator().manual_seed(rows * 7 + hq + length)
    q = torch.randn(rows, hq, 1, d, generator=g).to(dtype)
    # a window of a larger cache, as decode steps attend: position stride d, head stride capacity·d
    k = torch.randn(rows, hkv, length + 5, d, generator=g).to(dtype)[:, :, :length]
    v = torch.randn(rows, hkv, length + 5, d, generator=g).to(dtype)[:, :, :length]
    mask = None
    if masking != "none":
        mask = torch.rand(rows if masking == "per row" else 1, 1, 1, length, generator=g) > 0.4
        mask[..., -1] = True  # a query sees at least its own key
    got = kernels.decode_attention(q, k, v, mask)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16 output rounding
    torch.testing.assert_close(got.double(), sdpa64(q, k, v, mask), **tol)


@needs_kernel
def test_attention_rows_alone_equal_rows_batched_and_hidden_rows_give_zeros():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, 4, 1, 32, generator=g), torch.randn(4, 2, 9, 32, generator=g), torch.randn(4, 2, 9, 32, generator=g)
    batch = kernels.decode_attention(q, k, v)
    for i in range(4):
        assert torch.equal(kernels.decode_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]), batch[i:i + 1])
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool)
    mask[2] = False
    out = kernels.decode_attention(q, k, v, mask)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(out[[0, 1, 3]], batch[[0, 1, 3]])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 48, 128])
def test_attention_hidden_slots_holding_nan_or_inf_change_nothing(dtype, d):
    # a hidden cache slot (left padding, a slot never written) may hold anything: its key must not
    # leak into the output, even as NaN times a zero probability (odd and even lengths, both paths)
    g = torch.Generator().manual_seed(d)
    for length in (6, 7):
        q = torch.randn(3, 4, 1, d, generator=g).to(dtype)
        k, v = (torch.randn(3, 2, length, d, generator=g).to(dtype) for _ in range(2))
        mask = torch.ones(3, 1, 1, length, dtype=torch.bool)
        mask[0, ..., 0] = mask[1, ..., 3] = mask[2, ..., length - 1] = False
        clean = kernels.decode_attention(q, k, v, mask)
        k2, v2 = k.clone(), v.clone()
        for r, j in ((0, 0), (1, 3), (2, length - 1)):
            k2[r, :, j], v2[r, :, j] = float("nan"), float("inf")
        assert torch.equal(kernels.decode_attention(q, k2, v2, mask), clean)


def test_attention_it_does_not_take_returns_none():
    q, k = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 5, 32)
    for args in [(torch.randn(2, 4, 2, 32), k, k, None),          # two queries per row (prefill)
                 (torch.randn(2, 18, 1, 32), k, k, None),         # 9 query heads per KV head
                 (torch.randn(2, 4, 1, 24), torch.randn(2, 2, 5, 24), torch.randn(2, 2, 5, 24), None),  # d % 16
                 (q.double(), k.double(), k.double(), None),      # float64
                 (q, k.bfloat16(), k.bfloat16(), None),           # mixed dtypes
                 (q, k, torch.randn(2, 2, 6, 32), None),          # k and v differ
                 (q, k, k, torch.ones(2, 1, 1, 5)),               # a float mask
                 (q, k, k, torch.ones(3, 1, 1, 5, dtype=torch.bool)),  # mask rows neither 1 nor r
                 (q, torch.randn(2, 2, 32, 5).transpose(2, 3), k, None),  # features not contiguous
                 (torch.randn(2, 3, 1, 32), k, k, None)]:         # heads not a multiple
        assert kernels.decode_attention(*args) is None


# --------------------------------------------------------------------------- weight-only int8
@needs_kernel
@pytest.mark.parametrize("rows", range(1, 17))
@pytest.mark.parametrize("n,k", [(1, 1), (33, 17), (70, 64), (130, 300)])
def test_int8_products_match_the_exact_dequantised_product(rows, n, k):
    g = torch.Generator().manual_seed(rows * 100 + n + k)
    x = torch.randn(rows, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) / 100
    got = kernels.skinny_linear_int8(x, q, scale)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # x as 16-bit fixed point per row: the independent emulation to float32's rounding, and the
    # exact product within the documented bound
    torch.testing.assert_close(got.double(), fixed_point_reference(x, q, scale), rtol=1e-5,
                               atol=1e-6 * (k ** 0.5) * float(scale.max()) * 127)
    exact = F.linear(x.double(), q.double()) * scale.double()
    assert ((got.double() - exact).abs() <= kernels.int8_error_bound(x, q, scale)).all()


@needs_kernel
def test_int8_rows_with_nan_or_inf_give_nan_and_zero_rows_zero():
    q, s = torch.randint(-127, 128, (20, 40), dtype=torch.int8), torch.rand(20)
    x = torch.randn(4, 40)
    x[1, 5], x[2, 7], x[3] = float("nan"), float("inf"), 0.0
    got = kernels.skinny_linear_int8(x, q, s)
    assert torch.isfinite(got[0]).all() and got[1].isnan().all() and got[2].isnan().all() and (got[3] == 0).all()


@needs_kernel
def test_int8_sums_past_the_int32_flush_length_stay_exact():
    """k beyond 4096 (the kernel adds its int32 lanes into float32 every 4096 elements): all
    weights and activations at the extremes, where one int32 sum over k would overflow."""
    k = 3 * 4096 + 40
    x = torch.full((2, k), 1.0)
    x[1] = -1.0
    q = torch.full((5, k), 127, dtype=torch.int8)
    got = kernels.skinny_linear_int8(x, q, torch.ones(5))
    torch.testing.assert_close(got.double(), torch.tensor([[127.0 * k] * 5, [-127.0 * k] * 5], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_int8_products_it_does_not_take_return_none():
    x, q, s = torch.randn(3, 32), torch.zeros(8, 32, dtype=torch.int8), torch.ones(8)
    for args in [(x.bfloat16(), q, s), (x, q.float(), s), (x, q, s.double()), (torch.randn(17, 32), q, s),
                 (x, q, torch.ones(7)), (torch.randn(32, 3).t(), q, s)]:
        assert kernels.skinny_linear_int8(*args) is None


# --------------------------------------------------------------------------- in the model
def spy_products(monkeypatch) -> list:
    """(kind, rows, dtype) of every native product made from here on, through the general entry
    points (``kernels.skinny_linear[_int8]``) or a decode layout's bound weight (``kernels.Bound``);
    only products the kernel took."""
    seen = []

    def spy(name, real):
        def call(x, *args):
            out = real(x, *args)
            if out is not None:
                seen.append((name, x.shape[0], x.dtype))
            return out
        return call

    for name in ("skinny_linear", "skinny_linear_int8"):
        monkeypatch.setattr(kernels, name, spy(name, getattr(kernels, name)))
    real_bound = kernels.Bound.__call__

    def bound(self, x):
        out = real_bound(self, x)
        if out is not None:
            seen.append(("skinny_linear" if self.scale is None else "skinny_linear_int8", x.shape[0], x.dtype))
        return out

    monkeypatch.setattr(kernels.Bound, "__call__", bound)

    def block(real):  # kernels.mlp_block / attention_block: their two bound products, inside one call
        def call(x, norm_weight, eps, first, second, *rest):
            out = real(x, norm_weight, eps, first, second, *rest)
            if out is not None:
                for b in (first, second):
                    seen.append(("skinny_linear" if b.scale is None else "skinny_linear_int8", x.shape[0], x.dtype))
            return out
        return call

    for name in ("mlp_block", "attention_block"):
        monkeypatch.setattr(kernels, name, block(getattr(kernels, name)))
    return seen


@needs_kernel
def test_int8_model_decode_takes_the_native_kernel_and_a_row_alone_equals_it_batched(tiny_config, monkeypatch):
    """int8 decode rows (1..8) go through the native kernel: float32 activations, each output one
    row against one weight row, so a sample decoded alone gives the same logits as in a batch."""
    from parscale import ParScaleForCausalLM
    from parscale.quant import quantize_

    torch.manual_seed(0)
    cfg = tiny_config(P=2, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, prefix_tokens=3)
    m = quantize_(ParScaleForCausalLM(cfg).eval())
    ids = torch.randint(0, 61, (3, 6))
    with torch.inference_mode():
        seen = spy_products(monkeypatch)
        batch = [m(ids, cache=(c := m.new_cache(3, 8))).logits[:, -1], m(ids[:, -1:], cache=c).logits[:, -1]]
        calls = [rows for name, rows, _ in seen if name == "skinny_linear_int8"]
        assert calls and set(calls) <= {6, 3}  # decode only: 3 samples × 2 streams, and the head (prefill: 36 rows)
        for i in range(3):  # the same cache rows (prefill is a GEMM whose sums may depend on the batch)
            c = m.new_cache(3, 8)
            m(ids, cache=c)
            c.select([i])
            alone = m(ids[i:i + 1, -1:], cache=c).logits[:, -1]
            assert torch.equal(alone, batch[1][i:i + 1])


@needs_kernel
def test_float32_decode_steps_take_the_kernels_and_prefill_never_does(tiny_config, monkeypatch):
    from parscale import ParScaleForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(P=2, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, prefix_tokens=3)
    m = ParScaleForCausalLM(cfg).eval()
    ids = torch.randint(0, 61, (2, 5))
    products = spy_products(monkeypatch)
    attended = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda q, *a: attended.append(q.shape[0]) or real(q, *a))
    block = kernels.attention_block  # (spied by spy_products for its products)

    def attention_block(x, *a):
        out = block(x, *a)
        if out is not None:
            attended.append(x.shape[0])
        return out

    monkeypatch.setattr(kernels, "attention_block", attention_block)
    with torch.inference_mode():
        cache = m.new_cache(2, 8)
        m(ids, cache=cache)
        assert products == [] and attended == []  # prefill: the plain layers and SDPA, as in training
        step = m(ids[:, -1:], cache=cache).logits
        # 2 samples × 2 streams = 4 rows per layer product and attention; the head sees 2 rows
        assert set(attended) == {4} and {(n, r) for n, r, _ in products} == {("skinny_linear", 4), ("skinny_linear", 2)}
        cache = m.new_cache(2, 8)
        m(ids, cache=cache)
        with kernels.disabled():
            products.clear()
            plain = m(ids[:, -1:], cache=cache).logits
            assert products == []  # switched off: torch's kernels only
    torch.testing.assert_close(step, plain, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("P", [1, 2])
def test_bfloat16_decode_steps_take_the_kernel_at_every_row_count(tiny_config, monkeypatch, P):
    """A bfloat16 model's decode products go through the native bfloat16 kernel from one row on
    (where the CPU has no bfloat16 dot products), and its logits stay within bfloat16 rounding of
    torch's own bfloat16 kernels."""
    from parscale import ParScaleForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(P=2, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, prefix_tokens=3)
    monkeypatch.setattr(kernels, "cpu_has_bf16_dot", lambda: False)  # as on an AVX2 CPU
    m = ParScaleForCausalLM(cfg).to(torch.bfloat16).eval().set_streams(P)
    ids = torch.randint(0, 61, (1, 5))
    seen = spy_products(monkeypatch)
    with torch.inference_mode():
        cache = m.new_cache(1, 8)
        m(ids, cache=cache)
        step = m(ids[:, -1:], cache=cache).logits.float()
        rows = [(r, d) for _, r, d in seen]
        assert rows and {r for r, _ in rows} == ({1} if P == 1 else {P, 1}) and {d for _, d in rows} == {torch.bfloat16}
        cache = m.new_cache(1, 8)
        m(ids, cache=cache)
        with kernels.disabled():
            plain = m(ids[:, -1:], cache=cache).logits.float()
    torch.testing.assert_close(step, plain, rtol=0.02, atol=0.02 * float(plain.abs().max()))


@needs_kernel
def test_a_compiled_step_loads_the_kernels_before_it_traces(tiny_config, monkeypatch):
    """Compiled code only reads whether the library loaded; the eager preparation of every
    compiled step (``ensure_decode_layouts``) must load it, or a fresh process's graph would
    silently leave the kernels out."""
    from parscale import ParScaleForCausalLM
    from parscale.model import ensure_decode_layouts

    m = ParScaleForCausalLM(tiny_config(P=2)).eval()
    kernels.available()
    monkeypatch.delitem(kernels._state, "lib")  # as in a fresh process (restored afterwards)
    ensure_decode_layouts(m, 2)
    assert kernels._state.get("lib") is not None


def test_a_compiled_step_finds_the_cpu_flags_read(tiny_config, monkeypatch):
    """bfloat16 decode asks whether the CPU has bfloat16 dot products; a compiled step cannot open
    /proc/cpuinfo while tracing, so the eager preparation reads it first."""
    from parscale import ParScaleForCausalLM
    from parscale.model import ensure_decode_layouts

    m = ParScaleForCausalLM(tiny_config(P=2)).eval()
    monkeypatch.delitem(kernels._state, "cpu_flags", raising=False)  # as in a fresh process
    ensure_decode_layouts(m, 2)
    assert isinstance(kernels._state.get("cpu_flags"), set)


# --------------------------------------------------------------------------- decode-step elementwise
def _torch_rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 17), (16, 1, 1024), (2, 1, 576)])
def test_rms_norm_equals_the_eager_ops(dtype, shape):
    g = torch.Generator().manual_seed(shape[0] + shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    got = kernels.rms_norm(x, w, 1e-6)
    want = _torch_rms_norm(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    # float32: the sum of squares in another order; bfloat16: at most one rounding step apart
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 1, 34), (16, 1, 5632), (8, 1, 3072)])
def test_silu_mul_equals_the_eager_ops(dtype, shape):
    g = torch.Generator().manual_seed(shape[0] + shape[-1])
    gu = (torch.randn(*shape, generator=g) * 4).to(dtype)
    gu[..., 0] = -100.0  # far tails: silu → -0, and +100 → 100·u
    gu[..., 1 % shape[-1]] = 100.0
    got = kernels.silu_mul(gu)
    a, b = gu.chunk(2, dim=-1)
    want = F.silu(a) * b
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_elementwise_kernels_refuse_what_they_do_not_take():
    x, w = torch.randn(2, 1, 8), torch.ones(8)
    for args in [(x.double(), w.double()), (x, w.bfloat16()), (x.transpose(0, 2), torch.ones(2)),
                 (torch.randn(17, 1, 8), w), (x, torch.ones(7))]:
        assert kernels.rms_norm(*args, 1e-6) is None
    for gu in [torch.randn(2, 1, 7), torch.randn(2, 1, 8).double(), torch.randn(8, 1, 2).transpose(0, 2),
               torch.randn(17, 1, 8)]:
        assert kernels.silu_mul(gu) is None
    with kernels.disabled():
        assert kernels.rms_norm(x, w, 1e-6) is None and kernels.silu_mul(x) is None


@needs_kernel
def test_a_bound_weight_gives_the_general_entry_points_products_and_declines_what_they_decline(monkeypatch):
    """``kernels.bind``: the decode layouts' product with the weight checked once. Its outputs are
    the general entry points' bit for bit (same kernel, same operands), bias included for int8;
    it declines (None) what they decline and what it was not bound for."""
    torch.manual_seed(0)
    w, b = torch.randn(40, 32), torch.randn(40)
    q, s = torch.randint(-127, 128, (40, 32), dtype=torch.int8), torch.rand(40) + 0.1
    x = torch.randn(5, 32)
    f32, int8 = kernels.bind(w, b), kernels.bind(q, b, s)
    assert torch.equal(f32(x), kernels.skinny_linear(x, w, b))
    assert torch.equal(int8(x), kernels.skinny_linear_int8(x, q, s) + b)
    bf16 = kernels.bind(w.bfloat16(), b.bfloat16())
    assert torch.equal(bf16(x[:1].bfloat16()), kernels.skinny_linear(x[:1].bfloat16(), w.bfloat16(), b.bfloat16()))
    for bound in (f32, int8):
        for bad in (x.double(), x.bfloat16(), torch.randn(17, 32), torch.randn(3, 31), torch.randn(32, 3).t(),
                    torch.randn(2, 3, 32)):
            assert bound(bad) is None
        with kernels.disabled():
            assert bound(x) is None
    assert kernels.bind(w.double()) is None and kernels.bind(w, b.double()) is None
    assert kernels.bind(q, b, s.double()) is None and kernels.bind(q, b, s[:-1]) is None
    assert kernels.bind(torch.randn(32, 40).t()) is None  # rows of w not contiguous
    monkeypatch.setattr(kernels, "cpu_has_bf16_dot", lambda: True)  # torch's bfloat16 product past one row
    monkeypatch.setattr(kernels, "bf16_dot", lambda: False)
    one_row = kernels.bind(w.bfloat16())
    assert one_row(x[:1].bfloat16()) is not None and one_row(x[:2].bfloat16()) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 64])  # half of 64 fills the vector lanes; 16 takes the scalar loop
@pytest.mark.parametrize("cos_rows", [1, 3])
def test_rope_kv_equals_apply_rope_and_the_cache_write_bit_for_bit(dtype, d, cos_rows):
    """``kernels.rope_kv``: q and k rotated as ``apply_rope`` rotates them (the same roundings),
    k and v in the cache slots, other slots untouched; positions per row or one for all."""
    from parscale.cache import KVCache
    from parscale.model import RotaryEmbedding, apply_rope

    torch.manual_seed(0)
    r, hq, hkv = 3, 4, 2
    y = torch.randn(r, 1, (hq + 2 * hkv) * d).to(dtype) * 3
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.tensor([[5], [17], [901]])[:cos_rows], dtype)
    ours, ref = (KVCache(1, r, 1, hkv, d, 6, n_prefix=2, dtype=dtype) for _ in range(2))
    for c in (ours, ref):
        c.k[0].normal_(), c.v[0].normal_()
        c.length = 3
    ref.k[0].copy_(ours.k[0]), ref.v[0].copy_(ours.v[0])
    q = kernels.rope_kv(y, cos, sin, hq, hkv, *ours.slots(0, 1))
    qk, v = y.split([(hq + hkv) * d, hkv * d], -1)
    qk = apply_rope(qk.view(r, 1, hq + hkv, d).transpose(1, 2), cos, sin)
    want_k, want_v = ref.update(0, qk[:, hq:], v.view(r, 1, hkv, d).transpose(1, 2))
    assert torch.equal(q, qk[:, :hq])
    got_k, got_v = ours.so_far(0, 1)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert torch.equal(ours.k[0], ref.k[0]) and torch.equal(ours.v[0], ref.v[0])  # the slots after: untouched


@needs_kernel
def test_rope_kv_declines_what_it_cannot_take():
    from parscale.cache import KVCache
    from parscale.model import RotaryEmbedding

    c = KVCache(1, 2, 1, 2, 16, 4)
    y = torch.randn(2, 1, 8 * 16)
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.tensor([[1], [2]]), torch.float32)
    for args in [(y.double(), cos, sin), (y[:, :, :-16], cos, sin), (y, cos.bfloat16(), sin.bfloat16()),
                 (torch.randn(2, 2, 128), cos, sin), (y, cos[..., :8], sin[..., :8])]:
        before = c.k[0].clone()
        assert kernels.rope_kv(*args, 4, 2, *c.slots(0, 1)) is None
        assert torch.equal(c.k[0], before)
    with kernels.disabled():
        assert kernels.rope_kv(y, cos, sin, 4, 2, *c.slots(0, 1)) is None


# --------------------------------------------------------------------------- whole sub-blocks
def _mlp(h, inter, dtype, seed):
    from parscale.config import ParScaleConfig
    from parscale.model import MLP, RMSNorm
    from parscale.quant import Int8Linear

    torch.manual_seed(seed)
    cfg = ParScaleConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=32)
    mlp, norm = MLP(cfg).eval(), RMSNorm(h, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    if dtype == "int8":
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, Int8Linear.from_linear(getattr(mlp, name)))
        return mlp, norm, torch.float32
    return mlp.to(dtype), norm.to(dtype), dtype


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("rows,h,inter", [(1, 64, 160), (3, 40, 72), (8, 128, 344), (16, 96, 256)])
def test_mlp_block_is_the_per_op_path_bit_for_bit(dtype, rows, h, inter, monkeypatch):
    mlp, norm, xdt = _mlp(h, inter, dtype, rows + h)
    x = (torch.randn(rows, 1, h) * 2).to(xdt)
    ran = []
    real = kernels.mlp_block
    monkeypatch.setattr(kernels, "mlp_block", lambda *a: ran.append(real(*a) is not None) or real(*a))
    with torch.inference_mode():
        got = mlp.residual_block(x, norm)
        want = x + mlp(norm(x))  # rms_norm, the bound products, silu_mul, torch's add: op by op
    if xdt == torch.bfloat16 and rows > 1 and not kernels.bf16_past_one_row():
        assert ran == [] or ran == [False]  # the bound bf16 products take one row here: the ops run
    else:
        assert ran == [True]
    assert got.dtype == xdt and torch.equal(got, want)


@needs_kernel
def test_mlp_block_declines_and_the_ops_run():
    from parscale.model import packed

    mlp, norm, _ = _mlp(64, 160, torch.float32, 0)
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        mlp.residual_block(x, norm)  # makes the layouts
        a, b = packed(mlp, "_gate_up", x).bound(), packed(mlp, "_down", x).bound()
        w = norm.weight
        assert kernels.mlp_block(x, w, 1e-5, a, b) is not None
        for args in [(x.double(), w), (x.bfloat16(), w), (x, w.bfloat16()), (x.transpose(0, 2).contiguous().transpose(0, 2), w),
                     (torch.randn(17, 1, 64), w), (x, torch.ones(63)), (torch.randn(2, 1, 63), w)]:
            assert kernels.mlp_block(args[0], args[1], 1e-5, a, b) is None
        assert kernels.mlp_block(x, w, 1e-5, b, a) is None  # the layouts swapped: shapes do not chain
        with kernels.disabled():
            assert kernels.mlp_block(x, w, 1e-5, a, b) is None
            torch.testing.assert_close(mlp.residual_block(x, norm), x + mlp(norm(x)))
    mlp.train()
    y = torch.randn(2, 1, 64, requires_grad=True)
    out = mlp.residual_block(y, norm)  # training: the plain ops, with gradients
    out.sum().backward()
    assert y.grad is not None and mlp.gate_proj.weight.grad is not None


def _decode_run(m, ids, mask, steps):
    """Logits of a prefill and ``steps`` greedy decode steps, and the cache's tensors after them."""
    with torch.inference_mode():
        cache = m.new_cache(ids.shape[0], ids.shape[1] + steps + 1)
        out = m(ids, attention_mask=mask, cache=cache)
        logits, tok = [out.logits[:, -1]], out.logits[:, -1:].argmax(-1)
        am = mask
        for _ in range(steps):
            am = None if am is None else torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
            out = m(tok, attention_mask=None if am is None else am[:, -1:], cache=cache)
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits), [t.clone() for t in cache.k + cache.v]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("P,batch,padded,bias", [(1, 1, False, False), (2, 3, True, True), (4, 1, False, True),
                                                 (3, 2, True, False)])
def test_decode_blocks_are_the_per_op_path_bit_for_bit(tiny_config, dtype, P, batch, padded, bias, monkeypatch):
    """Decode steps through kernels.attention_block / mlp_block give the logits and the cache of
    the per-op path exactly: P streams, batches with left padding (the key mask), q/k/v biases."""
    from parscale import ParScaleForCausalLM
    from parscale.quant import quantize_

    torch.manual_seed(P * 10 + batch)
    cfg = tiny_config(P=P, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, prefix_tokens=3, attention_bias=bias)
    m = ParScaleForCausalLM(cfg).eval()
    if bias:
        with torch.no_grad():
            for layer in m.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    m = quantize_(m) if dtype == "int8" else m.to(dtype)
    ids = torch.randint(0, 61, (batch, 6))
    mask = None
    if padded:
        mask = torch.ones(batch, 6, dtype=torch.long)
        mask[0, :2] = 0  # left padding in one row
    used = []
    for name in ("attention_block", "mlp_block"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real: (lambda out: used.append(out is not None) or out)(_real(*a)))
    fused = _decode_run(m, ids, mask, 4)
    assert used and all(used)  # every decode step's blocks ran natively (none in the prefill)
    for name in ("attention_block", "mlp_block"):
        monkeypatch.setattr(kernels, name, lambda *a: None)
    per_op = _decode_run(m, ids, mask, 4)
    assert torch.equal(fused[0], per_op[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], per_op[1]))


@needs_kernel
def test_attention_block_declines_what_it_does_not_take(tiny_config):
    from parscale import ParScaleForCausalLM
    from parscale.model import packed

    cfg = tiny_config(P=1, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, prefix_tokens=0)
    m = ParScaleForCausalLM(cfg).eval()
    attn, norm = m.model.layers[0].self_attn, m.model.layers[0].input_layernorm
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        cache = m.new_cache(2, 8)
        m(torch.randint(0, 61, (2, 3)), cache=cache)
        a, b = packed(attn, "_qkv", x).bound(), packed(attn, "_o", x).bound()
        k, v = cache.so_far(0, 1)
        cos, sin = m.model.rotary(torch.tensor([[3], [3]]), x.dtype)
        args = dict(x=x, norm_weight=norm.weight, eps=norm.eps, qkv=a, o=b, heads=4, kv_heads=2, cos=cos, sin=sin,
                    k=k, v=v, mask=None)
        before = [t.clone() for t in (cache.k[0], cache.v[0])]
        for bad in [dict(x=x.bfloat16()), dict(x=torch.randn(17, 1, 64)), dict(norm_weight=norm.weight[:63]),
                    dict(qkv=b, o=a), dict(heads=2), dict(kv_heads=1), dict(k=k.bfloat16()), dict(v=v[:, :, :-1]),
                    dict(cos=cos.bfloat16()), dict(mask=torch.ones(3, 1, 1, k.shape[2], dtype=torch.bool)),
                    dict(mask=torch.ones(2, 1, 1, k.shape[2]))]:
            assert kernels.attention_block(**{**args, **bad}) is None, bad
        assert torch.equal(cache.k[0], before[0]) and torch.equal(cache.v[0], before[1])  # nothing written
        with kernels.disabled():
            assert kernels.attention_block(**args) is None
        assert kernels.attention_block(**args) is not None
