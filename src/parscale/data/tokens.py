"""The tokenized cache: each split of a corpus tokenized once into a flat memory-mapped array.

A split becomes one token stream, every document followed by the EOS id
(``doc₁ EOS doc₂ EOS … docₙ EOS``), in corpus order, stored as ``<name>.bin`` (raw little-endian
``uint16`` when the vocabulary has at most 65536 ids, else ``uint32``) with ``<name>.json`` beside it
(dtype, length, document count, fingerprints, tokens/s). The name carries a key, the sha1 of the
split's corpus fingerprint (content of its documents), the tokenizer fingerprint (its serialized
JSON), the split name and the format version, so any change to data or tokenizer makes a new entry and
an unchanged pair is never tokenized twice. Both files are written to temporary names and renamed
into place (``.bin`` first, ``.json`` last: an entry with a ``.json`` is complete).

Cache directory: the ``cache_dir`` argument, else ``$PARSCALE_CACHE``, else ``~/.cache/parscale/tokens``.
Several processes (e.g. data-parallel ranks) may build the same entry at once: each writes its own
temporary file and the renames leave one identical result; letting rank 0 build it first avoids the
duplicate work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write, atomic_write_text
from ..errors import ParScaleError
from .corpus import DEFAULT_VAL_FRACTION, SPLITS, TRAIN, VALIDATION, Corpus, corpus_from_spec
from .tokenizer import (DEFAULT_SAMPLE_BYTES, DEFAULT_VOCAB_SIZE, TextTokenizer,
                        load_or_train_tokenizer)

FORMAT_VERSION = 1
_BATCH_BYTES = 4_000_000  # text handed to one encode_batch call: parallel enough, bounded memory


def default_cache_dir() -> Path:
    """``$PARSCALE_CACHE`` if set, else ``~/.cache/parscale/tokens``."""
    env = os.environ.get("PARSCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "parscale" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass
class TokenizedSplit:
    """One split as a flat token array (a read-only memmap of the cache file)."""

    split: str
    corpus_name: str
    path: Path  # the .bin file
    tokens: np.ndarray
    n_documents: int
    eos_id: int
    from_cache: bool  # True: read from the cache, nothing was tokenized now
    seconds: float  # time spent tokenizing in this call (0.0 on a cache hit)
    meta: dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return len(self)

    @property
    def tokens_per_second(self) -> float:
        """Tokenization speed when this split was built (from the metadata on a cache hit)."""
        return float(self.meta.get("tokens_per_second", 0.0))


def _cache_key(corpus: Corpus, tokenizer: TextTokenizer, split: str) -> str:
    raw = f"tokens-v{FORMAT_VERSION}|{corpus.fingerprint(split)}|{tokenizer.fingerprint()}|{split}"
    return hashlib.sha1(raw.encode("utf-8")).hexdigest()[:16]


def _open_tokens(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # numpy cannot memory-map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _try_cached(bin_path: Path, meta_path: Path, key: str) -> dict[str, Any] | None:
    if not meta_path.is_file() or not bin_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        ok = (meta.get("key") == key and meta.get("format") == FORMAT_VERSION
              and bin_path.stat().st_size == int(meta["n_tokens"]) * dtype.itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None


def tokenize_split(corpus: Corpus, tokenizer: TextTokenizer, split: str, *,
                   cache_dir: str | os.PathLike | None = None, progress: bool = True) -> TokenizedSplit:
    """Tokenize one split into the cache (or open the cached result) and return it memory-mapped."""
    if split not in SPLITS:
        raise ParScaleError(f"unknown split {split!r}: use 'train' or 'validation'")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParScaleError(f"token cache directory {cache}: cannot create ({e.strerror})") from None
    key = _cache_key(corpus, tokenizer, split)
    stem = f"{corpus.name}-{split}-{key}"
    bin_path, meta_path = cache / f"{stem}.bin", cache / f"{stem}.json"
    dtype = token_dtype(tokenizer.vocab_size)

    meta = _try_cached(bin_path, meta_path, key)
    if meta is not None:
        return TokenizedSplit(split, corpus.name, bin_path,
                              _open_tokens(bin_path, np.dtype(meta["dtype"]), int(meta["n_tokens"])),
                              int(meta["n_documents"]), int(meta["eos_id"]), True, 0.0, meta)

    docs = corpus.split(split)
    n_tokens = 0
    t0 = time.perf_counter()

    def write(tmp: str) -> None:
        nonlocal n_tokens
        from tqdm.auto import tqdm

        with open(tmp, "wb") as f, tqdm(total=sum(d.size for d in docs), unit="B", unit_scale=True,
                                        desc=f"tokenizing {corpus.name}/{split}",
                                        disable=not progress, leave=False) as bar:
            i = 0
            while i < len(docs):
                # Batches of about _BATCH_BYTES of text (at least one document).
                j, size = i, 0
                while j < len(docs) and (j == i or size + docs[j].size <= _BATCH_BYTES):
                    size += docs[j].size
                    j += 1
                for ids in tokenizer.encode_batch([corpus.read(d) for d in docs[i:j]]):
                    ids.append(tokenizer.eos_id)
                    np.asarray(ids, dtype=dtype).tofile(f)
                    n_tokens += len(ids)
                bar.update(size)
                bar.set_postfix(tok_per_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
                i = j

    atomic_write(bin_path, write)
    seconds = time.perf_counter() - t0
    meta = {
        "format": FORMAT_VERSION, "key": key, "split": split, "corpus": corpus.name,
        "corpus_fingerprint": corpus.fingerprint(split), "tokenizer_fingerprint": tokenizer.fingerprint(),
        "dtype": dtype.str, "n_tokens": n_tokens, "n_documents": len(docs),
        "bytes": sum(d.size for d in docs), "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
        "seconds": round(seconds, 3), "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return TokenizedSplit(split, corpus.name, bin_path, _open_tokens(bin_path, dtype, n_tokens),
                          len(docs), tokenizer.eos_id, False, seconds, meta)


@dataclass
class PreparedData:
    """Everything the trainer needs from the data side."""

    corpus: Corpus
    tokenizer: TextTokenizer
    train: TokenizedSplit
    validation: TokenizedSplit
    tokenizer_from_cache: bool  # False when the tokenizer was trained (or loaded from a path) now

    def describe(self) -> str:
        """A few lines for logs."""
        lines = [self.corpus.describe(), repr(self.tokenizer)]
        for s in (self.train, self.validation):
            how = ("cached" if s.from_cache
                   else f"tokenized in {s.seconds:.1f} s, {s.tokens_per_second:,.0f} tokens/s")
            lines.append(f"{s.split}: {s.n_tokens:,} tokens, {s.n_documents} documents ({how})")
        return "\n".join(lines)


def prepare_data(data: str | Corpus = "stdlib", *,
                 tokenizer: TextTokenizer | str | os.PathLike | None = None,
                 vocab_size: int = DEFAULT_VOCAB_SIZE, val_fraction: float = DEFAULT_VAL_FRACTION,
                 max_bytes: int | None = None, include: str | list[str] | None = None,
                 text_field: str = "text", tokenizer_sample_bytes: int | None = DEFAULT_SAMPLE_BYTES,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True) -> PreparedData:
    """Corpus → tokenizer → both tokenized splits, each step cached.

    ``data``: a ``--data`` string (``"stdlib"`` or a path) or a ``Corpus``. ``tokenizer``: an
    instance, a path to a ``tokenizer.json`` or a model directory holding one, or None to train a
    byte-level BPE of ``vocab_size`` on the train split (cached in ``cache_dir``).
    """
    corpus = data if isinstance(data, Corpus) else corpus_from_spec(
        data, include=include, val_fraction=val_fraction, max_bytes=max_bytes, text_field=text_field)
    if tokenizer is None:
        tok, from_cache = load_or_train_tokenizer(corpus, vocab_size=vocab_size,
                                                  sample_bytes=tokenizer_sample_bytes, cache_dir=cache_dir)
    elif isinstance(tokenizer, TextTokenizer):
        tok, from_cache = tokenizer, False
    else:
        tok, from_cache = TextTokenizer.load(tokenizer), False
    train = tokenize_split(corpus, tok, TRAIN, cache_dir=cache_dir, progress=progress)
    validation = tokenize_split(corpus, tok, VALIDATION, cache_dir=cache_dir, progress=progress)
    return PreparedData(corpus, tok, train, validation, from_cache)
