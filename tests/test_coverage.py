"""The coverage law (exponentiated power law fit, bootstrap, held-out check) and selection by a
noisy verifier: exact references (brute-force subsets, numpy's polyfit), hand counts, and
degenerate inputs that must give a clear result or one-line error, never NaN."""

import itertools
import json
import math

import numpy as np
import pytest

from conftest import run_cli, snapshot
from parscale.errors import ParScaleError
from parscale.sampling import SampleSet
from parscale.sampling.coverage import (_wls_line, coverage_matrix, coverage_report, fit_coverage_law,
                                        noisy_verdicts, parse_noisy_verifier, prediction_interval,
                                        sample_correctness, selection_at_k, selection_curve)
from parscale.sampling.estimators import pass_at_k, score_sample_set
from parscale.sampling.records import CostLedger, Sample
from parscale.sampling.tasks import TASKS


def population(problems=120, n=32, alpha=0.3, beta=3.0, seed=0):
    """Per-problem solve rates from a Beta law (heavy tail of hard problems: the Monkeys setting)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(alpha, beta, size=problems)
    return {i: [bool(x) for x in rng.random(n) < pi] for i, pi in enumerate(p)}, p


# ----------------------------------------------------------------------------- measured coverage
def test_coverage_matrix_is_exact_over_subsets():
    flags = {0: [True, False, False, True, False], 1: [False] * 5, 2: [True, True, False, True, True]}
    m = coverage_matrix(flags)
    assert m.shape == (3, 5)
    for row, f in enumerate(flags.values()):
        for k in range(1, 6):
            subsets = list(itertools.combinations(f, k))
            assert m[row, k - 1] == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    with pytest.raises(ParScaleError, match="k_max=6"):
        coverage_matrix(flags, 6)


# ----------------------------------------------------------------------------- the fit
def test_line_fit_recovers_an_exact_law():
    ks = np.arange(1, 17, dtype=float)
    a, b = -1.7, -0.45
    c = np.exp(a * ks ** b)[None, :]
    fa, fb, ok = _wls_line(np.log(ks), c)
    assert ok[0] and fa[0] == pytest.approx(a, rel=1e-10) and fb[0] == pytest.approx(b, rel=1e-10)


def test_weighted_fit_matches_polyfit():
    correct, _ = population(problems=60, n=16, seed=3)
    fit = fit_coverage_law(correct, n_boot=0)
    c = coverage_matrix(correct).mean(0)
    ks = np.arange(1, 17)
    keep = (c > 0) & (c < 1)
    w = c[keep] * np.log(c[keep]) ** 2 / (1 - c[keep])
    # polyfit weights multiply the residuals, so they are the square roots of the WLS weights
    slope, intercept = np.polyfit(np.log(ks[keep]), np.log(-np.log(c[keep])), 1, w=np.sqrt(w))
    assert fit.status == "ok" and fit.ks == [int(k) for k in ks[keep]]
    assert fit.b == pytest.approx(slope, rel=1e-9) and fit.a == pytest.approx(-math.exp(intercept), rel=1e-9)
    assert fit.a < 0 and fit.b < 0
    assert fit.predict(1) == pytest.approx(math.exp(fit.a))


def test_bootstrap_intervals_are_seeded_and_contain_the_estimate():
    correct, _ = population(problems=80, n=16, seed=1)
    one = fit_coverage_law(correct, n_boot=300, seed=7)
    two = fit_coverage_law(correct, n_boot=300, seed=7)
    other = fit_coverage_law(correct, n_boot=300, seed=8)
    assert (one.a_ci.low, one.a_ci.high) == (two.a_ci.low, two.a_ci.high)
    assert (one.a_ci.low, one.a_ci.high) != (other.a_ci.low, other.a_ci.high)
    assert one.a_ci.low < one.a < one.a_ci.high and one.b_ci.low < one.b < one.b_ci.high
    assert one.boot_used == 300
    iv = prediction_interval(one, [4, 64, 1024])
    assert all(i.low < i.estimate < i.high for i in iv)
    assert iv[0].estimate < iv[1].estimate < iv[2].estimate < 1  # coverage rises towards 1
    assert fit_coverage_law(correct, n_boot=0).a_ci is None


def test_held_out_prediction_tracks_the_measured_coverage():
    correct, p = population(problems=200, n=64, seed=0)
    report = coverage_report(correct, predict_ks=[256], holdout=4, n_boot=400)
    assert report.holdout_k_max == 16 and [q.k for q in report.holdout] == list(range(17, 65))
    for q in report.holdout:  # measured is the exact coverage at that k
        assert q.measured == pytest.approx(np.mean([pass_at_k(64, sum(c), q.k) for c in correct.values()]))
    # fitted on a quarter of the curve, the law predicts the rest within 2 points of coverage
    assert report.holdout_max_abs_error < 0.02
    assert report.holdout_in_interval >= 0.9
    # and the extrapolation to k = 256 brackets the population's true coverage
    truth = float(np.mean(1 - (1 - p) ** 256))
    pred = report.predictions[0].predicted
    assert report.predictions[0].measured is None and pred.low < truth < pred.high
    json.dumps(report.to_dict(), allow_nan=False)


def test_a_curve_off_the_law_shows_in_the_held_out_error():
    # two kinds of problems: half solved at rate 0.5, half never: coverage plateaus at 0.5,
    # which no exp(a k^b) with b < 0 reaches -- the fit on small k overshoots the later k
    correct = {i: ([True, False] * 16 if i % 2 else [False] * 32) for i in range(40)}
    report = coverage_report(correct, holdout=4, n_boot=50)
    assert report.holdout_max_abs_error > 0.05


@pytest.mark.parametrize("flags, status, value", [
    ({0: [False] * 4, 1: [False] * 4}, "all_zero", 0.0),
    ({0: [True] * 4, 1: [True] * 4}, "all_one", 1.0),
    ({0: [True] * 4, 1: [False] * 4, 2: [False] * 4}, "flat", 1 / 3),
])
def test_degenerate_curves_give_a_clear_status(flags, status, value):
    report = coverage_report(flags, predict_ks=[2, 100], n_boot=50)
    assert report.fit.status == status
    assert [p.predicted.estimate for p in report.predictions] == pytest.approx([value, value])
    text = json.dumps(report.to_dict(), allow_nan=False)  # no NaN or infinity anywhere
    assert f'"status": "{status}"' in text


def test_too_few_k_is_a_one_line_error():
    with pytest.raises(ParScaleError, match="n >= 2"):
        coverage_report({0: [True], 1: [False]})
    # every problem has at most one wrong sample of 4: coverage is 1 from k = 2 on
    with pytest.raises(ParScaleError, match="saturates at 1"):
        fit_coverage_law({0: [True, True, True, False], 1: [True] * 4}, k_max=4)
    with pytest.raises(ParScaleError, match="holdout"):
        coverage_report({0: [True, False]}, holdout=1)
    with pytest.raises(ParScaleError, match="k >= 1"):
        coverage_report({0: [True, False]}, predict_ks=[0])


def test_held_out_check_is_skipped_when_n_is_too_small():
    report = coverage_report({0: [True, False], 1: [False, False]}, n_boot=10)
    assert report.holdout_fit is None and report.holdout == [] and report.holdout_max_abs_error is None


# ----------------------------------------------------------------------------- noisy verifier
def test_selection_hand_count():
    correct = [True, False, False, True]
    verdict = [False, True, False, True]  # a missed right one, a false positive, a true positive
    assert selection_at_k(correct, verdict, 1) == pytest.approx(2 / 4)
    # the six pairs: {0,1} picks 1 (wrong), {0,2} none accepted -> 1/2, {0,3} picks 3,
    # {1,2} picks 1, {1,3} half-half, {2,3} picks 3: (0 + 1/2 + 1 + 0 + 1/2 + 1) / 6
    assert selection_at_k(correct, verdict, 2) == pytest.approx(3 / 6)
    assert selection_at_k(correct, verdict, 4) == pytest.approx(1 / 2)  # 1 and 3 accepted
    curve = selection_curve({0: correct}, {0: verdict}, [1, 2, 4], fp=0.5, fn=0.5, n_boot=10)
    assert [r.selection.estimate for r in curve.rows] == pytest.approx([0.5, 0.5, 0.5])
    assert [r.coverage.estimate for r in curve.rows] == pytest.approx([0.5, 5 / 6, 1.0])
    assert (curve.accepted_right, curve.accepted_wrong, curve.rejected_right, curve.rejected_wrong) == (1, 1, 1, 1)
    # limit: p = 1/2, precision = 0.5*0.5 / (0.5*0.5 + 0.5*0.5)
    assert curve.selection_limit == pytest.approx(0.5)


def test_perfect_and_useless_verifiers():
    correct, _ = population(problems=30, n=8, seed=2)
    keys = {pid: range(8) for pid in correct}
    perfect = noisy_verdicts(keys, correct, 0.0, 0.0, seed=1)
    assert perfect == correct
    curve = selection_curve(correct, perfect, [1, 2, 8], n_boot=10)
    for r in curve.rows:  # a perfect verifier turns coverage into accuracy
        assert r.selection.estimate == pytest.approx(r.coverage.estimate)
    accept_all = noisy_verdicts(keys, correct, 1.0, 0.0, seed=1)
    assert all(all(v) for v in accept_all.values())
    curve = selection_curve(correct, accept_all, [1, 8], fp=1.0, n_boot=10)
    rate = np.mean([sum(c) / 8 for c in correct.values()])
    assert [r.selection.estimate for r in curve.rows] == pytest.approx([rate, rate])  # a random pick
    assert curve.selection_limit == pytest.approx(rate)


def test_noisy_verdicts_are_seeded_per_sample_with_the_asked_rates():
    correct = {pid: [i % 3 == 0 for i in range(40)] for pid in range(100)}
    keys = {pid: list(range(40)) for pid in correct}
    v = noisy_verdicts(keys, correct, 0.2, 0.1, seed=4)
    assert v == noisy_verdicts(keys, correct, 0.2, 0.1, seed=4)
    assert v != noisy_verdicts(keys, correct, 0.2, 0.1, seed=5)
    # a sample's verdict does not depend on the others: reversed order, same verdicts
    rev = noisy_verdicts({0: keys[0][::-1]}, {0: correct[0][::-1]}, 0.2, 0.1, seed=4)
    assert rev[0][::-1] == v[0]
    right = [x for pid in correct for x, c in zip(v[pid], correct[pid]) if c]
    wrong = [x for pid in correct for x, c in zip(v[pid], correct[pid]) if not c]
    assert abs(1 - np.mean(right) - 0.1) < 0.02 and abs(np.mean(wrong) - 0.2) < 0.02
    curve = selection_curve(correct, v, [1, 4, 40], fp=0.2, fn=0.1, n_boot=10)
    # coverage reaches 1, selection is held near the precision at p = 14/40 right samples
    assert curve.rows[-1].coverage.estimate == 1.0
    p = 14 / 40
    assert curve.selection_limit == pytest.approx(p * 0.9 / (p * 0.9 + (1 - p) * 0.2))
    assert curve.rows[-1].selection.estimate == pytest.approx(curve.selection_limit, abs=0.03)


@pytest.mark.parametrize("text, match", [("0.1", "FP,FN"), ("0.1,0.2,0.3", "FP,FN"), ("a,0.1", "not a number"),
                                         ("0.1,1.5", "false-negative rate must be in"),
                                         ("-0.1,0", "false-positive"), ("nan,0", "false-positive")])
def test_parse_noisy_verifier_rejects_bad_specs(text, match):
    with pytest.raises(ParScaleError, match=match):
        parse_noisy_verifier(text)
    assert parse_noisy_verifier(" 0.1, 0.05 ") == (0.1, 0.05)


# ----------------------------------------------------------------------------- the CLI
def arithmetic_set(problems=12, n=16, seed=0):
    """A sample file by hand: problem i's samples are right with a rate that falls with i."""
    task = TASKS["arithmetic"]
    probs = task.make_problems(problems, seed=seed, difficulty=1)
    rng = np.random.default_rng(seed)
    samples = []
    for p in probs:
        rate = 0.6 / (1 + p.id)
        for i in range(n):
            text = p.reference if rng.random() < rate else "99999"
            samples.append(Sample(p.id, i, [1, 2], f" {text}\nQ:", [-0.5, -0.5], "stop"))
    return SampleSet(probs, samples, CostLedger(generated_tokens=2 * problems * n, flops=1e3),
                     {"task": "arithmetic"})


def test_score_coverage_fit_cli(tmp_path, capsys):
    sset = arithmetic_set()
    path = sset.save_jsonl(tmp_path / "s.jsonl")
    plot, out = tmp_path / "cov.png", tmp_path / "r.json"
    rc, stdout, err = run_cli(["score", path, "--coverage-fit", "--coverage-predict", "64", "256",
                               "--plot", plot, "--out", out, "--noisy-verifier", "0.1,0.2",
                               "--boot", "200"], capsys)
    assert rc == 0, err
    assert "coverage law" in stdout and "held-out check" in stdout and "noisy verifier" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    # the CLI's numbers are the library's on the same samples
    again = SampleSet.load_jsonl(path)
    report = score_sample_set(again, n_boot=200)
    correct = sample_correctness(again, report.task)
    lib = coverage_report(correct, predict_ks=[64, 256], n_boot=200)
    assert result["coverage"]["fit"]["a"] == pytest.approx(lib.fit.a)
    assert result["coverage"]["fit"]["b"] == pytest.approx(lib.fit.b)
    assert [p["k"] for p in result["coverage"]["predictions"]] == [64, 256]
    assert result["coverage"]["holdout"]["k_max"] == 4
    assert result["noisy_verifier"]["fp"] == 0.1 and result["noisy_verifier"]["fn"] == 0.2
    assert [r["k"] for r in result["noisy_verifier"]["rows"]] == [1, 2, 4, 8, 16]
    rc, stdout, err = run_cli(["score", path, "--coverage-predict", "32", "--json"], capsys)
    assert rc == 0 and json.loads(stdout)["coverage"]["predictions"][0]["k"] == 32  # implies the fit


@pytest.mark.parametrize("flags, match", [
    (["--noisy-verifier", "0.1"], "--noisy-verifier"),
    (["--noisy-verifier", "0.1,2"], "--noisy-verifier"),
    (["--coverage-predict", "0"], "--coverage-predict"),
    (["--coverage-fit", "--coverage-holdout", "1"], "--coverage-holdout"),
    (["--plot", "{tmp}/c.png"], "--coverage-fit"),
    (["--coverage-fit", "--plot", "{tmp}/c.pdf"], ".png"),
    (["--coverage-fit", "--out", "{tmp}/r.txt"], ".json"),
    (["--noisy-verifier", "0.1,0.1", "--verifier-seed", "-1"], "--verifier-seed"),
])
def test_score_coverage_bad_flags(tmp_path, capsys, flags, match):
    path = arithmetic_set(problems=3, n=4).save_jsonl(tmp_path / "s.jsonl")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["score", path] + [f.format(tmp=tmp_path) for f in flags], capsys)
    assert rc == 2 and match in err and err.strip().count("\n") == 0, err
    assert snapshot(tmp_path) == before  # nothing written


def test_score_too_few_k_is_a_one_line_cli_error(tmp_path, capsys):
    path = arithmetic_set(problems=3, n=1).save_jsonl(tmp_path / "s.jsonl")
    rc, _, err = run_cli(["score", path, "--coverage-fit"], capsys)
    assert rc == 2 and "n >= 2" in err and err.strip().count("\n") == 0


def test_noisy_verifier_scorer_matches_the_selection_curve(tmp_path, capsys):
    """bon@k with the noisy_verifier scorer is the selection@k of --noisy-verifier (same draws)."""
    path = arithmetic_set(problems=10, n=8, seed=2).save_jsonl(tmp_path / "s.jsonl")
    rc, out, err = run_cli(["score", path, "--scorer", "noisy_verifier:0.2,0.3,5", "--strategy", "bon",
                            "--noisy-verifier", "0.2,0.3", "--verifier-seed", "5", "--json", "--boot", "20"],
                           capsys)
    assert rc == 0, err
    result = json.loads(out)
    bon = [r["bon_at_k"]["estimate"] for r in result["rows"]]
    sel = [r["selection"]["estimate"] for r in result["noisy_verifier"]["rows"]]
    assert bon == pytest.approx(sel, abs=1e-12) and len(bon) == 4
    # and the draws really are noisy: some verdicts differ from the exact verifier's
    rc, out, _ = run_cli(["score", path, "--scorer", "verifier", "--strategy", "bon", "--json", "--boot", "20"],
                         capsys)
    exact = [r["bon_at_k"]["estimate"] for r in json.loads(out)["rows"]]
    assert exact != pytest.approx(bon)


@pytest.mark.parametrize("spec, match", [("noisy_verifier", "FP,FN"), ("noisy_verifier:0.1", "FP,FN"),
                                         ("noisy_verifier:0.1,x", "not a number"),
                                         ("noisy_verifier:0.1,0.1,-2", "seed")])
def test_noisy_verifier_scorer_bad_specs(tmp_path, capsys, spec, match):
    path = arithmetic_set(problems=2, n=2).save_jsonl(tmp_path / "s.jsonl")
    rc, _, err = run_cli(["score", path, "--scorer", spec], capsys)
    assert rc == 2 and match in err and err.strip().count("\n") == 0, err


@pytest.mark.parametrize("flags", [{0: [False] * 4, 1: [False] * 4}, {0: [True] * 4, 1: [False] * 4},
                                   {0: [True] * 4}])
def test_plot_handles_degenerate_fits(tmp_path, flags):
    from parscale.plots.coverage import plot_coverage

    report = coverage_report(flags, predict_ks=[16], n_boot=20)
    path = plot_coverage(report, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
