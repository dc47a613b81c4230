"""``compile_decode``: decode steps through one ``torch.compile``'d graph over a static view of the cache.

Invariants: the compiled step gives the eager step's logits (float rounding only) and the same
greedy tokens, for P = 1 and P > 1, left-padded batches, finished rows leaving the batch, sampling
with a seed, and int8; prefill and training do not go through it; a failed compile warns once and
decodes eagerly with the same result; the static-slot math itself (eager) equals the cache's
growing-slice math. Each compile costs seconds, so the cases share a few compiled models.
"""

import contextlib
import copy
import warnings

import pytest
import torch

from parscale import ParScaleForCausalLM, kernels
from parscale.cache import StaticSlots
from parscale.quant import quantize_

from test_decode_fast import make

PROMPTS = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])  # left padding


def step_logits(model, ids, mask, steps=6):
    """Prefill, then ``steps`` decode steps feeding back the greedy token: logits of every step."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    with torch.inference_mode():
        out = [model(ids, mask, cache=cache).logits[:, -1]]
        for _ in range(steps):
            tok = out[-1].argmax(-1, keepdim=True)
            out.append(model(tok, cache=cache).logits[:, -1])
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def pair():
    """A P = 2 model (fp32) and its compiled twin (the same weights)."""
    from parscale import ParScaleConfig

    def tiny(P=1, **kw):
        return ParScaleConfig(**{**dict(prefix_tokens=3, streams=P), **kw})

    eager = make(tiny, P=2)
    compiled = copy.deepcopy(eager).compile_decode()
    return eager, compiled


def no_compile(fn, **kw):
    """A ``torch.compile`` stand-in whose compiled function fails: the model's eager fallback."""
    def fail(*a, **k):
        raise RuntimeError("no compiler here\nsecond line")
    return fail


def graph_state(model):
    g = model.__dict__.get("_decode_graph")
    return None if g is None else g.state


def test_compiled_decode_equals_eager_with_left_padding(pair):
    eager, compiled = pair
    for P in (2, 1):  # a stream set, then the plain backbone: the graph follows set_streams
        eager.set_streams(P), compiled.set_streams(P)
        ref, got = step_logits(eager, PROMPTS, MASK), step_logits(compiled, PROMPTS, MASK)
        assert graph_state(compiled) == "ok"  # it really compiled (no silent eager fallback)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    eager.set_streams(2), compiled.set_streams(2)


def test_compiled_generate_matches_eager_greedy_sampled_and_compacted(pair):
    eager, compiled = pair
    kw = dict(attention_mask=MASK, max_new_tokens=8)
    with torch.inference_mode():
        assert torch.equal(compiled.generate(PROMPTS, do_sample=False, **kw),
                           eager.generate(PROMPTS, do_sample=False, **kw))
        # a seeded sample: the same draws see the same (close) logits
        a = compiled.generate(PROMPTS, do_sample=True, seed=5, **kw)
        b = eager.generate(PROMPTS, do_sample=True, seed=5, **kw)
        assert torch.equal(a, b)
        # rows ending at different steps leave the batch (fewer rows: the graph re-specialises)
        eos = int(eager.generate(PROMPTS, do_sample=False, **kw)[1, 8])
        c = compiled.generate(PROMPTS, do_sample=False, eos_token_id=eos, **kw)
        d = eager.generate(PROMPTS, do_sample=False, eos_token_id=eos, **kw)
        assert torch.equal(c, d)


def test_prefill_training_and_gradients_do_not_use_the_graph(pair):
    eager, compiled = pair
    ids = PROMPTS[:1]
    with torch.inference_mode():  # a full forward: bit for bit the eager one
        assert torch.equal(compiled(ids).logits, eager(ids).logits)
    fresh = copy.deepcopy(eager).compile_decode()
    cache = fresh.new_cache(1, 9)
    with torch.no_grad():
        fresh(ids, cache=cache)
    fresh(ids[:, :1], cache=cache).logits.sum().backward()  # gradients wanted: the eager step
    assert fresh.lm_head.weight.grad is not None
    with torch.no_grad():
        fresh.train()(ids[:, :1], cache=cache)  # training mode: the eager step
    assert fresh.__dict__.get("_decode_graph") is None  # nothing was compiled


def test_static_slots_math_equals_the_growing_slice(tiny_config):
    """The compiled step's math, run eagerly (the fallback): the same logits as the usual step."""
    m = make(tiny_config, P=2)
    ref = step_logits(m, PROMPTS, MASK)
    m.compile_decode()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mp.setattr(torch, "compile", no_compile)
        got = step_logits(m, PROMPTS, MASK)
    assert graph_state(m) == "failed"
    assert sum("torch.compile failed (RuntimeError: no compiler here)" in str(w.message) for w in seen) == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_static_slots_write_one_slot_and_return_whole_buffers():
    k = [torch.zeros(2, 1, 5, 3)]
    v = [torch.zeros(2, 1, 5, 3)]
    slots = StaticSlots(k, v, torch.tensor([2]))
    new_k, new_v = torch.ones(2, 1, 1, 3), torch.full((2, 1, 1, 3), 2.0)
    kk, vv = slots.update(0, new_k, new_v)
    assert kk is k[0] and vv is v[0]
    assert torch.equal(k[0][:, :, 2:3], new_k) and k[0][:, :, [0, 1, 3, 4]].abs().sum() == 0
    assert torch.equal(v[0][:, :, 2:3], new_v)


def test_static_slots_with_a_window_return_the_slots_so_far():
    k, v = [torch.zeros(2, 1, 6, 3)], [torch.zeros(2, 1, 6, 3)]
    slots = StaticSlots(k, v, torch.tensor([2]), torch.ones(2, 1, 1, 3, dtype=torch.bool))
    kk, vv = slots.update(0, torch.ones(2, 1, 1, 3), torch.ones(2, 1, 1, 3))
    assert kk.shape[2] == vv.shape[2] == 3 and kk.data_ptr() == k[0].data_ptr()  # a view, not a copy
    assert torch.equal(kk[:, :, 2], torch.ones(2, 1, 3)) and k[0][:, :, 3:].abs().sum() == 0


def test_one_graph_for_every_length_and_capacity(tiny_config):
    """Dynamo compiles the decode step once: neither a longer generation nor a cache of another
    capacity recompiles (a recompile per capacity, and attention over the whole capacity, cost
    time per token in proportion to ``max_new_tokens``). Counted with a backend that runs the
    graph as traced, so no inductor compile is needed to see it."""
    from torch._dynamo.testing import CompileCounter

    m = make(tiny_config, P=2)
    counter = CompileCounter()
    c = copy.deepcopy(m).compile_decode(backend=counter)
    for steps in (3, 12, 30):  # capacities 10, 19, 37; up to 30 lengths
        torch.testing.assert_close(step_logits(c, PROMPTS, MASK, steps), step_logits(m, PROMPTS, MASK, steps),
                                   rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_warm_up_compiles_batches_of_one_and_two(tiny_config):
    """After ``warm_up`` a batch of 1 or 2 compiles nothing more, whatever its prompt lengths,
    padding or rows leaving: a server's first requests do not wait for a compile. Counted as
    above; the tokens equal eager ones."""
    from torch._dynamo.testing import CompileCounter

    from parscale.generation import decode, warm_up

    m = make(tiny_config, P=2)
    counter = CompileCounter()
    c = copy.deepcopy(m).compile_decode(backend=counter)
    assert sorted(warm_up(c, streams=2)) == [1, 2]
    warmed = counter.frame_count
    assert warmed == 2  # a batch of 1 has a graph of its own
    for rows, budgets in ((slice(1, 3), [2, 9]), (slice(0, 1), [6]), (slice(0, 2), [5, 5])):
        ids, mask = PROMPTS[rows], MASK[rows]  # left-padded pairs; the first pair drops to one row
        got, want = (decode(x, ids, mask, max_new_tokens=budgets).tokens for x in (c, m))
        assert got == want
    assert counter.frame_count == warmed


def test_compiled_step_attends_over_the_slots_so_far(tiny_config, monkeypatch):
    """The step's keys are the prefix and the tokens so far, not the cache's whole capacity (run
    through the eager fallback of the same math, where the window can be watched)."""
    m = make(tiny_config, P=2).compile_decode()
    monkeypatch.setattr(torch, "compile", no_compile)
    seen, update = [], StaticSlots.update

    def spy(self, layer, k, v):
        out = update(self, layer, k, v)
        if layer == 0:
            seen.append(out[0].shape[2])
        return out

    monkeypatch.setattr(StaticSlots, "update", spy)
    cache = m.new_cache(1, 50)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        m(PROMPTS[:1], cache=cache)
        for _ in range(3):
            m(PROMPTS[:1, :1], cache=cache)
    t = m.config.prefix_tokens + PROMPTS.shape[1]
    assert seen == [t + 1, t + 2, t + 3]


def test_compiled_int8_decode_equals_eager(tiny_config, monkeypatch):
    """Both int8 decode kernels traced into the graph: 6 rows (P = 2, 3 samples) take the
    two-digit product once its size threshold is lifted, P = 1's 3 rows the bf16-activation one."""
    import parscale.quant as quant

    monkeypatch.setattr(quant, "_TWO_DIGIT_MIN", 0)
    m = quantize_(make(tiny_config, P=2))
    c = copy.deepcopy(m).compile_decode()
    for P in (2, 1):
        m.set_streams(P), c.set_streams(P)
        ref, got = step_logits(m, PROMPTS, MASK), step_logits(c, PROMPTS, MASK)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert graph_state(c) == "ok"


def test_compile_decode_off_and_from_pretrained(tiny_config, tmp_path):
    make(tiny_config, P=2).save_pretrained(tmp_path)
    m = ParScaleForCausalLM.from_pretrained(tmp_path, compile_decode=True)
    assert m.__dict__["_compile_decode"] == {"freeze": False}
    m.compile_decode(False)
    step_logits(m, PROMPTS, MASK, steps=2)
    assert m.__dict__.get("_decode_graph") is None  # off: nothing compiled
    assert ParScaleForCausalLM.from_pretrained(tmp_path).__dict__.get("_compile_decode") is None


def test_continuous_batching_through_the_graph_equals_eager(pair):
    """Rows join (caches concatenated to new capacities) and leave at any step: the shapes change,
    the graph is re-made or made dynamic, and every request gets the eager decoder's tokens."""
    from test_continuous_batching import _staggered

    eager, compiled = pair
    g = torch.Generator().manual_seed(11)
    reqs = [(torch.randint(0, 61, (1, n), generator=g), dict(max_new_tokens=m), at)
            for n, m, at in [(4, 6, 0), (7, 3, 1), (2, 8, 1), (5, 5, 4), (3, 4, 6)]]
    with torch.inference_mode():
        assert [t for t, _, _ in _staggered(compiled, reqs)] == [t for t, _, _ in _staggered(eager, reqs)]
    assert graph_state(compiled) == "ok"


# ---------------------------------------------------------------- freeze=True (weights as graph constants)

@pytest.mark.parametrize("native_from", [3, 17])
def test_frozen_int8_decode_equals_eager(tiny_config, monkeypatch, native_from):
    """A frozen graph gives the eager logits and tokens in int8 (6 rows at P = 2, 3 at P = 1): from
    ``_FROZEN_NATIVE_ROWS`` rows on with the native int8 kernel, as eager steps; below, with
    inductor's int8 template (bf16 activations; 3 rows padded up to its AMX range)."""
    from parscale import quant

    monkeypatch.setattr(quant, "_FROZEN_NATIVE_ROWS", native_from)
    m = quantize_(make(tiny_config, P=2))
    frozen = copy.deepcopy(m).compile_decode(freeze=True)
    for P in (2, 1):  # each P compiles anew
        m.set_streams(P), frozen.set_streams(P)
        # the template takes bf16 activations: its eager reference is torch's bf16-activation
        # kernel, not the native kernel's 16-bit fixed point
        with contextlib.nullcontext() if kernels.available() and native_from <= 3 else kernels.disabled():
            ref = step_logits(m, PROMPTS, MASK)
        got = step_logits(frozen, PROMPTS, MASK)
        assert graph_state(frozen) == "ok"
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_frozen_graph_follows_new_weights_and_is_not_shared(tiny_config):
    """A float32 frozen graph gives the eager logits and tokens (left padding, P = 2); its constants
    belong to one model and one set of weights: after ``load_state_dict`` (in place) the next step
    compiles again from the new weights, and a second model of the same class with other weights
    never picks up the first one's graph."""
    a, b = make(tiny_config, P=2, seed=0), make(tiny_config, P=2, seed=1)
    fa = copy.deepcopy(a).compile_decode(freeze=True)
    fb = copy.deepcopy(b).compile_decode(freeze=True)
    got, ref = step_logits(fa, PROMPTS, MASK), step_logits(a, PROMPTS, MASK)
    assert graph_state(fa) == "ok"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(step_logits(fb, PROMPTS, MASK), step_logits(b, PROMPTS, MASK), rtol=1e-4, atol=1e-4)
    first = fa.__dict__["_decode_graph"]
    fa.load_state_dict(b.state_dict())  # a's weights become b's, in place
    torch.testing.assert_close(step_logits(fa, PROMPTS, MASK), step_logits(b, PROMPTS, MASK), rtol=1e-4, atol=1e-4)
    assert fa.__dict__["_decode_graph"] is not first  # compiled again
    # the graph refers back to its model (a cycle): a deleted model must still be freed
    import gc
    import weakref

    ref = weakref.ref(fa)
    del fa, first
    gc.collect()
    assert ref() is None


def test_frozen_with_a_mode_is_refused(tiny_config):
    from parscale.errors import ParScaleError

    with pytest.raises(ParScaleError, match="freeze=True"):
        make(tiny_config, P=2).compile_decode(freeze=True, mode="max-autotune")


def test_frozen_continuous_batching_equals_eager(tiny_config):
    """A row joining and one leaving (new batch sizes and capacities: new frozen graphs) still give
    every request the eager decoder's tokens."""
    from test_continuous_batching import _staggered

    eager = make(tiny_config, P=2)
    frozen = copy.deepcopy(eager).compile_decode(freeze=True)
    g = torch.Generator().manual_seed(11)
    reqs = [(torch.randint(0, 61, (1, n), generator=g), dict(max_new_tokens=m), at)
            for n, m, at in [(4, 6, 0), (7, 3, 1)]]  # fewer shapes than above: each compiles
    with torch.inference_mode():
        assert [t for t, _, _ in _staggered(frozen, reqs)] == [t for t, _, _ in _staggered(eager, reqs)]
    assert graph_state(frozen) == "ok"

