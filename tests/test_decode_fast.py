"""The fast inference path: packed weights, bfloat16, weight-only int8.

Invariants: the packed layout (fused q/k/v and gate/up, transposed float32 weights) computes the
plain layers' result within float rounding and leaves names, values and training untouched;
incremental decode equals the full forward in bfloat16 and int8 too; the opt-in prepacked copies
give the plain decode's result, follow in-place changes, and leave prefill bit-identical; bfloat16 and int8 logits
stay within stated tolerances of float32; an int8 checkpoint round-trips bit-exactly.
"""

import copy
import json

import pytest
import torch
from torch import nn

import parscale.model
from parscale import ParScaleForCausalLM, kernels
from parscale.cli import main
from parscale.model import PackedLinear, can_prepack
from parscale.quant import Int8Linear, int8_matmul, quantize_, quantize_weight

# hidden 64 / intermediate 96 / head_dim 16: multiples of 16, so the CPU int8 kernel runs
SHAPE = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, prefix_tokens=3)


def make(tiny_config, P=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(P=P, stream_sets=[1, 2, 4], **{**SHAPE, **kw})
    m = ParScaleForCausalLM(cfg).eval()
    with torch.no_grad():  # non-uniform aggregation and larger logits, so the checks can fail
        for s in m.stream_sets.values():
            s.aggregate_layer[2].weight.normal_()
        m.model.embed_tokens.weight.mul_(20)
    return m


def plain_logits(model, ids, **kw):
    """The plain layers' forward: gradients enabled, so nothing is packed."""
    with torch.enable_grad():
        return model(ids, **kw).logits.detach()


def incremental_logits(model, ids):
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        first = model(ids[:, :3], cache=cache).logits
        rest = [model(ids[:, t:t + 1], cache=cache).logits for t in range(3, ids.shape[1])]
    return torch.cat([first, *rest], dim=1)


IDS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- packed layout
SHORT = IDS[:1, :5]  # few rows, but several positions: not a decode step


@pytest.fixture(params=["native", "cached", "streamed"])
def fp32_form(request, monkeypatch):
    """Every float32 decode form: the native kernel (``parscale.kernels``, where it builds), and
    without it ``F.linear`` for weights that stay in cache (all of a tiny model's) and ``W @ xᵀ``
    past 2 rows for larger ones (forced here by a zero threshold)."""
    if request.param == "native":
        if not (kernels._isa() and kernels._compiler()):
            pytest.skip("no AVX-512 or AVX2 CPU, or no C++ compiler here")
        assert kernels.available()
    else:
        monkeypatch.setitem(kernels._state, "off", True)
    if request.param == "streamed":
        monkeypatch.setattr(parscale.model, "_CACHED_FP32_BYTES", 0)
    return request.param


@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("tie,bias", [(True, True), (False, False)])
def test_packed_decode_equals_plain_layers_and_full_forward_is_exact(tiny_config, P, tie, bias, fp32_form):
    m = make(tiny_config, P=2, tie_word_embeddings=tie, attention_bias=bias).set_streams(P)
    ref = plain_logits(m, IDS)
    torch.testing.assert_close(incremental_logits(m, IDS), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(m.model.layers[0].self_attn.__dict__.get("_qkv"), PackedLinear)  # it did pack
    with torch.no_grad():  # full forwards: the plain layers, bit for bit (transformers parity)
        assert torch.equal(m(IDS).logits, ref)
        assert torch.equal(m(SHORT).logits, plain_logits(m, SHORT))
    m64 = copy.deepcopy(m).double()
    torch.testing.assert_close(incremental_logits(m64, IDS), plain_logits(m64, IDS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_packed_output_is_row_major(dtype, bias, rows, fp32_form):
    """A decode step's projections feed attention: a transposed (or ``view + bias``) result has a
    last-dim stride != 1 and sends SDPA down its slow math path."""
    torch.manual_seed(0)
    q, k = nn.Linear(16, 32, bias=bias).to(dtype), nn.Linear(16, 8, bias=bias).to(dtype)
    x = torch.randn(rows, 1, 16, dtype=dtype)
    out = PackedLinear([q, k])(x)
    assert out.is_contiguous() and out.stride(-1) == 1
    torch.testing.assert_close(out, torch.cat([q(x), k(x)], -1).detach(), rtol=1e-2, atol=1e-2)


def test_packing_keeps_names_values_and_training(tiny_config):
    m = make(tiny_config)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.inference_mode():  # packing under inference_mode must leave ordinary parameters
        incremental_logits(m, SHORT)
    attn = m.model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert q.is_contiguous() and q.shape == (64, 64)  # a row slice of the fused q/k/v buffer
    assert attn.__dict__["_qkv"].weight.data_ptr() == q.data_ptr() and k.data_ptr() == q.data_ptr() + q.nbytes
    assert m.state_dict().keys() == before.keys()
    for key, v in m.state_dict().items():
        assert torch.equal(v, before[key]), key
    fresh = make(tiny_config)
    for model in (m, fresh):
        model.train()
        model(IDS, labels=IDS).loss.backward()
    assert "_qkv" not in attn.__dict__ and q.untyped_storage().nbytes() == q.nbytes  # train() unpacked
    for (n, a), (_, b) in zip(m.named_parameters(), fresh.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), n


def test_packed_model_follows_to_dtype_and_load(tiny_config):
    m = make(tiny_config)
    incremental_logits(m, SHORT)
    other = make(tiny_config, seed=1)
    m.load_state_dict(other.state_dict())  # in-place copies land in the packed buffers
    torch.testing.assert_close(incremental_logits(m, SHORT), plain_logits(other, SHORT), rtol=1e-5, atol=1e-5)
    assert copy.deepcopy(m).model.layers[0].mlp.__dict__.get("_gate_up") is None  # a copy packs anew
    b = m.to(torch.bfloat16)  # new storage: the float32 buffers are let go, then packed for bf16
    assert "_gate_up" not in b.model.layers[0].mlp.__dict__
    out = incremental_logits(b, SHORT)
    assert out.dtype == torch.bfloat16
    assert b.model.layers[0].mlp.__dict__["_gate_up"].weight.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain_logits(b, SHORT), rtol=0, atol=0.08)


# --------------------------------------------------------------------------- prepacked (opt-in)
def blocked_copies(model) -> int:
    return sum(1 for mod in model.modules() for v in mod.__dict__.values()
               if isinstance(v, PackedLinear) and v._blocked is not None)


@pytest.mark.parametrize("P", [1, 2, 4])
def test_prepacked_decode_equals_plain_and_prefill_is_untouched(tiny_config, P, monkeypatch):
    monkeypatch.setitem(kernels._state, "off", True)  # prepacking is the fallback where the native kernels do not run
    m = make(tiny_config).set_streams(P)
    ref = plain_logits(m, IDS)
    greedy = copy.deepcopy(m).generate(IDS[:1, :4], max_new_tokens=6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.prepack() is m
    torch.testing.assert_close(incremental_logits(m, IDS), ref, rtol=1e-5, atol=1e-5)
    # 2 rows x P: float32 takes the prepacked kernel past 2 rows, the plain one up to 2
    assert (blocked_copies(m) > 0) == (can_prepack(m.lm_head.weight) and 2 * P > 2)
    with torch.no_grad():  # prefill and full forwards: the plain layers, bit for bit
        assert torch.equal(m(IDS).logits, ref)
    assert torch.equal(m.generate(IDS[:1, :4], max_new_tokens=6), greedy)
    assert m.state_dict().keys() == before.keys()  # no extra tensors; values untouched
    for key, v in m.state_dict().items():
        assert torch.equal(v, before[key]), key


def test_prepacked_copy_follows_in_place_changes_and_can_be_released(tiny_config, monkeypatch):
    monkeypatch.setitem(kernels._state, "off", True)
    m = make(tiny_config).set_streams(4).prepack()
    incremental_logits(m, IDS)
    other = make(tiny_config, seed=1).set_streams(4)
    m.load_state_dict(other.state_dict())  # in place: same storage, so only the version says it changed
    torch.testing.assert_close(incremental_logits(m, IDS), plain_logits(other, IDS), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(2)  # as an optimizer step would
        other.model.layers[1].mlp.down_proj.weight.mul_(2)
    torch.testing.assert_close(incremental_logits(m, IDS), plain_logits(other, IDS), rtol=1e-5, atol=1e-5)
    m.prepack(False)
    assert blocked_copies(m) == 0
    torch.testing.assert_close(incremental_logits(m, IDS), plain_logits(other, IDS), rtol=1e-5, atol=1e-5)
    assert blocked_copies(m) == 0


def test_prepack_is_a_no_op_without_a_kernel(tiny_config, monkeypatch):
    monkeypatch.setitem(kernels._state, "off", True)
    m = make(tiny_config).set_streams(4)
    ref = incremental_logits(m, IDS)
    b = copy.deepcopy(m).to(torch.bfloat16)
    plain_b = incremental_logits(b, IDS)
    assert torch.equal(incremental_logits(b.prepack(), IDS), plain_b) and blocked_copies(b) == 0  # bf16: nothing to gain
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # as on CUDA or a CPU without oneDNN
    m.prepack()
    assert torch.equal(incremental_logits(m, IDS), ref) and blocked_copies(m) == 0


def test_from_pretrained_prepack_and_cli_flag(tiny_config, tmp_path, capsys):
    m = make(tiny_config, P=4)
    m.save_pretrained(tmp_path)
    p = ParScaleForCausalLM.from_pretrained(tmp_path, prepack=True)
    assert torch.equal(p.generate(IDS[:1, :3], max_new_tokens=4), m.generate(IDS[:1, :3], max_new_tokens=4))
    assert main(["generate", "--model", str(tmp_path), "--ids", "1 2 3", "--max-new-tokens", "4", "--prepack"]) == 0
    expect = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)[0].tolist()
    assert capsys.readouterr().out.split() == list(map(str, expect))


# --------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("P", [1, 2])
def test_bfloat16_close_to_float32_and_incremental_equals_full(tiny_config, P):
    m = make(tiny_config).set_streams(P)
    ref = plain_logits(m, IDS)
    b = copy.deepcopy(m).to(torch.bfloat16)
    with torch.no_grad():
        full = b(IDS).logits
    assert full.dtype == torch.bfloat16
    # stated tolerance: 1.5% of the largest logit (bf16 keeps 8 mantissa bits; seen: 0.2-0.5%)
    scale = ref.abs().max()
    assert (full.float() - ref).abs().max() <= 0.015 * scale
    inc = incremental_logits(b, IDS)  # seen: 0.1-0.35%
    assert (inc.float() - full.float()).abs().max() <= 0.01 * scale
    cache = b.new_cache(1, 4)
    assert cache.k[0].dtype == torch.bfloat16
    if P > 1:  # the prefix is stored in bf16 in the cache, and the aggregation weights are float32
        assert b(IDS[:1]).agg_weights.dtype == torch.float32


def test_from_pretrained_bfloat16(tiny_config, tmp_path):
    m = make(tiny_config)
    m.save_pretrained(tmp_path)
    b = ParScaleForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert b.model.norm.weight.dtype == torch.bfloat16
    assert b.generate(IDS[:1], max_new_tokens=3).shape == (1, 12)


# --------------------------------------------------------------------------- int8
def test_quantize_weight_bounds_and_bf16_exact_scales():
    w = torch.randn(40, 32) * torch.rand(40, 1) * 3
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.abs().max() <= 127
    assert torch.equal(s.to(torch.bfloat16).float(), s)  # exact in a bf16 kernel
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    assert (s >= w.abs().amax(1) / 127).all() and (s <= w.abs().amax(1) / 127 * 1.01).all()


@pytest.mark.parametrize("k,rows", [(64, 5), (64, 40), (24, 5)])  # the kernel; many rows; odd k
def test_int8_kernel_matches_dequantised_product(k, rows):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=g), torch.randn(48, k, generator=g)
    q, s = quantize_weight(w)
    ref = x @ (q.float() * s[:, None]).T
    out = int8_matmul(x, q, s)
    assert out.dtype == torch.float32
    # activations (and the CPU kernel's output) rounded to bf16: seen 0.34% of the largest output
    torch.testing.assert_close(out, ref, rtol=0, atol=0.006 * ref.abs().max().item())


@pytest.mark.parametrize("P", [1, 2, 4])  # 2, 4 and 8 decode rows: both int8 decode kernels
@pytest.mark.parametrize("tie", [True, False])
def test_int8_logits_close_and_greedy_decode(tiny_config, P, tie, monkeypatch):
    import parscale.quant as quant

    monkeypatch.setattr(quant, "_TWO_DIGIT_MIN", 0)  # the tiny weights take the two-digit product too
    m = make(tiny_config, tie_word_embeddings=tie).set_streams(P)
    ref = plain_logits(m, IDS)
    q = copy.deepcopy(m).quantize("int8")
    assert isinstance(q.model.layers[0].self_attn.q_proj, Int8Linear)
    with torch.no_grad():
        full = q(IDS).logits
    # stated tolerance: 1.5% of the largest logit (int8 weights, ±0.4% of each row's largest,
    # and bf16 activations; seen: 0.35-0.65%)
    assert (full - ref).abs().max() <= 0.015 * ref.abs().max()
    # the full forward (> 16 rows) takes the dequantised bf16 GEMM, decode the int8 kernel
    torch.testing.assert_close(incremental_logits(q, IDS), full, rtol=0, atol=0.01 * full.abs().max().item())
    out = q.generate(IDS, max_new_tokens=5)
    ids = IDS
    with torch.no_grad():  # greedy by full forwards of the same int8 model
        for _ in range(5):
            ids = torch.cat([ids, q(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_int8_save_load_round_trip_is_bit_exact(tiny_config, tmp_path):
    q = make(tiny_config).quantize()
    q.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization"] == "int8"
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert "model.layers.0.self_attn.q_proj.weight_scale" in stored
    assert "lm_head.weight" not in stored  # tied: the int8 table is stored once
    r = ParScaleForCausalLM.from_pretrained(tmp_path)
    assert r.state_dict().keys() == q.state_dict().keys()
    for k, v in q.state_dict().items():
        assert torch.equal(r.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(r(IDS).logits, q(IDS).logits)


def test_from_pretrained_quantize_equals_quantize(tiny_config, tmp_path):
    m = make(tiny_config, tie_word_embeddings=False)
    m.save_pretrained(tmp_path)
    a = ParScaleForCausalLM.from_pretrained(tmp_path, quantize="int8")
    b = quantize_(copy.deepcopy(m))
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    assert a.new_cache(1, 2).k[0].dtype == torch.float32  # the compute dtype, not int8
    c = ParScaleForCausalLM.from_pretrained(tmp_path, quantize="int8", dtype=torch.bfloat16)
    assert c.new_cache(1, 2).k[0].dtype == torch.bfloat16
    assert c.generate(IDS[:1], max_new_tokens=2).shape == (1, 11)


@pytest.mark.parametrize("k", [64, 72])
def test_two_digit_int8_product_is_finer_than_bf16_and_row_independent(k, monkeypatch):
    """5-16 rows without the native kernel: activations as two int8 digits per row, one int8 x int8
    product (and the dispatch between torch's kernels)."""
    import parscale.quant as quant
    from parscale.quant import _int8x2_matmul

    monkeypatch.setitem(kernels._state, "off", True)

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, k, generator=g), torch.randn(48, k, generator=g)
    x[:, 3] *= 30  # an outlier channel, as LLM activations have
    q, s = quantize_weight(w)
    ref = x.double() @ (q.double() * s.double()[:, None]).T  # the exact product with the int8 weights
    out = _int8x2_matmul(x, q, s)
    # digit rounding: at most max|x_row| / 64516 per activation (seen ~2e-5 of the largest output)
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    bf16 = x.bfloat16().double() @ (q.double() * s.double()[:, None]).T  # what the 1-4 row kernel rounds to
    assert (out.double() - ref).abs().max() < (bf16 - ref).abs().max()
    for r in range(6):  # per-row scales and exact int32 sums: a row alone gives the same bits
        assert torch.equal(_int8x2_matmul(x[r:r + 1], q, s), out[r:r + 1])
    small = int8_matmul(x, q, s)
    if k % 16 == 0:  # a small weight (48 x k) keeps the bf16 kernel: the two-digit one's small ops cost more
        assert torch.equal(small, torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s.bfloat16()).float())
    else:  # a k the bf16 kernel refuses: the two-digit product
        assert torch.equal(small, out)
    monkeypatch.setattr(quant, "_TWO_DIGIT_MIN", 0)
    torch.testing.assert_close(int8_matmul(x, q, s), out)  # 6 rows of a large weight: the dispatcher picks it


def test_int8_only_quantises_projections_and_head(tiny_config):
    q = make(tiny_config).quantize()
    floats = {n for n, t in q.state_dict().items() if t.is_floating_point()}
    ints = {n for n, t in q.state_dict().items() if t.dtype == torch.int8}
    assert all(n.endswith(".weight") for n in ints)
    assert "model.embed_tokens.weight" in ints
    assert any("prefix_k" in n for n in floats) and any("aggregate_layer" in n for n in floats)
    assert "model.norm.weight" in floats
    assert not any(isinstance(mod, nn.Linear) for mod in q.model.layers.modules())


# --------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("compile_flag,freeze", [(["--compile-decode"], False), (["--compile-decode", "frozen"], True)])
@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_cli_kernel_flags_reach_the_loaded_model(tiny_config, tmp_path, monkeypatch, command, compile_flag, freeze):
    """``--quantize`` / ``--prepack`` / ``--compile-decode`` must change the model the command runs (a greedy output
    alone can coincide: a dropped flag once went unnoticed)."""
    from parscale.quant import is_quantized

    make(tiny_config).save_pretrained(tmp_path)
    seen = []
    original = ParScaleForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.append(original(cls, *a, **kw))
        raise SystemExit(0)  # the model is all this test needs
    monkeypatch.setattr(ParScaleForCausalLM, "from_pretrained", classmethod(spy))
    argv = {"generate": ["--ids", "1 2"], "chat": [], "serve": ["--port", "0"]}[command]
    if command != "generate":
        from types import SimpleNamespace

        from parscale.tokenizer import Tokenizer  # chat and serve want a tokenizer before the model
        tok = SimpleNamespace(chat_template="{{ messages }}", apply_chat_template=lambda *a, **kw: [1])
        monkeypatch.setattr(Tokenizer, "from_pretrained", classmethod(lambda cls, *a, **kw: tok))
        monkeypatch.setattr("parscale.serve.load_tokenizer", lambda *a, **kw: tok)
        (tmp_path / "tokenizer.json").write_text("{}")  # serve checks the file is there first
    with pytest.raises(SystemExit):
        main([command, "--model", str(tmp_path), *argv, "--quantize", "int8", "--prepack", *compile_flag])
    assert len(seen) == 1 and is_quantized(seen[0])
    assert seen[0].model.layers[0].__dict__.get("_prepack") is True
    assert seen[0].__dict__.get("_compile_decode") == {"freeze": freeze}


@pytest.mark.parametrize("flags,warmed", [([], False), (["--compile-decode"], True),
                                          (["--compile-decode", "frozen", "--no-warm-up"], False)])
def test_serve_compiles_the_decode_steps_before_it_listens(tiny_config, tmp_path, monkeypatch, capsys, flags, warmed):
    """``serve --compile-decode`` compiles (``generation.warm_up``) before uvicorn takes requests,
    unless ``--no-warm-up``; without ``--compile-decode`` there is nothing to compile."""
    import uvicorn

    from types import SimpleNamespace

    import parscale.generation

    make(tiny_config).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # serve checks the file is there first
    stub = SimpleNamespace(chat_template=None, eos_token_id=None, apply_chat_template=lambda *a, **kw: [1])
    monkeypatch.setattr("parscale.serve.load_tokenizer", lambda *a, **kw: stub)
    events = []
    monkeypatch.setattr(parscale.generation, "warm_up", lambda model, **kw: events.append("warm") or {1: 0.0, 2: 0.0})

    def listen(self, *a, **kw):
        events.append("listen")
    monkeypatch.setattr(uvicorn.Server, "run", listen)
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--threads", "1", "--device", "cpu", *flags]) == 0
    assert events == (["warm", "listen"] if warmed else ["listen"])
    assert ("compiling the decode steps" in capsys.readouterr().out) == warmed

    def fail(self, *a, **kw):  # uvicorn's own exit when its start-up fails
        raise SystemExit(3)
    monkeypatch.setattr(uvicorn.Server, "run", fail)
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--threads", "1", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "the HTTP server stopped: start-up failed" in err and "Traceback" not in err


def test_bad_compile_decode_values_are_refused(tiny_config, tmp_path, capsys):
    from parscale.errors import ParScaleError

    make(tiny_config).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path), "--ids", "1 2", "--compile-decode", "fast"])
    assert e.value.code == 2 and "--compile-decode" in capsys.readouterr().err
    with pytest.raises(ParScaleError, match="compile_decode='fast'"):
        ParScaleForCausalLM.from_pretrained(tmp_path, compile_decode="fast")


def test_cli_generate_quantize_and_dtype(tiny_config, tmp_path, capsys):
    m = make(tiny_config)
    m.save_pretrained(tmp_path)
    expect = quantize_(copy.deepcopy(m)).generate(IDS[:1, :3], max_new_tokens=4)[0].tolist()
    assert main(["generate", "--model", str(tmp_path), "--ids", " ".join(map(str, IDS[0, :3].tolist())),
                 "--max-new-tokens", "4", "--quantize", "int8", "--threads", "1"]) == 0
    assert capsys.readouterr().out.split() == list(map(str, expect))
    assert main(["generate", "--model", str(tmp_path), "--ids", "1 2", "--max-new-tokens", "2",
                 "--dtype", "bfloat16"]) == 0


def test_prepack_makes_no_copy_where_the_native_kernels_run(tiny_config):
    if not kernels.available():
        pytest.skip("no native kernels here")
    m = make(tiny_config).set_streams(4).prepack()
    torch.testing.assert_close(incremental_logits(m, IDS), plain_logits(m, IDS), rtol=1e-5, atol=1e-5)
    assert blocked_copies(m) == 0  # the native kernel is faster without the extra weight memory


@pytest.mark.parametrize("int8", [False, True])
def test_a_model_that_has_decoded_pickles_and_decodes_the_same(tiny_config, int8):
    """``torch.save`` of a whole model (or multiprocessing) after decode steps: the decode layouts'
    bound products hold ctypes pointers, which must not go into the pickle; the copy binds anew."""
    import pickle

    m = make(tiny_config)
    if int8:
        quantize_(m)
    want = incremental_logits(m, SHORT)
    copy_ = pickle.loads(pickle.dumps(m))  # our own object, pickled just now (as multiprocessing does)
    assert torch.equal(incremental_logits(copy_, SHORT), want)
