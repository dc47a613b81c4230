"""Generation: one decode loop (prefill once, then one token per step) that everything else reuses.

``Decoder`` is the engine, step-wise so that a server can drive it (continuous batching: prompts
join the running batch at any step, rows leave when they end); ``decode`` is a loop over it for
one batch of prompts. It is built for sample-level scaling as much as for plain generation:

* a batch of (left-padded) prompts is prefilled **once**; with ``num_samples = n`` each prompt's
  cache is then shared by n rows (row ``r`` belongs to prompt ``r // n``);
* every row has its own temperature / top-k / top-p and, optionally, its own seeded generator, so
  a row's samples do not depend on which other rows run beside it;
* the chosen token's log-probability (under the model's unmodified distribution) is recorded;
* rows stop at EOS, at a caller's stop test, at ``max_new_tokens``, or when a caller's
  ``on_finish`` hook prunes them; stopped rows leave the running batch (compaction), and the
  counters ``decode_steps`` / ``row_steps`` say how much decode work was really done;
* rows of different lengths share a forward (``KVCache.concat`` right-aligns their caches), and
  each row's tokens equal what it gets alone, up to the rounding of a batched forward.

``generate`` wraps it with Hugging Face's calling convention and return value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ParScaleError


def seeded_generator(seed, device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (any integer torch takes: [-2**63, 2**64))."""
    try:
        return torch.Generator(device=device).manual_seed(int(seed))
    except (ValueError, RuntimeError, OverflowError, TypeError):
        raise ParScaleError(f"seed must be an integer in [-2**63, 2**64) (got {seed!r:.40})") from None


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # per row: the new tokens (EOS included when it ended the row)
    logprobs: list[list[float]] | None
    finish_reason: list[str]  # "eos" | "stop" | "length" | "pruned"
    finish_step: list[int]  # the step (0-based new-token index) at which the row ended
    prompt_index: list[int]
    prefill_tokens: int  # real prompt tokens, each counted once however many rows share it
    decode_steps: int  # forward passes after the prefill
    row_steps: int  # sum over those passes of the rows in the running batch (decode work)
    wall_s: float
    finish_time: list[float] = field(default_factory=list)  # seconds from start, per row


def _per_row(value, rows: int, name: str, cast) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ParScaleError(f"{name} has {len(value)} entries for {rows} rows")
        return [cast(v) for v in value]
    return [cast(value)] * rows


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Sampling probabilities ``r v`` after per-row temperature, top-k (0 = off), top-p (1 = off)."""
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # nucleus: drop a token when the mass before it already reaches top_p (the top token stays)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)


@dataclass
class Row:
    """One decoding row: its settings and what it produced so far."""

    id: int
    prompt_index: int  # index of its prompt within the ``add`` call that created it
    prompt_tokens: int  # real tokens of that prompt
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None  # None: the decoder's shared generator
    eos: frozenset[int]
    top_logprobs: int = 0  # record this many most likely tokens per step (0: none)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # chosen token, unmodified distribution
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per step, when top_logprobs
    reason: str | None = None  # "eos" | "stop" | "length" | "pruned" | "cancelled" | "error"
    finish_step: int = -1
    finish_time: float = 0.0  # seconds from the decoder's start


class Decoder:
    """The step-wise decode engine: a running batch of rows that new prompts can join at any step.

    ``add`` prefills prompts (``b s``, left-padded) and queues their rows; the next ``step``
    merges them into the running batch (the KV caches are right-aligned, so rows of different
    lengths share one forward). ``step`` chooses one token for every live row (greedy where
    temperature is 0, else sampled with the row's own generator, or the shared ``generator``),
    ends rows (the row's EOS set, the ``stop`` test, its ``max_new_tokens``, ``cancel``), drops
    ended rows from the batch (``compact``) and feeds the survivors' tokens to the model.

    A row's tokens do not depend on the other rows (up to floating-point rounding of the batched
    forward): positions, keys and randomness are per row. ``streams`` fixes P for this batch
    (the model's active stream set is switched for each forward and restored), so one model can
    serve one Decoder per P. Hooks are as in :func:`decode`, with row ids.
    """

    def __init__(self, model, *, streams: int | None = None, generator: torch.Generator | None = None,
                 stop: Callable[[int, list[int]], bool] | None = None,
                 on_finish: Callable[[int, list[int], str, int], Iterable[int] | None] | None = None,
                 logits_processor: Callable[[torch.Tensor, list[int], list[list[int]]], torch.Tensor] | None = None,
                 on_token: Callable[[int, int], None] | None = None, compact: bool = True,
                 trim: bool = True):
        self.model = model
        self.streams = model.streams if streams is None else int(streams)
        self.device = model.model.embed_tokens.weight.device
        self.generator = generator
        self.stop, self.on_finish = stop, on_finish
        self.logits_processor, self.on_token, self.compact, self.trim = logits_processor, on_token, compact, trim
        self.rows: dict[int, Row] = {}
        self.running: list[int] = []  # row ids in the cache, in cache order
        self.cache = None  # KVCache of the running rows
        self.logits: torch.Tensor | None = None  # running rows' next-token logits, ``r v``
        self._pending: list[tuple[object, torch.Tensor, list[int]]] = []  # prefilled, not merged yet
        self._next_id = 0
        self.prefill_tokens = self.decode_steps = self.row_steps = 0
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ queries
    @property
    def live(self) -> list[int]:
        """Rows still decoding (running or waiting to merge), in batch order."""
        queued = [r for _, _, rows in self._pending for r in rows]
        return [r for r in self.running + queued if self.rows[r].reason is None]

    def __len__(self) -> int:
        """Rows holding a slot in the batch (running or queued), ended or not."""
        return len(self.running) + sum(len(rows) for _, _, rows in self._pending)

    # ------------------------------------------------------------------ rows in and out
    @torch.no_grad()
    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            max_new_tokens: int | Sequence[int], num_samples: int = 1,
            temperature: float | Sequence[float] = 0.0, top_k: int | Sequence[int] | None = None,
            top_p: float | Sequence[float] | None = None, seeds: Sequence[int | None] | None = None,
            eos_token_id: int | Iterable[int] | None = None,
            top_logprobs: int | Sequence[int] = 0, cache=None) -> list[int]:
        """Prefill ``input_ids`` (``b s``, left-padded) once and queue ``num_samples`` rows per
        prompt (prompt-major); returns their row ids. Settings (``max_new_tokens``, sampling,
        ``top_logprobs``) are a scalar or one value per row; ``seeds`` (one per row, None = the
        shared generator) give rows their own generators. ``cache``: a KV cache of ``b`` rows already
        holding earlier tokens of these prompts (``input_ids`` are the tokens after them); it is
        used in place. Everything is validated before the prefill, and nothing changes if the
        prefill raises (except a passed ``cache``)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ParScaleError(f"input_ids must be (batch, seq) with seq >= 1; got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        n_rows = b * max(num_samples, 1)
        budgets = _per_row(max_new_tokens, n_rows, "max_new_tokens", int)
        if min(budgets) < 1 or num_samples < 1:
            raise ParScaleError("max_new_tokens and num_samples must be >= 1")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ParScaleError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                    f"{tuple(input_ids.shape)}")
            if not bool(attention_mask[:, -1].bool().all()):
                raise ParScaleError("prompts must be left-padded (attention_mask[:, -1] has a 0)")
        tops = _per_row(top_logprobs, n_rows, "top_logprobs", int)
        if min(tops) < 0:
            raise ParScaleError(f"top_logprobs must be >= 0 (got {min(tops)})")
        if seeds is not None and not isinstance(seeds, (list, tuple)):
            raise ParScaleError("seeds must be a list with one seed (or None) per row")
        eos = frozenset() if eos_token_id is None else frozenset(
            {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
        temps = _per_row(temperature, n_rows, "temperature", float)
        top_ks = _per_row(top_k or 0, n_rows, "top_k", int)
        top_ps = _per_row(1.0 if top_p is None else top_p, n_rows, "top_p", float)
        for name, vals, ok in [("temperature", temps, lambda t: 0 <= t < float("inf")),
                               ("top_k", top_ks, lambda k: k >= 0),
                               ("top_p", top_ps, lambda p: 0 < p <= 1)]:
            bad = [v for v in vals if not ok(v)]
            if bad:
                raise ParScaleError(f"{name} out of range: {bad[0]}")
        row_seeds = [None] * n_rows if seeds is None else _per_row(seeds, n_rows, "seeds", lambda x: x)
        gens = [None if x is None else seeded_generator(x, self.device) for x in row_seeds]

        if cache is not None and (cache.batch != b or cache.length + s + max(budgets) > cache.capacity):
            raise ParScaleError(f"the cache ({cache.batch} rows, {cache.length}/{cache.capacity} slots used) has no "
                                f"room for {b} rows of {s} + {max(budgets)} tokens")
        with _StreamsAs(self.model, self.streams):
            if cache is None:
                cache = self.model.new_cache(b, s + max(budgets))
            logits = self.model(input_ids.to(self.device), None if attention_mask is None
                                else attention_mask.to(self.device), cache=cache).logits[:, -1]
        real = attention_mask.sum(-1).tolist() if attention_mask is not None else [s] * b
        if num_samples > 1:
            cache.repeat_interleave(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
        ids = list(range(self._next_id, self._next_id + n_rows))
        self._next_id += n_rows
        for j, r in enumerate(ids):
            self.rows[r] = Row(id=r, prompt_index=j // num_samples, prompt_tokens=int(real[j // num_samples]),
                               max_new_tokens=budgets[j], temperature=temps[j], top_k=top_ks[j],
                               top_p=top_ps[j], generator=gens[j], eos=eos, top_logprobs=tops[j])
        self.prefill_tokens += int(sum(real))
        self._pending.append((cache, logits, ids))
        return ids

    def cancel(self, row: int) -> None:
        """End ``row`` now (reason "cancelled"); it leaves the batch at the next step."""
        r = self.rows[row]
        if r.reason is None:
            self._end(r, "cancelled", len(r.tokens) - 1)

    def prune(self, row: int) -> None:
        """End a live ``row`` now with reason "pruned" (a sampling policy's decision between steps).

        No ``on_finish`` hook runs (the row did not finish); it leaves the batch at the next step's
        compaction, so it costs no further decode work."""
        r = self.rows[row]
        if r.reason is None:
            r.reason, r.finish_step, r.finish_time = "pruned", len(r.tokens) - 1, time.perf_counter() - self.t0

    def release(self, row: int) -> Row:
        """Forget an ended row that has left the batch (a server's bookkeeping); returns it."""
        r = self.rows[row]
        if r.reason is None or row in self.running or any(row in rows for _, _, rows in self._pending):
            raise ParScaleError(f"row {row} is still in the batch")
        return self.rows.pop(row)

    def _end(self, row: Row, why: str, step: int) -> None:
        row.reason, row.finish_step, row.finish_time = why, step, time.perf_counter() - self.t0
        if self.on_finish is not None and why != "cancelled":
            for other in self.on_finish(row.id, row.tokens, why, step) or ():
                o = self.rows[other]
                if o.reason is None:
                    o.reason, o.finish_step, o.finish_time = "pruned", step, time.perf_counter() - self.t0

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[int]:
        """Choose a token for every live row, end rows, compact, feed the survivors to the model.

        Returns the rows that got a token or left the batch in this step. If the forward raises,
        the batch is left empty (its live rows end with reason "error") and the error propagates.
        """
        self._merge_pending()
        touched: list[int] = []
        live = [j for j, r in enumerate(self.running) if self.rows[r].reason is None]
        rows = [self.running[j] for j in live]
        choice = None
        if rows:
            step_logits = self.logits[live].float()
            scores = None if self.logits_processor is None else self.logits_processor(
                step_logits, rows, [self.rows[r].tokens for r in rows])
            choice, lp, top = self._pick(step_logits, rows, scores)
            chosen, lps = choice.tolist(), lp.tolist()
            for i, r in enumerate(rows):
                row = self.rows[r]
                if row.reason is not None:  # pruned by an earlier row's hook in this step
                    continue
                tok = chosen[i]
                row.tokens.append(tok)
                row.logprobs.append(lps[i])
                if top is not None and row.top_logprobs:
                    row.top.append(top[i][: row.top_logprobs])
                touched.append(r)
                if self.on_token is not None:
                    self.on_token(r, tok)
                step = len(row.tokens) - 1
                if tok in row.eos:
                    self._end(row, "eos", step)
                elif self.stop is not None and self.stop(r, row.tokens):
                    self._end(row, "stop", step)
                elif len(row.tokens) >= row.max_new_tokens:
                    self._end(row, "length", step)
        if all(self.rows[r].reason is not None for r in self.running):
            touched += [r for r in self.running if r not in touched]
            self.running, self.cache, self.logits = [], None, None
            return touched
        next_tok = torch.zeros(len(self.running), dtype=torch.long, device=self.device)
        next_tok[live] = choice.to(device=self.device, dtype=torch.long)
        if self.compact:
            keep = [j for j, r in enumerate(self.running) if self.rows[r].reason is None]
            if len(keep) < len(self.running):
                gone = [r for j, r in enumerate(self.running) if self.rows[r].reason is not None]
                touched += [r for r in gone if r not in touched]
                self.cache.select(keep)
                if self.trim:
                    self.cache.trim()
                self.running = [self.running[j] for j in keep]
                next_tok = next_tok[keep]
        try:
            with _StreamsAs(self.model, self.streams):
                self.logits = self.model(next_tok[:, None], cache=self.cache).logits[:, -1]
        except BaseException:
            self._fail_running()
            raise
        self.decode_steps += 1
        self.row_steps += len(self.running)
        return touched

    def _fail_running(self) -> None:
        now = time.perf_counter() - self.t0
        for r in self.running:
            row = self.rows[r]
            if row.reason is None:
                row.reason, row.finish_step, row.finish_time = "error", len(row.tokens) - 1, now
        self.running, self.cache, self.logits = [], None, None

    def _merge_pending(self) -> None:
        """Join the queued prefills to the running batch (one cache, right-aligned)."""
        if not self._pending:
            return
        from .cache import KVCache

        parts = ([(self.cache, self.logits, self.running)] if self.running else []) + self._pending
        self._pending = []
        if len(parts) == 1:
            self.cache, self.logits, self.running = parts[0][0], parts[0][1], list(parts[0][2])
            return
        running = [r for _, _, rows in parts for r in rows]
        length = max(c.length for c, _, _ in parts)
        # room for every row's remaining tokens (the last one is never fed back)
        room = max(self.rows[r].max_new_tokens - len(self.rows[r].tokens) - 1 for r in running)
        self.cache = KVCache.concat([c for c, _, _ in parts], capacity=length + max(room, 1))
        self.logits = torch.cat([lg for _, lg, _ in parts])
        self.running = running

    def _pick(self, logits: torch.Tensor, rows: list[int], scores: torch.Tensor | None):
        """Choose from ``scores`` (processed logits; default ``logits``); log-probs from ``logits``.

        Returns the choices, their log-probs and, when some row asks for them, the most likely
        tokens per row as ``(token, logprob)`` lists.
        """
        raw = logits
        lse = torch.logsumexp(raw, dim=-1, keepdim=True)  # log-probs only where asked: no v-wide tensor
        logits = logits if scores is None else scores.float()
        choice = logits.argmax(-1)
        settings = [self.rows[r] for r in rows]
        sampled = [j for j, row in enumerate(settings) if row.temperature > 0]
        if sampled:
            dev = logits.device
            idx = torch.tensor(sampled, device=dev)
            probs = filter_logits(logits[idx], torch.tensor([settings[j].temperature for j in sampled], device=dev),
                                  torch.tensor([settings[j].top_k for j in sampled], device=dev),
                                  torch.tensor([settings[j].top_p for j in sampled], device=dev))
            own = [i for i, j in enumerate(sampled) if settings[j].generator is not None]
            shared = [i for i, j in enumerate(sampled) if settings[j].generator is None]
            picked = torch.empty(len(sampled), dtype=choice.dtype, device=dev)
            for i in own:  # per-row streams of randomness: independent of the batch
                picked[i] = torch.multinomial(probs[i], 1, generator=settings[sampled[i]].generator)[0]
            if shared:  # one generator for these rows (HF-style)
                sel = torch.tensor(shared, device=dev)
                picked[sel] = torch.multinomial(probs[sel], 1, generator=self.generator).flatten()
            choice[idx] = picked
        top = None
        k = max((row.top_logprobs for row in settings), default=0)
        if k:
            vals, ids = raw.topk(min(k, raw.shape[-1]), dim=-1)
            top = [list(zip(i, v)) for i, v in zip(ids.tolist(), (vals - lse).tolist())]
        return choice, (raw.gather(-1, choice[:, None]) - lse).flatten(), top


def left_pad(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded batch (what ``decode`` and ``Decoder.add`` take): ``ids``
    and ``attention_mask``, both ``b s`` long tensors; padding is id 0 with mask 0."""
    width = max((len(x) for x in seqs), default=0)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, x in enumerate(seqs):
        if len(x):
            ids[b, width - len(x):] = torch.tensor(x)
            mask[b, width - len(x):] = 1
    return ids, mask


class _StreamsAs:
    """Context manager: the model runs with stream set ``streams`` inside, its own P after."""

    def __init__(self, model, streams: int):
        self.model, self.streams, self.prev = model, streams, None

    def __enter__(self):
        self.prev = self.model.streams
        if self.prev != self.streams:
            self.model.set_streams(self.streams)
        return self

    def __exit__(self, *exc):
        if self.prev != self.streams:
            self.model.set_streams(self.prev)
        return False


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           max_new_tokens: int, num_samples: int = 1,
           temperature: float | Sequence[float] = 0.0, top_k: int | Sequence[int] | None = None,
           top_p: float | Sequence[float] | None = None,
           seeds: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
           eos_token_id: int | Iterable[int] | None = None,
           stop: Callable[[int, list[int]], bool] | None = None,
           on_finish: Callable[[int, list[int], str, int], Iterable[int] | None] | None = None,
           logits_processor: Callable[[torch.Tensor, list[int], list[list[int]]], torch.Tensor] | None = None,
           on_token: Callable[[int, int], None] | None = None,
           on_step: Callable[["Decoder"], Iterable[int] | None] | None = None,
           return_logprobs: bool = False, compact: bool = True, cache=None) -> DecodeResult:
    """Prefill ``input_ids`` (``b s``, left-padded) once, then decode ``num_samples`` rows per prompt.

    Per-row settings (``temperature``, ``top_k``, ``top_p``, ``seeds``) are a scalar or one value
    per row (``b·num_samples`` rows, prompt-major). Temperature 0 means greedy. ``seeds``: one int
    seeds a single batch generator; a list gives every row its own generator (its samples are then
    the same whatever else runs in the batch). ``stop(row, new_tokens)`` ends a row with reason
    "stop". ``on_finish(row, tokens, reason, step)`` is called as each row ends (not for pruned
    rows) and may return rows to prune; pruned rows end with reason "pruned" and leave the batch.
    ``logits_processor(logits, rows, tokens)`` may rewrite the next-token logits (``r v`` float32 for
    the live ``rows``; ``tokens[j]`` is row ``rows[j]``'s new tokens so far) before the choice, e.g.
    a repetition penalty; recorded log-probs stay those of the unmodified distribution.
    ``on_token(row, token)`` is called for every new token as it is chosen (streaming).
    ``cache``: a KV cache of ``b`` rows already holding earlier tokens of these prompts (multi-turn
    chat); ``input_ids`` are then only the tokens after them.
    ``on_step(decoder)`` is called after every step while rows are live and may return live rows
    to prune (periodic decisions over partial rows, e.g. DeepPrune); they end with reason "pruned".

    A thin loop over :class:`Decoder`: one ``add``, then ``step`` until every row has ended.
    """
    row_seeds = None
    if isinstance(seeds, (list, tuple)):
        row_seeds = list(seeds)
    elif seeds is not None:
        generator = seeded_generator(seeds, model.model.embed_tokens.weight.device)
    was_training = model.training
    model.eval()
    try:
        # no trimming: a caller's cache keeps its slots (and length) as it would alone
        dec = Decoder(model, generator=generator, stop=stop, on_finish=on_finish,
                      logits_processor=logits_processor, on_token=on_token, compact=compact, trim=False)
        ids = dec.add(input_ids, attention_mask, max_new_tokens=max_new_tokens, num_samples=num_samples,
                      temperature=temperature, top_k=top_k, top_p=top_p, seeds=row_seeds,
                      eos_token_id=eos_token_id, cache=cache)
        while dec.live:
            dec.step()
            if on_step is not None and dec.live:
                for r in on_step(dec) or ():
                    dec.prune(r)
    finally:
        model.train(was_training)
    rows = [dec.rows[r] for r in ids]
    return DecodeResult(tokens=[r.tokens for r in rows],
                        logprobs=[r.logprobs for r in rows] if return_logprobs else None,
                        finish_reason=[r.reason or "length" for r in rows],
                        finish_step=[r.finish_step for r in rows],
                        prompt_index=[r.prompt_index for r in rows],
                        prefill_tokens=dec.prefill_tokens, decode_steps=dec.decode_steps,
                        row_steps=dec.row_steps, wall_s=time.perf_counter() - dec.t0,
                        finish_time=[r.finish_time for r in rows])


def warm_up(model, *, streams: int | None = None, batches: Sequence[int] = (1, 2), steps: int = 3) -> dict[int, float]:
    """Decode ``steps`` tokens from a 2-token prompt at each batch size in ``batches`` (rows of
    the stream set ``streams``, default the active one) and return the seconds each took.

    With ``compile_decode`` on, this is where the decode step compiles, instead of in the first
    request: after ``(1, 2)`` batches of 1 and 2 compile nothing more, whatever their lengths,
    padding or rows leaving. Larger batches may still add a graph or two on first use (torch makes
    the batch size dynamic, but the matmul form chosen by the row count splits it into ranges).
    ``parscale serve`` calls it before it takes requests. The prompt is token 0 repeated; nothing
    is kept."""
    times = {}
    device = model.model.embed_tokens.weight.device
    with _StreamsAs(model, model.streams if streams is None else streams):
        for b in batches:
            t0 = time.perf_counter()
            decode(model, torch.zeros(b, 2, dtype=torch.long, device=device), max_new_tokens=steps)
            times[b] = time.perf_counter() - t0
    return times


class RepetitionPenalty:
    """Hugging Face's repetition penalty: a logit of a token already in the row (prompt or new
    tokens) is divided by ``penalty`` when positive, multiplied by it when negative."""

    def __init__(self, penalty: float, prompts: list[list[int]], num_samples: int):
        if not penalty > 0:
            raise ParScaleError(f"repetition_penalty must be > 0 (got {penalty})")
        self.penalty, self.prompts, self.n = float(penalty), prompts, num_samples

    def __call__(self, logits: torch.Tensor, rows: list[int], tokens: list[list[int]]) -> torch.Tensor:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for j, r in enumerate(rows):
            ids = self.prompts[r // self.n] + tokens[j]
            seen[j, torch.tensor(ids, dtype=torch.long, device=logits.device)] = True
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(seen, penalised, logits)


class MinNewTokens:
    """EOS is impossible while a row has fewer than ``min_new_tokens`` new tokens."""

    def __init__(self, min_new_tokens: int, eos: list[int]):
        self.min, self.eos = int(min_new_tokens), list(eos)

    def __call__(self, logits: torch.Tensor, rows: list[int], tokens: list[list[int]]) -> torch.Tensor:
        short = [j for j, t in enumerate(tokens) if len(t) < self.min]
        eos = [e for e in self.eos if 0 <= e < logits.shape[-1]]
        if short and eos:
            logits = logits.clone()
            dev = logits.device
            logits[torch.tensor(short, device=dev)[:, None], torch.tensor(eos, device=dev)[None, :]] = float("-inf")
        return logits


class StopStrings:
    """``stop(row, tokens)`` for decode: the row's new text contains one of ``strings``.

    Checked on the last few tokens only (enough to spell the longest string, whatever the
    tokenization), so each step costs one short decode.
    """

    def __init__(self, strings: Sequence[str], tokenizer):
        if isinstance(strings, str):
            strings = [strings]
        strings = list(strings)
        if not strings or not all(isinstance(x, str) and x for x in strings):
            raise ParScaleError("stop_strings must be a non-empty string or a list of them")
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise ParScaleError("stop_strings needs tokenizer= (to turn tokens into text)")
        self.strings, self.tok = strings, tokenizer
        self.window = max(len(x.encode("utf-8")) for x in strings) + 2

    def __call__(self, row: int, tokens: list[int]) -> bool:
        tail = self.tok.decode(tokens[-self.window:])
        return any(x in tail for x in self.strings)


def _chain(processors):
    processors = [p for p in processors if p is not None]
    if not processors:
        return None

    def run(logits, rows, tokens):
        for p in processors:
            logits = p(logits, rows, tokens)
        return logits

    return run


def default_eos_ids(model, tokenizer=None) -> list[int]:
    """Every EOS id generation stops at: the config's, ``model.generation_config``'s (when the
    model has one) and the tokenizer's ``eos_token_ids`` (tokenizer_config + generation_config)."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for value in (model.config.eos_token_id,
                  gc.get("eos_token_id") if isinstance(gc, dict) else getattr(gc, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_ids", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids += [int(v) for v in value]
    return list(dict.fromkeys(ids))


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (b·n) (s + t): prompt then new tokens, padded after a row ends
    logprobs: torch.Tensor | None  # (b·n) t, chosen-token log-probs (0 where padded)
    result: DecodeResult
    # output_scores: per step, the (b·n) v scores the choice was made from (processed, and
    # temperature / top-k / top-p applied when sampling, as in HF); -inf for rows already ended
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None  # output_logits: the raw logits, same layout


def _check_ids(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor):
        raise ParScaleError(f"input_ids must be a torch.Tensor of shape (batch, seq), not a "
                            f"{type(input_ids).__name__}: use torch.tensor([ids]) or "
                            "tokenizer(..., return_tensors='pt')")
    if input_ids.dim() != 2:
        raise ParScaleError(f"input_ids must be 2-D (batch, seq); got shape {tuple(input_ids.shape)}"
                            + (": use input_ids[None] for one sequence" if input_ids.dim() == 1 else ""))
    if input_ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ParScaleError(f"input_ids must hold integer token ids (got {input_ids.dtype})")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ParScaleError(f"attention_mask must be a torch.Tensor (got {type(attention_mask).__name__})")


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int | None = None, max_length: int | None = None, min_new_tokens: int = 0,
             do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
             stop_strings: str | Sequence[str] | None = None, tokenizer=None, streamer=None,
             num_return_sequences: int = 1, seed: int | None = None,
             generator: torch.Generator | None = None, return_dict: bool = False,
             return_dict_in_generate: bool = False, output_scores: bool = False, output_logits: bool = False,
             output_logprobs: bool = False, past_key_values=None):
    """Generate like Hugging Face: returns ``prompt + new tokens`` as one ``(b·n) (s + t)`` tensor.

    ``input_ids`` is a 2-D tensor (a 1-D tensor or a list is an error that says what to pass; HF
    needs 2-D too). Greedy unless ``do_sample``. ``top_k=None`` / ``top_p=None`` mean no
    truncation (HF defaults top-k to 50; we do not truncate silently). Length: ``max_new_tokens``
    (default 20), or ``max_length`` = prompt length + new tokens (``max_new_tokens`` wins when both
    are given, as in HF); ``min_new_tokens`` forbids EOS before that many new tokens.
    ``repetition_penalty`` is HF's (prompt and new tokens both count). Rows stop at any of
    ``eos_token_id`` (an int or a list; default: every EOS id of the config, the model's
    ``generation_config`` and ``tokenizer``, see :func:`default_eos_ids`) or when their new text
    contains one of ``stop_strings`` (needs ``tokenizer``). Rows that end early are padded with
    ``pad_token_id`` (default: the config's pad id, the generation config's, the tokenizer's, else the
    first EOS id, else 0).

    ``streamer``: a callable ``streamer(row, token)`` called for every new token in order, or an
    HF-style object with ``put`` / ``end`` (``put`` gets the prompt, then each new token as a
    1-element tensor; one sequence only, like HF's TextStreamer).

    ``return_dict`` / ``return_dict_in_generate`` give a :class:`GenerateOutput` (``sequences``,
    log-probs and the decode statistics; ``scores`` with ``output_scores``, ``logits`` with
    ``output_logits``). ``past_key_values``: a :class:`~parscale.cache.KVCache` already holding
    the first ``cache.length`` tokens of every row of ``input_ids``; only the rest is prefilled
    (multi-turn chat). It must have room for the rest plus ``max_new_tokens``; it is left holding
    the prompt and all new tokens but each row's last.
    """
    _check_ids(input_ids, attention_mask)
    cfg = model.config
    b, s = input_ids.shape
    if max_new_tokens is None:
        if max_length is not None:
            if max_length <= s:
                raise ParScaleError(f"max_length={max_length} leaves no room after the {s}-token prompt")
            max_new_tokens = max_length - s
        else:
            max_new_tokens = 20
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ParScaleError(f"min_new_tokens must be an integer >= 0 (got {min_new_tokens!r})")
    if min_new_tokens > max_new_tokens:
        raise ParScaleError(f"min_new_tokens={min_new_tokens} exceeds max_new_tokens={max_new_tokens}")
    if eos_token_id is None:
        eos_token_id = default_eos_ids(model, tokenizer)
    eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if do_sample and temperature <= 0:
        raise ParScaleError(f"temperature must be > 0 when sampling (got {temperature})")
    n = num_return_sequences
    rows = b * n
    return_dict = return_dict or return_dict_in_generate

    cached = 0
    if past_key_values is not None:
        cached = past_key_values.length
        if past_key_values.batch != b:
            raise ParScaleError(f"past_key_values holds {past_key_values.batch} rows, input_ids has {b}")
        if cached >= s:
            raise ParScaleError(f"past_key_values already holds {cached} tokens; input_ids ({s}) must be longer")
    mask = attention_mask
    if mask is not None:
        if mask.shape != input_ids.shape:
            raise ParScaleError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        real = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
    else:
        real = input_ids.cpu().tolist()

    processors = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(repetition_penalty, real, n))
    if min_new_tokens:
        processors.append(MinNewTokens(min_new_tokens, eos))
    process = _chain(processors)
    scores = logits_log = None
    if output_scores or output_logits:
        scores, logits_log = [], []
        temp = temperature if do_sample else 0.0

        def record(logits, live, tokens):  # wraps the processors to keep what the choice saw
            out = logits if process is None else process(logits, live, tokens)
            step_scores = out
            if temp > 0:  # the warpers: temperature, then top-k / top-p as -inf (HF's filter value)
                dev = out.device
                probs = filter_logits(out, torch.full((len(live),), float(temp), device=dev),
                                      torch.full((len(live),), int(top_k or 0), device=dev),
                                      torch.full((len(live),), 1.0 if top_p is None else float(top_p), device=dev))
                step_scores = torch.where(probs > 0, out / temp, torch.full_like(out, float("-inf")))
            full = torch.full((rows, out.shape[-1]), float("-inf"))
            full[live] = step_scores.cpu()
            scores.append(full)
            raw = torch.full((rows, out.shape[-1]), float("-inf"))
            raw[live] = logits.cpu()
            logits_log.append(raw)
            return out

        logits_processor = record
    else:
        logits_processor = process

    on_token = None
    if streamer is not None:
        if hasattr(streamer, "put") and hasattr(streamer, "end"):
            if rows != 1:
                raise ParScaleError("a streamer with put/end takes one sequence (HF's TextStreamer does too); "
                                    "pass a callable streamer(row, token) for batches")
            streamer.put(input_ids.cpu())
            on_token = lambda row, tok: streamer.put(torch.tensor([tok]))  # noqa: E731
        elif callable(streamer):
            on_token = streamer
        else:
            raise ParScaleError("streamer must be a callable streamer(row, token) or have put() and end()")

    res = decode(model, input_ids[:, cached:], None if mask is None else mask[:, cached:],
                 max_new_tokens=max_new_tokens, num_samples=n, temperature=temperature if do_sample else 0.0,
                 top_k=top_k, top_p=top_p, seeds=seed, generator=generator, eos_token_id=eos,
                 stop=None if stop_strings is None else StopStrings(stop_strings, tokenizer),
                 logits_processor=logits_processor, on_token=on_token,
                 return_logprobs=return_dict or output_logprobs, cache=past_key_values)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    width = max(len(t) for t in res.tokens)
    new = torch.full((len(res.tokens), width), int(pad_token_id), dtype=input_ids.dtype)
    for r, toks in enumerate(res.tokens):
        new[r, : len(toks)] = torch.tensor(toks, dtype=input_ids.dtype)
    prompts = input_ids.repeat_interleave(n, dim=0).cpu()
    sequences = torch.cat([prompts, new], dim=1).to(input_ids.device)
    if not return_dict:
        return sequences
    lp = None
    if res.logprobs is not None:
        lp = torch.zeros(len(res.tokens), width)
        for r, row in enumerate(res.logprobs):
            lp[r, : len(row)] = torch.tensor(row)
    return GenerateOutput(sequences=sequences, logprobs=lp, result=res,
                          scores=tuple(scores) if output_scores else None,
                          logits=tuple(logits_log) if output_logits else None)
