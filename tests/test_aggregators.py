"""Answer extraction/canonicalisation and the aggregators (tie rules, INVALID handling, options)."""

import math

import pytest

from parscale.errors import ParScaleError
from parscale.sampling.aggregators import (STRATEGIES, best_of_majority, best_of_n, first_finished, get_strategy,
                                           majority_vote, min_window_logprob, shortest, verify_then_vote,
                                           weighted_vote)
from parscale.sampling.answers import (INVALID, Invalid, boxed, canonical_number, extract_answers, first_line,
                                       first_line_number, get_extractor, last_number, regex)
from parscale.sampling.records import Sample


def S(i, answer, *, logprobs=(-0.1,), score=None, length=3, step=None, text=""):
    return Sample(0, i, [0] * length, text, list(logprobs), "eos", finish_step=step, answer=answer, score=score)


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text, want", [
    ("3.0", "3"), ("-0", "0"), ("+5", "5"), ("1,000", "1000"), ("1,234.50", "1234.5"), ("007", "7"),
    ("1/2", "0.5"), ("2/6", "1/3"), ("-3/4", "-0.75"), ("4/2", "2"), (".5", "0.5"), ("3.", "3"),
    (" 42 ", "42"), ("1/0", None), ("1e3", None), ("12a", None), ("", None), ("1,00", None), ("5%", None),
])
def test_canonical_number(text, want):
    assert canonical_number(text) == want


@pytest.mark.parametrize("text, want", [
    ("so 5-3 is 2.", "2"), ("x = -3", "-3"), ("5-3", "3"), ("total 1,000 apples", "1000"),
    ("ratio 3/4", "0.75"), ("abc123", INVALID), ("no digits", INVALID), ("f(-2)", "-2"), ("[1, 2, 3]", "3"),
])
def test_last_number(text, want):
    assert last_number(text) == want


def test_boxed_nested_and_last():
    assert boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert boxed(r"\boxed{ 3.0 }") == "3"
    assert boxed(r"\boxed{7} and a cut \boxed{\frac{1}{") == "7"  # unbalanced last one: earlier wins
    assert boxed("nothing here") is INVALID
    assert boxed(r"\boxed{}") is INVALID


def test_lines_and_regex():
    assert first_line("\n  432  \nQ: 1+1=") == "432"
    assert first_line_number(" 432\nQ: 1+1=\nA: 2") == "432"
    assert first_line_number(" 432 apples\n") is INVALID
    assert first_line("   \n") is INVALID
    ex = regex(r"Answer:\s*(\S+)")
    assert ex("Answer: 1 ... Answer: 2.50") == "2.5"
    assert ex("none") is INVALID
    assert get_extractor("regex:=(\\d+)")("a=1 b=22") == "22"
    with pytest.raises(ParScaleError, match="does not compile"):
        regex("(")
    with pytest.raises(ParScaleError, match="unknown extractor"):
        get_extractor("nope")


def test_user_callable_and_extract_answers():
    ex = get_extractor(lambda t: t.split()[-1] if t.split() else None)
    assert ex("a b c") == "c" and ex("   ") is INVALID
    with pytest.raises(ParScaleError, match="expected str"):
        get_extractor(lambda t: 3)("x")
    samples = [Sample(0, 0, [], " 12\n", [], "eos"), Sample(0, 1, [], " 12\n", [], "pruned")]
    extract_answers(samples, "first_line_number")
    assert samples[0].answer == "12" and samples[1].answer is INVALID  # a pruned row never answered


def test_invalid_is_a_falsy_singleton_not_a_string():
    assert Invalid() is INVALID and not INVALID and INVALID != "INVALID" and repr(INVALID) == "INVALID"


# ----------------------------------------------------------------------------- votes
def test_majority_counts_and_tie_goes_to_first_occurrence():
    d = majority_vote([S(0, "a"), S(1, "b"), S(2, "b"), S(3, "a"), S(4, "c")])
    assert d.answer == "a" and d.support == 2 and d.total == 5 and d.index == 0
    assert d.details["tied"] == ["a", "b"]
    d = majority_vote([S(0, "c"), S(1, "b"), S(2, "b"), S(3, "a"), S(4, "a")])
    assert d.answer == "b" and d.index == 1 and d.details["tied"] == ["b", "a"]
    d = majority_vote([S(0, "x"), S(1, "y"), S(2, "y")])
    assert d.answer == "y" and d.details["tied"] == ["y"]


def test_invalid_never_wins_unless_counted():
    samples = [S(0, INVALID), S(1, INVALID), S(2, INVALID), S(3, "7")]
    assert majority_vote(samples).answer == "7"
    assert majority_vote(samples, count_invalid=True).answer is INVALID
    d = majority_vote([S(0, INVALID)])
    assert d.answer is INVALID and d.index is None


def test_majority_needs_extracted_answers():
    with pytest.raises(ParScaleError, match="no extracted answer"):
        majority_vote([S(0, None)])
    with pytest.raises(ParScaleError, match="no samples"):
        majority_vote([])


def test_weighted_vote_mean_logprob_outvotes_count():
    confident, unsure = [-0.01], [-3.0]
    samples = [S(0, "a", logprobs=unsure), S(1, "a", logprobs=unsure), S(2, "b", logprobs=confident)]
    d = weighted_vote(samples)
    assert d.answer == "b"
    assert d.support == pytest.approx(math.exp(-0.01))
    assert d.total == pytest.approx(math.exp(-0.01) + 2 * math.exp(-3.0))
    assert weighted_vote(samples, weights=lambda s: 1.0).answer == "a"  # plain counts again


def test_min_window_confidence_sees_a_bad_stretch():
    lp = [-0.1] * 10 + [-5.0, -5.0] + [-0.1] * 10
    assert min_window_logprob(lp, 2) == pytest.approx(-5.0)
    assert min_window_logprob(lp, 4) == pytest.approx(-2.55)
    assert min_window_logprob([-1.0, -3.0], 16) == pytest.approx(-2.0)  # shorter than the window
    steady = [-0.6] * 22
    samples = [S(0, "bumpy", logprobs=lp), S(1, "steady", logprobs=steady)]
    assert sum(lp) / len(lp) > -0.6  # by mean the bumpy trace is more confident...
    assert weighted_vote(samples).answer == "bumpy"
    assert weighted_vote(samples, weights="min_window", window=4).answer == "steady"  # ...not by its worst window


def test_weighted_keep_filters_to_most_confident():
    samples = [S(0, "a", logprobs=[-2.0]), S(1, "a", logprobs=[-2.0]), S(2, "a", logprobs=[-2.0]),
               S(3, "b", logprobs=[-0.1]), S(4, "b", logprobs=[-0.2])]
    assert weighted_vote(samples, weights=lambda s: 1.0).answer == "a"
    d = weighted_vote(samples, weights="mean_logprob", keep=0.4)
    assert d.answer == "b" and d.details["kept"] == [3, 4]


def test_weighted_errors():
    with pytest.raises(ParScaleError, match="weight 0"):
        weighted_vote([S(0, "a", logprobs=()), S(1, "b", logprobs=())])
    with pytest.raises(ParScaleError, match="unknown weights"):
        weighted_vote([S(0, "a")], weights="entropy")
    with pytest.raises(ParScaleError, match="finite and >= 0"):
        weighted_vote([S(0, "a")], weights=lambda s: -1.0)


def test_best_of_n_skips_invalid_and_breaks_ties_first():
    samples = [S(0, INVALID, score=9.0), S(1, "a", score=0.5), S(2, "b", score=0.7), S(3, "c", score=0.7)]
    d = best_of_n(samples)
    assert d.answer == "b" and d.index == 2 and d.details["tied"] == [2, 3]
    assert best_of_n(samples, scorer=lambda s: -s.index).answer == "a"
    assert best_of_n([S(0, INVALID, score=1.0)]).answer is INVALID
    with pytest.raises(ParScaleError, match="no score"):
        best_of_n([S(0, "a")])


def test_best_of_majority_restricts_to_frequent_answers():
    samples = [S(0, "a", score=0.1), S(1, "a", score=0.2), S(2, "a", score=0.3),
               S(3, "b", score=0.6), S(4, "b", score=0.5), S(5, "c", score=0.99)]
    assert best_of_n(samples).answer == "c"  # the lone high score
    d = best_of_majority(samples, min_fraction=0.3)  # c has 1/6 < 0.3
    assert d.answer == "b" and d.index == 3 and d.details["candidates"] == ["a", "b"]
    assert best_of_majority(samples, top_m=1).answer == "a"
    assert best_of_majority(samples, min_fraction=0.9).answer == "a"  # the most frequent is always kept
    assert best_of_majority(samples).answer == "b"  # default 20%: c is out
    with pytest.raises(ParScaleError, match="not both"):
        best_of_majority(samples, min_fraction=0.5, top_m=2)


def test_verify_then_vote_and_fallback():
    samples = [S(0, "a", score=0.0), S(1, "a", score=0.1), S(2, "b", score=0.9)]
    d = verify_then_vote(samples)
    assert d.answer == "b" and d.details["fallback"] is False and d.details["accepted"] == [2]
    d = verify_then_vote(samples, verifier=lambda s: False)
    assert d.answer == "a" and d.details["fallback"] is True


def test_shortest_and_first_finished():
    samples = [S(0, "a", length=5, step=9), S(1, INVALID, length=1, step=0), S(2, "b", length=2, step=4),
               S(3, "c", length=2, step=None)]
    d = shortest(samples)
    assert d.answer == "b" and d.support == 2
    d = first_finished(samples)
    assert d.answer == "b" and d.support == 4
    assert first_finished([S(0, "x"), S(1, "y")]).answer == "x"  # unknown steps: order decides


def test_registry():
    assert set(STRATEGIES) == {"majority", "weighted", "bon", "bom", "verify", "shortest", "first"}
    assert get_strategy("majority") is majority_vote
    with pytest.raises(ParScaleError, match="unknown strategy"):
        get_strategy("vote")
