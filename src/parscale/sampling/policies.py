"""Early-stopping policies: pure state machines the sampler consults as rows finish.

Protocol: per problem the sampler calls ``policy.reset()`` and ``policy.bind(context)`` (a
``PolicyContext``: the model, tokenizer, problem and its prompt tokens), then
``policy.observe(sample)`` each time one of the problem's rows finishes (``sample.index`` is the
row within the problem). The returned ``Action`` says: ``continue``, ``stop`` (end every row still
running for this problem), or ``prune`` the listed row indices. Once a policy has said ``stop`` it
keeps saying so. A policy with ``every = K > 0`` is also consulted on the *live* rows: after every
K-th generated token the sampler calls ``policy.inspect(step, live)`` (``live``: row index → its
tokens so far) and prunes the rows the returned Action lists (``deepprune``, ``peek``). Work a
policy does itself (a judge, forked rows) goes in ``policy.extra_cost`` and into the run's ledger.

A policy needs the finished sample's answer: it uses ``sample.answer`` when set, else its
``extractor`` (give the task's extractor). ``INVALID`` answers never count as agreement.

Policies (``make_policy`` parses the CLI spelling):

``agree:W``        ``AgreeFirstW(W)`` — stop when the first W finished answers are all the same
                   real answer; if they disagree, never stop early.
``posterior:T``    ``PosteriorSettled(T, prior)`` — stop when the posterior probability that the
                   current leading answer is the true mode reaches T. With a symmetric
                   Dirichlet(prior) posterior over the answers seen so far, the share of the
                   leader among the top two, p1/(p1+p2), is exactly Beta(prior+c1, prior+c2)
                   (c1 >= c2 the two largest counts; c2 = 0 with one answer). We use
                   P(p1 > p2) = P(Beta(prior+c1, prior+c2) > 1/2) as the approximation: it ignores
                   the third and later answers, so it overstates P(leader is the mode) when many
                   answers compete. With prior 1 and unanimous answers it is 1 - 2^-(c1+1):
                   0.75, 0.875, 0.9375, 0.96875 after 1..4 agreeing answers.
                   Add ``:PRIOR`` to set the prior (``posterior:0.95:0.5``).
``first:K``        ``FirstFinish(K)`` — keep the first K rows to finish, then stop.
``none``           ``NoStop()`` — never stop early.
``deepprune:JUDGE[:EVERY[:KEEP[:THRESHOLD]]]``  ``deepprune.DeepPrune`` — every EVERY tokens
                   (default 8) cluster the live rows greedily by the judge saved in directory
                   JUDGE (equivalent when its probability >= THRESHOLD, default 0.5), keep KEEP
                   rows per cluster (default 2), prune the rest.
``peek:EVERY[:KEEP]``  ``deepprune.Peek`` — judge-free: every EVERY tokens fork each live row,
                   force the task's answer mark, greedily read the forced answer; rows with equal
                   forced answers form a cluster; keep KEEP per cluster (default 2).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParScaleError
from .answers import INVALID, Invalid, get_extractor
from .records import CostLedger, Problem, Sample


@dataclass(frozen=True)
class Action:
    kind: str  # "continue" | "stop" | "prune"
    rows: tuple[int, ...] = ()  # row indices to prune (kind == "prune")

    @staticmethod
    def prune(rows: Sequence[int]) -> "Action":
        return Action("prune", tuple(rows))

    @property
    def stops(self) -> bool:
        return self.kind == "stop"


CONTINUE = Action("continue")
STOP = Action("stop")


@dataclass
class PolicyContext:
    """What the sampler tells a policy about the problem it is deciding for."""

    model: Any = None
    tokenizer: Any = None
    problem: Problem | None = None
    prompt_ids: list[int] = field(default_factory=list)
    eos: frozenset[int] = frozenset()
    n: int = 1  # rows of this problem


class Policy:
    """Base class: tracks the answers of finished rows; subclasses decide in ``decide``."""

    every = 0  # > 0: ``inspect`` the live rows after every ``every``-th generated token

    def __init__(self, extractor: str | Callable[[str], str | None] | None = None) -> None:
        self.extract = get_extractor(extractor) if extractor is not None else None
        self.context = PolicyContext()
        self.reset()

    def reset(self) -> None:
        self.answers: list[str | Invalid] = []  # in finishing order
        self.stopped = False
        self.merged: dict[int, int] = {}  # pruned row index -> the kept row judged equivalent
        self.extra_cost = CostLedger()  # work done by the policy itself

    def bind(self, context: PolicyContext) -> None:
        self.context = context

    def inspect(self, step: int, live: dict[int, list[int]]) -> Action:
        """A decision over the live rows (``every > 0`` only): CONTINUE, or prune some of them."""
        return CONTINUE

    def _answer(self, sample: Sample) -> str | Invalid:
        if sample.finish_reason == "pruned":
            return INVALID
        if sample.answer is not None:
            return sample.answer
        if self.extract is None:
            raise ParScaleError(f"{type(self).__name__}: sample {sample.index} has no answer and the "
                                "policy has no extractor")
        return self.extract(sample.text)

    def observe(self, sample: Sample) -> Action:
        if self.stopped:
            return STOP
        self.answers.append(self._answer(sample))
        action = self.decide()
        self.stopped = action.stops
        return action

    def decide(self) -> Action:
        return CONTINUE

    @property
    def valid_counts(self) -> Counter:
        return Counter(a for a in self.answers if a is not INVALID)


class NoStop(Policy):
    def __repr__(self) -> str:
        return "NoStop()"


class AgreeFirstW(Policy):
    def __init__(self, w: int, extractor=None) -> None:
        if not isinstance(w, int) or w < 1:
            raise ParScaleError(f"agree policy: W must be an integer >= 1 (got {w!r})")
        self.w = w
        super().__init__(extractor)

    def decide(self) -> Action:
        if len(self.answers) == self.w:
            first = self.answers[0]
            if first is not INVALID and all(a == first for a in self.answers):
                return STOP
        return CONTINUE

    def __repr__(self) -> str:
        return f"AgreeFirstW({self.w})"


def beta_sf_half(a: float, b: float) -> float:
    """P(X > 1/2) for X ~ Beta(a, b).

    For integer a, b this is the binomial identity P(Bin(a+b-1, 1/2) <= a-1); otherwise scipy's
    regularised incomplete beta.
    """
    if a <= 0 or b <= 0:
        raise ParScaleError(f"Beta parameters must be > 0 (got {a}, {b})")
    if float(a).is_integer() and float(b).is_integer():
        a, b = int(a), int(b)
        m = a + b - 1
        return math.fsum(math.comb(m, i) for i in range(a)) / 2**m
    from scipy.special import betainc

    return float(1.0 - betainc(a, b, 0.5))


class PosteriorSettled(Policy):
    def __init__(self, threshold: float, prior: float = 1.0, extractor=None) -> None:
        if not 0.5 < threshold < 1.0:
            raise ParScaleError(f"posterior policy: threshold must be in (0.5, 1) (got {threshold!r})")
        if not (math.isfinite(prior) and prior > 0):
            raise ParScaleError(f"posterior policy: prior must be > 0 (got {prior!r})")
        self.threshold, self.prior = float(threshold), float(prior)
        super().__init__(extractor)

    def probability(self) -> float:
        """Approximate P(the current leader is the true mode); 0 before any real answer."""
        top = self.valid_counts.most_common(2)
        if not top:
            return 0.0
        c1 = top[0][1]
        c2 = top[1][1] if len(top) > 1 else 0
        return beta_sf_half(self.prior + c1, self.prior + c2)

    def decide(self) -> Action:
        return STOP if self.probability() >= self.threshold else CONTINUE

    def __repr__(self) -> str:
        return f"PosteriorSettled({self.threshold}, prior={self.prior})"


class FirstFinish(Policy):
    def __init__(self, k: int, extractor=None) -> None:
        if not isinstance(k, int) or k < 1:
            raise ParScaleError(f"first policy: K must be an integer >= 1 (got {k!r})")
        self.k = k
        super().__init__(extractor)

    def _answer(self, sample: Sample) -> str | Invalid:  # counts finishes only; answers not needed
        return INVALID

    def decide(self) -> Action:
        return STOP if len(self.answers) >= self.k else CONTINUE

    def __repr__(self) -> str:
        return f"FirstFinish({self.k})"


def make_policy(spec: str, extractor: str | Callable | None = None) -> Policy:
    """``"agree:3"``, ``"posterior:0.95"`` (``"posterior:0.95:0.5"`` sets the prior), ``"first:4"``,
    ``"deepprune:runs/judge:8:2:0.5"``, ``"peek:8:2"``, ``"none"``."""
    if not isinstance(spec, str):
        raise ParScaleError(f"policy must be a string such as 'agree:3' (got {spec!r})")
    name, *args = spec.strip().split(":")
    usage = ("use agree:W, posterior:THRESHOLD[:PRIOR], first:K, deepprune:JUDGE[:EVERY[:KEEP[:THRESHOLD]]], "
             "peek:EVERY[:KEEP] or none")
    if name in ("deepprune", "peek"):
        from .deepprune import make_live_policy

        return make_live_policy(spec, extractor, usage)
    try:
        if name == "none" and not args:
            return NoStop(extractor)
        if name == "agree" and len(args) == 1:
            return AgreeFirstW(int(args[0]), extractor)
        if name == "posterior" and len(args) in (1, 2):
            return PosteriorSettled(float(args[0]), float(args[1]) if len(args) == 2 else 1.0, extractor)
        if name == "first" and len(args) == 1:
            return FirstFinish(int(args[0]), extractor)
    except ValueError:
        raise ParScaleError(f"bad early-stop policy {spec!r}: a parameter is not a number; {usage}") from None
    raise ParScaleError(f"bad early-stop policy {spec!r}; {usage}")
