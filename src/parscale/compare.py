"""Parameters vs streams vs samples at equal compute: one harness, one cost ledger, one Pareto plot.

Three ways to spend more compute on a language model: more parameters (a bigger model), more
parallel streams (ParScale: P× the forward work per token) and more samples per question (N
answers, then majority vote, Best-of-Majority or best-of-N). ``compare`` trains a grid of model
sizes × P on an offline task with an exact verifier (``parscale.sampling.tasks``), every model
to the same token budget on training text that leaves the evaluation problems out, then
evaluates every model greedily and with N samples per problem, and puts every (model, method,
k) point on the same cost axes:

* ``train_flops`` — 3 × the forward FLOPs of the trained tokens (forward + backward), from
  ``parscale.cost.forward_flops`` at the model's own P and the mean causal context of a
  training sequence;
* ``inference_flops`` — per problem: the prompt's prefill once (its cache is shared by the k
  rows) plus the decode work of k rows. With n samples drawn once, the k-subset value is the
  exact expectation over all k-subsets of the n rows: prefill + (k / n) · Σ_rows decode(row),
  each row's decode counted as the sampler's ledger counts it (``row_cost``); the sum over the
  rows plus the prefills *is* the ledger's ``flops`` (tests check it);
* ``kv_read_bytes`` and ``eflops`` — the KV-cache bytes the k rows' decode steps read
  (``cost.decode_kv_read_bytes``, the sampler ledger's own count, (k / n) · Σ_rows as for FLOPs)
  and Kinetics' memory-aware eFLOPs, ``inference_flops + kv_read_bytes · FLOP/byte`` of the
  preset's ``eflops_hardware`` (``cost.kinetics_eflops``): ranking by it charges long caches read
  by many rows, which FLOPs alone leave out;
* ``decode_steps`` — forward passes after the prefill at batch 1 (the k rows of one problem run
  side by side, so the latency proxy is the longest row): E[max over the subset of (length - 1)];
* ``kv_cache_bytes`` — the KV cache of the k rows × P streams at the length of the subset's longest
  answer, ``k · P · (prefix + prompt + longest) · bytes per token``, what the model's
  ``new_cache`` holds when sized to the answers (expected over subsets, averaged over problems);
* ``wall_s`` — measured seconds per problem of the run the point comes from (the greedy run, or
  the one n-sample run that every k-subset point is estimated from; ``wall_s_from`` says which).

Accuracies are exact k-subset estimators over the n samples (``maj_at_k``, ``bon_at_k`` from
``parscale.sampling.estimators``; Best-of-Majority by enumerating every k-subset, ``bom_at_k``
here), so one n = 16 run per model gives every k ≤ 16 without separate runs; their intervals are
percentile bootstraps over problems. ``pass@k`` is kept as an oracle reference (it needs the
verifier) and is never on a frontier.

Training seeds: a preset's ``train_seeds`` trains every (size, P) once more per extra seed
(``NAME-sSEED``, same corpus); the axes, frontiers and conclusions then use the per-problem
averages over the seeds (``seed_cells``: ``NAME-avgN``), and a conclusion states the
seed-to-seed spread against the intervals over problems (which do not contain it).

Outputs (``OUT``): ``runs/NAME`` (ordinary training runs, resumable), ``evals/NAME.json`` (one
model's evaluation with per-problem values; written when it finishes, skipped when present),
``results.json``, ``report.md`` and PNG plots, rewritten after every model so a cut run keeps
what finished. ``compare(models=[dir, ...])`` evaluates existing model directories instead of
training (any model ``ParScaleForCausalLM.from_pretrained`` loads, with a ``tokenizer.json``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ParScaleError
from .reproduce import SizeSpec  # one model shape of a grid: the trainer's shape flags

FORMAT = "parscale.compare"
VERSION = 1
RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
PLOT_NAMES = {
    "inference": "accuracy_vs_inference_flops.png",  # every point, one colour per axis, the frontier
    "frontier": "frontier.png",  # the inference-FLOPs frontier alone, labelled
    "frontier_eflops": "frontier_eflops.png",  # the eFLOPs (KV reads charged) frontier alone, labelled
    "training": "accuracy_vs_training_flops.png",  # per model: greedy and the best sampled point
}
METHODS = ("greedy", "sample", "majority", "bom", "bon", "pass")  # "pass": oracle, never on a frontier
AXES = ("parameters", "streams", "samples")
COST_KEYS = ("inference_flops", "eflops", "train_flops", "decode_steps", "kv_cache_bytes")
INFERENCE_COSTS = ("inference_flops", "eflops")  # the budgets the axes are ranked by


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class ComparePreset:
    name: str
    task: str
    difficulty: int
    sizes: tuple[SizeSpec, ...]
    streams: tuple[int, ...]
    train_tokens: int  # the same budget for every model (input tokens, not × P)
    train_problems: int  # distinct generated training problems (the corpus)
    eval_problems: int
    n_samples: int = 16
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    temperature: float = 1.0
    max_new_tokens: int = 16
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    prefix_tokens: int = 4
    vocab_size: int = 257  # byte-level: digits stay single tokens (BPE merges of digits hurt arithmetic)
    bom_min_fraction: float = 0.2  # best_of_majority's default
    scorer: str = "mean_logprob"
    eflops_hardware: str = "A100-80GB"  # whose FLOP/byte ratio turns KV reads into eFLOPs
    batch_problems: int = 25
    n_boot: int = 1000
    seed: int = 0  # training corpus, the first training run of each (size, P), the sampler
    train_seeds: tuple[int, ...] = ()  # more training seeds per (size, P): replicas named NAME-sSEED
    eval_seed: int = 4242  # problem generator seed of the evaluation set (training uses ``seed``)
    why: str = ""  # why this task / difficulty (measured; docs/compare.md)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TINY = SizeSpec("tiny", 2, 64, 4, 2, 176)
_SMALL = SizeSpec("small", 4, 128, 4, 2, 352)
_MID = SizeSpec("mid", 3, 96, 4, 2, 256)
_MICRO = SizeSpec("micro", 1, 32, 2, 1, 64)
_MICRO2 = SizeSpec("micro2", 1, 48, 2, 1, 96)

# why the committed task (measured with 1-minute probes; docs/compare.md)
_WHY = ("4x4 sudoku with 4 blanks: 1-minute probes put a 740k-parameter model at 77% greedy with 4 blanks "
        "(300k tokens) and 49% with 6 (400k tokens; a 93k-parameter one 16%), pass@8 71-96% (room for every "
        "axis); with 5 blanks 120k tokens left a 93k-parameter model at 0%; with 4 blanks and 300k tokens it "
        "stayed at 0% at 16 sequences per step but reached 33% at 4 per step (1172 steps instead of 293; "
        "lr 6e-3 at 8 per step: 5%, lr 1e-2 at 16: 0%), hence batch 4 — and a rerun of that setting on "
        "another split reached only 0.5% (the 93k model sits on a sharp transition at 300k tokens), hence 500k "
        "tokens in full; at 500k tokens with 4 blanks the first full grid put tiny P=1/P=2 and mid P=1 at "
        "5.5% / 70.0% / 95.5% greedy (near the ceiling), hence 6 blanks in full; answers are 16 digits, so "
        "voting and best-of-N "
        "are not degenerate (one-digit answers, as in linear equations, make a majority converge to the "
        "greedy answer); arithmetic (2 digits) and countdown stayed near 0% at these budgets.")

PRESETS: dict[str, ComparePreset] = {
    # seconds: for the tests (two micro shapes, P in {1, 2}, a few steps, 6 problems, n = 4)
    "smoke": ComparePreset("smoke", "arithmetic", 1, (_MICRO, _MICRO2), (1, 2), train_tokens=2048,
                           train_problems=300, eval_problems=6, n_samples=4, ks=(1, 2, 4), max_new_tokens=6,
                           seq_len=32, batch_size=4, warmup_steps=2, prefix_tokens=2, batch_problems=6,
                           n_boot=50),
    "quick": ComparePreset("quick", "sudoku", 4, (_MID, _SMALL), (1, 2, 4), train_tokens=200_000,
                           train_problems=20_000, eval_problems=100, max_new_tokens=20, batch_size=4, why=_WHY),
    "full": ComparePreset("full", "sudoku", 6, (_TINY, _MID, _SMALL), (1, 2, 4), train_tokens=500_000,
                          train_problems=30_000, eval_problems=200, max_new_tokens=20, batch_size=4,
                          train_seeds=(1,), why=_WHY),
}


def get_preset(name: str) -> ComparePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ParScaleError(f"--preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------- cost accounting
def prefill_flops(config, prompt_tokens: int) -> float:
    """FLOPs of one prompt's prefill, as the sampler's ledger counts it (causal: mean context)."""
    from .cost import forward_flops

    return forward_flops(config, tokens=prompt_tokens, context=(prompt_tokens + 1) / 2)


def row_cost(config, prompt_tokens: int, length: int) -> float:
    """Decode FLOPs of one row of ``length`` new tokens after a ``prompt_tokens`` prompt.

    With compaction a row is fed back ``length - 1`` tokens (its last token ends it and is never
    fed), the j-th at context ``prompt_tokens + j``: the ledger's count, one row at a time (the
    FLOPs are linear in tokens × context, so summing rows equals the ledger's batched formula).
    """
    from .cost import forward_flops

    m = max(int(length) - 1, 0)
    if m == 0:
        return 0.0
    ctx = (m * prompt_tokens + m * (m + 1) / 2) / m
    return forward_flops(config, tokens=m, context=ctx)


def expected_max(values: Sequence[float], k: int) -> float:
    """E[max of a uniformly random k-subset of ``values``], exactly (order statistics):
    the i-th smallest (1-based) is the maximum of C(i-1, k-1) of the C(n, k) subsets."""
    n = len(values)
    if not 1 <= k <= n:
        raise ParScaleError(f"k={k} must be in [1, n={n}]")
    v = sorted(values)
    total = sum(math.comb(i - 1, k - 1) * v[i - 1] for i in range(k, n + 1))
    return total / math.comb(n, k)


def subset_costs(config, prompt_tokens: int, lengths: Sequence[int], k: int, *, kv_bytes_per_token: float,
                 streams: int, prefix_tokens: int, bytes_per_value: float | None = None,
                 hardware: str = "A100-80GB") -> dict[str, float]:
    """Expected cost of answering one problem with k of its n sampled rows (all k-subsets).

    ``lengths``: new tokens of each of the n rows. Returns inference_flops, decode_steps,
    row_steps, generated_tokens and kv_cache_bytes, and with ``bytes_per_value`` (the cache dtype's
    size) kv_read_bytes and eflops on ``hardware`` (see the module docstring for each definition).
    """
    from .cost import decode_kv_read_bytes, kinetics_eflops

    n = len(lengths)
    if not 1 <= k <= n:
        raise ParScaleError(f"k={k} must be in [1, n={n}]")
    decode = sum(row_cost(config, prompt_tokens, L) for L in lengths)
    longest = expected_max(lengths, k)
    flops = prefill_flops(config, prompt_tokens) + k / n * decode
    out = {}
    if bytes_per_value is not None:
        fed = [(max(int(L) - 1, 0), int(prompt_tokens)) for L in lengths]
        reads = k / n * decode_kv_read_bytes(config, fed, bytes_per_value, streams)
        out = {"kv_read_bytes": reads, "eflops": kinetics_eflops(flops, reads, hardware)}
    return {
        "inference_flops": flops, **out,
        "decode_steps": expected_max([max(int(L) - 1, 0) for L in lengths], k),
        "row_steps": k / n * sum(max(L - 1, 0) for L in lengths),
        "generated_tokens": k / n * sum(lengths),
        "kv_cache_bytes": k * streams * (prefix_tokens + prompt_tokens + longest) * kv_bytes_per_token,
    }


# --------------------------------------------------------------------------- Best-of-Majority at k
@lru_cache(maxsize=64)
def _subsets(n: int, k: int) -> np.ndarray:
    """Every k-subset of range(n) as a boolean mask, ``S n`` (S = C(n, k))."""
    combos = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)  # S k
    mask = np.zeros((len(combos), n), dtype=bool)
    np.put_along_axis(mask, combos, True, axis=1)
    return mask


def bom_at_k(answers: Sequence[Any], scores: Sequence[float], correct: Sequence[bool], k: int, *,
             min_fraction: float = 0.2, invalid: Any = None) -> float:
    """Expected accuracy of ``best_of_majority(min_fraction=...)`` on a uniformly random k-subset.

    Exact: every k-subset is enumerated (C(16, 8) = 12870 at most for n = 16) and decided by the
    aggregator's own rules — answers with at least ``min_fraction`` of the subset's valid votes
    are candidates, plus the most frequent one (ties to the answer seen first); the best-scored
    candidate sample wins (ties to the first); a subset with no valid answer is wrong.
    ``invalid``: the value marking a sample without an answer (``parscale.sampling.INVALID``).
    """
    n = len(answers)
    if not 1 <= k <= n or len(scores) != n or len(correct) != n:
        raise ParScaleError(f"bom@k: need 1 <= k <= n and one score and verdict per sample (n={n}, k={k})")
    labels: dict[Any, int] = {}
    ids = np.array([-1 if a is invalid else labels.setdefault(a, len(labels)) for a in answers])
    if not labels:
        return 0.0
    mask = _subsets(n, k)  # S n
    onehot = ids[:, None] == np.arange(len(labels))[None, :]  # n A
    counts = mask.astype(np.int64) @ onehot.astype(np.int64)  # S A
    n_valid = counts.sum(axis=1)  # S
    first = np.where(mask[:, :, None] & onehot[None, :, :], np.arange(n)[None, :, None], n).min(axis=1)  # S A
    rank = np.where(counts > 0, counts * (n + 1) - first, -1)  # more votes first, then seen first
    top = rank.argmax(axis=1)  # S
    keep = (counts > 0) & (counts >= min_fraction * n_valid[:, None])
    keep[np.arange(len(mask)), top] |= counts[np.arange(len(mask)), top] > 0
    eligible = mask & (ids >= 0)[None, :] & keep[:, np.maximum(ids, 0)]  # S n
    s = np.where(eligible, np.asarray(scores, dtype=float)[None, :], -np.inf)
    winner = s.argmax(axis=1)  # the first of equal top scores, as _best
    right = np.asarray(correct, dtype=bool)[winner] & eligible.any(axis=1)
    return float(right.mean())


# --------------------------------------------------------------------------- Pareto frontier
def pareto_front(points: Sequence[Mapping[str, Any]], costs: Sequence[str] = ("inference_flops",),
                 accuracy: str = "accuracy") -> list[int]:
    """Indices of the points no other point dominates (accuracy >= and every cost <=, one of them
    strictly better), in increasing order of the first cost. Points missing a cost are skipped."""
    usable = [i for i, p in enumerate(points) if all(p.get(c) is not None for c in costs)]
    front = []
    for i in usable:
        a = points[i]
        dominated = False
        for j in usable:
            if j == i:
                continue
            b = points[j]
            no_worse = b[accuracy] >= a[accuracy] and all(b[c] <= a[c] for c in costs)
            better = b[accuracy] > a[accuracy] or any(b[c] < a[c] for c in costs)
            if no_worse and better:
                dominated = True
                break
        if not dominated:
            front.append(i)
    # equal points: keep the first only
    seen, unique = set(), []
    for i in front:
        key = (points[i][accuracy], *(points[i][c] for c in costs))
        if key not in seen:
            seen.add(key)
            unique.append(i)
    return sorted(unique, key=lambda i: (points[i][costs[0]], -points[i][accuracy]))


# --------------------------------------------------------------------------- evaluating one model
def _per_problem_ci(values: Sequence[float], n_boot: int, seed: int) -> tuple[float, float, float]:
    from .sampling.estimators import bootstrap_ci

    ci = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return ci.estimate, ci.low, ci.high


def eval_settings(preset: ComparePreset) -> dict[str, Any]:
    """What an evaluation depends on (an eval file made with other settings is redone)."""
    keys = ("task", "difficulty", "eval_problems", "n_samples", "ks", "temperature", "max_new_tokens",
            "bom_min_fraction", "scorer", "eval_seed", "seed", "eflops_hardware")
    return {k: getattr(preset, k) if not isinstance(getattr(preset, k), tuple) else list(getattr(preset, k))
            for k in keys}


def eval_problems(preset: ComparePreset):
    from .sampling.tasks import get_task

    return get_task(preset.task).make_problems(preset.eval_problems, seed=preset.eval_seed,
                                               difficulty=preset.difficulty)


def _verdicts(task, problem, samples) -> list[bool]:
    from .sampling.answers import INVALID

    seen: dict[Any, bool] = {}
    out = []
    for s in samples:
        if s.answer not in seen:
            seen[s.answer] = s.answer is not INVALID and bool(task.verify(problem, s.answer))
        out.append(seen[s.answer])
    return out


def evaluate_model(model, tokenizer, problems, preset: ComparePreset, *, progress: bool = False) -> dict[str, Any]:
    """Greedy and n-sample evaluation of one loaded model; per-problem accuracies and costs of every
    (method, k) point (see the module docstring). Pure data: nothing is written."""
    from .cost import ModelShape
    from .generation import default_eos_ids
    from .sampling.answers import INVALID, extract_answers
    from .sampling.estimators import bon_at_k, maj_at_k, pass_at_k
    from .sampling.sampler import sample_problems
    from .sampling.scorers import score_samples
    from .sampling.tasks import get_task

    task = get_task(preset.task)
    cfg = model.config
    P = model.streams
    eos = default_eos_ids(model, tokenizer)
    common = dict(max_new_tokens=preset.max_new_tokens, eos_token_id=eos, extractor=task.extractor,
                  batch_problems=preset.batch_problems, meta={"task": task.name})
    greedy = sample_problems(model, tokenizer, problems, n=1, temperature=0.0, progress=progress, **common)
    sampled = sample_problems(model, tokenizer, problems, n=preset.n_samples, temperature=preset.temperature,
                              seed=preset.seed, progress=progress, **common)
    score_samples(sampled, preset.scorer, task=task.name)
    extract_answers(greedy.samples, task.extractor)
    extract_answers(sampled.samples, task.extractor)

    kv_value = model.model.norm.weight.element_size()  # the cache's dtype, as the sampler counts it
    kv_tok = ModelShape.from_config(cfg).kv_bytes_per_token(kv_value)
    prefix = cfg.prefix_tokens if P > 1 or cfg.prefix_only else 0  # what the cache holds per stream
    prompt_len = {p.id: len(tokenizer.encode(p.prompt)) for p in problems}
    n_prob = len(problems)

    def costs(problem_rows: Mapping[int, Sequence[int]], k: int) -> dict[str, float]:
        per = [subset_costs(cfg, prompt_len[pid], lengths, k, kv_bytes_per_token=kv_tok, streams=P,
                            prefix_tokens=prefix, bytes_per_value=kv_value, hardware=preset.eflops_hardware)
               for pid, lengths in problem_rows.items()]
        return {key: float(np.mean([c[key] for c in per])) for key in per[0]}

    values: dict[str, list[float]] = {}
    point_costs: dict[str, dict[str, float]] = {}
    g_rows = {p.id: [s.length for s in grp] for p, grp in zip(problems, greedy.by_problem().values())}
    g_groups = greedy.by_problem()
    values["greedy@1"] = [float(_verdicts(task, p, g_groups[p.id])[0]) for p in problems]
    point_costs["greedy@1"] = costs(g_rows, 1)

    groups = sampled.by_problem()
    n = preset.n_samples
    s_rows = {p.id: [s.length for s in groups[p.id]] for p in problems}
    per_method: dict[str, list[float]] = {}
    for k in preset.ks:
        c = costs(s_rows, k)
        for m in ("sample",) if k == 1 else ("majority", "bom", "bon", "pass"):
            per_method[f"{m}@{k}"] = []
            point_costs[f"{m}@{k}"] = c
    invalid = 0
    for p in problems:
        samples = groups[p.id]
        correct = _verdicts(task, p, samples)
        answers = [s.answer for s in samples]
        scores = [s.score for s in samples]
        valid = [a is not INVALID for a in answers]
        invalid += sum(not v for v in valid)
        for k in preset.ks:
            if k == 1:
                per_method["sample@1"].append(sum(correct) / n)
                continue
            per_method[f"majority@{k}"].append(maj_at_k(answers, correct, k))
            per_method[f"bom@{k}"].append(bom_at_k(answers, scores, correct, k,
                                                   min_fraction=preset.bom_min_fraction, invalid=INVALID))
            per_method[f"bon@{k}"].append(bon_at_k(scores, correct, k, valid))
            per_method[f"pass@{k}"].append(pass_at_k(n, sum(correct), k))
    values.update(per_method)
    wall = {"greedy": greedy.ledger.wall_s / n_prob, "sampled": sampled.ledger.wall_s / n_prob}
    examples = [{"prompt": p.prompt, "reference": p.reference, "greedy": g_groups[p.id][0].text,
                 "samples": [s.text for s in groups[p.id][:4]]} for p in problems[:3]]
    return {
        "values": values,  # point -> per-problem accuracy (problem order)
        "costs": point_costs,  # point -> mean per-problem costs
        "wall_s": wall,
        "ledger": {"greedy": greedy.ledger.to_dict(), "sampled": sampled.ledger.to_dict()},
        "prompt_tokens": float(np.mean(list(prompt_len.values()))),
        "invalid_rate": invalid / (n_prob * n),
        "kv_bytes_per_token": kv_tok,
        "examples": examples,
    }


# --------------------------------------------------------------------------- training
def train_config(preset: ComparePreset, size: SizeSpec, streams: int, corpus: Path, run_dir: Path,
                 threads: int | None, seed: int | None = None, device: str = "auto"):
    """The TrainConfig of one grid model; ``seed`` (default ``preset.seed``) seeds its initialisation
    and data order (the corpus is the same for every seed)."""
    from .training.options import TrainConfig

    steps = math.ceil(preset.train_tokens / (preset.batch_size * preset.seq_len))
    return TrainConfig(data=str(corpus), out=str(run_dir), **size.shape(), vocab_size=preset.vocab_size,
                       streams=streams, prefix_tokens=preset.prefix_tokens, seq_len=preset.seq_len,
                       batch_size=preset.batch_size, tokens=preset.train_tokens, lr=preset.lr, min_lr=preset.min_lr,
                       warmup_steps=preset.warmup_steps, eval_every=steps, checkpoint_every=max(1, steps // 4),
                       seed=preset.seed if seed is None else seed, threads=threads, device=device, quiet=True,
                       resume=True)


def train_flops_per_token(preset: ComparePreset, size: SizeSpec, streams: int) -> float:
    """Training FLOPs per input token of one grid model (3 forwards at the mean causal context)."""
    from .config import ParScaleConfig
    from .cost import forward_flops

    cfg = ParScaleConfig(vocab_size=preset.vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, streams=streams, prefix_tokens=preset.prefix_tokens)
    return 3 * forward_flops(cfg, tokens=1, context=(preset.seq_len + 1) / 2)


def training_info(model_dir: str | os.PathLike, config) -> dict[str, Any]:
    """Tokens, FLOPs, time and held-out loss of the run that made ``model_dir``, read from the
    trainer's files beside it (``../summary.json``, ``../train_config.json``); Nones for a model
    parscale did not train (a converted one): its training compute is unknown here."""
    from .cost import forward_flops
    from .training.trainer import SUMMARY_NAME, saved_config

    run = Path(model_dir).parent
    info: dict[str, Any] = {"train_tokens": None, "train_flops": None, "train_wall_s": None, "val_loss": None}
    try:
        summary = json.loads((run / SUMMARY_NAME).read_text())
        saved = saved_config(run) or {}
    except (OSError, ValueError, ParScaleError):
        return info
    tokens, seq_len = summary.get("tokens"), saved.get("seq_len")
    if isinstance(tokens, int) and isinstance(seq_len, int):
        # forward + backward = 3 forwards; a training sequence's mean causal context is (s + 1) / 2
        flops = 3 * forward_flops(config, tokens=tokens, context=(seq_len + 1) / 2)
        info.update(train_tokens=tokens, train_flops=flops)
    info.update(train_wall_s=summary.get("wall_s"), val_loss=summary.get("val_loss"))
    return info


# --------------------------------------------------------------------------- points, frontier, conclusions
def axes_of(model: Mapping[str, Any], k: int, base_params: int | None) -> list[str]:
    """Which of the three axes a point raises above the grid's base (smallest size, P = 1, k = 1).

    Parameters are the backbone's (``param_counts(...).backbone_non_embedding``: what the model has
    at P = 1), so a P > 1 model's prefixes and aggregator count as streams, not as parameters."""
    out = []
    if base_params is not None and model["backbone_params"] > base_params:
        out.append("parameters")
    if model["P"] > 1:
        out.append("streams")
    if k > 1:
        out.append("samples")
    return out


def build_points(models: Sequence[Mapping[str, Any]], evals: Mapping[str, Mapping[str, Any]],
                 n_boot: int, seed: int) -> list[dict[str, Any]]:
    """One row per (model, method, k): accuracy with its bootstrap interval and every cost."""
    sizes = [m["backbone_params"] for m in models]
    base_params = min(sizes) if sizes else None
    points = []
    for m in models:
        ev = evals.get(m["name"])
        if ev is None:
            continue
        for key, vals in ev["values"].items():
            method, k = key.split("@")
            k = int(k)
            acc, lo, hi = _per_problem_ci(vals, n_boot, seed)
            c = ev["costs"][key]
            axes = axes_of(m, k, base_params)
            points.append({
                "id": f"{m['name']}/{key}", "model": m["name"], "size": m["size"], "P": m["P"], "params": m["params"],
                "train_seed": m.get("train_seed"), "average_of": m.get("average_of"),
                "method": method, "k": k, "oracle": method == "pass", "accuracy": acc, "ci": [lo, hi],
                "axes": axes, "category": "+".join(axes) or "base",
                "train_flops": m.get("train_flops"), "inference_flops": c["inference_flops"],
                "kv_read_bytes": c["kv_read_bytes"], "eflops": c["eflops"],
                "decode_steps": c["decode_steps"], "row_steps": c["row_steps"],
                "generated_tokens": c["generated_tokens"], "kv_cache_bytes": c["kv_cache_bytes"],
                "wall_s": ev["wall_s"]["greedy" if method == "greedy" else "sampled"],
                "wall_s_from": "greedy run" if method == "greedy" else f"one n={ev['n']} run",
            })
    return points


def seed_cells(models: Sequence[Mapping[str, Any]], evals: Mapping[str, Mapping[str, Any]]
               ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """With replicas (``train_seeds``): one averaged "model" per (size, P), ``NAME-avgN``, whose
    per-problem values and costs are the means over its N trained seeds (same problems, so the
    average is per problem and the bootstrap stays paired). None without replicas."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for m in models:
        if m.get("train_seed") is not None and m["name"] in evals:
            groups.setdefault((m["size"], m["P"]), []).append(m)
    if not any(len(g) > 1 for g in groups.values()):
        return [], {}
    cells, cell_evals = [], {}
    for (size, P), ms in groups.items():
        name = f"{size}-p{P}-avg{len(ms)}"
        evs = [evals[m["name"]] for m in ms]
        cell = dict(ms[0], name=name, train_seed=None, average_of=[m["name"] for m in ms])
        cell["train_flops"] = float(np.mean([m["train_flops"] for m in ms])) if ms[0].get("train_flops") else None
        values = {key: [float(x) for x in np.mean([ev["values"][key] for ev in evs], axis=0)]
                  for key in evs[0]["values"]}
        costs = {key: {c: float(np.mean([ev["costs"][key][c] for ev in evs])) for c in evs[0]["costs"][key]}
                 for key in evs[0]["costs"]}
        wall = {w: float(np.mean([ev["wall_s"][w] for ev in evs])) for w in evs[0]["wall_s"]}
        cells.append(cell)
        cell_evals[name] = {"values": values, "costs": costs, "wall_s": wall, "n": evs[0]["n"]}
    return cells, cell_evals


def first_seed(points: Sequence[Mapping[str, Any]], seed: int) -> list[Mapping[str, Any]]:
    """The points the axes are compared on: the seed averages (``seed_cells``) when there are
    replicas, else the models of the first training seed (and models not trained here)."""
    if any(p.get("average_of") for p in points):
        return [p for p in points if p.get("average_of")]
    return [p for p in points if p.get("train_seed") in (None, seed)]


def frontiers(points: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, list[str]]:
    """Point ids on the accuracy frontier of each cost (oracle points and replicas excluded), and
    the joint frontier over training and inference FLOPs."""
    real = [p for p in first_seed(points, seed) if not p["oracle"]]
    out = {c: [real[i]["id"] for i in pareto_front(real, (c,))] for c in COST_KEYS}
    out["train_and_inference_flops"] = [real[i]["id"] for i in pareto_front(real, ("inference_flops", "train_flops"))]
    return out


def _diff(a: Sequence[float], b: Sequence[float], n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean of a - b over problems (paired: the same problems) with its bootstrap interval."""
    return _per_problem_ci(np.asarray(a, float) - np.asarray(b, float), n_boot, seed)


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "helps"
    if hi < 0:
        return "hurts"
    return "no clear effect"


def conclude(points: Sequence[Mapping[str, Any]], evals: Mapping[str, Mapping[str, Any]],
             fronts: Mapping[str, Sequence[str]], n_boot: int, seed: int,
             hardware: str = "A100-80GB", first: int = 0,
             val_losses: Mapping[str, float | None] | None = None) -> list[str]:
    """Plain-language conclusions, every number computed here from the points (see docs/compare.md);
    the axes are compared on the seed averages, or the models of training seed ``first``;
    ``val_losses``: each model's held-out loss (for the loss-vs-accuracy correlation)."""
    evals_loss = dict(val_losses or {})
    replicas = [p for p in points if not p["oracle"] and p["method"] == "greedy" and not p.get("average_of")]
    real = [p for p in first_seed(points, first) if not p["oracle"]]
    if not real:
        return ["no model was evaluated yet"]
    by_id = {p["id"]: p for p in real}

    def vals(p: Mapping[str, Any]) -> list[float]:
        return evals[p["model"]]["values"][f"{p['method']}@{p['k']}"]

    out: list[str] = []
    base_candidates = [p for p in real if p["method"] == "greedy" and p["category"] == "base"]
    if not base_candidates:
        base_candidates = sorted((p for p in real if p["method"] == "greedy"), key=lambda p: p["inference_flops"])
    base = base_candidates[0]
    out.append(f"Base point: {base['model']} greedy, {_pct(base['accuracy'])} "
               f"[{_pct(base['ci'][0])}, {_pct(base['ci'][1])}] at {base['inference_flops']:.3g} inference FLOPs "
               f"per problem.")

    # 1. each pure axis from the base: gain per doubling of inference FLOPs, then of eFLOPs
    for cost in INFERENCE_COSTS:
        if base.get(cost) is None:
            continue
        label = "inference FLOPs" if cost == "inference_flops" else f"eFLOPs ({hardware})"
        unit = "inference FLOP" if cost == "inference_flops" else f"eFLOP ({hardware})"
        per_axis: dict[str, tuple[float, Mapping[str, Any]]] = {}
        for axis in AXES:
            cands = [p for p in real if p["axes"] == [axis] and p.get(cost) is not None and p[cost] > base[cost]
                     and (axis != "samples" or p["model"] == base["model"])]
            if not cands:
                continue
            scored = [((p["accuracy"] - base["accuracy"]) / math.log2(p[cost] / base[cost]), p) for p in cands]
            rate, best = max(scored, key=lambda t: t[0])
            per_axis[axis] = (rate, best)
            if cost == "inference_flops":  # the best point of the axis: once, with its paired interval
                top = max(cands, key=lambda p: p["accuracy"])
                d = _diff(vals(top), vals(base), n_boot, seed)
                out.append(f"{axis.capitalize()} alone (from the base): best rate {_pts(rate)} points per doubling "
                           f"of {label} ({best['id']}, {best[cost] / base[cost]:.2f}x the base's); highest "
                           f"accuracy {top['id']} {_pct(top['accuracy'])}, {_pts(d[0])} points "
                           f"[{_pts(d[1])}, {_pts(d[2])}] over the base: {_verdict(d[1], d[2])}.")
        if per_axis:
            ranked = sorted(per_axis, key=lambda a: -per_axis[a][0])
            winner = ranked[0]
            rest = ", ".join(f"{a} {_pts(per_axis[a][0])}" for a in ranked[1:])
            if per_axis[winner][0] <= 0:
                out.append(f"Most accuracy per {unit}: none of the axes gained accuracy over the base.")
            else:
                out.append(f"Most accuracy per {unit}: {winner} ({_pts(per_axis[winner][0])} points per doubling, "
                           f"{per_axis[winner][1]['id']}" + (f"; then {rest})." if rest else ")."))

    # 2. training FLOPs: parameters vs streams (samples cost none)
    greedy = [p for p in real if p["method"] == "greedy" and p["train_flops"]]
    if base["train_flops"]:
        rates = {}
        for axis in ("parameters", "streams"):
            cands = [p for p in greedy if p["axes"] == [axis] and p["train_flops"] > base["train_flops"]]
            if cands:
                r, p = max((((p["accuracy"] - base["accuracy"]) / math.log2(p["train_flops"] / base["train_flops"]), p)
                            for p in cands), key=lambda t: t[0])
                rates[axis] = r
                out.append(f"Per training FLOP, {axis}: best {_pts(r)} greedy points per doubling of training "
                           f"FLOPs ({p['id']}, {p['train_flops'] / base['train_flops']:.2f}x the base's).")
        samp = [p for p in real if p["axes"] == ["samples"] and p["model"] == base["model"]]
        if samp:
            best = max(samp, key=lambda p: p["accuracy"])
            d = _diff(vals(best), vals(base), n_boot, seed)
            out.append(f"Samples need no training FLOPs: on the base model {best['method']}@{best['k']} adds "
                       f"{_pts(d[0])} points [{_pts(d[1])}, {_pts(d[2])}] at zero extra training compute.")
        if rates:
            top_axis = max(rates, key=rates.get)
            if rates[top_axis] <= 0:
                out.append("Most accuracy per training FLOP: neither parameters nor streams gained greedy "
                           "accuracy over the base.")
            else:
                out.append(f"Most accuracy per training FLOP among the trained axes: {top_axis} "
                           f"({_pts(rates[top_axis])} points per doubling).")

    # 3. the frontiers of the two inference budgets
    for cost in INFERENCE_COSTS:
        ids = fronts.get(cost, [])
        if not ids:
            continue
        label = "Inference-FLOPs" if cost == "inference_flops" else f"eFLOPs ({hardware})"
        cats = [by_id[i]["category"] for i in ids]
        summary = ", ".join(f"{by_id[i]['id']} {_pct(by_id[i]['accuracy'])} @ {by_id[i][cost]:.3g}" for i in ids)
        counts = {c: cats.count(c) for c in dict.fromkeys(cats)}
        out.append(f"{label} frontier ({len(ids)} points, cheapest first): {summary}. Axes on it: "
                   + ", ".join(f"{c} x{n}" for c, n in counts.items()) + ".")

    # 4. where an axis does not help (paired over the same problems)
    misses: dict[str, list[str]] = {"streams": [], "parameters": [], "samples": []}
    greedy_by = {(p["size"], p["P"]): p for p in real if p["method"] == "greedy"}
    for (size, P), p in sorted(greedy_by.items()):
        if P > 1 and (size, 1) in greedy_by:
            d = _diff(vals(p), vals(greedy_by[(size, 1)]), n_boot, seed)
            if d[1] <= 0:
                misses["streams"].append(f"{size} P={P} vs P=1 greedy {_pts(d[0])} [{_pts(d[1])}, {_pts(d[2])}]")
    sizes_by_params = sorted({(p["params"], p["size"]) for p in real if p["P"] == 1 and p["method"] == "greedy"})
    for P in sorted({p["P"] for p in real}):
        row = [greedy_by[(s, P)] for _, s in sizes_by_params if (s, P) in greedy_by]
        for small, big in zip(row, row[1:]):
            d = _diff(vals(big), vals(small), n_boot, seed)
            if d[1] <= 0:
                misses["parameters"].append(f"{big['size']} vs {small['size']} at P={P} greedy {_pts(d[0])} "
                                            f"[{_pts(d[1])}, {_pts(d[2])}]")
    kmax = max(p["k"] for p in real)
    for name in dict.fromkeys(p["model"] for p in real):
        g = [p for p in real if p["model"] == name and p["method"] == "greedy"]
        for method in ("majority", "bom", "bon"):
            s = [p for p in real if p["model"] == name and p["method"] == method and p["k"] == kmax]
            if g and s:
                d = _diff(vals(s[0]), vals(g[0]), n_boot, seed)
                if d[1] <= 0:
                    misses["samples"].append(f"{name} {method}@{kmax} vs greedy {_pts(d[0])} "
                                             f"[{_pts(d[1])}, {_pts(d[2])}]")
    for axis, cases in misses.items():
        if cases:
            out.append(f"Where {axis} do not clearly help (points gained, 95% paired interval reaching 0 or "
                       f"below): " + "; ".join(cases) + ".")
    if not any(misses.values()):
        out.append("Every axis step tested (each P > 1 vs P = 1, each larger size, every aggregator at the "
                   "largest k vs greedy) helps with a 95% paired interval above 0.")

    # 5. training seeds: the spread of the same (size, P) between seeds, against the problem intervals
    by_cell: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for p in replicas:
        if p.get("train_seed") is not None:
            by_cell.setdefault((p["size"], p["P"]), []).append(p)
    spread = {cell: ps for cell, ps in by_cell.items() if len(ps) > 1}
    if spread:
        cases = []
        widest = 0.0
        for (size, P), ps in sorted(spread.items()):
            accs = [p["accuracy"] for p in sorted(ps, key=lambda p: p["train_seed"])]
            widest = max(widest, max(accs) - min(accs))
            cases.append(f"{size} P={P} " + " / ".join(_pct(a) for a in accs))
        half = float(np.mean([(p["ci"][1] - p["ci"][0]) / 2 for ps in spread.values() for p in ps]))
        out.append(f"Training seeds (greedy accuracy per seed): " + "; ".join(cases) + f". The widest spread is "
                   f"{100 * widest:.1f} points, against a mean 95% half-width over problems of {100 * half:.1f}: "
                   + ("differences between models smaller than the seed spread are not resolved by one seed per "
                      "model." if widest > half else "the seed spread is within the problem intervals."))

    # 6. does accuracy follow the held-out loss more than the grid's axes? (rank correlation)
    losses = [(evals_loss[p["model"]], p["accuracy"]) for p in replicas if evals_loss.get(p["model"]) is not None]
    if len(losses) >= 4 and len({a for _, a in losses}) > 1 and len({x for x, _ in losses}) > 1:
        from scipy.stats import spearmanr

        rho = float(spearmanr([x for x, _ in losses], [a for _, a in losses]).statistic)  # ties: mean ranks
        out.append(f"Across the {len(losses)} trained models, greedy accuracy against held-out loss: Spearman rank "
                   f"correlation {rho:+.2f} (lower loss, higher accuracy when negative).")

    # 7. latency and memory at batch 1
    kpts = [p for p in real if p["model"] == base["model"] and p["method"] == "majority"]
    if kpts:
        top = max(kpts, key=lambda p: p["k"])
        out.append(f"Latency and memory at batch 1: samples run side by side, so {top['k']} samples on the base "
                   f"model take {top['decode_steps']:.2f} decode steps (greedy {base['decode_steps']:.2f}) but "
                   f"{top['kv_cache_bytes'] / base['kv_cache_bytes']:.1f}x the KV cache; P streams multiply the KV "
                   "cache and "
                   "the per-step work by P at the same number of steps.")
    return out


# --------------------------------------------------------------------------- the comparison
@dataclass
class CompareResult:
    out_dir: Path
    results_path: Path
    report_path: Path
    plots: dict[str, Path]
    points: list[dict[str, Any]]
    conclusions: list[str]
    trained: list[str]
    evaluated: list[str]
    skipped: list[str]


def _eval_path(out_dir: Path, name: str) -> Path:
    return out_dir / "evals" / f"{name}.json"


def _load_eval(path: Path, settings: Mapping[str, Any], model_dir: str) -> dict[str, Any] | None:
    """A finished evaluation with the same settings and model, or None (then it is redone)."""
    try:
        ev = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if ev.get("settings") != dict(settings) or ev.get("model_dir") != model_dir:
        return None
    return ev


def _fingerprint(model_dir: Path) -> str:
    """Changes when the weights change (size + mtime of the model directory's files)."""
    h = hashlib.sha1()
    for f in sorted(model_dir.glob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _model_names(dirs: Sequence[str | os.PathLike]) -> list[str]:
    """A short unique name per model directory (its name, or its run's name for ``RUN/model``)."""
    names = []
    for d in dirs:
        p = Path(d).resolve()
        base = p.parent.name if p.name == "model" and p.parent.name else p.name
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def check_model_dirs(dirs: Sequence[str | os.PathLike]) -> None:
    """Every --models entry is a directory with a config and a tokenizer (checked before any work)."""
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise ParScaleError(f"--models {d}: not a directory")
        if not (p / "config.json").is_file():
            raise ParScaleError(f"--models {d}: no config.json there (not a model directory)")
        if not (p / "tokenizer.json").is_file():
            raise ParScaleError(f"--models {d}: no tokenizer.json there")


def compare(preset: str | ComparePreset = "quick", out: str | os.PathLike | None = None, *,
            models: Sequence[str | os.PathLike] | None = None, threads: int | str | None = "auto",
            progress: bool = True, command: str | None = None, overrides: Mapping[str, Any] | None = None,
            train_fn: Callable[..., Any] | None = None, log: Callable[[str], None] | None = None,
            device: str = "auto") -> CompareResult:
    """Train the preset's grid (or take ``models``: existing model directories), evaluate every
    model, and write evals/, results.json, report.md and the plots into ``out`` after each model.

    ``overrides``: preset fields to change (``task``, ``difficulty``, ``eval_problems``, ...);
    ``threads``: torch CPU threads (``"auto"``: the cores free right now, per model); ``train_fn``
    replaces ``parscale.training.train`` (tests); ``device``: where the models are evaluated
    (``auto``: CUDA when present; training picks its device the same way). Finished training runs
    and evaluations are skipped, so running the same command again continues where a cut run
    stopped.
    """
    import torch

    from .atomic import atomic_write_text
    from .cost import param_counts
    from .model import ParScaleForCausalLM
    from .reproduce import _load_average, _machine, auto_threads, grid_name
    from .sampling.tasks import get_task, write_training_corpus
    from .tokenizer import Tokenizer

    t0 = time.perf_counter()
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ComparePreset)})
        if unknown:
            raise ParScaleError(f"unknown preset field(s): {', '.join(unknown)}")
        preset = dataclasses.replace(preset, **{k: (tuple(v) if isinstance(v, list) else v)
                                                for k, v in overrides.items() if v is not None})
    validate_preset(preset)
    if threads is not None and threads != "auto" and (not isinstance(threads, int) or threads < 1):
        raise ParScaleError(f"--threads must be a positive integer or 'auto' (got {threads!r})")
    if device not in ("auto", "cpu", "cuda"):
        raise ParScaleError(f"--device must be auto, cpu or cuda (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ParScaleError("--device cuda: no CUDA device is available")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    out_dir = Path(out if out is not None else f"runs/compare-{preset.name}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ParScaleError(f"--out {out_dir}: exists and is not a directory")
    if models:
        check_model_dirs(models)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if progress else None)
    started = datetime.datetime.now(datetime.UTC)
    load_start = _load_average()
    task = get_task(preset.task)
    problems = eval_problems(preset)
    settings = eval_settings(preset)

    # the plan: (name, size label, P or None (read from the model), model dir, TrainConfig or None)
    plan: list[tuple[str, str, int | None, Path, Any]] = []
    corpus = out_dir / "data" / f"{preset.task}-d{preset.difficulty}-train.jsonl"
    if models:
        for name, d in zip(_model_names(models), models):
            plan.append((name, name, None, Path(d), None))
    else:
        # cheapest to train first, so a run cut short still holds the most models
        # the first grid complete before any replica
        grid = sorted(((size, P) for size in preset.sizes for P in preset.streams),
                      key=lambda sp: train_flops_per_token(preset, *sp))
        for seed in (preset.seed, *preset.train_seeds):
            for size, P in grid:
                name = grid_name(size.name, P) + ("" if seed == preset.seed else f"-s{seed}")
                run_dir = out_dir / "runs" / name
                plan.append((name, size.name, P, run_dir / "model", (size, P, run_dir, seed)))
        if not corpus.exists():
            write_training_corpus(task, preset.train_problems, seed=preset.seed, difficulty=preset.difficulty,
                                  path=corpus, exclude=[p.prompt for p in problems])
    say(f"parscale compare: preset {preset.name}, {len(plan)} models into {out_dir}; task {task.name} "
        f"difficulty {preset.difficulty}, {len(problems)} held-out problems, n={preset.n_samples} samples")

    train_fn = train_fn or _train
    records: list[dict[str, Any]] = []
    evals: dict[str, dict[str, Any]] = {}
    trained, evaluated, skipped = [], [], []
    result = None
    for i, (name, size_label, P, model_dir, spec) in enumerate(plan, start=1):
        n_threads = auto_threads() if threads == "auto" else threads
        if spec is not None:
            size, P, run_dir, seed = spec
            cfg = train_config(preset, size, P, corpus, run_dir, n_threads, seed, device)
            t_train = time.perf_counter()
            res = train_fn(cfg)
            if not getattr(res, "already_finished", False):
                trained.append(name)
                say(f"[{i}/{len(plan)}] {name}: trained {res.tokens:,} tokens in {time.perf_counter() - t_train:.0f} s "
                    f"(held-out loss {res.val_loss:.4f})")
            model_dir = Path(res.model_dir)
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        tok = Tokenizer.from_pretrained(model_dir)
        model = ParScaleForCausalLM.from_pretrained(model_dir, streams=P, device=device)
        model.eval()
        info = training_info(model_dir, model.config)
        record = {"name": name, "size": size_label, "P": int(model.streams),
                  "params": int(model.num_parameters(non_embedding=True)),
                  "params_total": int(model.num_parameters()), "model_dir": str(model_dir),
                  "backbone_params": int(param_counts(model.config).backbone_non_embedding),
                  "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                  "train_seed": spec[3] if spec is not None else None, **info}
        path = _eval_path(out_dir, name)
        fp = _fingerprint(model_dir)
        ev = _load_eval(path, settings, str(model_dir))
        if ev is not None and ev.get("weights") == fp:
            skipped.append(name)
            say(f"[{i}/{len(plan)}] {name}: evaluation already done ({path})")
        else:
            t_eval = time.perf_counter()
            ev = evaluate_model(model, tok, problems, preset, progress=False)
            ev.update(settings=settings, model_dir=str(model_dir), weights=fp, n=preset.n_samples,
                      threads=n_threads, device=device, eval_wall_s=time.perf_counter() - t_eval)
            atomic_write_text(path, json.dumps(ev) + "\n")
            evaluated.append(name)
            g = float(np.mean(ev["values"]["greedy@1"]))
            say(f"[{i}/{len(plan)}] {name}: evaluated in {ev['eval_wall_s']:.0f} s; greedy {_pct(g)}, "
                f"majority@{max(preset.ks)} {_pct(float(np.mean(ev['values'][f'majority@{max(preset.ks)}'])))}"
                if max(preset.ks) > 1 else f"[{i}/{len(plan)}] {name}: evaluated; greedy {_pct(g)}")
        record["eval_wall_s"] = ev.get("eval_wall_s")
        record["eval_threads"] = ev.get("threads")
        record["eval_device"] = ev.get("device")
        records.append(record)
        evals[name] = ev
        del model
        result = _write_outputs(out_dir, preset, records, evals, started, load_start, t0, command, threads,
                                trained, evaluated, skipped, len(plan), _machine)
    return result


def _train(cfg):
    from .training import train

    return train(cfg)


def validate_preset(p: ComparePreset) -> None:
    from .sampling.tasks import get_task

    task = get_task(p.task)
    if task.name == "exact":
        raise ParScaleError("--task exact has no generator; compare needs a task that makes problems")
    task.make_problems(0, difficulty=p.difficulty)  # a bad difficulty fails here, naming the range
    for name, value, low in [("eval_problems", p.eval_problems, 1), ("n_samples", p.n_samples, 1),
                             ("train_tokens", p.train_tokens, 1), ("train_problems", p.train_problems, 1),
                             ("max_new_tokens", p.max_new_tokens, 1)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ParScaleError(f"{name.replace('_', '-')} must be an integer >= {low} (got {value!r})")
    if not p.ks or any(not isinstance(k, int) or k < 1 or k > p.n_samples for k in p.ks):
        raise ParScaleError(f"ks must be integers in [1, n_samples={p.n_samples}] (got {list(p.ks)})")
    if not p.streams or any(P < 1 for P in p.streams):
        raise ParScaleError(f"streams must be integers >= 1 (got {list(p.streams)})")
    if not (math.isfinite(p.temperature) and p.temperature > 0):
        raise ParScaleError(f"temperature must be > 0 (got {p.temperature})")


def _write_outputs(out_dir: Path, preset: ComparePreset, records, evals, started, load_start, t0, command,
                   threads, trained, evaluated, skipped, planned: int, machine) -> CompareResult:
    from .atomic import atomic_write_text
    from .plots.compare import plot_frontier, plot_inference, plot_training

    cells, cell_evals = seed_cells(records, evals)
    evals = {**evals, **cell_evals}
    points = build_points([*records, *cells], evals, preset.n_boot, preset.seed)
    fronts = frontiers(points, preset.seed)
    conclusions = conclude(points, evals, fronts, preset.n_boot, preset.seed, preset.eflops_hardware, preset.seed,
                           {m["name"]: m.get("val_loss") for m in records})
    shown = first_seed(points, preset.seed)
    plots = {
        "inference": plot_inference(shown, fronts["inference_flops"], out_dir / PLOT_NAMES["inference"]),
        "frontier": plot_frontier(points, fronts["inference_flops"], out_dir / PLOT_NAMES["frontier"]),
        "frontier_eflops": plot_frontier(points, fronts["eflops"], out_dir / PLOT_NAMES["frontier_eflops"],
                                         x="eflops", title=f"Pareto frontier: accuracy vs eFLOPs "
                                                           f"({preset.eflops_hardware} FLOP/byte)"),
        "training": plot_training([p for p in points if not p.get("average_of")], out_dir / PLOT_NAMES["training"],
                                  first_seed=preset.seed),
    }
    results = {
        "format": FORMAT, "version": VERSION,
        "complete": len(records) == planned, "models_planned": planned,
        "preset": preset.to_dict(),
        "models": records,
        "seed_averages": cells,
        "points": points,
        "frontiers": fronts,
        "conclusions": conclusions,
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(threads if threads != "auto" else "auto", load_start),
        "wall_s": time.perf_counter() - t0,
        "trained": trained, "evaluated": evaluated, "skipped": skipped,
        "plots": {k: p.name for k, p in plots.items()},
    }
    results_path = atomic_write_text(out_dir / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    report_path = atomic_write_text(out_dir / REPORT_NAME, render_report(results))
    return CompareResult(out_dir, results_path, report_path, plots, points, conclusions, list(trained),
                         list(evaluated), list(skipped))


# --------------------------------------------------------------------------- the report
def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def render_report(results: Mapping[str, Any]) -> str:
    """report.md from results.json alone (numbers, tables and the computed conclusions)."""
    pr = results["preset"]
    points = results["points"]
    m = results["machine"]
    lines = [f"# parscale compare: parameters vs streams vs samples ({pr['name']})", ""]
    if not results.get("complete", True):
        lines += [f"**Partial run:** {len(results['models'])} of {results['models_planned']} models finished so far.",
                  ""]
    lines += [
        f"Task **{pr['task']}** at difficulty {pr['difficulty']}: {pr['eval_problems']} held-out problems (never in "
        f"the training text), every model trained on the same {pr['train_tokens']:,} tokens. Each model is "
        f"evaluated greedily and with n = {pr['n_samples']} samples per problem at temperature {pr['temperature']}; "
        f"every k < n is the exact expectation over all k-subsets of those n samples (one sampling run per "
        f"model, not one per k). Methods: `greedy`, `sample` (one sample), `majority` (vote), `bom` "
        f"(Best-of-Majority, min_fraction {pr['bom_min_fraction']}), `bon` (best-of-N by `{pr['scorer']}`); "
        f"`pass` (pass@k) is an oracle reference, never on a frontier. Intervals: 95% percentile bootstrap over "
        f"problems ({pr['n_boot']} resamples).", ""]
    if pr.get("why"):
        lines += [f"Why this task: {pr['why']}", ""]
    lines += ["## Conclusions (computed from the numbers below)", ""]
    lines += [f"- {c}" for c in results["conclusions"]]
    lines += ["", "## Models", "",
              "| model | size | P | non-emb. params | train tokens | train FLOPs | held-out loss | train s | eval s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["models"]:
        tf = f"{r['train_flops']:.3g}" if r.get("train_flops") else "unknown"
        vl = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-"
        tw = f"{r['train_wall_s']:.0f}" if r.get("train_wall_s") is not None else "-"
        ew = f"{r['eval_wall_s']:.0f}" if r.get("eval_wall_s") is not None else "-"
        tt = f"{r['train_tokens']:,}" if r.get("train_tokens") else "-"
        lines.append(f"| {r['name']} | {r['size']} | {r['P']} | {r['params']:,} | {tt} | {tf} | {vl} | {tw} | {ew} |")
    lines += ["", "## Every point", "",
              "Costs per problem: inference FLOPs (prefill once + k rows of decode), decode steps at batch 1 "
              "(latency proxy: the k rows run side by side), peak KV cache (k rows x P streams at the longest "
              f"answer), eFLOPs = FLOPs + KV-cache bytes read x the FLOP/byte of {pr['eflops_hardware']}, "
              "wall seconds of the run the point comes from. Frontier: * on the inference-FLOPs "
              "frontier, + on the joint training + inference frontier.", "",
              "| point | axes | accuracy | 95% CI | inference FLOPs | eFLOPs | train FLOPs | decode steps | KV cache "
              "| wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    f_inf = set(results["frontiers"].get("inference_flops", []))
    f_joint = set(results["frontiers"].get("train_and_inference_flops", []))
    for p in points:
        mark = ("*" if p["id"] in f_inf else "") + ("+" if p["id"] in f_joint else "")
        tf = f"{p['train_flops']:.3g}" if p.get("train_flops") else "-"
        name = f"{p['id']}{' (oracle)' if p['oracle'] else ''} {mark}".strip()
        lines.append(f"| {name} | {p['category']} | {100 * p['accuracy']:.1f}% | "
                     f"[{100 * p['ci'][0]:.1f}, {100 * p['ci'][1]:.1f}] | {p['inference_flops']:.3g} | "
                     f"{p['eflops']:.3g} | {tf} | "
                     f"{p['decode_steps']:.2f} | {_fmt_bytes(p['kv_cache_bytes'])} | {p['wall_s']:.4f} |")
    lines += ["", "## Pareto frontiers", ""]
    by_id = {p["id"]: p for p in points}
    for key, ids in results["frontiers"].items():
        lines.append(f"- **{key.replace('_', ' ')}**: " + ", ".join(
            f"{i} ({100 * by_id[i]['accuracy']:.1f}%)" for i in ids))
    lines += ["", "## Plots", ""]
    for key, name in results.get("plots", {}).items():
        lines.append(f"![{key}]({name})")
    lines += ["", "## Run", "",
              f"- command: `{results.get('command') or 'parscale compare (Python API)'}`",
              f"- date: {results['date']}; wall time {results['wall_s']:.0f} s "
              f"(trained {len(results['trained'])}, evaluated {len(results['evaluated'])}, "
              f"reused {len(results['skipped'])} evaluations)",
              f"- machine: {m.get('platform')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')}, threads "
              f"{m.get('threads')}; load average at start {m.get('load_average')}, at end {m.get('load_average_end')}",
              ""]
    return "\n".join(lines)
