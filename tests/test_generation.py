"""The decode loop and HF-style generate(): greedy, sampling, padding, sharing, compaction."""

import pytest
import torch

from parscale import ParScaleError, ParScaleForCausalLM
from parscale.generation import decode, filter_logits


@pytest.fixture(params=[1, 3])
def model(request, tiny_config):
    torch.manual_seed(request.param)
    m = ParScaleForCausalLM(tiny_config(P=request.param)).double().eval()
    with torch.no_grad():  # sharper, non-uniform distributions so sampling differs from greedy
        m.model.embed_tokens.weight.mul_(4)
        if m.stream_set is not None:
            m.stream_set.aggregate_layer[2].weight.normal_()
    return m


def naive_greedy(model, ids, n):
    """Greedy decoding by re-running the full forward each step (no cache)."""
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_greedy_equals_full_forward_loop(model):
    ids = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=6)
    assert torch.equal(out, naive_greedy(model, ids, 6))
    assert torch.equal(out[:, :5], ids)  # prompt first, like HF


def test_left_padded_generation_equals_rows_alone(model):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 53, (1, 3), generator=g), torch.randint(0, 53, (1, 6), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(out[0, 6:], model.generate(a, max_new_tokens=5)[0, 3:])
    assert torch.equal(out[1, 6:], model.generate(b, max_new_tokens=5)[0, 6:])


def test_right_padding_is_refused(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ParScaleError, match="left-padded"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 0]]), max_new_tokens=2)


def test_eos_stops_a_row_and_pads(model):
    ids = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(2))
    free = model.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])  # row 0's third new token
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=52, return_dict=True)
    seq = out.sequences
    first = (free[0, 4:] == eos).nonzero()[0, 0].item()
    assert seq[0, 4 + first] == eos and (seq[0, 5 + first:] == 52).all()
    assert out.result.finish_reason[0] == "eos"


def test_seeded_sampling_is_reproducible_and_top_k1_is_greedy(model):
    ids = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(3))
    a = model.generate(ids, max_new_tokens=8, do_sample=True, seed=7)
    assert torch.equal(a, model.generate(ids, max_new_tokens=8, do_sample=True, seed=7))
    assert not torch.equal(a, model.generate(ids, max_new_tokens=8, do_sample=True, seed=8))
    greedy = model.generate(ids, max_new_tokens=8)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=1), greedy)


def test_logprobs_are_the_models_own(model):
    ids = torch.randint(0, 53, (1, 4), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, max_new_tokens=5, do_sample=True, seed=3, return_dict=True)
    seq = out.sequences
    logp = torch.log_softmax(model(seq).logits.float(), -1)
    expect = logp[0, 3:-1].gather(-1, seq[0, 4:, None]).flatten()
    torch.testing.assert_close(out.logprobs[0], expect, rtol=1e-5, atol=1e-5)


def test_shared_prompt_rows_equal_rows_run_alone(model):
    ids = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(5))
    seeds = [11, 12, 13, 21, 22, 23]
    temps = [1.0, 0.7, 0.0, 1.3, 1.0, 0.5]
    shared = decode(model, ids, max_new_tokens=7, num_samples=3, temperature=temps, top_p=0.9,
                    seeds=seeds, return_logprobs=True)
    assert shared.prompt_index == [0, 0, 0, 1, 1, 1]
    assert shared.prefill_tokens == 10  # each prompt counted once
    for r in range(6):
        alone = decode(model, ids[r // 3: r // 3 + 1], max_new_tokens=7, temperature=[temps[r]],
                       top_p=0.9, seeds=[seeds[r]], return_logprobs=True)
        assert alone.tokens[0] == shared.tokens[r]
        assert alone.logprobs[0] == pytest.approx(shared.logprobs[r], abs=1e-9)


def test_compaction_saves_work_without_changing_samples(model):
    ids = torch.randint(0, 53, (1, 4), generator=torch.Generator().manual_seed(6))
    seeds = list(range(8))
    first = decode(model, ids, max_new_tokens=10, num_samples=8, temperature=1.0, seeds=seeds)
    eos = first.tokens[0][1]  # some rows will hit this token early
    kw = dict(max_new_tokens=10, num_samples=8, temperature=1.0, seeds=seeds, eos_token_id=eos)
    packed = decode(model, ids, compact=True, **kw)
    loose = decode(model, ids, compact=False, **kw)
    assert packed.tokens == loose.tokens and packed.finish_reason == loose.finish_reason
    assert "eos" in packed.finish_reason
    assert packed.decode_steps == loose.decode_steps
    assert packed.row_steps < loose.row_steps == 8 * loose.decode_steps


def test_on_finish_can_prune_rows(model):
    ids = torch.randint(0, 53, (1, 4), generator=torch.Generator().manual_seed(7))
    res = decode(model, ids, max_new_tokens=10, num_samples=4, temperature=1.0, seeds=[1, 2, 3, 4],
                 stop=lambda row, toks: row == 0 and len(toks) == 2,
                 on_finish=lambda row, toks, why, step: [1, 2, 3] if row == 0 else None)
    assert res.finish_reason == ["stop", "pruned", "pruned", "pruned"]
    assert len(res.tokens[0]) == 2 and res.decode_steps == 1


def test_filter_logits_top_p_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    probs = filter_logits(logits, torch.ones(2), torch.tensor([0, 1]), torch.tensor([0.7, 1.0]))
    torch.testing.assert_close(probs[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(probs[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_bad_sampling_arguments(model):
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ParScaleError, match="top_p"):
        decode(model, ids, max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ParScaleError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ParScaleError, match="seeds has 1 entries for 2 rows"):
        decode(model, ids, max_new_tokens=2, num_samples=2, temperature=1.0, seeds=[1])


def test_logits_processor_and_on_token_hooks(model):
    ids = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(3))
    plain = decode(model, ids, max_new_tokens=5, return_logprobs=True)
    banned = plain.tokens[0][0]
    seen = []

    def ban(logits, rows, toks):  # forbid the token greedy picked first for row 0
        assert logits.shape[0] == len(rows) == len(toks)
        assert all(len(t) == len(toks[0]) for t in toks)
        return logits.index_fill(-1, torch.tensor([banned]), float("-inf"))

    res = decode(model, ids, max_new_tokens=5, logits_processor=ban, return_logprobs=True,
                 on_token=lambda row, tok: seen.append((row, tok)))
    assert all(banned not in row for row in res.tokens)
    assert sorted(seen) == sorted((r, t) for r, row in enumerate(res.tokens) for t in row)
    # log-probs are those of the unmodified distribution: the first step's choice under the
    # unprocessed logits matches a plain forward
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[:, -1].float(), -1)
    for r in range(2):
        assert abs(res.logprobs[r][0] - float(lp[r, res.tokens[r][0]])) < 1e-6
