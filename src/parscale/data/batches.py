"""Deterministic training batches for exact resume and data parallelism, and the validation set.

The token stream of a split (length N) is cut into ``n_windows = (N - 1) // seq_len``
non-overlapping windows; window ``k`` is ``tokens[k·seq_len : k·seq_len + seq_len + 1]`` (inputs
are its first ``seq_len`` tokens, labels its last ``seq_len``; neighbouring windows share only the
one boundary token, so every token is a label exactly once per epoch; the < seq_len tail tokens
are never used).

Global sample ``s`` (counting from 0 over the whole run) is window ``perm_e[s mod n_windows]`` of
epoch ``e = s // n_windows``, where ``perm_e = numpy.random.default_rng([seed, e]).permutation(n_windows)``.
Global step ``i`` holds samples ``[i·G, (i+1)·G)``. So a batch is a pure function of
``(seed, step)``: resuming needs only the step number, and a batch may straddle two epochs.

Data parallelism: rank ``r`` of ``W`` takes rows ``[r·G/W, (r+1)·G/W)`` of the global batch and reads
only those windows; the ranks' rows concatenate to exactly the single-process batch. Gradient
accumulation splits a rank's rows into equal consecutive micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ParScaleError
from .tokens import TokenizedSplit

if TYPE_CHECKING:
    import os

    import torch

    from .corpus import Corpus
    from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class Batch:
    """Rows of windows as int64 tensors ``(rows, seq_len)``.

    ``labels`` are already shifted: ``labels[:, t]`` is the token after ``inputs[:, t]``
    (``labels[:, :-1] == inputs[:, 1:]``), so the loss is ``cross_entropy(logits, labels)`` with no
    further shift. (A model that shifts internally, as HF-style ``labels=`` arguments do, must not
    be given these labels.)
    """

    inputs: "torch.Tensor"
    labels: "torch.Tensor"
    step: int  # global step; -1 for validation windows
    row_start: int  # index of the first row within the global batch (or validation set)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __iter__(self):
        """Unpacks as ``inputs, labels = batch``."""
        return iter((self.inputs, self.labels))

    @property
    def n_tokens(self) -> int:
        """Label tokens in this batch (rows × seq_len)."""
        return int(self.labels.numel())


def _as_array(tokens: np.ndarray | TokenizedSplit) -> np.ndarray:
    arr = tokens.tokens if isinstance(tokens, TokenizedSplit) else tokens
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        raise ParScaleError("tokens must be a 1-D numpy array or a TokenizedSplit")
    return arr


def _check_int(value: object, name: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ParScaleError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return int(value)


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int, step: int, row_start: int) -> Batch:
    import torch

    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return Batch(torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
                 torch.from_numpy(np.ascontiguousarray(windows[:, 1:])), step, row_start)


class TokenBatches:
    """Global batch ``step`` of ``global_batch`` windows of ``seq_len`` + 1 tokens; see module docstring."""

    def __init__(self, tokens: np.ndarray | TokenizedSplit, *, seq_len: int, global_batch: int,
                 seed: int = 0):
        self.tokens = _as_array(tokens)
        self.seq_len = _check_int(seq_len, "seq_len", 1)
        self.global_batch = _check_int(global_batch, "global_batch", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.n_windows = (len(self.tokens) - 1) // self.seq_len
        if self.n_windows < 1:
            raise ParScaleError(f"the training split has {len(self.tokens)} tokens, fewer than "
                                f"seq_len + 1 = {self.seq_len + 1}; use more data or a shorter seq_len")
        self._perms: dict[int, np.ndarray] = {}
        self.validation: TokenizedSplit | None = None  # set by build()

    @classmethod
    def build(cls, corpus: "Corpus", tokenizer: "TextTokenizer", *, seq_len: int, global_batch: int,
              seed: int = 0, cache_dir: "str | os.PathLike | None" = None, progress: bool = True,
              main: bool = True, barrier: Callable[[], None] | None = None) -> "TokenBatches":
        """Tokenize (or open from the cache) both splits and return the train batches.

        Under data parallelism pass ``main`` (rank 0?) and ``barrier``: the main rank builds the
        cache entries, everyone waits at the barrier, then the other ranks open them (cache hits),
        so the corpus is tokenized once. The validation split is kept as ``.validation``.
        """
        from .tokens import tokenize_split

        def both(show: bool) -> tuple[TokenizedSplit, TokenizedSplit]:
            return tuple(tokenize_split(corpus, tokenizer, split, cache_dir=cache_dir, progress=show)
                         for split in ("train", "validation"))  # type: ignore[return-value]

        if main:
            train, val = both(progress)
        if barrier is not None:
            barrier()
        if not main:
            train, val = both(False)
        out = cls(train, seq_len=seq_len, global_batch=global_batch, seed=seed)
        out.validation = val
        return out

    def validation_windows(self, n: int) -> Batch | None:
        """``validation_windows(self.validation, seq_len=self.seq_len, n=n)``; None when there is no
        validation split (not built with ``build``) or it is shorter than one window."""
        if self.validation is None or (len(self.validation) - 1) // self.seq_len < 1:
            return None
        return validation_windows(self.validation, seq_len=self.seq_len, n=n)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        return self.n_windows / self.global_batch

    def epoch(self, step: int) -> float:
        """Epochs completed before ``step`` (fractional)."""
        return step * self.global_batch / self.n_windows

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:  # a step needs at most a few epochs; keep memory bounded
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def rows(self, *, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
        """The global-batch rows ``[start, stop)`` that ``rank`` of ``world_size`` takes."""
        world_size = _check_int(world_size, "world_size", 1)
        rank = _check_int(rank, "rank", 0)
        if rank >= world_size:
            raise ParScaleError(f"rank must be < world_size={world_size} (got {rank})")
        if self.global_batch % world_size:
            raise ParScaleError(f"global_batch={self.global_batch} is not divisible by "
                                f"world_size={world_size}")
        per = self.global_batch // world_size
        return rank * per, (rank + 1) * per

    def window_starts(self, step: int, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Token offsets of the windows in rows ``[row_start, row_stop)`` of global batch ``step``."""
        step = _check_int(step, "step", 0)
        row_stop = self.global_batch if row_stop is None else row_stop
        samples = step * self.global_batch + np.arange(row_start, row_stop, dtype=np.int64)
        epochs, pos = np.divmod(samples, self.n_windows)
        windows = np.empty(len(samples), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            windows[sel] = self._perm(int(e))[pos[sel]]
        return windows * self.seq_len

    def batch(self, step: int, *, rank: int = 0, world_size: int = 1) -> Batch:
        """This rank's rows of global batch ``step``."""
        start, stop = self.rows(rank=rank, world_size=world_size)
        return _gather(self.tokens, self.window_starts(step, start, stop), self.seq_len, step, start)

    def micro_batches(self, step: int, *, rank: int = 0, world_size: int = 1,
                      accum_steps: int = 1) -> list[Batch]:
        """This rank's rows of step ``step`` as ``accum_steps`` equal consecutive micro-batches."""
        accum_steps = _check_int(accum_steps, "accum_steps", 1)
        start, stop = self.rows(rank=rank, world_size=world_size)
        if (stop - start) % accum_steps:
            raise ParScaleError(f"rows per rank ({stop - start} = global_batch {self.global_batch} / "
                                f"world_size {world_size}) are not divisible by accum_steps={accum_steps}")
        full = self.batch(step, rank=rank, world_size=world_size)
        per = (stop - start) // accum_steps
        return [Batch(full.inputs[k * per:(k + 1) * per], full.labels[k * per:(k + 1) * per],
                      step, start + k * per) for k in range(accum_steps)]

    def iterate(self, start_step: int = 0, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Batches ``start_step``, ``start_step + 1``, … without end (resume: pass the next step)."""
        step = start_step
        while True:
            yield self.batch(step, rank=rank, world_size=world_size)
            step += 1


def validation_windows(tokens: np.ndarray | TokenizedSplit, *, seq_len: int, n: int) -> Batch:
    """A fixed validation set: ``n`` non-overlapping windows, evenly spaced over the split.

    Window ``j`` is window ``(j · n_windows) // n`` of the split (all windows when the split has
    fewer than ``n``), so it samples the whole split, not just its first documents. No seed is
    involved: the same split and ``(seq_len, n)`` always give the same tensors. Slice rows for
    evaluation batches (``batch.inputs[a:b]``) or to shard them across ranks.
    """
    arr = _as_array(tokens)
    seq_len = _check_int(seq_len, "seq_len", 1)
    n = _check_int(n, "n", 1)
    n_windows = (len(arr) - 1) // seq_len
    if n_windows < 1:
        raise ParScaleError(f"the validation split has {len(arr)} tokens, fewer than seq_len + 1 = "
                            f"{seq_len + 1}; use more data, a larger val_fraction or a shorter seq_len")
    n = min(n, n_windows)
    idx = (np.arange(n, dtype=np.int64) * n_windows) // n
    return _gather(arr, idx * seq_len, seq_len, -1, 0)
