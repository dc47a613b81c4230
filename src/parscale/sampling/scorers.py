"""Scorers: give every sample a ``score`` so best-of-N, best-of-majority and verify can run.

A scorer maps one sample (and its problem) to a float, higher = better. ``score_samples`` writes
it into ``Sample.score`` for a whole ``SampleSet`` (what ``parscale sample --scorer`` and
``parscale score --scorer`` do), so the scores are saved with the samples and re-scoring needs no
model. Specs (registry ``SCORERS``):

``mean_logprob``      mean chosen-token log-prob (the geometric-mean token probability, in log)
``sum_logprob``       total log-prob of the answer (favours short answers)
``min_window[:W]``    lowest mean log-prob over sliding windows of W tokens (default 16; DeepConf's
                      "lowest group confidence", as ``aggregators.min_window_logprob``)
``verifier``          1.0 if the task's exact verifier accepts the extracted answer, else 0.0 — an
                      *oracle* (it reads the reference), for upper bounds and for ``verify``
``neg_length``        minus the answer's token count (prefer short answers)
``noisy_verifier:FP,FN[,SEED]``  the ``verifier`` seen through noise: a wrong answer scores 1.0
                      with probability FP, a right one 0.0 with probability FN (one seeded draw
                      per sample, ``coverage.noisy_verdict``): best-of-N by an imperfect verifier

A sample without recorded log-probs scores ``-1e9`` under the log-prob scorers (finite, so the
score survives JSON, and below any real score).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import ParScaleError
from .aggregators import min_window_logprob
from .answers import INVALID
from .records import Problem, Sample, SampleSet

NO_LOGPROBS = -1e9
DEFAULT_WINDOW = 16

ScoreFn = Callable[[Sample, Problem], float]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else NO_LOGPROBS


def _mean(s: Sample, _p: Problem) -> float:
    return _finite(s.mean_logprob)


def _sum(s: Sample, _p: Problem) -> float:
    return float(sum(s.logprobs)) if s.logprobs else NO_LOGPROBS


def _neg_length(s: Sample, _p: Problem) -> float:
    return -float(s.length)


SCORERS = ("mean_logprob", "sum_logprob", "min_window[:W]", "verifier", "neg_length", "noisy_verifier:FP,FN[,SEED]")


def make_scorer(spec: str, *, task=None, extractor=None) -> ScoreFn:
    """The scorer a spec names; ``verifier`` needs the ``task`` (a name or Task)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ParScaleError(f"--scorer: expected one of {', '.join(SCORERS)}")
    name, _, arg = spec.strip().partition(":")
    if name in ("mean_logprob", "sum_logprob", "neg_length", "verifier") and arg:
        raise ParScaleError(f"--scorer {spec}: {name} takes no argument")
    if name == "mean_logprob":
        return _mean
    if name == "sum_logprob":
        return _sum
    if name == "neg_length":
        return _neg_length
    if name == "min_window":
        try:
            window = int(arg) if arg else DEFAULT_WINDOW
        except ValueError:
            window = 0
        if window < 1:
            raise ParScaleError(f"--scorer {spec}: the window must be an integer >= 1 (e.g. min_window:16)")
        return lambda s, _p: _finite(min_window_logprob(s.logprobs, window))
    if name in ("verifier", "noisy_verifier"):
        from .answers import get_extractor
        from .tasks import get_task

        noise = _noise(spec, arg) if name == "noisy_verifier" else None
        if task is None:
            raise ParScaleError(f"--scorer {name}: needs the task whose verifier to run (--task)")
        t = get_task(task)
        saved = extractor == "saved"  # the answers stored in the file
        extract = None if saved else get_extractor(extractor if extractor is not None else t.extractor)

        def verified(s: Sample, p: Problem) -> float:
            answer = s.answer if saved else extract(s.text)
            ok = answer is not None and answer is not INVALID and bool(t.verify(p, answer))
            if noise is not None:
                from .coverage import noisy_verdict

                ok = noisy_verdict(ok, *noise, p.id, s.index)
            return 1.0 if ok else 0.0

        return verified
    raise ParScaleError(f"--scorer: unknown scorer {spec!r}; use one of {', '.join(SCORERS)}")


def _noise(spec: str, arg: str) -> tuple[float, float, int]:
    """``FP,FN[,SEED]`` of a noisy_verifier spec -> (fp, fn, seed)."""
    from .coverage import parse_noisy_verifier

    parts = arg.split(",")
    seed = 0
    if len(parts) == 3:
        try:
            seed = int(parts[2])
        except ValueError:
            seed = -1
        if seed < 0:
            raise ParScaleError(f"--scorer {spec}: the seed must be an integer >= 0 (got {parts[2]!r})")
    try:
        fp, fn = parse_noisy_verifier(",".join(parts[:2]) if len(parts) == 3 else arg)
    except ParScaleError as e:
        raise ParScaleError(f"--scorer {spec}: {e} (e.g. noisy_verifier:0.1,0.05)") from None
    return fp, fn, seed


def score_samples(sset: SampleSet, spec: str, *, task=None, extractor=None) -> SampleSet:
    """Set ``score`` of every sample of ``sset`` with the scorer ``spec`` (in place; returns it)."""
    names = {p.task for p in sset.problems}
    task = task or sset.meta.get("task") or (names.pop() if len(names) == 1 else None)
    fn = make_scorer(spec, task=task, extractor=extractor)
    problems = {p.id: p for p in sset.problems}
    for s in sset.samples:
        if s.problem_id not in problems:
            raise ParScaleError(f"sample {s.index} belongs to unknown problem {s.problem_id}")
        s.score = float(fn(s, problems[s.problem_id]))
    sset.meta["scorer"] = spec
    return sset
