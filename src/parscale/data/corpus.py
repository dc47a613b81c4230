"""Training corpora: which documents there are, which split each belongs to, and their text.

A ``Corpus`` is a sorted list of ``Document`` records (name relative to the corpus root, byte size,
content hash, split) whose text is read lazily, so a large directory costs a directory listing and
one hashing pass, not its size in memory. Sources:

* ``"stdlib"`` (the default): every ``*.py`` file of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``, recursively, without ``site-packages``/``dist-packages``);
  about 31 MB of Python on CPython 3.11, the same kind of data as the paper's Stack-V2-Python.
* a directory: every regular file under it (recursively, sorted), except hidden names (starting
  with ``.``) and files that look binary (a NUL byte in the first 8 KiB); ``include`` narrows it
  with shell patterns matched against the relative path (``"*.py"``; ``*`` also crosses ``/``).
  ``*.jsonl`` files inside a directory are read as JSONL (one document per line).
* a ``.jsonl``/``.ndjson`` file: one document per non-blank line, from the string field ``text``
  (``text_field``). A line that is not JSON, not an object, or lacks a string ``text`` field is an
  error naming the file and line number (never silently skipped: a wrong field name would otherwise
  train on nothing). Lines whose text is empty are skipped and counted.
* any other file: plain text, cut at line boundaries into ~64 KiB chunks so the by-document split
  below still gives a validation set (EOS then separates the chunks like documents).

Bytes that are not valid UTF-8 are decoded with ``errors="replace"`` (U+FFFD); the number of such
bytes and of documents that had any is reported in ``CorpusStats`` (never an exception).

Split rule (deterministic, stable across machines): a document goes to validation when
``int(sha1(name)[:8], 16) / 2**32 < val_fraction``, where ``name`` is its POSIX path relative to
the corpus root (``dir/file.py``; ``data.jsonl:17`` for line 17; ``book.txt#3`` for chunk 3).
If that puts no document in validation although ``val_fraction > 0`` and there are at least two
documents, the one with the smallest hash value goes there; if it puts every document there, the
one with the largest goes to train. ``max_bytes`` keeps a stable subset: documents in order of
``sha1("cap:" + name)`` are taken while they fit in the budget (a different hash than the split's,
so the cap does not favour either split).
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import re
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ParScaleError

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)
DEFAULT_VAL_FRACTION = 0.02
TEXT_CHUNK_BYTES = 64 * 1024  # a single plain-text file is cut into chunks of about this size
_SNIFF_BYTES = 8192  # binary check: a NUL byte in the first 8 KiB (what git does)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_STDLIB_EXCLUDE_DIRS = {"site-packages", "dist-packages"}


# --------------------------------------------------------------------------- decoding
_decode_state = threading.local()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    # Same output as errors="replace" (one U+FFFD per maximal invalid subsequence), plus a count.
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _decode_state.bad = getattr(_decode_state, "bad", 0) + (exc.end - exc.start)
    return "\ufffd", exc.end


codecs.register_error("parscale-count-replace", _count_and_replace)


def _read_range(path, start: int, end: int | None) -> bytes:
    """Bytes ``start:end`` of a corpus file (``end=None``: to the end of the file)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read() if end is None else f.read(end - start)
    except OSError as e:
        raise ParScaleError(f"corpus file {path}: cannot read ({e.strerror})") from None


def decode_utf8(data: bytes) -> tuple[str, int]:
    """``data.decode("utf-8", errors="replace")`` and the number of bytes that were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _decode_state.bad = 0
        text = data.decode("utf-8", errors="parscale-count-replace")
        return text, _decode_state.bad


def split_value(name: str) -> float:
    """The document's position in [0, 1) used by the split rule: ``int(sha1(name)[:8], 16) / 2**32``."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def cap_order(name: str) -> str:
    """Sort key of the stable pseudo-random order that ``max_bytes`` (and tokenizer sampling) use."""
    return hashlib.sha1(("cap:" + name).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Document:
    """One document: where its bytes are and which split it is in. Text is read on demand."""

    name: str  # POSIX path relative to the corpus root; "f.jsonl:17" (line), "f.txt#3" (chunk)
    path: Path  # the file holding it
    start: int  # byte range in `path`; end None = to the end of the file
    end: int | None
    jsonl: bool  # the range is one JSONL line; the text is its `text_field`
    size: int  # bytes of text (file/chunk bytes; UTF-8 bytes of a JSONL text field)
    sha1: str  # of the raw bytes of the range (file, chunk or JSONL line)
    replaced_bytes: int  # bytes that were not valid UTF-8
    split: str  # "train" or "validation"


@dataclass(frozen=True)
class CorpusStats:
    files: int  # source files read
    documents: int
    bytes: int
    replaced_bytes: int  # invalid UTF-8 bytes, decoded as U+FFFD
    replaced_documents: int  # documents with at least one such byte
    skipped_binary: int  # files left out because they look binary
    skipped_empty: int  # empty files / JSONL lines with empty text
    capped_documents: int  # documents left out by max_bytes
    train_documents: int
    train_bytes: int
    validation_documents: int
    validation_bytes: int


@dataclass
class _Candidate:
    name: str
    path: Path
    start: int
    end: int | None
    jsonl: bool
    size: int


class Corpus:
    """A sorted, split list of documents; build one with ``load_corpus``/``stdlib_corpus``/``corpus_from_spec``."""

    def __init__(self, name: str, root: Path, documents: list[Document], stats: CorpusStats, *,
                 val_fraction: float, max_bytes: int | None, text_field: str = "text"):
        self.name = name
        self.root = root
        self.documents = documents
        self.stats = stats
        self.val_fraction = val_fraction
        self.max_bytes = max_bytes
        self.text_field = text_field
        self._fingerprints: dict[str | None, str] = {}

    def __repr__(self) -> str:
        return f"Corpus({self.describe()})"

    def split(self, split: str) -> list[Document]:
        """The documents of one split ("train" or "validation"), in corpus order."""
        _check_split(split)
        return [d for d in self.documents if d.split == split]

    def read(self, doc: Document) -> str:
        """The text of one document (invalid UTF-8 replaced by U+FFFD)."""
        text, _ = decode_utf8(_read_range(doc.path, doc.start, doc.end))
        if doc.jsonl:
            text = _jsonl_text(text, doc.path, doc.name, self.text_field)
        return text

    def texts(self, split: str | None = None) -> Iterator[str]:
        """Texts of one split (or of all documents), in corpus order."""
        docs = self.documents if split is None else self.split(split)
        for d in docs:
            yield self.read(d)

    def fingerprint(self, split: str | None = None) -> str:
        """sha1 over the (name, content hash) of every document of the split (None: all documents).

        A content hash, so touching a file does not invalidate caches but editing one does; the
        names make it depend on split membership too.
        """
        if split is not None:
            _check_split(split)
        if split not in self._fingerprints:
            h = hashlib.sha1()
            for d in self.documents if split is None else self.split(split):
                h.update(f"{d.name}\0{d.sha1}\n".encode("utf-8"))
            self._fingerprints[split] = h.hexdigest()
        return self._fingerprints[split]

    def describe(self) -> str:
        """One line for logs: name, sizes, split and anything unusual."""
        s = self.stats
        line = (f"{self.name}: {s.documents} documents, {s.bytes / 1e6:.2f} MB "
                f"(train {s.train_documents} docs / {s.train_bytes / 1e6:.2f} MB, "
                f"validation {s.validation_documents} docs / {s.validation_bytes / 1e6:.2f} MB)")
        extra = []
        if s.replaced_bytes:
            extra.append(f"{s.replaced_bytes} invalid UTF-8 bytes replaced in {s.replaced_documents} documents")
        if s.skipped_binary:
            extra.append(f"{s.skipped_binary} binary files skipped")
        if s.skipped_empty:
            extra.append(f"{s.skipped_empty} empty documents skipped")
        if s.capped_documents:
            extra.append(f"{s.capped_documents} documents left out by max_bytes={self.max_bytes}")
        return line + ("; " + "; ".join(extra) if extra else "")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ParScaleError(f"unknown split {split!r}: use 'train' or 'validation'")


# --------------------------------------------------------------------------- JSONL
def _jsonl_text(line: str, path: Path, name: str, field: str) -> str:
    lineno = name.rsplit(":", 1)[-1]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ParScaleError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ParScaleError(f"{path} line {lineno}: expected a JSON object with a {field!r} field, "
                            f"got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise ParScaleError(f"{path} line {lineno}: no {field!r} field (keys: {keys}); every line "
                            f"needs a string {field!r} field")
    text = obj[field]
    if not isinstance(text, str):
        raise ParScaleError(f"{path} line {lineno}: field {field!r} must be a string, "
                            f"got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800-style escape: not encodable
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _scan_jsonl(path: Path, rel: str, field: str, counts: dict[str, int]) -> list[_Candidate]:
    out: list[_Candidate] = []
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            line, _ = decode_utf8(raw)
            text = _jsonl_text(line, path, f"{rel}:{lineno}", field)
            if not text:
                counts["empty"] += 1
                continue
            out.append(_Candidate(f"{rel}:{lineno}", path, start, offset, True,
                                  len(text.encode("utf-8"))))
    return out


# --------------------------------------------------------------------------- scanning
def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def _text_chunks(path: Path, rel: str, size: int) -> list[_Candidate]:
    # Cut at the first newline after every TEXT_CHUNK_BYTES; a "\n" byte is always a UTF-8
    # character boundary, so each chunk decodes on its own.
    with open(path, "rb") as f:
        data = f.read()
    out, start, k = [], 0, 0
    while start < len(data):
        nl = data.find(b"\n", start + TEXT_CHUNK_BYTES - 1)
        end = len(data) if nl < 0 else nl + 1
        out.append(_Candidate(f"{rel}#{k}", path, start, end, False, end - start))
        start, k = end, k + 1
    if len(out) == 1:  # small file: one document, named like the file
        out[0] = _Candidate(rel, path, 0, None, False, size)
    return out


def _walk(root: Path, include: list[str] | None, exclude_dirs: set[str], skip_hidden: bool,
          counts: dict[str, int], field: str) -> list[_Candidate]:
    out: list[_Candidate] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        # sorted + pruned in place: a deterministic walk on every machine
        dirnames[:] = sorted(d for d in dirnames
                             if d not in exclude_dirs and not (skip_hidden and d.startswith(".")))
        for fn in sorted(filenames):
            if skip_hidden and fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if include is not None and not any(fnmatch.fnmatchcase(rel, pat) for pat in include):
                continue
            try:
                if not p.is_file():
                    continue
                size = p.stat().st_size
                if size == 0:
                    counts["empty"] += 1
                    continue
                if fn.lower().endswith(_JSONL_SUFFIXES):
                    out.extend(_scan_jsonl(p, rel, field, counts))
                    continue
                if _looks_binary(p):
                    counts["binary"] += 1
                    continue
            except OSError as e:
                raise ParScaleError(f"corpus file {p}: cannot read ({e.strerror})") from None
            out.append(_Candidate(rel, p, 0, None, False, size))
    return out


def _cap(cands: list[_Candidate], max_bytes: int | None, where: str) -> tuple[list[_Candidate], int]:
    if max_bytes is None:
        return cands, 0
    keep: set[int] = set()
    total = 0
    for i in sorted(range(len(cands)), key=lambda i: cap_order(cands[i].name)):
        if total + cands[i].size <= max_bytes:
            keep.add(i)
            total += cands[i].size
    if not keep:
        smallest = min(c.size for c in cands)
        raise ParScaleError(f"max_bytes={max_bytes} is smaller than every document of {where} "
                            f"(the smallest has {smallest} bytes)")
    return [c for i, c in enumerate(cands) if i in keep], len(cands) - len(keep)


def _assign_splits(cands: list[_Candidate], val_fraction: float) -> list[str]:
    values = [split_value(c.name) for c in cands]
    splits = [VALIDATION if v < val_fraction else TRAIN for v in values]
    if val_fraction > 0 and len(cands) >= 2:
        if VALIDATION not in splits:
            splits[min(range(len(cands)), key=values.__getitem__)] = VALIDATION
        if TRAIN not in splits:
            splits[max(range(len(cands)), key=values.__getitem__)] = TRAIN
    return splits


def _build(name: str, root: Path, cands: list[_Candidate], counts: dict[str, int], *,
           val_fraction: float, max_bytes: int | None, text_field: str, where: str) -> Corpus:
    if not cands or sum(c.size for c in cands) == 0:
        raise ParScaleError(f"corpus {where} is empty: no non-empty text documents found")
    cands, capped = _cap(cands, max_bytes, where)
    splits = _assign_splits(cands, val_fraction)
    docs: list[Document] = []
    for c, split in zip(cands, splits):
        data = _read_range(c.path, c.start, c.end)
        _, bad = decode_utf8(data)
        # A file may have changed since it was listed: trust what was read. A JSONL document's
        # size is its text's (measured in the scan), not its line's.
        size = c.size if c.jsonl else len(data)
        docs.append(Document(c.name, c.path, c.start, c.end, c.jsonl, size,
                             hashlib.sha1(data).hexdigest(), bad, split))
    train = [d for d in docs if d.split == TRAIN]
    val = [d for d in docs if d.split == VALIDATION]
    stats = CorpusStats(
        files=len({d.path for d in docs}), documents=len(docs), bytes=sum(d.size for d in docs),
        replaced_bytes=sum(d.replaced_bytes for d in docs),
        replaced_documents=sum(1 for d in docs if d.replaced_bytes),
        skipped_binary=counts["binary"], skipped_empty=counts["empty"], capped_documents=capped,
        train_documents=len(train), train_bytes=sum(d.size for d in train),
        validation_documents=len(val), validation_bytes=sum(d.size for d in val))
    return Corpus(name, root, docs, stats, val_fraction=val_fraction, max_bytes=max_bytes,
                  text_field=text_field)


def _check_common(val_fraction: float, max_bytes: int | None) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ParScaleError(f"val_fraction must be in [0, 1) (got {val_fraction!r})")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
        raise ParScaleError(f"max_bytes must be a positive integer or None (got {max_bytes!r})")


def _safe_name(name: str) -> str:
    # Used in cache file names: keep it to a portable character set.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "corpus"


# --------------------------------------------------------------------------- public constructors
def stdlib_corpus(*, val_fraction: float = DEFAULT_VAL_FRACTION, max_bytes: int | None = None) -> Corpus:
    """The ``*.py`` files of the running interpreter's standard library (no site-/dist-packages)."""
    _check_common(val_fraction, max_bytes)
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ParScaleError(f"standard library directory {root} not found")
    counts = {"binary": 0, "empty": 0}
    cands = _walk(root, ["*.py"], _STDLIB_EXCLUDE_DIRS, skip_hidden=False, counts=counts, field="text")
    return _build("stdlib", root, cands, counts, val_fraction=val_fraction, max_bytes=max_bytes,
                  text_field="text", where=f"stdlib ({root})")


def load_corpus(path: str | os.PathLike, *, include: str | list[str] | None = None,
                val_fraction: float = DEFAULT_VAL_FRACTION, max_bytes: int | None = None,
                text_field: str = "text") -> Corpus:
    """A corpus from a directory, a JSONL file or a plain-text file (see the module docstring)."""
    _check_common(val_fraction, max_bytes)
    p = Path(path).expanduser()
    if not p.exists():
        raise ParScaleError(f"data path {p} does not exist")
    counts = {"binary": 0, "empty": 0}
    patterns = [include] if isinstance(include, str) else (list(include) if include else None)
    if p.is_dir():
        root = p.resolve()
        cands = _walk(root, patterns, set(), skip_hidden=True, counts=counts, field=text_field)
        if not cands and patterns:
            raise ParScaleError(f"corpus {p} is empty: no non-empty text file matches "
                                f"{', '.join(patterns)}")
        name = root.name
    elif p.is_file():
        root = p.resolve().parent
        rel = p.name
        try:
            if p.name.lower().endswith(_JSONL_SUFFIXES):
                cands = _scan_jsonl(p.resolve(), rel, text_field, counts)
            elif p.stat().st_size == 0:
                cands = []
            elif _looks_binary(p):
                raise ParScaleError(f"data file {p} looks binary (it has NUL bytes); expected text or JSONL")
            else:
                cands = _text_chunks(p.resolve(), rel, p.stat().st_size)
        except OSError as e:
            raise ParScaleError(f"data file {p}: cannot read ({e.strerror})") from None
        name = p.name.split(".")[0] or p.name
    else:
        raise ParScaleError(f"data path {p} is neither a file nor a directory")
    return _build(_safe_name(name), root, cands, counts, val_fraction=val_fraction,
                  max_bytes=max_bytes, text_field=text_field, where=str(p))


def corpus_from_spec(spec: str = "stdlib", *, include: str | list[str] | None = None,
                     val_fraction: float = DEFAULT_VAL_FRACTION, max_bytes: int | None = None,
                     text_field: str = "text") -> Corpus:
    """What a ``--data`` string names: ``"stdlib"`` (default) or a path (directory, JSONL, text file).

    A file or directory literally called ``stdlib`` in the working directory can be named as ``./stdlib``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ParScaleError("--data must be 'stdlib' or a path to a directory, JSONL or text file")
    if spec.strip() == "stdlib":
        if include is not None:
            raise ParScaleError("include patterns apply to a directory corpus, not to 'stdlib'")
        return stdlib_corpus(val_fraction=val_fraction, max_bytes=max_bytes)
    return load_corpus(spec, include=include, val_fraction=val_fraction, max_bytes=max_bytes,
                       text_field=text_field)
