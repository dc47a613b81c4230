"""parscale.diagnostics.stream_usage: what a trained model's streams do."""

import math

import pytest
import torch
import torch.nn.functional as F

from parscale import ParScaleConfig, ParScaleError, ParScaleForCausalLM
from parscale.diagnostics import stream_usage


def tiny(streams: int, **kw) -> ParScaleForCausalLM:
    torch.manual_seed(0)
    cfg = ParScaleConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, streams=streams, prefix_tokens=3, **kw)
    model = ParScaleForCausalLM(cfg)
    with torch.no_grad():  # a non-uniform aggregator, as after training
        model.stream_set.aggregate_layer[2].weight.normal_(std=2.0)
    return model


def test_losses_weights_and_entropy_match_direct_computation():
    model = tiny(3)
    x, y = torch.randint(0, 50, (5, 7)), torch.randint(0, 50, (5, 7))
    u = stream_usage(model, x, y, batch_size=2)  # uneven batches: 2 + 2 + 1 rows
    with torch.no_grad():
        out = model(x)
    assert u.tokens == 35 and u.P == 3
    assert u.loss == pytest.approx(float(F.cross_entropy(out.logits.flatten(0, 1), y.flatten())), abs=1e-6)
    w = out.agg_weights.double()
    assert list(u.mean_weights) == pytest.approx(w.mean((0, 1)).tolist(), abs=1e-7)  # fp32 weights; batches of 2 vs 5 round differently
    ent = float(-(w * w.log()).sum(-1).mean()) / math.log(3)
    assert u.entropy_over_lnP == pytest.approx(ent, abs=1e-7) and 0 < u.entropy_over_lnP < 1
    assert u.share_peaked == pytest.approx(float((w.max(-1).values > 0.9).double().mean()))
    assert len(u.stream_losses) == 3 and u.best_single_stream_loss == min(u.stream_losses)
    assert u.combination_gain == pytest.approx(u.best_single_stream_loss - u.loss)
    d = u.to_dict()
    assert d["combination_gain"] == u.combination_gain and d["mean_weights"] == u.mean_weights


def test_uniform_aggregation_is_the_uniform_mean():
    model = tiny(2, agg_smoothing=1.0)  # ε = 1: weights are exactly 1/P whatever the MLP says
    x = torch.randint(0, 50, (3, 6))
    u = stream_usage(model, x, x)
    assert u.loss == pytest.approx(u.uniform_mean_loss, abs=1e-6)
    assert list(u.mean_weights) == pytest.approx([0.5, 0.5]) and u.entropy_over_lnP == pytest.approx(1.0)
    assert u.share_peaked == 0.0


def test_restores_mode_and_hooks_and_refuses_bad_input():
    model = tiny(2).train()
    x = torch.randint(0, 50, (2, 4))
    stream_usage(model, x, x)
    assert model.training and not model.model.norm._forward_hooks
    with pytest.raises(ParScaleError, match="same 2-D shape"):
        stream_usage(model, x, x[:, :3])
    model.set_streams(1)
    with pytest.raises(ParScaleError, match="P > 1"):
        stream_usage(model, x, x)


def test_stream_diversity_matches_direct_computation():
    model = tiny(3)
    with torch.no_grad():  # streams that really differ
        model.stream_set.prefix_k.normal_(std=1.0)
        model.stream_set.prefix_v.normal_(std=1.0)
    x, y = torch.randint(0, 50, (4, 6)), torch.randint(0, 50, (4, 6))
    u = stream_usage(model, x, y, batch_size=3)
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    with torch.no_grad():
        model(x)
    hook.remove()
    h = captured["h"].unflatten(0, (3, 4))
    logp = [F.log_softmax(model.lm_head(h[p]).double(), -1).detach() for p in range(3)]
    nll = torch.stack([-lp.gather(-1, y[..., None])[..., 0].flatten() for lp in logp])
    corr = torch.corrcoef(nll)
    rho = float((corr.sum() - corr.trace()) / 6)
    assert u.loss_correlation == pytest.approx(rho, abs=1e-6) and -1 <= rho < 1
    pairs = [(0, 1), (0, 2), (1, 2)]
    js = []
    for i, j in pairs:
        pi, pj = logp[i].exp(), logp[j].exp()
        m = (pi + pj) / 2
        js.append(float((0.5 * (pi * (pi / m).log()).sum(-1) + 0.5 * (pj * (pj / m).log()).sum(-1)).mean()))
    assert u.pairwise_js == pytest.approx(sum(js) / 3, rel=1e-4) and u.pairwise_js > 0
    assert u.to_dict()["loss_correlation"] == u.loss_correlation


def test_identical_streams_have_no_diversity():
    model = tiny(2)
    with torch.no_grad():  # every stream gets stream 0's prefix: P copies of one stream
        model.stream_set.prefix_k[:, 1] = model.stream_set.prefix_k[:, 0]
        model.stream_set.prefix_v[:, 1] = model.stream_set.prefix_v[:, 0]
    x = torch.randint(0, 50, (3, 5))
    u = stream_usage(model, x, x)
    assert u.loss_correlation == pytest.approx(1.0, abs=1e-6)
    assert u.pairwise_js == pytest.approx(0.0, abs=1e-7)
