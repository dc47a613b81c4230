"""The serving engine: one loop owns the model and drives continuous batching.

HTTP handlers (asyncio, the server's event loop) turn requests into ``Job``s and ``submit`` them
to a bounded admission queue (full: ``QueueFull``, HTTP 429). The engine loop runs in a thread
of its own (``start``) or in the caller's (``host`` + ``run``: ``parscale serve`` uses the thread
that loaded the model, see ``Engine.host``). It admits waiting jobs while the running batch has
room (``max_batch`` rows; each prompt is prefilled once and shared by its ``n`` rows), steps
every active batch once, and hands each job its new text, log-probs and finish through the job's
asyncio queue (``loop.call_soon_threadsafe``: the loop never touches the event loop's objects
directly). Rows with different P cannot share a forward, so there is one
:class:`parscale.generation.Decoder` per P, stepped in turn.

Faults stay local: a job whose prefill raises fails alone; if a batch step raises, the jobs of
that batch fail and the engine serves on. ``cancel`` (the client went away) ends the job's rows;
they leave the batch at the next step. ``shutdown(drain=True)`` refuses new jobs, finishes the
admitted and queued ones, then stops the loop.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import threading
import traceback
from dataclasses import dataclass, field

from ..errors import ParScaleError
from ..generation import Decoder, left_pad
from ..sampling.sampler import row_seed

# the decoder's reasons, as OpenAI's finish_reason
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}


class QueueFull(ParScaleError):
    """The admission queue is full (HTTP 429)."""


class ShuttingDown(ParScaleError):
    """The engine drains and takes no new work (HTTP 503)."""


class TextStream:
    """One row's text as it is generated, with stop strings.

    The tokenizer's ``StreamDecoder`` turns tokens into final text (a multi-byte character split
    over tokens waits for its last byte). Text is handed out only when no stop string can still
    begin in it; when a stop string appears the text ends before it, as OpenAI's API does.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stop = stop
        self.longest = max((len(s) for s in stop), default=0)
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token: int) -> bool:
        """Add a generated token; True when a stop string has appeared (the row should end)."""
        return self.stopped or self._extend(self.decoder.put(token))

    def _extend(self, new: str) -> bool:
        if new:
            start = max(0, len(self.text) - self.longest + 1)  # a stop string may end in ``new``
            self.text += new
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.sent = min(self.sent, len(self.text))
                self.stopped = True
        return self.stopped

    def delta(self, final: bool = False) -> str:
        """The text not handed out yet that is safe to hand out (all of it when ``final``)."""
        if final and not self.stopped:
            self._extend(self.decoder.flush())
        end = len(self.text)
        if not (final or self.stopped):
            for s in self.stop:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.sent: end]
        self.sent = max(self.sent, end)
        return out


@dataclass
class TokenInfo:
    """One generated token for the log-probs fields."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]
    offset: int  # characters of the choice's text before this token


@dataclass
class Delta:
    index: int  # choice index
    text: str
    tokens: list[TokenInfo]


@dataclass
class Finish:
    index: int
    reason: str  # OpenAI's: "stop" | "length"
    text: str  # the choice's whole text
    tokens: list[TokenInfo]
    completion_tokens: int


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Choice:
    index: int
    text: TextStream
    row: int | None = None
    seen: int = 0  # tokens of the row already handed out
    offsets: list[int] = field(default_factory=list)  # per non-EOS token: text length before it
    tokens: list[TokenInfo] = field(default_factory=list)
    sent_tokens: int = 0
    finished: bool = False
    completion_tokens: int = 0


@dataclass
class Job:
    """One HTTP request's generation work: ``len(prompts) × n`` choices (prompt-major)."""

    prompts: list[list[int]]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no log-probs; k: the chosen token and k alternatives
    streams: int = 1
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    choices: list[Choice] = field(default_factory=list)
    cancelled: bool = False
    failed: bool = False
    admitted: bool = False

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class Engine:
    """Continuous batching over one model; see the module docstring."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 eos_token_ids: list[int] | None = None):
        if max_batch < 1 or max_queue < 1:  # a request waits in the queue until the next step
            raise ParScaleError("max_batch and max_queue must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = frozenset(eos_token_ids or ())
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._stopping = False
        self._decoders: dict[int, Decoder] = {}
        self._owner: dict[tuple[int, int], tuple[Job, Choice]] = {}  # (P, row) -> job, choice
        self._thread: threading.Thread | None = None
        self._hosted = False  # the loop runs in a caller's thread (run), not in _thread
        self._stopped = threading.Event()  # the loop has returned
        self._rng = random.Random()
        self.steps = 0  # batch steps so far (all P)
        self.error: BaseException | None = None  # what stopped the thread, if anything did

    # ------------------------------------------------------------------ asyncio side
    def start(self) -> "Engine":
        """Run the loop in a thread of its own (unless :meth:`host` gave it the caller's)."""
        if self._thread is None and not self._hosted:
            self._thread = threading.Thread(target=self._run, name="parscale-engine", daemon=True)
            self._thread.start()
        return self

    def host(self) -> "Engine":
        """Say that :meth:`run` will run the loop in the calling thread: :meth:`start` (the app's
        start-up) then starts nothing. ``parscale serve`` runs the loop in the thread that loaded
        the model and the HTTP server beside it. A model driven from a second thread, after the
        first has run torch's OpenMP work, gets a second OpenMP thread pool; with more pool threads
        than cores libgomp throttles its spin-waits, and every op pays a wake-up (SmolLM2 int8 on
        2 cores: 26 ms per token from the loading thread, 48 ms from another)."""
        self._hosted = True
        return self

    def run(self) -> None:
        """The loop, in the calling thread, until :meth:`shutdown` has been called and every
        admitted and queued job is done (see :meth:`host`)."""
        self._hosted = True
        self._run()

    def submit(self, job: Job) -> None:
        """Queue a job (its ``loop``/``events`` set); QueueFull / ShuttingDown when refused."""
        if job.rows > self.max_batch:
            raise ParScaleError(f"{job.rows} rows exceed the batch size {self.max_batch}")
        with self._cond:
            if self._stopping or self._stopped.is_set():
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"too many requests waiting ({len(self._queue)}); retry later")
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: forget the job (its rows leave the batch at the next step)."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
            else:
                self._cancels.append(job)
            self._cond.notify()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Drain: take no new jobs, finish the admitted and queued ones, stop the loop.
        Returns whether the loop has stopped (False: still draining after ``timeout`` s)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None or self._hosted:
            return self._stopped.wait(timeout)
        return True

    def stats(self) -> dict:
        """Rows in the batches, rows remembered, jobs waiting (a snapshot; for health and tests)."""
        with self._cond:
            decs = list(self._decoders.values())
            return {"running": sum(len(d) for d in decs), "rows": sum(len(d.rows) for d in decs),
                    "owned": len(self._owner), "queued": len(self._queue), "steps": self.steps,
                    "draining": self._stopping}

    # ------------------------------------------------------------------ engine thread
    def _busy(self) -> bool:
        return any(len(d) for d in self._decoders.values())

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._queue or self._cancels or self._busy() or self._stopping):
                        self._cond.wait()
                    if self._stopping and not self._queue and not self._busy():
                        return
                    cancels, self._cancels = self._cancels, []
                    admit = []
                    used = sum(len(d) for d in self._decoders.values())
                    while self._queue and used + self._queue[0].rows <= self.max_batch:
                        job = self._queue.popleft()
                        used += job.rows
                        admit.append(job)
                for job in cancels:
                    self._drop(job)
                if admit:
                    self._admit(admit)
                for P, dec in list(self._decoders.items()):
                    if len(dec):
                        self._step(P, dec)
        except BaseException as e:  # a bug of ours: fail everything rather than hang the clients
            self.error = e
            traceback.print_exc(file=sys.stderr)
            with self._cond:
                self._stopping = True
                jobs = list(self._queue) + [j for j, _ in self._owner.values()]
                self._queue.clear()
            for job in jobs:
                self._fail(job, f"internal error: {e}")
        finally:
            self._stopped.set()

    def _emit(self, job: Job, event) -> None:
        if job.loop is not None and not job.cancelled:
            try:
                job.loop.call_soon_threadsafe(job.events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _fail(self, job: Job, message: str) -> None:
        if not job.failed:
            job.failed = True
            self._emit(job, Failed(message))

    def _decoder(self, P: int) -> Decoder:
        if P not in self._decoders:
            with self._cond:  # stats() reads the dict from other threads
                self._decoders[P] = Decoder(self.model, streams=P,
                                            stop=lambda row, toks, P=P: self._push(P, row, toks))
        return self._decoders[P]

    def _push(self, P: int, row: int, tokens: list[int]) -> bool:
        """The decoder's stop test: feed the new token to the row's text; a stop string ends it."""
        owner = self._owner.get((P, row))
        if owner is None:
            return False
        choice = owner[1]
        choice.offsets.append(len(choice.text.text))
        return choice.text.push(tokens[-1])

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs: one left-padded forward per group of jobs with the same P
        and n (prompts of similar length together, so padding stays under half the work)."""
        groups: dict[tuple[int, int], list[Job]] = {}
        for job in jobs:
            job.admitted = True
            job.choices = [Choice(index=i, text=TextStream(self.tokenizer, job.stop)) for i in range(job.rows)]
            groups.setdefault((job.streams, job.n), []).append(job)
        for (P, n), group in groups.items():
            group.sort(key=lambda j: max(map(len, j.prompts)))
            chunk: list[Job] = []
            for job in group:
                lengths = [len(p) for j in chunk + [job] for p in j.prompts]
                if chunk and max(lengths) * len(lengths) > 2 * sum(lengths):
                    self._prefill(P, n, chunk)
                    chunk = []
                chunk.append(job)
            self._prefill(P, n, chunk)

    def _prefill(self, P: int, n: int, jobs: list[Job]) -> None:
        prompts = [(job, i, p) for job in jobs for i, p in enumerate(job.prompts)]
        ids, mask = left_pad([p for _, _, p in prompts])
        settings = {k: [] for k in ("budget", "temp", "top_p", "seed", "top")}
        for job, i, _ in prompts:
            # every choice its own generator: its samples do not depend on the batch
            base = None
            if job.temperature > 0:  # any int64 seed (OpenAI's range), as a non-negative one
                base = self._rng.getrandbits(64) if job.seed is None else job.seed % (1 << 64)
            for j in range(n):
                settings["budget"].append(job.max_tokens)
                settings["temp"].append(job.temperature)
                settings["top_p"].append(job.top_p)
                settings["seed"].append(None if base is None else row_seed(base, i, j))
                settings["top"].append(job.top_logprobs or 0)
        try:
            rows = self._decoder(P).add(ids, None if bool(mask.all()) else mask, num_samples=n,
                                        max_new_tokens=settings["budget"], temperature=settings["temp"],
                                        top_p=settings["top_p"], seeds=settings["seed"], eos_token_id=self.eos,
                                        top_logprobs=settings["top"])
        except Exception as e:
            if len(jobs) > 1:  # find the job that fails: each alone, so the others go on
                for job in jobs:
                    self._prefill(P, n, [job])
                return
            traceback.print_exc(file=sys.stderr)
            self._fail(jobs[0], f"the model failed on this request: {e}")
            return
        for b, (job, i, _) in enumerate(prompts):
            for j in range(n):
                choice = job.choices[i * n + j]
                choice.row = rows[b * n + j]
                self._owner[(P, choice.row)] = (job, choice)

    def _drop(self, job: Job) -> None:
        """End a job's rows (cancelled or failed): they leave at the decoder's next step."""
        dec = self._decoders.get(job.streams)
        for c in job.choices:
            if c.row is not None and dec is not None and c.row in dec.rows:
                dec.cancel(c.row)

    def _step(self, P: int, dec: Decoder) -> None:
        try:
            touched = dec.step()
        except Exception as e:  # the whole batch step failed: fail its jobs, keep serving
            traceback.print_exc(file=sys.stderr)
            for (p, r), (job, _) in list(self._owner.items()):
                if p == P:
                    self._fail(job, f"the model failed while decoding: {e}")
                    del self._owner[(p, r)]
            with self._cond:
                self._decoders.pop(P, None)
            return
        self.steps += 1
        for r in touched:
            job, choice = self._owner[(P, r)]
            row = dec.rows[r]
            self._deliver(job, choice, row)
            if row.reason is not None:
                dec.release(r)
                del self._owner[(P, r)]

    def _token_info(self, job: Job, choice: Choice, row, k: int, offset: int) -> TokenInfo:
        tok = row.tokens[k]
        top = []
        if job.top_logprobs:
            top = [(t, self.tokenizer.decode([t], skip_special_tokens=False), lp)
                   for t, lp in row.top[k][: job.top_logprobs]]
        return TokenInfo(token=tok, text=self.tokenizer.decode([tok], skip_special_tokens=False),
                         logprob=row.logprobs[k], top=top, offset=offset)

    def _deliver(self, job: Job, choice: Choice, row) -> None:
        if job.cancelled or job.failed:
            return
        for k in range(choice.seen, len(row.tokens)):
            if job.top_logprobs is not None and row.tokens[k] not in self.eos:
                offset = choice.offsets[len(choice.tokens)] if len(choice.tokens) < len(choice.offsets) else 0
                choice.tokens.append(self._token_info(job, choice, row, k, offset))
        choice.seen = len(row.tokens)
        if row.reason is None:
            text = choice.text.delta()
            if text:
                self._emit(job, Delta(choice.index, text, choice.tokens[choice.sent_tokens:]))
                choice.sent_tokens = len(choice.tokens)
            return
        if row.reason not in FINISH_REASON:  # cancelled / error: handled by the caller
            return
        text = choice.text.delta(final=True)
        if text:
            self._emit(job, Delta(choice.index, text, choice.tokens[choice.sent_tokens:]))
            choice.sent_tokens = len(choice.tokens)
        choice.finished, choice.completion_tokens = True, len(row.tokens)
        self._emit(job, Finish(choice.index, FINISH_REASON[row.reason], choice.text.text, list(choice.tokens),
                               len(row.tokens)))
        if all(c.finished for c in job.choices):
            self._emit(job, Done(job.prompt_tokens, sum(c.completion_tokens for c in job.choices)))
