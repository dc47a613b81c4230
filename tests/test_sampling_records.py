"""Sample / Problem / CostLedger / SampleSet: properties, JSONL round trip, errors on bad files."""

import json
import math
import os

import pytest

from parscale.errors import ParScaleError
from parscale.sampling.answers import INVALID
from parscale.sampling.records import CostLedger, Problem, Sample, SampleSet


def make_set():
    problems = [Problem(0, "arithmetic", "Q: 1+2=\nA:", "3", {"a": 1, "b": 2, "op": "+"}),
                Problem(7, "arithmetic", "Q: 2*2=\nA:", "4", {"a": 2, "b": 2, "op": "*"})]
    samples = [
        Sample(0, 0, [5, 6], " 3\n", [-0.5, -0.25], "eos", seed=11, temperature=0.7, top_p=0.9,
               finish_step=1, wall_s=0.01, answer="3", score=0.8),
        Sample(0, 1, [9], " x", [-2.0], "pruned", answer=INVALID),
        Sample(7, 0, [], "", [], "length"),
    ]
    ledger = CostLedger(prompt_tokens=10, generated_tokens=3, decode_steps=2, row_steps=3, wall_s=0.5,
                        flops=1e6, streams=2, params=100)
    return SampleSet(problems, samples, ledger, {"task": "arithmetic", "n": 2})


def test_sample_properties():
    s = Sample(0, 0, [1, 2, 3, 4], "abcd", [-1.0, -2.0, -3.0, -2.0], "eos")
    assert s.length == 4
    assert s.mean_logprob == pytest.approx(-2.0)
    assert Sample(0, 1, [], "", [], "eos").mean_logprob == -math.inf


def test_jsonl_round_trip_keeps_everything(tmp_path):
    sset = make_set()
    path = sset.save_jsonl(tmp_path / "sub" / "s.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3
    assert json.loads(lines[0])["format"] == "parscale.samples"
    back = SampleSet.load_jsonl(path)
    assert back.problems == sset.problems
    assert back.ledger == sset.ledger
    assert back.meta == sset.meta
    assert back.samples == sset.samples
    assert back.samples[1].answer is INVALID  # the sentinel survives, distinct from "not extracted"
    assert back.samples[2].answer is None
    assert [f for f in os.listdir(tmp_path / "sub") if f != "s.jsonl"] == []  # no temp file left


def test_by_problem_groups_and_orders():
    sset = make_set()
    sset.samples.reverse()
    groups = sset.by_problem()
    assert list(groups) == [0, 7]
    assert [s.index for s in groups[0]] == [0, 1]
    assert len(groups[7]) == 1


def test_bad_sample_set_construction():
    p = [Problem(0, "t", "q", "r")]
    with pytest.raises(ParScaleError, match="unknown problem id 3"):
        SampleSet(p, [Sample(3, 0, [], "", [], "eos")])
    with pytest.raises(ParScaleError, match="two samples with index 0"):
        SampleSet(p, [Sample(0, 0, [], "", [], "eos"), Sample(0, 0, [], "", [], "eos")])
    with pytest.raises(ParScaleError, match="id 0 appears more than once"):
        SampleSet(p + p, [])


@pytest.mark.parametrize("mutate, message", [
    (lambda lines: lines.__setitem__(2, "{not json"), r":3: not valid JSON"),
    (lambda lines: lines.__setitem__(3, json.dumps({"problem_id": 7, "index": 0})), r":4: sample is missing field"),
    (lambda lines: lines.__setitem__(1, lines[1].replace('"eos"', '"done"')), r":2: sample field 'finish_reason'"),
    (lambda lines: lines.__setitem__(1, lines[1].replace('"index": 0', '"index": -1')), r":2: sample field 'index'"),
    (lambda lines: lines.__setitem__(2, lines[2].replace('"text"', '"txt"')), r":3: unknown sample field"),
    (lambda lines: lines.__setitem__(0, json.dumps({"format": "other"})), r":1: first line must be a header"),
    (lambda lines: lines.__setitem__(0, lines[0].replace('"version": 1', '"version": 9')), r":1: unsupported"),
    (lambda lines: lines.__setitem__(0, lines[0].replace('"params": 100', '"params": -1')), r":1: ledger field 'params'"),
    (lambda lines: lines.__setitem__(2, lines[2].replace('"problem_id": 0', '"problem_id": 5')), r"unknown problem id 5"),
])
def test_malformed_files_name_the_line(tmp_path, mutate, message):
    path = make_set().save_jsonl(tmp_path / "s.jsonl")
    lines = path.read_text().splitlines()
    mutate(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ParScaleError, match=message):
        SampleSet.load_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ParScaleError, match="no such file"):
        SampleSet.load_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ParScaleError, match="empty file"):
        SampleSet.load_jsonl(tmp_path / "e.jsonl")


def test_unserialisable_meta_is_an_error_and_keeps_old_file(tmp_path):
    path = make_set().save_jsonl(tmp_path / "s.jsonl")
    before = path.read_text()
    bad = make_set()
    bad.meta["obj"] = object()
    with pytest.raises(ParScaleError, match="not JSON-serialisable"):
        bad.save_jsonl(path)
    assert path.read_text() == before


def test_cost_ledger_add_and_per_problem():
    a = CostLedger(prompt_tokens=10, generated_tokens=20, decode_steps=5, row_steps=30, wall_s=1.0,
                   flops=100.0, streams=4, params=7)
    b = CostLedger(prompt_tokens=2, generated_tokens=4, decode_steps=1, row_steps=6, wall_s=0.5,
                   flops=50.0, streams=4, params=7)
    c = a + b
    assert (c.prompt_tokens, c.generated_tokens, c.decode_steps, c.row_steps) == (12, 24, 6, 36)
    assert (c.wall_s, c.flops, c.streams, c.params) == (1.5, 150.0, 4, 7)
    assert sum([a, b]) == c
    assert CostLedger() + a == a  # the empty ledger is the identity, whatever its streams
    per = c.per_problem(3)
    assert per["tokens"] == pytest.approx(12.0) and per["row_steps"] == pytest.approx(12.0)
    assert per["streams"] == 4
    with pytest.raises(ParScaleError, match="different models"):
        a + CostLedger(generated_tokens=1, streams=2, params=7)
    with pytest.raises(ParScaleError, match="n >= 1"):
        a.per_problem(0)
