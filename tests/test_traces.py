"""Trace tasks: every generated trace is well formed and its final answer verifies; the extractor
rejects malformed traces; problems and traces are deterministic by seed; corpora hold out."""

import json

import pytest

from parscale.errors import ParScaleError
from parscale.sampling import INVALID, get_task, write_training_corpus
from parscale.sampling.records import Problem
from parscale.sampling.traces import (TRACE_TASKS, arithmetic_trace_answer, column_trace, countdown_trace_answer,
                                      sum_trace_answer)

NAMES = ["arithmetic-trace", "countdown-trace", "sum-trace"]


def test_registered_under_stable_names():
    assert set(NAMES) <= set(TRACE_TASKS)
    for name in NAMES:
        assert get_task(name).name == name


@pytest.mark.parametrize("name", NAMES)
def test_every_trace_verifies(name):
    task = get_task(name)
    for d in range(task.min_difficulty, task.max_difficulty + 1):
        for p in task.make_problems(60, seed=d, difficulty=d):
            trace = task.reference_solution(p)
            assert "\n" not in trace and len(trace) >= 10
            assert len(trace) + 1 <= task.trace_budget(d)  # + the newline that ends it
            answer = task.extract(trace)
            assert answer is not INVALID
            assert task.verify(p, answer), (p, trace)
            assert task.verify(p, p.reference)  # the reference is the final answer
            assert task.trace_errors(p, trace) == []
            text = task.training_text(p)
            assert text == f"{p.prompt} {trace}\n"


def test_arithmetic_trace_by_hand():
    assert column_trace([4738, 2965, 107]) == ("8+5+7=20 > 0 ; 3+6+0+2=11 > 10 ; 7+9+1+1=18 > 810 ; "
                                               "4+2+0+1=7 > 7810 ; => 7810")
    assert column_trace([99, 11]) == "9+1=10 > 0 ; 9+1+1=11 > 110 ; => 110"
    p = Problem(0, "arithmetic-trace", "Q: 4738+2965+107=\nA:", "7810", {"operands": [4738, 2965, 107]})
    task = get_task("arithmetic-trace")
    assert task.verify(p, "7810") and not task.verify(p, "7811")
    # a trace whose steps are wrong but whose answer is right still verifies (the answer is the
    # contract); trace_errors names the wrong step
    wrong = "8+5+7=21 > 1 ; 3+6+0+2=11 > 10 ; 7+9+1+1=18 > 810 ; 4+2+0+1=7 > 7810 ; => 7810"
    assert task.verify(p, task.extract(wrong))
    assert task.trace_errors(p, wrong) == ["column 1: '8+5+7=21 > 1', expected '8+5+7=20 > 0'"]
    assert task.trace_errors(p, "8+5+7=20 > 0 ; => 7811") == ["1 columns, expected 4",
                                                              "final answer '7811', expected 7810"]


@pytest.mark.parametrize("text", [
    "", "   \n", "8+5=13 > 3 ; 1+1=2 > 23", "8+5=13 > 3 ; 1+1=2 > 23 =>", "=> 123", "8+5=13 > 3 ; 1+x=2 > 23 ; => 23",
    "8+5=13 > 3 ; 1+1=2 > 23 ; => 2 3", "8+5=13 > 3 ; => 1 => 2", "8+5=13 > 3 ; 1+1 ; => 23", "8+5=13 > 3 ; => -5",
    "8+5=13 > 3 ; => 1.5", "8+5=13 ; 1+1=2 ; => 23", "8+5=13 > ; => 3",
])
def test_arithmetic_extractor_rejects_malformed(text):
    assert arithmetic_trace_answer(text) is INVALID


def test_arithmetic_extractor_reads_first_line_only():
    assert arithmetic_trace_answer("8+5=13 > 3 ; 1+1=2 > 23 ; => 23\nQ: 1+1=\nA: 1+1=2 > 2 ; => 2") == "23"
    assert arithmetic_trace_answer("  8+5=13>3;1+1=2 >23; => 023") == "23"  # spacing is free; leading zeros canonical
    assert arithmetic_trace_answer("8+5=13 > 3 ; 1+1=2 > 23 => 23") is INVALID  # the ";" before "=>" is part of it


@pytest.mark.parametrize("text", [
    "", "20*2=40", "20*2=40 =>", "20*2=40 no | => 20*2", "20*2=40 | 40-1 => 40-1", "20*2=40 => 20*x",
    "20*2=40 maybe => 20*2", "20^2=400 => 20^2",
])
def test_countdown_extractor_rejects_malformed(text):
    assert countdown_trace_answer(text) is INVALID


def test_countdown_trace_checks():
    task = get_task("countdown-trace")
    p = Problem(0, "countdown-trace", "Q: 2 6 14 20 -> 20\nA:", "(14+6)*2-20",
                {"numbers": [2, 6, 14, 20], "target": 20, "trace": "14+6=20, 20*2=40, 40-20=20 => (14+6)*2-20"})
    assert task.verify(p, "20") and task.verify(p, "(14+6)*2-20") and task.verify(p, "14+6")
    assert not task.verify(p, "20*2/2")  # 2 used twice
    assert not task.verify(p, "20*20") and not task.verify(p, "14+6+6-6")  # 6 used twice
    assert task.extract("20*2=40, 40-14=26 no | 14+6=20 => 14 + 6") == "14+6"
    assert task.trace_errors(p, "20*2=40 no | 14+6=20, 20*2=40, 40-20=20 => (14+6)*2-20") == []
    errs = task.trace_errors(p, "20*2=41 | 14+6=20 => 14+6")
    assert "attempt 1: '20*2=41' is wrong" in errs and any("marked final" in e for e in errs)
    assert task.trace_errors(p, "14+7=21 => 14+6") == ["attempt 1: 7 is not available in '14+7=21'",
                                                         "attempt 1: ends at 21 but is marked final"]


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_by_seed(name):
    task = get_task(name)
    a, b = task.make_problems(30, seed=5), task.make_problems(30, seed=5)
    assert [(p.prompt, p.reference, task.reference_solution(p)) for p in a] == \
           [(p.prompt, p.reference, task.reference_solution(p)) for p in b]
    c = task.make_problems(30, seed=6)
    assert [p.prompt for p in a] != [p.prompt for p in c]


@pytest.mark.parametrize("name", NAMES)
def test_training_corpus_excludes_eval(tmp_path, name):
    task = get_task(name)
    held = task.make_problems(40, seed=1234, difficulty=3)
    path = write_training_corpus(task, 300, seed=0, difficulty=3, path=tmp_path / "c.jsonl",
                                 exclude=[p.prompt for p in held])
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(texts) == 300
    prompts = {t.split("\nA:")[0] + "\nA:" for t in texts}
    assert not prompts & {p.prompt for p in held}
    assert all(" => " in t and t.endswith("\n") and t.count("\n") == 2 for t in texts)


def test_bad_difficulty():
    with pytest.raises(ParScaleError, match="difficulty"):
        get_task("countdown-trace").make_problems(3, difficulty=2)
    with pytest.raises(ParScaleError, match="difficulty"):
        get_task("arithmetic-trace").make_problems(3, difficulty=9)


def test_sum_trace_takes_many_paths_and_checks_each_step():
    task = get_task("sum-trace")
    p = Problem(0, "sum-trace", "Q: 7+7+1+5+9+8=\nA:", "37", {"operands": [7, 7, 1, 5, 9, 8]})
    assert task.verify(p, "37") and not task.verify(p, "36")
    good = "9+7=16 ; 16+7=23 ; 23+8=31 ; 31+1=32 ; 32+5=37 ; => 37"
    assert task.extract(good) == "37" and task.trace_errors(p, good) == []
    assert task.trace_errors(p, "9+7=17 ; 17+7=24 ; 24+8=32 ; 32+1=33 ; 33+5=38 ; => 38") == [
        "step 1: 9+7 is 16, not 17", "final answer '38', expected 37"]
    assert task.trace_errors(p, "9+7=16 ; 15+7=22 ; => 22")[:2] == [
        "step 2: starts from 15, the running sum is 16", "numbers used [7, 7, 9], expected [1, 5, 7, 7, 8, 9]"]
    # the training text shows different orders of the same numbers (what makes a vote over paths work)
    firsts = {task.reference_solution(q).split("+")[0] for q in task.make_problems(200, seed=0, difficulty=6)}
    assert len(firsts) == 9


@pytest.mark.parametrize("text", ["", "9+7=16 ; => x", "9+7=16 => 16", "9+7 ; => 16", "9+7=16 ; => 1 6",
                                  "9*7=63 ; => 63", "9+7=16 ; => -16"])
def test_sum_extractor_rejects_malformed(text):
    assert sum_trace_answer(text) is INVALID
