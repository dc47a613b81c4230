"""Aggregators: pick one answer from the N samples of one problem.

Every aggregator takes the samples of one problem, in index order, with answers already extracted
(``extract_answers``), and returns a ``Decision``. Shared rules, so results are reproducible:

* ``INVALID`` never wins while any sample has a real answer (``count_invalid=True`` lets the
  vote-based ones count it as an ordinary answer). With no real answer the decision is ``INVALID``.
* **Ties** are broken towards the answer (or sample) that comes **first in the given order**, i.e.
  the lowest sample index. ``details["tied"]`` lists everything that tied, so an estimator can
  instead average over a uniformly random tie-break (``estimators.maj_at_k`` does).
* ``Decision.index`` is the ``Sample.index`` of the chosen sample; for votes it is the first
  sample that gave the winning answer.

Strategies (registry ``STRATEGIES``, names used by the CLI):

``majority``  self-consistency (Wang et al., 2022): the most frequent answer.
``weighted``  confidence-weighted vote. ``weights="mean_logprob"``: weight ``exp(mean log-prob)``
              (the geometric-mean token probability). ``weights="min_window"``: ``exp`` of the
              lowest mean log-prob over sliding windows of ``window`` tokens — DeepConf's "lowest
              group confidence" (Fu et al., 2025), computed from the chosen token's log-prob
              because that is what the sampler records (DeepConf uses top-k token log-probs).
              ``keep`` < 1 votes with only that fraction of most confident traces (DeepConf-style
              filtering).
``bon``       best-of-N: the sample with the highest score (``Sample.score`` or a scorer callable).
``bom``       Best-of-Majority (Di et al., 2025): keep answers that are frequent (at least
              ``min_fraction`` of the valid votes, or the ``top_m`` most frequent), then take the
              best-scored sample among them.
``verify``    verify-then-vote: majority over samples a verifier accepts; if it accepts none,
              majority over all (``details["fallback"] = True``).
``shortest``  the shortest valid sample (fewest tokens).
``first``     the valid sample that finished first (``finish_step``, then order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParScaleError
from .answers import INVALID, Invalid
from .records import Sample

Scorer = Callable[[Sample], float]


@dataclass
class Decision:
    answer: str | Invalid
    support: float  # votes / weight / score behind the answer
    total: float  # votes or weight cast in all (for bon/bom: the number of candidates)
    index: int | None  # Sample.index of the chosen sample; None when nothing was chosen
    details: dict[str, Any] = field(default_factory=dict)


def _check_extracted(samples: Sequence[Sample]) -> None:
    if not samples:
        raise ParScaleError("no samples to aggregate")
    for s in samples:
        if s.answer is None:
            raise ParScaleError(f"sample {s.index} of problem {s.problem_id} has no extracted answer "
                                "(run extract_answers first)")


def _vote(samples: Sequence[Sample], weights: Sequence[float], count_invalid: bool) -> Decision:
    """Weighted plurality; ties go to the answer whose first sample comes first."""
    tally: dict[Any, float] = {}
    first: dict[Any, int] = {}
    for pos, (s, w) in enumerate(zip(samples, weights)):
        if s.answer is INVALID and not count_invalid:
            continue
        tally[s.answer] = tally.get(s.answer, 0.0) + w
        first.setdefault(s.answer, pos)
    total = sum(tally.values())
    if not tally:
        return Decision(INVALID, 0.0, 0.0, None, {"votes": [], "tied": []})
    ranked = sorted(tally, key=lambda a: (-tally[a], first[a]))
    best = tally[ranked[0]]
    tied = [a for a in ranked if tally[a] == best]
    winner = ranked[0]
    return Decision(winner, best, total, samples[first[winner]].index,
                    {"votes": [(a, tally[a]) for a in ranked], "tied": tied})


def majority_vote(samples: Sequence[Sample], *, count_invalid: bool = False) -> Decision:
    _check_extracted(samples)
    return _vote(samples, [1.0] * len(samples), count_invalid)


def min_window_logprob(logprobs: Sequence[float], window: int) -> float:
    """Lowest mean over sliding windows of ``window`` log-probs (whole trace if shorter)."""
    if not logprobs:
        return -math.inf
    if len(logprobs) <= window:
        return sum(logprobs) / len(logprobs)
    run = sum(logprobs[:window])
    lowest = run
    for i in range(window, len(logprobs)):
        run += logprobs[i] - logprobs[i - window]
        lowest = min(lowest, run)
    return lowest / window


def confidence(sample: Sample, weights: str = "mean_logprob", window: int = 16) -> float:
    """A sample's vote weight in ``weighted_vote`` (see the module docstring)."""
    if weights == "mean_logprob":
        return math.exp(sample.mean_logprob)
    if weights == "min_window":
        return math.exp(min_window_logprob(sample.logprobs, window))
    raise ParScaleError(f"unknown weights {weights!r}; use mean_logprob, min_window or a callable")


def weighted_vote(samples: Sequence[Sample], *, weights: str | Callable[[Sample], float] = "mean_logprob",
                  window: int = 16, keep: float = 1.0, count_invalid: bool = False) -> Decision:
    _check_extracted(samples)
    if not isinstance(window, int) or window < 1:
        raise ParScaleError(f"weighted vote: window must be an integer >= 1 (got {window!r})")
    if not 0.0 < keep <= 1.0:
        raise ParScaleError(f"weighted vote: keep must be in (0, 1] (got {keep!r})")
    weigh = weights if callable(weights) else (lambda s: confidence(s, weights, window))
    w = [float(weigh(s)) for s in samples]
    for s, x in zip(samples, w):
        if not (math.isfinite(x) and x >= 0):
            raise ParScaleError(f"weighted vote: sample {s.index} has weight {x!r}; weights must be finite and >= 0")
    voters = [i for i, s in enumerate(samples) if count_invalid or s.answer is not INVALID]
    if voters and keep < 1.0:
        n_keep = max(1, math.ceil(keep * len(voters)))
        voters = sorted(voters, key=lambda i: (-w[i], i))[:n_keep]
    if voters and all(w[i] == 0 for i in voters):
        raise ParScaleError("weighted vote: every sample has weight 0 (were token log-probs recorded?)")
    chosen = sorted(voters)
    decision = _vote([samples[i] for i in chosen], [w[i] for i in chosen], count_invalid)
    decision.details["kept"] = [samples[i].index for i in chosen]
    return decision


def _scores(samples: Sequence[Sample], scorer: Scorer | None) -> list[float]:
    out = []
    for s in samples:
        x = scorer(s) if scorer is not None else s.score
        if x is None:
            raise ParScaleError(f"sample {s.index} of problem {s.problem_id} has no score "
                                "(best-of-N needs Sample.score or a scorer)")
        x = float(x)
        if math.isnan(x):
            raise ParScaleError(f"sample {s.index} of problem {s.problem_id} has score NaN")
        out.append(x)
    return out


def _best(samples: Sequence[Sample], scores: Sequence[float], allowed: Callable[[Sample], bool]) -> Decision:
    """Highest score among allowed samples; ties go to the first. INVALID only if none allowed."""
    candidates = [i for i, s in enumerate(samples) if allowed(s)]
    if not candidates:
        return Decision(INVALID, -math.inf, 0, None, {"tied": []})
    top = max(scores[i] for i in candidates)
    tied = [i for i in candidates if scores[i] == top]
    chosen = samples[tied[0]]
    return Decision(chosen.answer, top, len(candidates), chosen.index,
                    {"tied": [samples[i].index for i in tied]})


def best_of_n(samples: Sequence[Sample], scorer: Scorer | None = None) -> Decision:
    """The best-scored sample with a real answer (INVALID samples are passed over)."""
    _check_extracted(samples)
    return _best(samples, _scores(samples, scorer), lambda s: s.answer is not INVALID)


def best_of_majority(samples: Sequence[Sample], scorer: Scorer | None = None, *,
                     min_fraction: float | None = None, top_m: int | None = None) -> Decision:
    """Best-scored sample among frequent answers. Default: answers with >= 20% of the valid votes;
    the most frequent answer is always a candidate."""
    _check_extracted(samples)
    if min_fraction is not None and top_m is not None:
        raise ParScaleError("best-of-majority: give min_fraction or top_m, not both")
    if top_m is not None and (not isinstance(top_m, int) or top_m < 1):
        raise ParScaleError(f"best-of-majority: top_m must be an integer >= 1 (got {top_m!r})")
    if min_fraction is None and top_m is None:
        min_fraction = 0.2
    if min_fraction is not None and not 0.0 < min_fraction <= 1.0:
        raise ParScaleError(f"best-of-majority: min_fraction must be in (0, 1] (got {min_fraction!r})")
    scores = _scores(samples, scorer)
    ranked = _vote(samples, [1.0] * len(samples), False).details["votes"]  # [(answer, count)], best first
    if top_m is not None:
        keep = {a for a, _ in ranked[:top_m]}
    else:
        n_valid = sum(c for _, c in ranked)
        keep = {a for a, c in ranked if c >= min_fraction * n_valid} | {a for a, _ in ranked[:1]}
    decision = _best(samples, scores, lambda s: s.answer in keep and s.answer is not INVALID)
    decision.details["candidates"] = [a for a, _ in ranked if a in keep]
    return decision


def verify_then_vote(samples: Sequence[Sample], verifier: Callable[[Sample], bool] | None = None, *,
                     threshold: float = 0.5) -> Decision:
    """Majority over the samples the verifier accepts (default: ``score >= threshold``)."""
    _check_extracted(samples)
    if verifier is None:
        scores = _scores(samples, None)
        accepted = [s for s, x in zip(samples, scores) if x >= threshold]
    else:
        accepted = [s for s in samples if verifier(s)]
    voting = accepted if any(s.answer is not INVALID for s in accepted) else list(samples)
    decision = _vote(voting, [1.0] * len(voting), False)
    decision.details["fallback"] = voting is not accepted
    decision.details["accepted"] = [s.index for s in accepted]
    return decision


def shortest(samples: Sequence[Sample]) -> Decision:
    """Fewest tokens; ``support`` is that token count."""
    _check_extracted(samples)
    decision = _best(samples, [-s.length for s in samples], lambda s: s.answer is not INVALID)
    decision.support = -decision.support
    return decision


def first_finished(samples: Sequence[Sample]) -> Decision:
    """Earliest ``finish_step`` (unknown counts as last), ties to the first in order; ``support`` is
    that step."""
    _check_extracted(samples)
    steps = [-(s.finish_step if s.finish_step is not None else math.inf) for s in samples]
    decision = _best(samples, steps, lambda s: s.answer is not INVALID)
    decision.support = -decision.support
    return decision


STRATEGIES: dict[str, Callable[..., Decision]] = {
    "majority": majority_vote,
    "weighted": weighted_vote,
    "bon": best_of_n,
    "bom": best_of_majority,
    "verify": verify_then_vote,
    "shortest": shortest,
    "first": first_finished,
}
# Strategies that read Sample.score when no scorer/verifier is passed.
NEEDS_SCORES = {"bon", "bom", "verify"}


def get_strategy(name: str) -> Callable[..., Decision]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ParScaleError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
