"""The model's forward pass: reference parity, P = 1 invariants, cache, padding, gradients."""

import pytest
import torch
from conftest import official_config, official_tensors, write_checkpoint
from reference import reference_logits

from parscale import ParScaleConfig, ParScaleError, ParScaleForCausalLM
from parscale.model import build_mask

# RoPE tables are float32 like HF's (even for a float64 model): ~1e-7 absolute noise vs the float64 reference.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=[1, 2, 3])
def official(request, tmp_path):
    c = official_config(P=request.param, tie=request.param == 2)
    W = official_tensors(c, seed=request.param)
    model = ParScaleForCausalLM.from_pretrained(write_checkpoint(tmp_path / "ckpt", c, W), dtype=torch.float64)
    return c, W, model


def test_fast_path_equals_naive_reference(official):
    c, W, model = official
    ids = torch.randint(0, c["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(W, c, ids)
    out = model(ids).logits
    torch.testing.assert_close(out, ref, **TOL)


def test_left_padded_rows_equal_rows_alone(official):
    c, W, model = official
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, c["vocab_size"], (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    out = model(ids, attention_mask=mask).logits
    for b in range(3):
        real = mask[b].bool()
        alone = model(ids[b:b + 1, real]).logits[0]
        torch.testing.assert_close(out[b, real], alone, **TOL)
    torch.testing.assert_close(out * mask[..., None], reference_logits(W, c, ids, mask), **TOL)


def test_incremental_decode_equals_full_forward(official):
    c, W, model = official
    ids = torch.randint(0, c["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    full = model(ids, attention_mask=mask).logits
    cache = model.new_cache(2, 12)
    chunks = [model(ids[:, a:b], attention_mask=mask[:, a:b], cache=cache).logits
              for a, b in [(0, 4), (4, 5), (5, 6), (6, 9)]]
    inc = torch.cat(chunks, dim=1)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], **TOL)


def test_p1_is_exactly_the_plain_backbone(tiny_config):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=4, stream_sets=[1, 4])).double()
    ids = torch.randint(0, 53, (2, 5))
    model.set_streams(1)
    p1 = model(ids).logits
    assert model(ids).agg_weights is None
    plain = ParScaleForCausalLM(tiny_config(P=1)).double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("stream_sets.")})
    assert torch.equal(plain(ids).logits, p1)
    model.set_streams(4)
    assert not torch.allclose(model(ids).logits, p1)  # the streams do change the output



@pytest.mark.parametrize("tied", [True, False])
def test_same_seed_same_backbone_for_every_p(tiny_config, tied):
    # paired experiments: under one seed, P only adds a stream set; the backbone draws are unchanged
    def backbone(P):
        torch.manual_seed(7)
        m = ParScaleForCausalLM(tiny_config(P=P, stream_sets=sorted({1, P}), tie_word_embeddings=tied))
        return {k: v for k, v in m.state_dict().items() if not k.startswith("stream_sets.")}

    ref = backbone(1)
    for P in (2, 4):
        other = backbone(P)
        assert other.keys() == ref.keys()
        assert all(torch.equal(other[k], ref[k]) for k in ref)
    torch.manual_seed(8)
    different = ParScaleForCausalLM(tiny_config(P=1, tie_word_embeddings=tied)).state_dict()
    assert not torch.equal(different["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])

def test_stream_major_layout_and_weights(tiny_config):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=3)).double()
    with torch.no_grad():
        model.stream_set.aggregate_layer[2].weight.normal_()
    out = model(torch.randint(0, 53, (2, 4)))
    w = out.agg_weights
    assert w.shape == (2, 4, 3) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    eps = model.config.agg_smoothing
    assert (w >= eps / 3 - 1e-7).all()  # smoothing keeps every stream alive


def test_fresh_streams_start_as_mean_of_streams(tiny_config):
    """Initialisation: aggregator output layer zero → uniform weights; prefixes finite and distinct."""
    model = ParScaleForCausalLM(tiny_config(P=4))
    out = model(torch.randint(0, 53, (1, 6)))
    torch.testing.assert_close(out.agg_weights, torch.full((1, 6, 4), 0.25))
    pk = model.stream_set.prefix_k
    assert torch.isfinite(pk).all() and not torch.equal(pk[:, 0], pk[:, 1])


def test_gradients_reach_prefixes_and_aggregator(tiny_config):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=2))
    with torch.no_grad():  # a trained aggregator: non-zero output layer lets gradient reach layer 0
        model.stream_set.aggregate_layer[2].weight.normal_(std=0.1)
    ids = torch.randint(0, 53, (2, 6))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=3)).double()
    with torch.no_grad():
        model.stream_set.aggregate_layer[2].weight.normal_(std=0.1)
    ids = torch.randint(0, 53, (2, 6))
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-12, atol=1e-12)


def test_loss_is_mean_shifted_cross_entropy_ignoring_minus_100(tiny_config):
    model = ParScaleForCausalLM(tiny_config(P=2)).double()
    ids = torch.randint(0, 53, (2, 6))
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.float(), -1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_dynamic_streams(tiny_config):
    model = ParScaleForCausalLM(tiny_config(P=2, stream_sets=[2, 4]))
    assert sorted(model.stream_sets) == ["2", "4"]
    ids = torch.randint(0, 53, (1, 4))
    assert model.set_streams(4)(ids).agg_weights.shape[-1] == 4
    with pytest.raises(ParScaleError, match="no stream set for P=8"):
        model.set_streams(8)
    model.add_stream_set(8)
    assert model(ids).agg_weights.shape[-1] == 8 and model.config.stream_sets == [2, 4, 8]


@pytest.mark.parametrize("field,value,msg", [
    ("streams", 0, "streams"), ("num_key_value_heads", 3, "num_key_value_heads"),
    ("agg_smoothing", 1.5, "agg_smoothing"), ("hidden_size", 30, "hidden_size"),
    ("vocab_size", "10", "vocab_size"), ("eos_token_id", 99, "eos_token_id"),
])
def test_config_validation_names_the_field(field, value, msg):
    kw = dict(vocab_size=53, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    kw[field] = value
    with pytest.raises(ParScaleError, match=msg):
        ParScaleConfig(**kw)


def test_bad_input_shapes(tiny_config):
    model = ParScaleForCausalLM(tiny_config(P=2))
    with pytest.raises(ParScaleError, match="2-D"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ParScaleError, match="attention_mask shape"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_mask_builder_keeps_pad_queries_finite():
    mask, causal = build_mask(torch.tensor([[False, False, True]]), 0, 3, 2, torch.device("cpu"))
    assert not causal and mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].any(-1).all()  # every query row sees something
    assert mask[0, 0, :, :2].all()  # the prefix is visible to every query
    assert build_mask(None, 0, 4, 0, torch.device("cpu")) == (None, True)


def test_transformers_qwen2_parity_at_p1(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = transformers.Qwen2ForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = ParScaleForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)
