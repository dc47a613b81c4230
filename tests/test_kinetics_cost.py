"""Kinetics' memory-aware cost: KV-cache read bytes per decode step, eFLOPs, and the ledger fill.

Every number is checked against a count written out by hand (or by a per-token loop that does
not share the closed form), on a tiny config.
"""

import json

import pytest
import torch

from parscale import ParScaleForCausalLM
from parscale.cost import (HARDWARE_PRESETS, GenerationCost, custom_hardware,
                           decode_kv_read_bytes, flop_per_byte, forward_flops, generation_cost,
                           kinetics_eflops)
from parscale.errors import ParScaleError
from parscale.sampling import SampleSet, get_task
from parscale.sampling.records import CostLedger
from parscale.sampling.sampler import sample_problems

from conftest import CharTok
from test_sampler import ALPHABET


def test_kv_read_bytes_hand_count(tiny_config):
    # L = 2 layers, n_kv = 2, head_dim = 32 / 4 = 8, prefix 3, P = 2, fp32 (4 bytes).
    cfg = tiny_config(P=2)
    # Prompt of 5 tokens; rows generate 3, 1 and 4 tokens -> they feed back 2, 0 and 3 tokens.
    # Row 0 reads 5+1 and 5+2 token positions, row 2 reads 6, 7, 8: 34 positions, plus the
    # 3 prefix positions for each of the 5 fed tokens: 49 positions per stream.
    # One position of one stream: 2 layers * 2 (K, V) * 2 kv heads * 8 dims * 4 bytes = 256 bytes.
    expected = 49 * 256 * 2  # * P streams
    assert decode_kv_read_bytes(cfg, [(2, 5), (0, 5), (3, 5)], 4) == expected == 25088
    # P = 1 has no prefix: 34 positions * 256 bytes
    assert decode_kv_read_bytes(tiny_config(P=1), [(2, 5), (0, 5), (3, 5)], 4) == 34 * 256
    # the prefix-only control keeps its one prefix at P = 1
    assert decode_kv_read_bytes(tiny_config(P=1, prefix_only=True), [(2, 5), (0, 5), (3, 5)], 4) \
        == 49 * 256
    # bf16 halves it; nothing fed reads nothing
    assert decode_kv_read_bytes(cfg, [(2, 5), (0, 5), (3, 5)], 2) == expected / 2
    assert decode_kv_read_bytes(cfg, [(0, 5)], 4) == 0


def test_generation_cost_matches_a_per_token_loop(tiny_config):
    cfg = tiny_config(P=2)
    p, lengths = 5, [3, 1, 4]
    cost = generation_cost(cfg, 2, p, lengths, hardware="H100", dtype="fp32")
    assert isinstance(cost, GenerationCost)
    flops, kv, eflops = cost  # unpacks as a tuple
    # independent: prefill once, then one forward_flops call per fed token at its own context
    want_flops = forward_flops(cfg, tokens=p, context=(p + 1) / 2)
    for g in lengths:
        for j in range(1, g):
            want_flops += forward_flops(cfg, tokens=1, context=p + j)
    assert flops == pytest.approx(want_flops, rel=1e-12)
    assert kv == 25088
    ratio = 989e12 / 3.35e12
    assert flop_per_byte("H100") == pytest.approx(ratio)
    assert eflops == pytest.approx(want_flops + 25088 * ratio, rel=1e-12)
    # without compaction every row runs until the longest finishes: 3 fed tokens each
    idle = generation_cost(cfg, 2, p, lengths, hardware="H100", dtype="fp32", compact=False)
    assert idle.kv_read_bytes == decode_kv_read_bytes(cfg, [(3, 5)] * 3, 4) > kv
    assert idle.flops > flops


def test_eflops_and_hardware_ratio():
    for name, hw in HARDWARE_PRESETS.items():
        assert flop_per_byte(name) == pytest.approx(hw.peak_flops / hw.bandwidth)
    hw = custom_hardware(peak_flops=100.0, bandwidth=4.0)
    assert kinetics_eflops(10.0, 3.0, hw) == 10.0 + 3.0 * 25.0
    with pytest.raises(ParScaleError, match="unknown hardware"):
        flop_per_byte("TPU-v9")
    with pytest.raises(ParScaleError, match=">= 0"):
        kinetics_eflops(-1.0, 0.0)


def test_bad_inputs_are_one_line_errors(tiny_config):
    cfg = tiny_config(P=2)
    with pytest.raises(ParScaleError, match="integers >= 0"):
        decode_kv_read_bytes(cfg, [(-1, 5)], 4)
    with pytest.raises(ParScaleError, match="bytes_per_value"):
        decode_kv_read_bytes(cfg, [(1, 5)], 0)
    with pytest.raises(ParScaleError, match="prompt_tokens"):
        generation_cost(cfg, 2, 0, [1])
    with pytest.raises(ParScaleError, match="generated length"):
        generation_cost(cfg, 2, 4, [2, 0])
    with pytest.raises(ParScaleError, match="unknown dtype"):
        generation_cost(cfg, 2, 4, [2], dtype="fp3")


def test_long_generations_are_dominated_by_kv_reads():
    """The Kinetics point on a paper model: the KV share of eFLOPs grows with the length."""
    from parscale.cost import paper_config

    cfg = paper_config("0.5b", streams=1)
    share = []
    for g in (64, 4096, 32768):
        c = generation_cost(cfg, 1, 64, [g], hardware="A100-80GB", dtype="bf16")
        share.append(1 - c.flops / c.eflops)
    assert share[0] < share[1] < share[2]
    assert share[2] > 0.5 > share[0]
    assert generation_cost("0.5b", 1, 64, [64], dtype="bf16") == generation_cost(cfg, 1, 64, [64], dtype="bf16")


@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("compact", [True, False])
def test_sampler_fills_the_ledger_exactly(tiny_config, P, compact):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=P, vocab_size=len(ALPHABET) + 1,
                                            eos_token_id=len(ALPHABET))).double().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3)
    tok = CharTok(ALPHABET)
    problems = get_task("arithmetic").make_problems(2, seed=1, difficulty=2)
    sset = sample_problems(model, tok, problems, n=4, temperature=1.0, seed=3, max_new_tokens=6,
                           compact=compact)
    ledger = sset.ledger
    assert ledger.kv_bytes_per_value == 8  # float64 cache
    # hand sum: every fed token of every row, at its own context, prefix for P > 1
    per_position = 2 * 2 * 2 * 8 * 8 * P  # layers * (K, V) * kv heads * head_dim * bytes * P
    prefix = 3 if P > 1 else 0
    want = 0
    for problem, group in sset.by_problem().items():
        p = len(tok.encode(sset.problem(problem).prompt))
        longest = max(s.length for s in group)
        for s in group:
            fed = s.length - 1 if compact else longest - 1
            want += sum(p + j + prefix for j in range(1, fed + 1)) * per_position
    assert ledger.kv_read_bytes == want > 0
    # the harness function charges each problem the same way
    total = [generation_cost(model.config, P, len(tok.encode(sset.problem(pid).prompt)),
                             [s.length for s in group], dtype="fp32", compact=compact)
             for pid, group in sset.by_problem().items()]
    assert sum(c.flops for c in total) == pytest.approx(ledger.flops, rel=1e-12)
    assert sum(c.kv_read_bytes for c in total) * 2 == ledger.kv_read_bytes  # fp32 vs float64
    assert ledger.eflops("A100-80GB") == pytest.approx(
        ledger.flops + ledger.kv_read_bytes * 312e12 / 2.039e12)


def test_old_sample_files_load_without_the_field(tmp_path):
    sset = SampleSet(problems=[], samples=[], ledger=CostLedger(
        prompt_tokens=4, generated_tokens=6, decode_steps=2, row_steps=6, flops=1e6, streams=2,
        params=10))
    path = tmp_path / "old.jsonl"
    header = sset.header()
    for name in ("kv_read_bytes", "kv_bytes_per_value"):  # what files written before had
        del header["ledger"][name]
    path.write_text(json.dumps(header) + "\n")
    loaded = SampleSet.load_jsonl(path).ledger
    assert not loaded.kv_recorded and loaded.eflops() is None
    per = loaded.per_problem(2)
    assert per["eflops"] is None and per["flops"] == 5e5 and per["hardware"] == "A100-80GB"
    # a new one round-trips, and its eFLOPs per problem follow the hardware
    new = CostLedger(generated_tokens=6, flops=1e6, kv_read_bytes=1e4, streams=2, params=10,
                     kv_bytes_per_value=2)
    SampleSet(problems=[], samples=[], ledger=new).save_jsonl(path)
    again = SampleSet.load_jsonl(path).ledger
    assert again == new
    assert again.per_problem(2, "H200")["eflops"] == pytest.approx((1e6 + 1e4 * 989e12 / 4.8e12) / 2)


def test_ledgers_of_different_cache_dtypes_do_not_add():
    a = CostLedger(generated_tokens=1, streams=2, params=7, kv_bytes_per_value=4)
    b = CostLedger(generated_tokens=1, kv_read_bytes=5.0, streams=2, params=7, kv_bytes_per_value=4)
    assert (a + b).kv_read_bytes == 5.0
    with pytest.raises(ParScaleError, match="different models"):
        a + CostLedger(generated_tokens=1, streams=2, params=7, kv_bytes_per_value=2)
    # a ledger without recorded reads (a policy's own work, an older file) adds as zero reads
    extra = CostLedger(generated_tokens=2, flops=3.0, streams=2, params=7)
    both = b + extra
    assert both.kv_read_bytes == 5.0 and both.kv_bytes_per_value == 4 and both.generated_tokens == 3
    assert (extra + b) == both
    with pytest.raises(ParScaleError, match="different models"):  # reads without a dtype: refused
        b + CostLedger(generated_tokens=1, kv_read_bytes=1.0, streams=2, params=7)



def test_score_reports_flops_and_eflops(tmp_path, tiny_config, capsys):
    from conftest import run_cli

    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=2, vocab_size=len(ALPHABET) + 1,
                                            eos_token_id=len(ALPHABET))).double().eval()
    problems = get_task("arithmetic").make_problems(2, seed=1, difficulty=2)
    sset = sample_problems(model, CharTok(ALPHABET), problems, n=3, seed=3, max_new_tokens=5,
                           meta={"task": "arithmetic"})
    path = sset.save_jsonl(tmp_path / "s.jsonl")
    rc, out, err = run_cli(["score", path, "--hardware", "H100", "--json"], capsys)
    assert rc == 0, err
    cost = json.loads(out)["cost_per_problem"]
    ledger = sset.ledger
    assert cost["flops"] == pytest.approx(ledger.flops / 2)
    assert cost["eflops"] == pytest.approx((ledger.flops + ledger.kv_read_bytes * 989e12 / 3.35e12) / 2)
    assert cost["hardware"] == "H100"
    rc, out, err = run_cli(["score", path], capsys)
    assert rc == 0 and "eFLOPs per problem" in out and "A100-80GB" in out
    rc, out, err = run_cli(["score", path, "--hardware", "TPU"], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and "--hardware" in err


def test_peek_forks_read_the_kv_cache_too(tiny_config):
    """Peek's forked rows (its own decode) add their KV reads to the ledger, not only FLOPs."""
    from parscale.sampling.deepprune import Peek

    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=1, vocab_size=len(ALPHABET) + 1,
                                            eos_token_id=len(ALPHABET))).double().eval()
    tok = CharTok(ALPHABET)
    problems = get_task("arithmetic").make_problems(2, seed=2, difficulty=2)
    kw = dict(n=6, temperature=0.5, seed=3, max_new_tokens=8, stop_strings=())
    peeked = sample_problems(model, tok, problems, policy=Peek(every=3, keep=5, answer_prefix=":"), **kw)
    # the sampled rows alone read at most this much (every row fed at most all its tokens) ...
    prompt = {p.id: len(tok.encode(p.prompt)) for p in problems}
    rows_at_most = decode_kv_read_bytes(model.config, [(s.length, prompt[s.problem_id]) for s in peeked.samples], 8)
    # ... so the ledger's excess is the forks' own decoding, which read their caches
    assert peeked.ledger.generated_tokens > sum(s.length for s in peeked.samples)
    assert peeked.ledger.kv_read_bytes > rows_at_most
    assert peeked.ledger.kv_bytes_per_value == 8
