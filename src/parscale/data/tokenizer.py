"""The text tokenizer: a byte-level BPE trained with Hugging Face ``tokenizers``, or a model's own.

``TextTokenizer.train`` learns a byte-level BPE (GPT-2 style: the 256 byte symbols are the base
alphabet, so every string encodes and decodes back exactly) with one special token,
``<|endoftext|>``, at id 0: the end-of-document / EOS token that separates documents in the token
stream. ``TextTokenizer.load`` reads ``tokenizer.json`` from a directory (ours or an existing
model's); its document separator is chosen as ``parscale.tokenizer.find_separator`` does
(``<|endoftext|>`` when the vocabulary has it, ...).

Text is encoded by the same rule as ``parscale.Tokenizer`` (generate, sample, chat): special
tokens written in a document (chat markup such as ``<|im_start|>`` of a model's tokenizer) are
those tokens, exactly as at inference; only a literal separator inside a document is encoded as
ordinary text, so data cannot inject document boundaries.

Training is deterministic: the same texts and settings give a byte-identical ``tokenizer.json``
(checked across processes and thread counts with tokenizers 0.23). Caches are keyed by
``fingerprint()``, the sha1 of the serialized tokenizer (plus the separator, for tokenizers with
other special tokens), not by the training settings, so they stay right even where that would
not hold.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_write_text
from ..errors import ParScaleError
from ..tokenizer import SEPARATOR_CANDIDATES, TextEncoder, find_separator, refuse_gguf
from .corpus import cap_order

if TYPE_CHECKING:
    from .corpus import Corpus

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SAMPLE_BYTES = 64_000_000  # tokenizer training sample cap (the whole stdlib train split fits)


class TextTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the few things training needs."""

    def __init__(self, tokenizer, eos_token: str = EOS_TOKEN, config: dict | None = None):
        self._tok = tokenizer
        # tokenizer_config.json it came with (chat template, special tokens), written back by save
        self.config = dict(config) if config else {"tokenizer_class": "PreTrainedTokenizerFast",
                                                   "eos_token": eos_token}
        self._text = TextEncoder(tokenizer, eos_token)  # the encoding rule (module docstring)
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ParScaleError(f"tokenizer has no EOS token {eos_token!r}")
        self.eos_token = eos_token
        self.eos_id: int = eos_id
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids may be sparse: the model needs an embedding row for the largest one.
        self.vocab_size: int = max(vocab.values()) + 1
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}->{self.eos_id})"

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # ------------------------------------------------------------------ use
    def encode(self, text: str) -> list[int]:
        return self._text.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        return self._text.encode_batch(texts)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; EOS shows as ``<|endoftext|>`` unless ``skip_special``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def fingerprint(self) -> str:
        """sha1 of the serialized tokenizer: equal iff every vocab entry, merge and setting is."""
        if self._fingerprint is None:
            raw = self._tok.to_str()
            if not self._text.only_separator:  # the separator then decides what the text encodes to
                raw += f"\0separator={self.eos_token}"
            self._fingerprint = hashlib.sha1(raw.encode("utf-8")).hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` and ``tokenizer_config.json`` (the one it was loaded
        with, so a chat template survives training; ours names the EOS) atomically; returns the
        tokenizer.json path."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_text(path, self._tok.to_str(pretty=True))
        atomic_write_text(path.parent / "tokenizer_config.json",
                          json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, eos_token: str | None = None) -> "TextTokenizer":
        """Load ``tokenizer.json`` from a model directory (or the file itself).

        The EOS token (the document separator) is ``eos_token`` if given, else the first of
        ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>`` in the vocabulary, else
        ``eos_token`` of a ``tokenizer_config.json`` next to it (``find_separator``): a chat model's
        end-of-turn EOS (``<|im_end|>``) stays free for chat markup inside documents.
        """
        from tokenizers import Tokenizer

        p = Path(path).expanduser()
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise ParScaleError(f"tokenizer file {file} not found")
        refuse_gguf(file)
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON/schema
            raise ParScaleError(f"tokenizer file {file}: cannot load ({e})") from None
        config = _read_config(file.parent / "tokenizer_config.json") if p.is_dir() else None
        template = file.parent / "chat_template.jinja"  # transformers 5 keeps the template here
        if p.is_dir() and template.is_file():
            config = dict(config or {}, chat_template=template.read_text(encoding="utf-8", errors="replace"))
        if eos_token is None:
            eos_token = find_separator(tok, _eos_from_config(file.parent / "tokenizer_config.json"))
        if eos_token is None:
            raise ParScaleError(f"tokenizer file {file}: no document separator found (looked for "
                                f"{', '.join(SEPARATOR_CANDIDATES)} and tokenizer_config.json's "
                                "eos_token); pass eos_token")
        return cls(tok, eos_token, config)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *,
              min_frequency: int = 2, length: int | None = None) -> "TextTokenizer":
        """Learn a byte-level BPE with ``vocab_size`` ids (EOS at id 0, 256 byte symbols, merges)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 2**20:
            raise ParScaleError(f"vocab_size must be an integer in [257, {2**20}] "
                                f"(256 byte symbols + EOS at least; got {vocab_size!r})")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok, EOS_TOKEN)

    @classmethod
    def train_on_corpus(cls, corpus: "Corpus", vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                        sample_bytes: int | None = DEFAULT_SAMPLE_BYTES,
                        min_frequency: int = 2) -> "TextTokenizer":
        """Train on the corpus's train split, at most ``sample_bytes`` of it (None: all).

        The sample is the train documents in a stable pseudo-random order (``sha1("cap:" + name)``,
        the order ``max_bytes`` uses) while they fit in the cap (at least one document). The cap is far above the stdlib corpus (31 MB), so by default
        the stdlib tokenizer sees all of its train split; it keeps training time bounded on large
        user corpora.
        """
        docs = corpus.split("train")
        if not docs:
            raise ParScaleError(f"corpus {corpus.name}: the train split is empty; cannot train a tokenizer")
        if sample_bytes is not None and sum(d.size for d in docs) > sample_bytes:
            picked, total = [], 0
            for d in sorted(docs, key=lambda d: cap_order(d.name)):
                if not picked or total + d.size <= sample_bytes:
                    picked.append(d)
                    total += d.size
            docs = picked
        return cls.train((corpus.read(d) for d in docs), vocab_size, min_frequency=min_frequency,
                         length=len(docs))


def load_tokenizer(path: str | os.PathLike, *, eos_token: str | None = None) -> TextTokenizer:
    """``TextTokenizer.load``: ``tokenizer.json`` of a model directory (or the file itself)."""
    return TextTokenizer.load(path, eos_token=eos_token)


def train_tokenizer(corpus: "Corpus", *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    sample_bytes: int | None = DEFAULT_SAMPLE_BYTES) -> TextTokenizer:
    """``TextTokenizer.train_on_corpus``: a byte-level BPE trained on the corpus's train split."""
    return TextTokenizer.train_on_corpus(corpus, vocab_size, sample_bytes=sample_bytes)


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ParScaleError(f"{path}: not a readable JSON tokenizer config ({e})") from None
    if not isinstance(data, dict):
        raise ParScaleError(f"{path}: a tokenizer config must be a JSON object")
    return data


def _eos_from_config(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        tok = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(tok, dict):  # {"content": "<|endoftext|>", ...} form
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def load_or_train_tokenizer(corpus: "Corpus", *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                            sample_bytes: int | None = DEFAULT_SAMPLE_BYTES,
                            cache_dir: str | os.PathLike | None = None) -> tuple[TextTokenizer, bool]:
    """The tokenizer for ``corpus`` at ``vocab_size``, trained once and then read from the cache.

    Returns ``(tokenizer, from_cache)``. Keyed by the train split's fingerprint and the settings;
    stored as ``<cache_dir>/tokenizer-<corpus>-<key>.json`` (cache_dir: see ``default_cache_dir``).
    """
    from .tokens import default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = hashlib.sha1(f"bpe-v1|{corpus.fingerprint('train')}|{vocab_size}|{sample_bytes}"
                       .encode("utf-8")).hexdigest()[:16]
    file = cache / f"tokenizer-{corpus.name}-{key}.json"
    if file.is_file():
        try:
            return TextTokenizer.load(file, eos_token=EOS_TOKEN), True
        except ParScaleError:
            pass  # a damaged cache entry: train again and overwrite it
    tok = TextTokenizer.train_on_corpus(corpus, vocab_size, sample_bytes=sample_bytes)
    atomic_write_text(file, tok.backend.to_str(pretty=True))
    return tok, False
