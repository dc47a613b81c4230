"""Estimators against brute-force enumeration of every k-subset; intervals; scoring a SampleSet + CLI."""

import itertools
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from parscale.cli import main
from parscale.errors import ParScaleError
from parscale.sampling.aggregators import best_of_n, majority_vote
from parscale.sampling.answers import INVALID
from parscale.sampling.estimators import (bon_at_k, bon_at_k_exact, bootstrap_ci, default_ks, maj_at_k,
                                          maj_at_k_exact, pass_at_k, score_sample_set, wilson_ci)
from parscale.sampling.records import CostLedger, Sample, SampleSet
from parscale.sampling.tasks import TASKS


def random_case(rng):
    """n <= 8 samples over a few answers plus INVALID, with several score levels (ties)."""
    n = rng.randint(1, 8)
    pool = [str(i) for i in range(rng.randint(1, 4))] + [INVALID]
    answers = [rng.choice(pool) for _ in range(n)]
    right = {a: a is not INVALID and rng.random() < 0.5 for a in pool}
    correct = [right[a] for a in answers]
    scores = [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
    samples = [Sample(0, i, [0], "", [-0.1], "eos", answer=a, score=s)
               for i, (a, s) in enumerate(zip(answers, scores))]
    return answers, correct, scores, samples, right


def subsets(n, k):
    return list(itertools.combinations(range(n), k))


def test_every_estimator_matches_brute_force():
    rng = random.Random(1234)
    checked = 0
    for _ in range(60):
        answers, correct, scores, samples, right = random_case(rng)
        n = len(answers)
        for k in range(1, n + 1):
            subs = subsets(n, k)
            # pass@k: any correct sample in the subset
            bf = Fraction(sum(any(correct[i] for i in s) for s in subs), len(subs))
            assert pass_at_k(n, sum(correct), k) == pytest.approx(float(bf), abs=1e-12)
            # maj@k: majority_vote on the subset, uniform tie-break over details["tied"]
            for count_invalid in (False, True):
                total = Fraction(0)
                for s in subs:
                    tied = majority_vote([samples[i] for i in s], count_invalid=count_invalid).details["tied"]
                    if tied:
                        total += Fraction(sum(right[a] for a in tied), len(tied))
                exact = maj_at_k_exact(answers, correct, k, count_invalid=count_invalid)
                assert exact == total / len(subs), (answers, correct, k, count_invalid)
            # bon@k: best_of_n on the subset, uniform tie-break over the tied top samples
            total = Fraction(0)
            for s in subs:
                tied = best_of_n([samples[i] for i in s]).details["tied"]  # Sample.index == position
                if tied:
                    total += Fraction(sum(correct[i] for i in tied), len(tied))
            valid = [a is not INVALID for a in answers]
            assert bon_at_k_exact(scores, correct, k, valid) == total / len(subs)
            checked += 1
    assert checked > 150


def test_known_values():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # subsets of {r, r, r, w} of size 3: {r,r,r} and 3x {r,r,w}: r always has the majority
    assert maj_at_k(["r", "r", "r", "w"], [True, True, True, False], 3) == 1.0
    # {r, w}: a 1-1 tie -> 1/2 with uniform tie-breaking
    assert maj_at_k(["r", "w"], [True, False], 2) == 0.5
    # INVALID does not vote: the lone real answer wins every subset containing it
    assert maj_at_k(["r", INVALID, INVALID], [True, False, False], 2) == pytest.approx(2 / 3)
    # counted as an answer, INVALID ties r in {r, I} (twice, 1/2 each) and wins {I, I}
    assert maj_at_k(["r", INVALID, INVALID], [True, False, False], 2, count_invalid=True) == pytest.approx(1 / 3)
    assert bon_at_k([0.1, 0.9, 0.5], [False, True, False], 2) == pytest.approx(2 / 3)


def test_maj_at_k_large_n_is_fast_and_sane():
    rng = random.Random(0)
    answers = [rng.choice("aaabbc") for _ in range(64)]
    correct = [a == "a" for a in answers]
    values = [maj_at_k(answers, correct, k) for k in (1, 2, 4, 8, 16, 32, 64)]
    assert values[0] == pytest.approx(answers.count("a") / 64)
    assert values[-1] == 1.0  # the plurality answer at full n
    assert values[-2] > values[2] > values[0]  # more votes help when the right answer leads


def test_estimator_errors():
    with pytest.raises(ParScaleError, match="larger than the number of samples"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ParScaleError, match="k must be an integer >= 1"):
        maj_at_k(["a"], [True], 0)
    with pytest.raises(ParScaleError, match="both correct and incorrect"):
        maj_at_k(["a", "a"], [True, False], 1)
    with pytest.raises(ParScaleError, match="INVALID answer is marked correct"):
        maj_at_k([INVALID], [True], 1)
    with pytest.raises(ParScaleError, match="needs a score"):
        bon_at_k([float("nan")], [True], 1)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).random(50)
    a = bootstrap_ci(values, seed=3)
    b = bootstrap_ci(values, seed=3)
    assert a == b
    assert a.low < a.estimate < a.high
    assert a.estimate == pytest.approx(values.mean())
    med = bootstrap_ci(values, statistic=np.median, n_boot=200)
    assert med.low <= np.median(values) <= med.high
    assert bootstrap_ci([1.0, 1.0]).low == 1.0
    with pytest.raises(ParScaleError, match="non-empty"):
        bootstrap_ci([])


def test_wilson_interval():
    w = wilson_ci(8, 10)
    assert w.estimate == 0.8
    assert (w.low, w.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # textbook value
    assert wilson_ci(0, 5).low == 0.0 and wilson_ci(5, 5).high == 1.0
    with pytest.raises(ParScaleError):
        wilson_ci(3, 2)


def test_default_ks():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert default_ks(1) == [1]


def toy_set(with_scores=True):
    """3 arithmetic problems x 4 samples; problem 0 right by majority, 1 wrong, 2 all INVALID."""
    task = TASKS["arithmetic"]
    problems = task.make_problems(3, seed=0, difficulty=1)
    texts = {0: [problems[0].reference, problems[0].reference, "999", problems[0].reference],
             1: ["999", "999", problems[1].reference, "998"],
             2: ["??", "", "x", "?"]}
    samples = []
    for p in problems:
        for i, t in enumerate(texts[p.id]):
            samples.append(Sample(p.id, i, [1, 2], f" {t}\nQ:", [-0.5, -0.5], "stop",
                                  score=(1.0 if t == p.reference else 0.0) if with_scores else None))
    ledger = CostLedger(prompt_tokens=30, generated_tokens=24, decode_steps=6, row_steps=24, flops=3e3, streams=2)
    return SampleSet(problems, samples, ledger, {"task": "arithmetic"})


def test_score_sample_set():
    report = score_sample_set(toy_set(), ks=[1, 4], n_boot=200)
    assert report.n == 4 and report.problems == 3 and report.task == "arithmetic"
    assert report.invalid_rate == pytest.approx(4 / 12)
    assert report.sample_accuracy == pytest.approx(4 / 12)
    row1, row4 = report.rows
    assert row1.pass_at_k.estimate == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert row4.pass_at_k.estimate == pytest.approx(2 / 3)
    assert row4.maj_at_k.estimate == pytest.approx(1 / 3)
    assert row4.bon_at_k.estimate == pytest.approx(2 / 3)  # the score here is an oracle
    assert report.strategy_accuracy.estimate == pytest.approx(1 / 3)
    assert report.cost_per_problem["tokens"] == pytest.approx(18.0)
    assert score_sample_set(toy_set(False), ks=[2], n_boot=10).rows[0].bon_at_k is None
    assert score_sample_set(toy_set(), strategy="bon", ks=[1], n_boot=10).strategy_accuracy.estimate == \
        pytest.approx(2 / 3)
    with pytest.raises(ParScaleError, match="k=5 is larger"):
        score_sample_set(toy_set(), ks=[5])
    with pytest.raises(ParScaleError, match="unknown task"):
        score_sample_set(toy_set(), task="chess")


def test_score_cli(tmp_path, capsys):
    path = toy_set().save_jsonl(tmp_path / "s.jsonl")
    assert main(["score", str(path), "--k", "1,2,4", "--boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "maj@k" in out and "bon@k" in out and "strategy majority" in out
    assert main(["score", str(path), "--k", "4", "--json", "--boot", "50", "--strategy", "bom"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"][0]["k"] == 4 and report["strategy"] == "bom"
    assert math.isclose(report["rows"][0]["pass_at_k"]["estimate"], 2 / 3)
    for argv, msg in [(["--k", "8"], "larger than the number of samples"), (["--k", "0"], "k must be >= 1"),
                      (["--k", "two"], "not an integer"), (["--strategy", "magic"], "unknown strategy")]:
        assert main(["score", str(path), *argv]) == 2
        assert msg in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["score", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err
