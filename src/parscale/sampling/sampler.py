"""The batched sampler: N answers per problem on ``parscale.generation.decode`` (no second loop).

For each batch of problems the prompts are prefilled once and each prompt's cache is shared by
its N rows. Every row has its own seed (derived from ``(seed, problem id, sample index)``, so a
sample does not depend on the batch it ran in), its own temperature / top-p, and its chosen-token
log-probs are recorded. A row ends at EOS, at a stop string, or at ``max_new_tokens``; an
early-stopping policy (``policies.make_policy``) sees each finished answer and may prune the
problem's other rows, which then leave the running batch, so the saved decode work is real and
shows in the ledger's ``row_steps`` and ``flops``. A policy with ``every = K`` (DeepPrune, peek)
is also shown the problem's live rows after every K-th token (``decode``'s ``on_step`` hook) and
may prune some of them; the work it does itself (``policy.extra_cost``) is added to the ledger,
and which kept row each pruned row was judged equal to goes to ``meta["pruned_into"]``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..cost import decode_kv_read_bytes, forward_flops
from ..errors import ParScaleError
from ..generation import decode, left_pad
from .policies import Policy, PolicyContext, make_policy
from .records import CostLedger, Problem, Sample, SampleSet


def row_seed(seed: int, problem_id: int, index: int) -> int:
    """The seed of sample ``index`` of problem ``problem_id``: independent of batching."""
    return int(np.random.SeedSequence([seed, problem_id, index]).generate_state(1)[0])


def _per_sample(value, n: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ParScaleError(f"{name}: {len(values)} values for n={n} samples")
    return [float(v) for v in values]


def sample_problems(model, tokenizer, problems: Sequence[Problem], *, n: int,
                    temperature: float | Sequence[float] = 1.0, top_p: float | Sequence[float] = 1.0,
                    top_k: int | None = None, seed: int = 0, max_new_tokens: int = 32,
                    stop_strings: Sequence[str] = ("\n",), eos_token_id: int | Sequence[int] | None = None,
                    policy: str | Policy | None = None, extractor: str | Callable | None = None,
                    batch_problems: int = 1, compact: bool = True, progress: bool = False,
                    meta: dict | None = None) -> SampleSet:
    """Sample ``n`` answers for every problem; returns a SampleSet with its cost ledger.

    ``tokenizer`` needs ``encode(str) -> list[int]`` and ``decode(list[int]) -> str`` (a
    ``parscale.data`` tokenizer or any object with those methods). ``temperature`` / ``top_p`` may
    be one value per sample index (so one call can mix temperatures). ``policy`` is a spec such as
    ``"agree:3"``, ``"posterior:0.95"``, ``"first:4"`` or a Policy (reset per problem).
    """
    if n < 1 or batch_problems < 1 or max_new_tokens < 1:
        raise ParScaleError("n, batch_problems and max_new_tokens must be >= 1")
    temps, top_ps = _per_sample(temperature, n, "temperature"), _per_sample(top_p, n, "top_p")
    cfg = model.config
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    # one EOS id or several (a model's every EOS: parscale.generation.default_eos_ids)
    eos = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
    # one policy object parsed (a judge loaded) once, copied per problem: its state is per problem
    proto = make_policy(policy, extractor=extractor) if isinstance(policy, str) else policy
    pruned_into: dict[str, dict[str, int]] = {}
    samples: list[Sample] = []
    ledger = CostLedger(streams=model.streams, params=model.num_parameters(),
                        kv_bytes_per_value=model.model.norm.weight.element_size())
    bar = tqdm(total=len(problems), desc="sampling", unit="problem", disable=not progress)
    t_start = time.perf_counter()
    for lo in range(0, len(problems), batch_problems):
        batch = list(problems[lo: lo + batch_problems])
        prompts = [tokenizer.encode(p.prompt) for p in batch]
        if any(not ids for ids in prompts):
            raise ParScaleError("a problem's prompt encodes to no tokens")
        ids, mask = left_pad(prompts)
        policies: list[Policy | None] = []
        for p, ids_p in zip(batch, prompts):
            pol = None if proto is None else copy.copy(proto)
            if pol is not None:
                pol.reset()
                pol.bind(PolicyContext(model=model, tokenizer=tokenizer, problem=p, prompt_ids=list(ids_p),
                                       eos=frozenset(eos), n=n))
            policies.append(pol)
        rows = len(batch) * n
        watched = [b for b, pol in enumerate(policies) if pol is not None and pol.every > 0]

        def text_of(tokens: list[int]) -> str:
            return tokenizer.decode([t for t in tokens if t not in eos])

        def stop(row: int, tokens: list[int]) -> bool:
            if not stop_strings:
                return False
            tail = tokenizer.decode(tokens[-8:])  # a stop string ends in the last few tokens
            return any(s in tail for s in stop_strings)

        def on_finish(row: int, tokens: list[int], reason: str, step: int):
            b, i = divmod(row, n)
            pol = policies[b]
            if pol is None:
                return None
            action = pol.observe(Sample(problem_id=batch[b].id, index=i, token_ids=list(tokens),
                                        text=text_of(tokens), logprobs=[], finish_reason=reason))
            if action.kind == "stop":
                return [b * n + j for j in range(n) if b * n + j != row]
            if action.kind == "prune":
                return [b * n + j for j in action.rows]
            return None

        between: set[int] = set()  # rows pruned between steps: their last token was fed too

        def on_step(dec) -> list[int]:
            out = []
            for b in watched:
                pol = policies[b]
                live = {r - b * n: dec.rows[r].tokens for r in range(b * n, (b + 1) * n) if dec.rows[r].reason is None}
                if not live:
                    continue
                step = max(map(len, live.values()))  # a problem's rows decode in lockstep
                if step % pol.every:
                    continue
                action = pol.inspect(step, live)
                if action.kind == "stop":
                    out += [b * n + i for i in live]
                elif action.kind == "prune":
                    out += [b * n + i for i in action.rows if i in live]
            between.update(out)
            return out

        seeds = [row_seed(seed, p.id, i) for p in batch for i in range(n)]
        res = decode(model, ids, mask, max_new_tokens=max_new_tokens, num_samples=n,
                     temperature=temps * len(batch), top_p=top_ps * len(batch), top_k=top_k, seeds=seeds,
                     eos_token_id=eos, stop=stop, on_finish=on_finish, on_step=on_step if watched else None,
                     return_logprobs=True, compact=compact)
        for r in range(rows):
            b, i = divmod(r, n)
            samples.append(Sample(problem_id=batch[b].id, index=i, token_ids=res.tokens[r],
                                  text=text_of(res.tokens[r]), logprobs=res.logprobs[r],
                                  finish_reason=res.finish_reason[r], seed=seeds[r], temperature=temps[i],
                                  top_p=top_ps[i], finish_step=res.finish_step[r],
                                  wall_s=res.finish_time[r]))
        # FLOPs from the model's own cost formulas: each prefill once, then every token fed back to
        # the model (m_r per row: len - 1 with compaction, every decode step without) at its context.
        flops = sum(forward_flops(cfg, tokens=len(p), context=(len(p) + 1) / 2) for p in prompts)
        fed = [(len(res.tokens[r]) - (r not in between) if compact else res.decode_steps, len(prompts[r // n]))
               for r in range(rows)]
        n_fed = sum(m for m, _ in fed)
        if n_fed:
            ctx_sum = sum(m * p + m * (m + 1) / 2 for m, p in fed)
            flops += forward_flops(cfg, tokens=n_fed, context=ctx_sum / n_fed)
        kv_value = model.model.norm.weight.element_size()  # the cache's dtype (model.new_cache)
        ledger = ledger + CostLedger(prompt_tokens=res.prefill_tokens,
                                     generated_tokens=sum(len(t) for t in res.tokens),
                                     decode_steps=res.decode_steps, row_steps=res.row_steps,
                                     wall_s=res.wall_s, flops=flops, streams=model.streams,
                                     params=model.num_parameters(),
                                     kv_read_bytes=decode_kv_read_bytes(cfg, fed, kv_value, model.streams),
                                     kv_bytes_per_value=kv_value)
        for p, pol in zip(batch, policies):
            if pol is not None:
                ledger = ledger + pol.extra_cost
                if pol.merged:
                    pruned_into[str(p.id)] = {str(i): int(j) for i, j in sorted(pol.merged.items())}
        bar.update(len(batch))
    bar.close()
    ledger.wall_s = time.perf_counter() - t_start
    info = dict(meta or {})
    info.update(n=n, temperature=temps, top_p=top_ps, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens,
                stop_strings=list(stop_strings), policy=policy if isinstance(policy, (str, type(None))) else
                type(policy).__name__, streams=model.streams, compact=compact)
    if extractor is not None and not callable(extractor):
        info["extractor"] = extractor
    if pruned_into:
        info["pruned_into"] = pruned_into
    return SampleSet(problems=list(problems), samples=samples, ledger=ledger, meta=info)
