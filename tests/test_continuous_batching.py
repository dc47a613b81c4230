"""Continuous batching: KV caches of different lengths joined into one batch, and the step-wise
Decoder that rows join and leave at any step. Invariant throughout: a row's logits and tokens are
those it gets alone (float64: to ~1e-12; float32: the same tokens)."""

import pytest
import torch

from parscale import ParScaleError, ParScaleForCausalLM
from parscale.cache import KVCache
from parscale.generation import Decoder, decode

V = 53


def _model(tiny_config, P, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = ParScaleForCausalLM(tiny_config(P=P, **kw)).to(dtype).eval()
    with torch.no_grad():  # sharper, non-uniform distributions so sampling differs from greedy
        m.model.embed_tokens.weight.mul_(4)
        for s in m.stream_sets.values():
            s.aggregate_layer[2].weight.normal_()
    return m


@pytest.fixture(params=[1, 3])
def model(request, tiny_config):
    return _model(tiny_config, request.param)


def _prompt(seed, n):
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


def _continue(model, cache, tokens):
    """Feed ``tokens`` (``b t``) one step at a time; the logits of each step, ``b t v``."""
    out = []
    for t in range(tokens.shape[1]):
        out.append(model(tokens[:, t: t + 1], cache=cache).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("P", [1, 3])
@torch.no_grad()
def test_concat_right_aligns_rows_and_keeps_their_logits(tiny_config, P, dtype, tol):
    model = _model(tiny_config, P, dtype=dtype)
    a, b = _prompt(1, 3), _prompt(2, 7)
    feed = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(3))
    alone = []
    for p, f in [(a, feed[:1]), (b, feed[1:])]:
        c = model.new_cache(1, p.shape[1] + 8)
        model(p, cache=c)
        alone.append(_continue(model, c, f))
    # a is prefilled and advanced two steps before b exists; then both share one cache
    ca = model.new_cache(1, 3 + 2)
    model(a, cache=ca)
    first = _continue(model, ca, feed[:1, :2])
    cb = model.new_cache(1, 7 + 8)
    model(b, cache=cb)
    joined = KVCache.concat([ca, cb])
    assert joined.length == 7 and joined.batch == 2
    assert joined.capacity >= 7 + 8 - 7  # b keeps its room
    assert joined.key_valid[0].tolist()[:7] == [False, False, True, True, True, True, True]
    assert joined.next_pos.tolist() == [5, 7]
    rest = _continue(model, joined, torch.stack([feed[0, 2:4], feed[1, :2]]))
    torch.testing.assert_close(torch.cat([first, rest[:1]], 1), alone[0], rtol=0, atol=tol)
    torch.testing.assert_close(rest[1:], alone[1][:, :2], rtol=0, atol=tol)
    assert (rest[0].argmax(-1) == alone[0][0, 2:].argmax(-1)).all()


@torch.no_grad()
def test_concat_interleaves_streams(tiny_config):
    # stream-major rows: stream p of sample i is row p·B + i, in the inputs and in the result
    model = _model(tiny_config, 3)
    caches = [model.new_cache(n, 6) for n in (2, 1)]
    for c, n in zip(caches, (2, 1)):
        model(torch.randint(0, V, (n, 2 + n)), cache=c)
    joined = KVCache.concat(caches)
    t = model.config.prefix_tokens
    for layer in range(len(joined.k)):
        got = joined.k[layer].view(3, 3, *joined.k[layer].shape[1:])  # (p b) h n d -> p b h n d
        first = caches[0].k[layer].view(3, 2, *caches[0].k[layer].shape[1:])
        for p in range(3):
            assert torch.equal(got[p, :2, :, t: t + 4], first[p, :, :, t: t + 4])
            assert torch.equal(got[p, 2, :, t + 1: t + 4], caches[1].k[layer][p, :, t: t + 3])
            assert torch.equal(got[p, :, :, :t], caches[0].k[layer][p * 2: p * 2 + 1, :, :t].expand(3, -1, -1, -1))


@torch.no_grad()
def test_trim_drops_unused_leading_slots_without_changing_logits(model):
    short, long = _prompt(4, 2), _prompt(5, 9)
    c = model.new_cache(1, 2 + 6)
    model(short, cache=c)
    cl = model.new_cache(1, 9 + 6)
    model(long, cache=cl)
    joined = KVCache.concat([c, cl])
    feed = torch.randint(0, V, (1, 3), generator=torch.Generator().manual_seed(6))
    ref = model.new_cache(1, 2 + 6)
    model(short, cache=ref)
    expect = _continue(model, ref, feed)
    joined.select([0])  # the long row leaves: 7 leading slots are now nobody's
    assert joined.trim() == 7 and joined.length == 2 and bool(joined.key_valid[:, :2].all())
    assert joined.trim() == 0
    torch.testing.assert_close(_continue(model, joined, feed), expect, rtol=0, atol=1e-12)


@torch.no_grad()
def test_dense_flag_tracks_padding_so_steps_need_no_mask_check(model):
    """``dense`` (no padding slot anywhere: attention runs unmasked) is kept on the host; it must be
    False exactly when some row has a padding slot, or padded rows would attend to garbage."""
    c = model.new_cache(2, 8)
    model(_prompt(1, 3).repeat(2, 1), cache=c)
    assert c.dense and c.advance_positions(None, 0)[1] is None
    padded = model.new_cache(2, 8)
    model(_prompt(1, 3).repeat(2, 1), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), cache=padded)
    assert not padded.dense and padded.advance_positions(None, 0)[1] is not None
    a, b = model.new_cache(1, 6), model.new_cache(1, 6)
    model(_prompt(2, 2), cache=a)
    model(_prompt(3, 4), cache=b)
    assert not KVCache.concat([a, b]).dense  # the short row is left-padded
    b2 = model.new_cache(1, 6)
    model(_prompt(4, 2), cache=b2)
    assert KVCache.concat([a, b2]).dense  # same lengths, no padding
    # an unmasked row decoded inside a padded batch equals it alone
    joined, alone = KVCache.concat([a, b]), model.new_cache(1, 6)
    model(_prompt(2, 2), cache=alone)
    feed = _prompt(5, 2)
    torch.testing.assert_close(_continue(model, joined, feed.repeat(2, 1))[:1], _continue(model, alone, feed),
                               rtol=0, atol=1e-12)


def test_concat_refuses_mismatched_caches(tiny_config):
    a = _model(tiny_config, 1).new_cache(1, 4)
    b = _model(tiny_config, 3).new_cache(1, 4)
    with pytest.raises(ParScaleError, match="differ"):
        KVCache.concat([a, b])
    with pytest.raises(ParScaleError, match="capacity"):
        a.length = 3
        KVCache.concat([a], capacity=2)


def _staggered(model, requests, *, streams=None):
    """Run ``requests`` (prompt, settings, join step) through one Decoder; tokens per request."""
    dec = Decoder(model, streams=streams)
    rows, out, step = {}, {}, 0
    while len(out) < len(requests):
        for i, (p, kw, at) in enumerate(requests):
            if at == step:
                rows[dec.add(p, **kw)[0]] = i
        for r in dec.step():
            row = dec.rows[r]
            if row.reason is not None:
                out[rows[r]] = (row.tokens, row.logprobs, row.reason)
                dec.release(r)
        step += 1
    assert len(dec) == 0 and not dec.rows  # nothing leaked
    return [out[i] for i in range(len(requests))]


def _sixteen(seed, sampled):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(16):
        p = torch.randint(0, V, (1, int(torch.randint(1, 12, (1,), generator=g))), generator=g)
        kw = dict(max_new_tokens=int(torch.randint(3, 12, (1,), generator=g)))
        if sampled:
            kw.update(temperature=0.9, top_p=0.95, seeds=[1000 + i])
        reqs.append((p, kw, int(torch.randint(0, 8, (1,), generator=g))))
    return reqs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("P", [1, 3])
def test_request_beside_15_others_equals_it_alone(tiny_config, P, sampled, dtype):
    model = _model(tiny_config, P, dtype=dtype)
    reqs = _sixteen(P + 10 * sampled, sampled)
    batched = _staggered(model, reqs)
    for (p, kw, _), (toks, lps, why) in zip(reqs, batched):
        seeds = kw.get("seeds")
        alone = decode(model, p, max_new_tokens=kw["max_new_tokens"], temperature=kw.get("temperature", 0.0),
                       top_p=kw.get("top_p"), seeds=seeds, return_logprobs=True)
        assert alone.tokens[0] == toks and why == "length"
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert alone.logprobs[0] == pytest.approx(lps, abs=tol)


def test_eos_and_stop_end_rows_per_row_settings(model):
    p = _prompt(7, 4)
    free = decode(model, p, max_new_tokens=6).tokens[0]
    dec = Decoder(model, stop=lambda row, toks: row == 1 and len(toks) == 2)
    a = dec.add(p, max_new_tokens=6, eos_token_id=free[2])[0]  # EOS for this row only
    b = dec.add(p, max_new_tokens=6)[0]
    c = dec.add(p, max_new_tokens=6)[0]
    while dec.live:
        dec.step()
    assert (dec.rows[a].reason, dec.rows[a].tokens) == ("eos", free[: free.index(free[2]) + 1])
    assert (dec.rows[b].reason, dec.rows[b].tokens) == ("stop", free[:2])
    assert (dec.rows[c].reason, dec.rows[c].tokens) == ("length", free)


def test_cancel_frees_the_row_at_the_next_step(model):
    dec = Decoder(model)
    keep = dec.add(_prompt(8, 5), max_new_tokens=10)[0]
    gone = dec.add(_prompt(9, 3), max_new_tokens=10)[0]
    dec.step()
    assert len(dec) == 2
    dec.cancel(gone)
    with pytest.raises(ParScaleError, match="still in the batch"):
        dec.release(gone)
    assert gone in dec.step()
    assert len(dec) == 1 and dec.running == [keep] and dec.cache.batch == 1
    assert dec.release(gone).reason == "cancelled"
    while dec.live:
        dec.step()
    assert dec.rows[keep].tokens == decode(model, _prompt(8, 5), max_new_tokens=10).tokens[0]


def test_top_logprobs_are_the_most_likely_tokens(model):
    p = _prompt(10, 4)
    dec = Decoder(model)
    r = dec.add(p, max_new_tokens=3, top_logprobs=4)[0]
    while dec.live:
        dec.step()
    row = dec.rows[r]
    with torch.no_grad():
        lp = torch.log_softmax(model(p).logits[0, -1].float(), -1)
    vals, ids = lp.topk(4)
    assert [t for t, _ in row.top[0]] == ids.tolist()
    assert [v for _, v in row.top[0]] == pytest.approx(vals.tolist(), abs=1e-6)
    assert row.top[0][0][0] == row.tokens[0] and len(row.top) == 3  # greedy picks the top one


def test_one_decoder_per_stream_set_on_one_model(tiny_config):
    # dynamic P: decoders for P = 1 and P = 3 step in turn on one model; each row equals its P alone
    model = _model(tiny_config, 3, stream_sets=[1, 2, 3])
    p = _prompt(11, 5)
    decs = {P: Decoder(model, streams=P) for P in (1, 2, 3)}
    rows = {P: d.add(p, max_new_tokens=6, temperature=1.0, seeds=[5])[0] for P, d in decs.items()}
    while any(d.live for d in decs.values()):
        for d in decs.values():
            d.step()
    assert model.streams == 3  # restored
    for P, d in decs.items():
        model.set_streams(P)
        alone = decode(model, p, max_new_tokens=6, temperature=1.0, seeds=[5], return_logprobs=True)
        assert d.rows[rows[P]].tokens == alone.tokens[0]
        assert d.rows[rows[P]].logprobs == pytest.approx(alone.logprobs[0], abs=1e-12)
    model.set_streams(3)
    assert len({tuple(d.rows[rows[P]].logprobs) for P, d in decs.items()}) == 3  # the P's differ


def test_a_failing_forward_ends_the_batch_and_the_decoder_recovers(model):
    dec = Decoder(model)
    dec.add(_prompt(12, 4), max_new_tokens=5)
    dec.step()
    boom = model.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            dec.step()
    finally:
        boom.remove()
    assert [r.reason for r in dec.rows.values()] == ["error"] and len(dec) == 0
    r = dec.add(_prompt(13, 4), max_new_tokens=5)[0]
    while dec.live:
        dec.step()
    assert dec.rows[r].tokens == decode(model, _prompt(13, 4), max_new_tokens=5).tokens[0]


def test_a_failing_prefill_changes_nothing(model):
    dec = Decoder(model)
    keep = dec.add(_prompt(14, 4), max_new_tokens=5)[0]
    dec.step()
    boom = model.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError):
            dec.add(_prompt(15, 4), max_new_tokens=5)
    finally:
        boom.remove()
    assert len(dec) == 1
    while dec.live:
        dec.step()
    assert dec.rows[keep].tokens == decode(model, _prompt(14, 4), max_new_tokens=5).tokens[0]


def test_one_add_with_per_row_budgets_equals_rows_alone(model):
    # several requests prefilled in one left-padded forward, each with its own budget and settings
    prompts = [_prompt(20 + i, n) for i, n in enumerate((2, 6, 4))]
    width = 6
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[1]:], mask[b, width - p.shape[1]:] = p[0], 1
    budgets, temps, seeds, tops = [3, 7, 5], [0.0, 1.0, 0.8], [None, 4, 9], [0, 2, 1]
    dec = Decoder(model)
    rows = dec.add(ids, mask, max_new_tokens=budgets, temperature=temps, seeds=seeds, top_logprobs=tops)
    while dec.live:
        dec.step()
    for b, r in enumerate(rows):
        alone = decode(model, prompts[b], max_new_tokens=budgets[b], temperature=[temps[b]],
                       seeds=None if seeds[b] is None else [seeds[b]], return_logprobs=True)
        row = dec.rows[r]
        assert row.tokens == alone.tokens[0] and len(row.tokens) == budgets[b]
        assert row.logprobs == pytest.approx(alone.logprobs[0], abs=1e-10)
        assert [len(t) for t in row.top] == ([tops[b]] * budgets[b] if tops[b] else [])
    with pytest.raises(ParScaleError, match="max_new_tokens has 2 entries for 3 rows"):
        dec.add(ids, mask, max_new_tokens=[1, 2])


def test_a_decode_steps_positions_and_validity_are_the_general_paths():
    """advance_positions' one-token, no-mask shortcut gives what the general path gives (with a mask
    of ones), after a left-padded prefill and across steps."""
    from parscale.cache import KVCache

    fast, general = (KVCache(1, 2, 1, 1, 4, capacity=9) for _ in range(2))
    prompt = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    for c in (fast, general):
        c.advance_positions(prompt, 4)
        c.length += 4
    for _ in range(3):
        pf, vf = fast.advance_positions(None, 1)
        pg, vg = general.advance_positions(torch.ones(2, 1, dtype=torch.long), 1)
        fast.length += 1
        general.length += 1
        assert torch.equal(pf, pg) and pf.dtype == pg.dtype and torch.equal(vf, vg)
        assert torch.equal(fast.next_pos, general.next_pos) and torch.equal(fast.key_valid, general.key_valid)
