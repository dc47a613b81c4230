"""KV cache: preallocated key/value buffers for incremental decoding, with ParScale prefixes.

Layout per layer: ``(p b) h (t + capacity) d`` — stream-major rows like the model's batch, the
first ``t`` slots holding each stream's learned prefix (written once, never rotated), then token
slots. The cache also remembers which token slots are real (``key_valid``, per sample ``b``; the
same for all streams) and each sample's next position, so left-padded rows count positions from
their first real token.

Rows can be dropped (``select``: finished / pruned samples leave the running batch, so later
steps cost less) or repeated (``repeat_interleave``: one prefilled prompt shared by many sampled
rows). Continuous batching joins caches of different lengths (``concat``: right-aligned, the
shorter ones left-padded with invalid slots, so each sample keeps its keys, validity and
positions) and drops leading slots that no remaining sample uses (``trim``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

from .errors import ParScaleError


class KVCache:
    def __init__(self, n_layers: int, batch: int, streams: int, n_kv_heads: int, head_dim: int,
                 capacity: int, n_prefix: int = 0, *, dtype=torch.float32, device=None):
        if capacity < 1:
            raise ParScaleError(f"cache capacity must be >= 1 (got {capacity})")
        self.batch, self.streams, self.capacity, self.n_prefix = batch, streams, capacity, n_prefix
        shape = (streams * batch, n_kv_heads, n_prefix + capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0  # token slots written so far
        # every row's slots so far are real, so attention needs no mask: tracked on the host so a
        # decode step never waits for the device to answer "is any slot padding?"
        self.dense = True

    def set_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][:, :, : self.n_prefix] = k
        self.v[layer][:, :, : self.n_prefix] = v

    def advance_positions(self, attention_mask: torch.Tensor | None, s: int):
        """Register ``s`` new token slots; returns their positions ``b s`` and the key-validity mask
        over all token slots so far (None when every slot is real)."""
        if self.length + s > self.capacity:
            raise ParScaleError(f"KV cache full: {self.length} + {s} tokens > capacity {self.capacity}")
        if attention_mask is None and s == 1:  # a decode step of real tokens: the same, in three small ops
            self.key_valid[:, self.length] = True
            positions = self.next_pos[:, None]  # next_pos is replaced below, not written: this stays as is
            self.next_pos = self.next_pos + 1
            return positions, (None if self.dense else self.key_valid[:, : self.length + 1])
        new = (torch.ones(self.batch, s, dtype=torch.bool, device=self.key_valid.device)
               if attention_mask is None else attention_mask.bool())
        if attention_mask is not None and self.dense:
            self.dense = bool(new.all())  # one sync per masked (prefill) call, none per decode step
        self.key_valid[:, self.length: self.length + s] = new
        positions = (self.next_pos[:, None] + new.long().cumsum(-1) - 1).clamp(min=0)
        self.next_pos = self.next_pos + new.long().sum(-1)
        return positions, (None if self.dense else self.key_valid[:, : self.length + s])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys/values; return everything so far (prefix + tokens)."""
        k_slot, v_slot = self.slots(layer, k.shape[2])
        k_slot.copy_(k)
        v_slot.copy_(v)
        return self.so_far(layer, k.shape[2])

    def slots(self, layer: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the key and value slots this call's ``s`` tokens take (``(p b) h s d``), for a
        writer that fills them itself (``kernels.rope_kv``); ``so_far`` then returns the whole."""
        start = self.n_prefix + self.length
        return self.k[layer][:, :, start:start + s], self.v[layer][:, :, start:start + s]

    def so_far(self, layer: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prefix, the earlier tokens and this call's ``s``."""
        end = self.n_prefix + self.length + s
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    # ------------------------------------------------------------------ row bookkeeping
    def _take(self, index: torch.Tensor) -> None:
        """Keep samples ``index`` (in that order) in every stream."""
        def take_rows(t):
            t = rearrange(t, "(p b) h n d -> p b h n d", p=self.streams)[:, index]
            return rearrange(t, "p b h n d -> (p b) h n d").contiguous()

        self.k = [take_rows(t) for t in self.k]
        self.v = [take_rows(t) for t in self.v]
        self.key_valid = self.key_valid[index]
        self.next_pos = self.next_pos[index]
        self.batch = int(index.numel())

    def select(self, keep: torch.Tensor | list[int]) -> "KVCache":
        """Drop every sample not in ``keep`` (compaction). In place; returns self."""
        self._take(torch.as_tensor(keep, dtype=torch.long, device=self.key_valid.device))
        return self

    def repeat_interleave(self, n: int) -> "KVCache":
        """Sample ``b`` becomes rows ``b·n … b·n+n-1``: one prefilled prompt shared by n samples."""
        idx = torch.arange(self.batch, device=self.key_valid.device).repeat_interleave(n)
        self._take(idx)
        return self

    def truncate(self, length: int) -> "KVCache":
        """Forget every token slot from ``length`` on (a chat whose re-rendered history differs
        from what was cached after that point). In place."""
        if not 0 <= length <= self.length:
            raise ParScaleError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.key_valid[:, length:] = False
        self.next_pos = self.key_valid.long().sum(-1)  # each row's next position: its real tokens so far
        self.length = length
        return self

    def grow(self, capacity: int) -> "KVCache":
        """Room for ``capacity`` tokens in all (a longer chat); what is cached stays. In place."""
        if capacity <= self.capacity:
            return self
        extra = capacity - self.capacity

        def pad(t):  # (p b) h (t + capacity) d: new empty slots at the end
            return torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)

        self.k = [pad(t) for t in self.k]
        self.v = [pad(t) for t in self.v]
        self.key_valid = torch.cat([self.key_valid, self.key_valid.new_zeros(self.batch, extra)], dim=1)
        self.capacity = capacity
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ------------------------------------------------------------------ continuous batching
    @classmethod
    def concat(cls, caches: Sequence["KVCache"], capacity: int | None = None) -> "KVCache":
        """One cache holding the samples of ``caches``, in order, right-aligned at the longest length.

        Each input's token slots end at the new ``length``; the slots before them are invalid
        (left padding), and positions (``next_pos``) are kept, so a sample attends to exactly what
        it did before. ``capacity`` defaults to the new length plus the largest free room of any
        input, so every sample keeps the room it had. New buffers; the inputs are left untouched.
        """
        caches = [c for c in caches]
        if not caches:
            raise ParScaleError("KVCache.concat needs at least one cache")
        ref = caches[0]
        for c in caches[1:]:
            same = (c.streams == ref.streams and c.n_prefix == ref.n_prefix and len(c.k) == len(ref.k)
                    and c.k[0].shape[1] == ref.k[0].shape[1] and c.k[0].shape[3] == ref.k[0].shape[3]
                    and c.k[0].dtype == ref.k[0].dtype and c.k[0].device == ref.k[0].device)
            if not same:
                raise ParScaleError("KVCache.concat: caches differ in streams, prefix, layers, heads, "
                                    "head size, dtype or device")
        length = max(c.length for c in caches)
        room = max(c.capacity - c.length for c in caches)
        capacity = length + room if capacity is None else capacity
        if capacity < max(length, 1):
            raise ParScaleError(f"KVCache.concat: capacity {capacity} < the longest cache's {length} tokens")
        P, t = ref.streams, ref.n_prefix
        _, n_kv, _, head_dim = ref.k[0].shape
        out = cls(len(ref.k), sum(c.batch for c in caches), P, n_kv, head_dim, capacity, t,
                  dtype=ref.k[0].dtype, device=ref.k[0].device)
        for dst, srcs in ((out.k, [c.k for c in caches]), (out.v, [c.v for c in caches])):
            for layer in range(len(dst)):
                # views of the contiguous buffers: stream-major rows split into (stream, sample)
                d = rearrange(dst[layer], "(p b) h n d -> p b h n d", p=P)
                lo = 0
                for c, src in zip(caches, srcs):
                    s = rearrange(src[layer], "(p b) h n d -> p b h n d", p=P)
                    hi = lo + c.batch
                    d[:, lo:hi, :, :t] = s[:, :, :, :t]  # the prefix (the same for every sample)
                    d[:, lo:hi, :, t + length - c.length: t + length] = s[:, :, :, t: t + c.length]
                    lo = hi
        lo = 0
        for c in caches:
            hi = lo + c.batch
            out.key_valid[lo:hi, length - c.length: length] = c.key_valid[:, : c.length]
            out.next_pos[lo:hi] = c.next_pos
            lo = hi
        out.length = length
        out.dense = all(c.dense and c.length == length for c in caches)  # else: left padding
        return out

    def trim(self) -> int:
        """Drop the leading token slots that no sample uses (after long samples left the batch);
        in place, capacity unchanged. Returns how many slots were dropped."""
        if self.length == 0:
            return 0
        used = self.key_valid[:, : self.length].any(0)  # slots some sample still attends to
        first = int(used.int().argmax()) if self.batch and bool(used.any()) else self.length
        if first == 0:
            return 0
        keep, t = self.length - first, self.n_prefix
        for buf in self.k + self.v:  # clone: the source and destination ranges overlap
            buf[:, :, t: t + keep] = buf[:, :, t + first: t + self.length].clone()
        self.key_valid[:, :keep] = self.key_valid[:, first: self.length].clone()
        self.key_valid[:, keep:] = False
        self.length = keep
        return first


class StaticSlots:
    """A decode step's view of a ``KVCache`` for a compiled step (``compile_decode``): ``update``
    writes this step's keys/values at token slot ``slot`` (a 1-element tensor, so the compiled
    graph does not change from step to step) and returns the buffers' first ``window`` slots:
    the prefix and every token slot up to this one. ``window`` is read off a tensor's last size
    (the step's attention mask), which the compiled graph treats as dynamic: one graph serves
    every length and capacity, and a step attends over the slots written so far, not over the
    whole capacity."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], slot: torch.Tensor,
                 window: torch.Tensor | None = None):
        self.k, self.v, self.slot, self.window = k, v, slot, window

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        if self.window is None:
            return self.k[layer], self.v[layer]
        n = self.window.shape[-1]
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]
