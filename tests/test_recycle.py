"""Recycling: snippet-initialised stream sets equal the base model reading the snippet first; the
prefix-only P = 1 set (the fair control); zero q/k/v biases on export of bias-free backbones."""

import json

import pytest
import torch

from parscale import ParScaleConfig, ParScaleError, ParScaleForCausalLM
from parscale.recycle import backbone_kv, sample_snippets, snippet_prefixes, snippets_from_tokens


def tiny(**kw) -> ParScaleForCausalLM:
    cfg = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, prefix_tokens=5, attention_bias=False, bos_token_id=3)
    cfg.update(kw)
    torch.manual_seed(0)
    model = ParScaleForCausalLM(ParScaleConfig(**cfg)).double()
    with torch.no_grad():  # a "trained" backbone: weights large enough that attention is peaked
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def pick_stream(model, p: int) -> None:
    """Make the aggregator put all weight on stream ``p`` (ε = 0, a huge bias)."""
    s = model.stream_set
    s.smoothing = 0.0
    with torch.no_grad():
        s.aggregate_layer[2].bias.fill_(-1e9)
        s.aggregate_layer[2].bias[p] = 0.0


@pytest.mark.parametrize("P", [2, 3])
def test_each_stream_is_the_base_model_reading_its_snippet_first(P):
    model = tiny()
    snips = torch.randint(0, 61, (P, 5), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    model.add_stream_set(P, snippets=snips)
    for p in range(P):
        pick_stream(model, p)
        with torch.no_grad():
            got = model(x).logits
            model.set_streams(1)
            want = model(torch.cat([snips[p].expand(2, 5), x], 1)).logits[:, 5:]  # snippet, then x
            model.set_streams(P)
        # float64 model; RoPE angles are float32 (as in HF), rotated to -T..-1 vs T..: ~1e-7
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - model.set_streams(1)(x).logits).abs().max() > 1e-3  # the snippet matters
        model.set_streams(P)


def test_identical_snippets_with_a_uniform_aggregator_equal_one_prefixed_stream():
    model = tiny()
    snip = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    model.add_stream_set(1, snippets=snip)  # the prefix-only control
    one = model(x).logits
    model.add_stream_set(3, snippets=snip.expand(3, 5))  # aggregator starts exactly uniform
    # weights are float32 (1/3 rounds): 3e-8 relative in a float64 model
    torch.testing.assert_close(model(x).logits, one, rtol=1e-6, atol=1e-6)


def test_rope_modes_and_sampled_snippets():
    model = tiny()
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    k_pre, v_pre = backbone_kv(model, ids, rope="none")
    k_prep, v_prep = backbone_kv(model, ids, rope="prepend")
    assert k_pre.shape == (2, 2, 2, 5, 8) and torch.equal(v_pre, v_prep)  # l r h t d; values unrotated
    assert not torch.allclose(k_pre, k_prep)
    # the norm of each key is unchanged by the rotation
    torch.testing.assert_close(k_pre.norm(dim=-1), k_prep.norm(dim=-1))
    s1, s2 = sample_snippets(model, 3, 6), sample_snippets(model, 3, 6)
    assert s1.shape == (3, 6) and torch.equal(s1, s2) and bool((s1[:, 0] == 3).all())  # seeded, from BOS
    k, v = snippet_prefixes(model, 3)  # no snippets: sampled from the model
    assert k.shape == (2, 3, 2, 5, 8)
    with pytest.raises(ParScaleError, match="rope mode"):
        backbone_kv(model, ids, rope="sideways")


def test_bad_snippets_and_init_are_one_line_errors():
    model = tiny()
    with pytest.raises(ParScaleError, match=r"shape \(P, prefix_tokens\) = \(2, 5\)"):
        model.add_stream_set(2, snippets=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ParScaleError, match="outside"):
        model.add_stream_set(2, snippets=torch.full((2, 5), 61))
    with pytest.raises(ParScaleError, match="integer token ids"):
        model.add_stream_set(2, snippets=torch.zeros(2, 5))
    with pytest.raises(ParScaleError, match="unknown stream-set init"):
        model.add_stream_set(2, init="zeros")
    with pytest.raises(ParScaleError, match="need 10 tokens"):
        snippets_from_tokens(torch.zeros(3, 3, dtype=torch.long), 2, 5)
    assert "2" not in model.stream_sets  # nothing half-added


def test_random_init_is_the_from_scratch_init():
    model = tiny()
    torch.manual_seed(5)
    s = model.add_stream_set(2, init="random", std=0.01)
    assert 0.005 < float(s.prefix_k.detach().std()) < 0.015
    assert float(s.aggregate_layer[2].weight.detach().abs().sum()) == 0


def test_missing_stream_set_error_points_to_recycling(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ParScaleError, match=r"add_stream_set\(2\).*--init-from DIR --streams 2"):
        ParScaleForCausalLM.from_pretrained(tmp_path / "m", streams=2)


# --------------------------------------------------------------------------- the prefix-only control
def test_prefix_only_set_round_trips_and_plain_p1_is_untouched(tmp_path):
    plain = tiny()
    x = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    base_logits = plain(x).logits
    model = tiny().float()  # the loader builds float32 models
    s = model.add_stream_set(1, snippets=torch.arange(5)[None])
    assert s.aggregate_layer is None and model.config.prefix_only and model.streams == 1
    assert model.num_parameters() == plain.num_parameters() + 2 * s.prefix_k.numel()
    got = model(x)
    assert got.agg_weights is None and not torch.allclose(got.logits.double(), base_logits)
    model.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["parscale_n"] == 1 and raw["parscale_prefix_only"] is True
    back = ParScaleForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.prefix_only and torch.equal(back(x).logits, got.logits)
    # a config without the flag keeps P = 1 the plain backbone, exactly
    assert ParScaleConfig().prefix_only is False and plain.stream_set is None


def test_prefix_only_decode_with_cache_equals_full_forward():
    model = tiny()
    model.add_stream_set(1, snippets=torch.arange(5)[None])
    x = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    full = model(x).logits
    cache = model.new_cache(2, 8)
    steps = [model(x[:, :3], cache=cache).logits] + [model(x[:, i:i + 1], cache=cache).logits for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_prefix_only_config_validation():
    with pytest.raises(ParScaleError, match="'prefix_only'"):
        ParScaleConfig(prefix_only="yes")
    with pytest.raises(ParScaleError, match="'prefix_tokens'"):
        ParScaleConfig(prefix_only=True, prefix_tokens=0)
    assert ParScaleConfig(prefix_only=True, streams=2, stream_sets=[2]).stream_sets == [1, 2]


# --------------------------------------------------------------------------- export of bias-free backbones
def test_bias_free_backbone_exports_zero_biases_and_loads_back_bias_free(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny().float()
    model.add_stream_set(2, snippets=torch.arange(10).view(2, 5))
    model.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["attention_bias"] is True and raw["parscale_zero_attention_bias"] is True
    W = load_file(str(tmp_path / "m" / "model.safetensors"))
    for i in range(2):
        for x, n in (("q", 32), ("k", 16), ("v", 16)):
            b = W[f"model.layers.{i}.self_attn.{x}_proj.bias"]
            assert b.shape == (n,) and not bool(b.any())
    back = ParScaleForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.attention_bias is False and back.model.layers[0].self_attn.q_proj.bias is None
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(back(ids).logits, model(ids).logits)
    back.save_pretrained(tmp_path / "again")  # and the second round trip writes the same files
    assert load_file(str(tmp_path / "again" / "model.safetensors")).keys() == W.keys()

    # biases someone trained since (the official code trains them) are kept
    W["model.layers.1.self_attn.k_proj.bias"] = torch.full((16,), 0.5, dtype=W["model.embed_tokens.weight"].dtype)
    save_file(W, str(tmp_path / "m" / "model.safetensors"))
    trained = ParScaleForCausalLM.from_pretrained(tmp_path / "m")
    assert trained.config.attention_bias is True
    assert torch.equal(trained.model.layers[1].self_attn.k_proj.bias, W["model.layers.1.self_attn.k_proj.bias"])


def test_zero_bias_export_loads_in_transformers_qwen2_as_the_same_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny(tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    # the official class is Qwen2 + prefixes; at P = 1 it is exactly Qwen2 (q/k/v biases required)
    raw.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- reproduce --baseline prefix
def test_reproduce_baseline_prefix_runs_beside_every_p(tmp_path, monkeypatch):
    import dataclasses

    from conftest import write_corpus

    from parscale.reproduce import PRESETS, plan_runs, reproduce

    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "cache"))
    micro = PRESETS["micro"]
    preset = dataclasses.replace(micro, streams=(1, 2), two_stage=None, bootstrap=0)  # 2 sizes: 4 points
    plan = plan_runs(preset, tmp_path / "r", baseline="prefix")
    assert [(r.name, r.experiment, r.config.prefix_only) for r in plan] == [
        ("xxs-p1", "grid", False), ("xxs-p2", "grid", False), ("xxs-p1-prefix", "baseline", True),
        ("xs-p1", "grid", False), ("xs-p2", "grid", False), ("xs-p1-prefix", "baseline", True)]
    with pytest.raises(ParScaleError, match="unknown baseline"):
        plan_runs(preset, tmp_path / "r", baseline="lora")

    res = reproduce(preset, tmp_path / "r", data=str(write_corpus(tmp_path / "corpus")), threads=1,
                    progress=False, baseline="prefix")
    results = json.loads(res.results_path.read_text())
    assert [r["name"] for r in results["runs"]] == ["xxs-p1", "xxs-p2", "xs-p1", "xs-p2"]  # the fit's grid
    ctrl = results["baseline_prefix"][0]
    assert ctrl["P"] == 1 and ctrl["params"] > results["runs"][0]["params"]  # the prefix counts in N
    report = res.report_path.read_text()
    assert "P = 1 + one learned prefix" in report and "| xxs-p2 | 2 |" in report
    assert any("fair control" in c for c in results["conclusions"])
    model = ParScaleForCausalLM.from_pretrained(tmp_path / "r" / "runs" / "xxs-p1-prefix" / "model")
    assert model.config.prefix_only and model.stream_set.aggregate_layer is None
