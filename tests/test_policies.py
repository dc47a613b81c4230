"""Early-stopping policies: agreement of the first W, posterior settling, first-K, parsing."""

import pytest

from parscale.errors import ParScaleError
from parscale.sampling.answers import INVALID
from parscale.sampling.policies import (CONTINUE, STOP, Action, AgreeFirstW, FirstFinish, NoStop, PosteriorSettled,
                                        beta_sf_half, make_policy)
from parscale.sampling.records import Sample


def fin(i, answer=None, text="", reason="eos"):
    return Sample(0, i, [1], text, [-0.1], reason, answer=answer)


def run(policy, answers):
    return [policy.observe(fin(i, a)).kind for i, a in enumerate(answers)]


def test_agree_first_w_stops_on_agreement():
    assert run(AgreeFirstW(3), ["5", "5", "5", "5"]) == ["continue", "continue", "stop", "stop"]


def test_agree_first_w_never_stops_after_disagreement():
    assert run(AgreeFirstW(3), ["5", "6", "5", "5", "5", "5"]) == ["continue"] * 6


def test_invalid_never_counts_as_agreement():
    assert run(AgreeFirstW(2), [INVALID, INVALID, INVALID]) == ["continue"] * 3
    assert run(AgreeFirstW(1), [INVALID]) == ["continue"]
    assert run(AgreeFirstW(1), ["7"]) == ["stop"]


def test_reset_starts_a_new_problem():
    p = AgreeFirstW(2)
    assert run(p, ["1", "1"])[-1] == "stop"
    p.reset()
    assert run(p, ["1", "2"]) == ["continue", "continue"]


def test_policy_uses_its_extractor_and_pruned_rows_are_invalid():
    p = AgreeFirstW(2, extractor="first_line_number")
    assert p.observe(fin(0, text=" 12\nQ:")) == CONTINUE
    assert p.observe(fin(1, text=" 12.0\n")) == STOP
    p = AgreeFirstW(2, extractor="first_line_number")
    p.observe(fin(0, text=" 12\n"))
    assert p.observe(fin(1, text=" 12\n", reason="pruned")) == CONTINUE
    with pytest.raises(ParScaleError, match="no extractor"):
        AgreeFirstW(2).observe(fin(0, text="12"))


def test_beta_tail():
    # unanimous c answers with prior 1: P(Beta(1+c, 1) > 1/2) = 1 - 2^-(c+1)
    for c in range(1, 6):
        assert beta_sf_half(1 + c, 1) == pytest.approx(1 - 2.0 ** -(c + 1))
    assert beta_sf_half(3, 3) == pytest.approx(0.5)
    from scipy.special import betainc
    assert beta_sf_half(4, 2) == pytest.approx(1 - betainc(4, 2, 0.5))
    assert beta_sf_half(2.5, 1.5) == pytest.approx(1 - betainc(2.5, 1.5, 0.5))
    # Monte Carlo check of the Dirichlet fact the policy relies on: p1/(p1+p2) ~ Beta(a1, a2)
    import numpy as np
    d = np.random.default_rng(0).dirichlet([4.0, 2.0, 3.0], size=200_000)
    assert np.mean(d[:, 0] > d[:, 1]) == pytest.approx(beta_sf_half(4, 2), abs=0.005)


def test_posterior_settled_thresholds():
    p = PosteriorSettled(0.95)
    assert run(p, ["a", "a", "a", "a"]) == ["continue", "continue", "continue", "stop"]  # 0.96875 >= 0.95
    p = PosteriorSettled(0.9)
    kinds = run(p, ["a", "b", "a", "a", "a"])
    # counts (1,0) .75, (1,1) .5, (2,1) .6875, (3,1) .8125, (4,1) .890625 -> never reaches 0.9
    assert kinds == ["continue"] * 5
    assert p.probability() == pytest.approx(0.890625)
    assert p.observe(fin(9, "a")) == STOP  # (5,1): 0.9375
    p = PosteriorSettled(0.6)
    assert run(p, [INVALID, INVALID]) == ["continue", "continue"]  # INVALID is no evidence
    assert p.probability() == 0.0


def test_posterior_prior_makes_it_more_cautious():
    eager, cautious = PosteriorSettled(0.95, prior=0.5), PosteriorSettled(0.95, prior=3.0)
    answers = ["a"] * 10
    assert run(eager, answers).index("stop") < run(cautious, answers).index("stop")


def test_first_finish():
    assert run(FirstFinish(3), [INVALID, "1", "2", "3"]) == ["continue", "continue", "stop", "stop"]
    assert run(NoStop(), ["1"] * 5) == ["continue"] * 5


def test_make_policy():
    assert isinstance(make_policy("agree:3"), AgreeFirstW) and make_policy("agree:3").w == 3
    p = make_policy("posterior:0.95")
    assert isinstance(p, PosteriorSettled) and p.threshold == 0.95 and p.prior == 1.0
    assert make_policy("posterior:0.9:0.5").prior == 0.5
    assert make_policy("first:4").k == 4
    assert isinstance(make_policy("none"), NoStop)
    for bad, msg in [("agree", "bad early-stop policy"), ("agree:x", "not a number"), ("agree:0", "W must be"),
                     ("posterior:1.5", "threshold"), ("posterior:0.9:-1", "prior"), ("vote:3", "bad early-stop"),
                     ("first:2:3", "bad early-stop")]:
        with pytest.raises(ParScaleError, match=msg):
            make_policy(bad)


def test_action():
    a = Action.prune([3, 5])
    assert a.kind == "prune" and a.rows == (3, 5) and not a.stops
    assert STOP.stops and not CONTINUE.stops
