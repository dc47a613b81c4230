"""Architectures as config switches: Llama (with Llama-3 RoPE scaling), Qwen2 and Qwen3 against
transformers' own classes built from the same random tensors, at P = 1 and with a stream set added.

Each case writes a tiny model with transformers' ``save_pretrained`` (its own config.json and
safetensors), loads it with parscale, and compares logits. With a stream set added, the saved
parscale checkpoint is checked against the naive reference (tests/reference.py), which reads our
config.json keys (``qk_norm``, ``rope_scaling``, ``attention_bias``) itself.
"""

import json

import pytest
import torch
from reference import reference_logits
from safetensors.torch import load_file

from parscale import ParScaleConfig, ParScaleError, ParScaleForCausalLM
from parscale.interop import config_from_hf_dict

transformers = pytest.importorskip("transformers")

# head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283; with original 1000 and factors 1 / 8
# the bands are < 125 (kept), 125..1000 (interpolated), > 1000 (slowed): one frequency in each
# band except the kept one, which has two.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 1000}
COMMON = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rms_norm_eps=1e-6, tie_word_embeddings=False)


def _hf_model(arch: str, seed: int = 0):
    if arch == "llama":
        cfg = transformers.LlamaConfig(**COMMON, rope_parameters={"rope_theta": 10000.0, **LLAMA3})
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**dict(COMMON, tie_word_embeddings=True),
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = transformers.Qwen2ForCausalLM
    else:  # explicit head_dim != hidden / heads, q/k norms
        cfg = transformers.Qwen3Config(**COMMON, head_dim=16,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF's 0.02 init gives near-uniform logits: use larger weights
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def arch(request, tmp_path):
    hf = _hf_model(request.param)
    hf.save_pretrained(tmp_path / "hf")
    return request.param, hf, tmp_path


def test_config_switches_follow_the_architecture(arch):
    name, hf, tmp = arch
    cfg = ParScaleForCausalLM.from_pretrained(tmp / "hf").config
    assert cfg.qk_norm is (name == "qwen3")
    assert cfg.attention_bias is (name == "qwen2")
    assert cfg.rope_scaling == (LLAMA3 if name == "llama" else None)
    assert cfg.head_dim == (16 if name == "qwen3" else 8)


def test_p1_logits_equal_transformers(arch):
    name, hf, tmp = arch
    model = ParScaleForCausalLM.from_pretrained(tmp / "hf")
    ids = torch.randint(0, 67, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (out[real] - ref[real]).abs().max().item()
    print(f"{name}: max |logit diff| vs transformers = {diff:.3g}")
    assert diff < 1e-4, diff
    # RoPE tables are computed the same way: bit-equal inverse frequencies
    assert torch.equal(model.model.rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    # greedy continuation agrees token for token
    prompt = ids[:1, :6]
    ours = model.generate(prompt, max_new_tokens=8)
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_streams_added_match_the_naive_reference(arch):
    name, hf, tmp = arch
    model = ParScaleForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float64)
    model.config.prefix_tokens = 3
    torch.manual_seed(0)
    sset = model.add_stream_set(2)
    with torch.no_grad():  # non-trivial aggregation weights (the init starts uniform)
        torch.nn.init.normal_(sset.aggregate_layer[2].weight, std=1.0)
        sset.prefix_k.normal_(std=1.0)
        sset.prefix_v.normal_(std=1.0)
    model.save_pretrained(tmp / "p2")
    c = json.loads((tmp / "p2" / "config.json").read_text())
    W = load_file(tmp / "p2" / "model.safetensors")
    assert c["model_type"] == "qwen2_parscale" and c["parscale_n"] == 2
    assert c.get("qk_norm", False) is (name == "qwen3") and c["rope_scaling"] == (LLAMA3 if name == "llama" else None)
    ids = torch.randint(0, 67, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids).logits
    ref = reference_logits(W, c, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the saved checkpoint reloads to the same model (switches kept)
    again = ParScaleForCausalLM.from_pretrained(tmp / "p2", dtype=torch.float64)
    assert again.config == model.config
    assert torch.equal(again(ids).logits, out)
    # and P = 1 on the same backbone is still transformers' model
    with torch.no_grad():
        p1 = model.set_streams(1)(ids).logits.float()
        torch.testing.assert_close(p1, hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_reference_sees_the_switches(arch):
    """The checks above can fail: dropping a switch changes the reference's logits."""
    name, hf, tmp = arch
    model = ParScaleForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float64)
    model.save_pretrained(tmp / "ours")
    c = json.loads((tmp / "ours" / "config.json").read_text())
    W = load_file(tmp / "ours" / "model.safetensors")
    ids = torch.arange(20)[None] % 67
    ref = reference_logits(W, c, ids)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    if name == "llama":
        plain = reference_logits(W, dict(c, rope_scaling=None), ids)
        assert not torch.allclose(plain, ref, atol=1e-4)
    if name == "qwen3":
        W2 = dict(W)
        for k in W2:
            if k.endswith("q_norm.weight"):
                W2[k] = torch.ones_like(W2[k])
        assert not torch.allclose(reference_logits(W2, c, ids), ref, atol=1e-4)


def test_rope_scaling_validated_on_construction():
    base = dict(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    assert ParScaleConfig(**base, rope_scaling=dict(LLAMA3, factor=8)).rope_scaling["factor"] == 8.0
    bad = [({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not supported"),
           (dict(LLAMA3, factor=-1), "'factor' must be a positive number"),
           (dict(LLAMA3, high_freq_factor=0.5), "'high_freq_factor' must be greater"),
           (dict(LLAMA3, extra=1), "unknown key"),
           ({k: v for k, v in LLAMA3.items() if k != "factor"}, "'factor' must be a positive number"),
           ("llama3", "must be null or an object")]
    for rs, msg in bad:
        with pytest.raises(ParScaleError, match=f"config field 'rope_scaling': .*{msg}"):
            ParScaleConfig(**base, rope_scaling=rs)
    with pytest.raises(ParScaleError, match="config field 'qk_norm'"):
        ParScaleConfig(**base, qk_norm="yes")


def test_hf_config_dicts_of_both_transformers_generations():
    llama31 = {"model_type": "llama", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 8,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
               "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "rope_type": "llama3",
                                                        "original_max_position_embeddings": 8192}}
    v4 = config_from_hf_dict(llama31)
    v5 = dict(llama31, rope_parameters=dict(llama31.pop("rope_scaling"), rope_theta=500000.0))
    assert config_from_hf_dict(v5) == v4 and v4.rope_theta == 500000.0
    assert v4.rope_scaling["original_max_position_embeddings"] == 8192
    with pytest.raises(ParScaleError, match="rope_type 'dynamic' is not supported"):
        config_from_hf_dict(dict(v5, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    q3 = config_from_hf_dict({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 2,
                              "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 11,
                              "intermediate_size": 8})
    assert q3.qk_norm and q3.head_dim == 128 and not q3.attention_bias  # Qwen3Config's defaults


def test_cost_model_counts_the_switches(arch):
    from parscale.cost import param_counts

    name, hf, tmp = arch
    model = ParScaleForCausalLM.from_pretrained(tmp / "hf")
    assert param_counts(model.config).total == model.num_parameters() == hf.num_parameters()
