"""generate()'s Hugging Face keyword arguments, each against an independent reference."""

import pytest
import torch

from parscale import ParScaleError, ParScaleForCausalLM, Tokenizer
from parscale.generation import RepetitionPenalty
from test_tokenizer import build_tokenizer


@pytest.fixture(params=[1, 2], ids=["P1", "P2"])
def model(request, tiny_config):
    torch.manual_seed(0)
    return ParScaleForCausalLM(tiny_config(P=request.param, vocab_size=320)).eval()


@pytest.fixture
def tok(tmp_path):
    return Tokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))


def reference(model, ids, steps, process=None, eos=()):
    """Greedy decoding by full forward passes; ``process(seq, logits, step)`` edits the logits."""
    seq = ids.clone()
    for step in range(steps):
        logits = model(seq).logits[:, -1].float()
        if process is not None:
            logits = process(seq, logits, step)
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        if int(nxt) in eos:
            break
    return seq


IDS = torch.tensor([[5, 17, 99, 3, 250, 41]])


def test_min_new_tokens_forbids_eos_before_n(model):
    free = model.generate(IDS, max_new_tokens=6)
    eos = int(free[0, IDS.shape[1]])  # the first greedy token: without the floor it ends the row at once
    out = model.generate(IDS, max_new_tokens=6, eos_token_id=eos, return_dict=True)
    assert out.result.tokens[0] == [eos]
    out = model.generate(IDS, max_new_tokens=6, min_new_tokens=3, eos_token_id=eos, return_dict=True)
    new = out.result.tokens[0]
    assert len(new) >= 3 and eos not in new[:3]

    def no_eos(seq, logits, step):
        if step < 3:
            logits[:, eos] = float("-inf")
        return logits

    assert new == reference(model, IDS, 6, no_eos, eos={eos})[0, IDS.shape[1]:].tolist()
    with pytest.raises(ParScaleError, match="min_new_tokens"):
        model.generate(IDS, max_new_tokens=2, min_new_tokens=3)


def test_repetition_penalty_equals_transformers():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50, (3, 7), generator=g)
    new = torch.randint(0, 50, (3, 4), generator=g)
    logits = torch.randn(3, 50, generator=g) * 3
    for penalty in (1.3, 0.7):
        theirs = transformers.RepetitionPenaltyLogitsProcessor(penalty)(torch.cat([prompts, new], 1), logits.clone())
        ours = RepetitionPenalty(penalty, prompts.tolist(), 1)(logits.clone(), [0, 1, 2], new.tolist())
        assert torch.equal(ours, theirs)


def test_repetition_penalty_in_generate(model):
    transformers = pytest.importorskip("transformers")
    proc = transformers.RepetitionPenaltyLogitsProcessor(5.0)
    out = model.generate(IDS, max_new_tokens=8, repetition_penalty=5.0, eos_token_id=[])
    assert torch.equal(out, reference(model, IDS, 8, lambda seq, lg, step: proc(seq, lg)))
    assert not torch.equal(out, model.generate(IDS, max_new_tokens=8, eos_token_id=[]))


def test_stop_strings_end_at_the_string(model, tok):
    prompt = torch.tensor([tok.encode("def add(a, b):")])
    full = model.generate(prompt, max_new_tokens=12, eos_token_id=[])[0, prompt.shape[1]:].tolist()
    text = tok.decode(full)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=[], stop_strings=[stop], tokenizer=tok,
                         return_dict=True)
    new = out.result.tokens[0]
    assert new == full[: len(new)] and out.result.finish_reason == ["stop"]
    assert stop in tok.decode(new) and stop not in tok.decode(new[:-1])
    with pytest.raises(ParScaleError, match="needs tokenizer"):
        model.generate(prompt, max_new_tokens=3, stop_strings=["x"])


def test_streamer_gets_every_token_in_order(model, tok):
    got = []
    enc = tok(["hello", "def add(a, b):"], padding=True, return_tensors="pt")
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=7, num_return_sequences=2,
                         do_sample=True, seed=0,
                         streamer=lambda row, t: got.append((row, t)), return_dict=True)
    for row, tokens in enumerate(out.result.tokens):
        assert [t for r, t in got if r == row] == tokens
    assert len(got) == sum(map(len, out.result.tokens))


def test_hf_text_streamer_object(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = build_tokenizer(tmp_path / "t")
    hf_tok, tok = transformers.AutoTokenizer.from_pretrained(str(d)), Tokenizer.from_pretrained(d)
    streamer = transformers.TextIteratorStreamer(hf_tok, skip_prompt=True)
    ids = torch.tensor([tok.encode("def add(a, b):")])
    out = model.generate(ids, max_new_tokens=10, streamer=streamer, eos_token_id=[])
    assert "".join(streamer) == hf_tok.decode(out[0, ids.shape[1]:])
    with pytest.raises(ParScaleError, match="one sequence"):
        model.generate(ids.repeat(2, 1), max_new_tokens=2, streamer=transformers.TextStreamer(hf_tok))


def test_max_length_is_prompt_plus_new(model):
    out = model.generate(IDS, max_length=10, eos_token_id=[])
    assert out.shape == (1, 10) and torch.equal(out, model.generate(IDS, max_new_tokens=4, eos_token_id=[]))
    assert model.generate(IDS, max_length=10, max_new_tokens=2, eos_token_id=[]).shape == (1, 8)  # HF: new wins
    with pytest.raises(ParScaleError, match="max_length"):
        model.generate(IDS, max_length=6)


def test_return_dict_in_generate_scores(model):
    transformers = pytest.importorskip("transformers")
    out = model.generate(IDS, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                         output_logits=True, repetition_penalty=1.2, eos_token_id=[])
    assert torch.equal(out.sequences, model.generate(IDS, max_new_tokens=5, repetition_penalty=1.2, eos_token_id=[]))
    assert isinstance(out.scores, tuple) and len(out.scores) == len(out.logits) == 5
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.2)
    s = IDS.shape[1]
    for t, (score, raw) in enumerate(zip(out.scores, out.logits)):
        logits = model(out.sequences[:, : s + t]).logits[:, -1].float()
        torch.testing.assert_close(raw, logits, rtol=1e-4, atol=1e-5)  # incremental == full forward
        torch.testing.assert_close(score, proc(out.sequences[:, : s + t], raw.clone()))
        assert int(score.argmax()) == int(out.sequences[0, s + t])
    # sampling: the warpers' view, -inf outside the top-k, temperature applied
    out = model.generate(IDS, max_new_tokens=3, do_sample=True, top_k=5, temperature=0.5, seed=0,
                         return_dict_in_generate=True, output_scores=True, output_logits=True, eos_token_id=[])
    for score, raw in zip(out.scores, out.logits):
        kept = torch.isfinite(score)
        assert int(kept.sum()) == 5 and torch.equal(kept[0], raw[0] >= raw[0].topk(5).values[-1])
        torch.testing.assert_close(score[kept], raw[kept] / 0.5)
    assert model.generate(IDS, max_new_tokens=2, return_dict_in_generate=True).scores is None


def test_one_d_input_and_lists_are_clear_errors(model):
    with pytest.raises(ParScaleError, match=r"2-D .*input_ids\[None\]"):
        model.generate(IDS[0], max_new_tokens=2)
    with pytest.raises(ParScaleError, match="torch.tensor"):
        model.generate([[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(ParScaleError, match="integer"):
        model.generate(IDS.float(), max_new_tokens=2)


def test_default_eos_is_every_eos_of_the_tokenizer(model, tok):
    ids = torch.tensor([tok.encode("hello")])
    first = int(model.generate(ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    tok.eos_token_ids = [tok.eos_token_id, first]  # as if generation_config.json listed it
    out = model.generate(ids, max_new_tokens=6, tokenizer=tok, return_dict=True)
    assert out.result.tokens[0] == [first] and out.result.finish_reason == ["eos"]


def test_past_key_values_prefills_only_the_new_tokens(model):
    """A cache holding a prefix gives exactly the fresh full-prefill result (multi-turn chat)."""
    fresh = model.generate(IDS, max_new_tokens=5, eos_token_id=[], return_dict=True)
    cache = model.new_cache(1, 4)
    model(IDS[:, :4], cache=cache)
    cache.grow(IDS.shape[1] + 5)
    out = model.generate(IDS, max_new_tokens=5, eos_token_id=[], past_key_values=cache, return_dict=True)
    assert torch.equal(out.sequences, fresh.sequences) and out.result.prefill_tokens == 2
    assert cache.length == IDS.shape[1] + 4  # all but the last new token
    with pytest.raises(ParScaleError, match="no room"):
        model.generate(out.sequences, max_new_tokens=5, past_key_values=cache)


def test_truncated_cache_equals_a_fresh_one(model):
    cache = model.new_cache(1, 32)
    model(torch.tensor([[7, 8, 9, 10, 11, 12, 13]]), cache=cache)  # 7 tokens, of which 3 are kept
    cache.truncate(3)
    ids = torch.cat([torch.tensor([[7, 8, 9]]), IDS], 1)
    out = model.generate(ids, max_new_tokens=5, eos_token_id=[], past_key_values=cache)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, eos_token_id=[]))
    assert cache.length == ids.shape[1] + 4
