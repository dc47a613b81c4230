"""The tokenizer of a model directory: encode, decode, batch with left padding, chat templates.

``Tokenizer.from_pretrained(DIR)`` reads the Hugging Face files a model directory holds:
``tokenizer.json`` (the ``tokenizers`` pipeline), ``tokenizer_config.json`` (special tokens,
``chat_template`` — or a ``chat_template.jinja`` beside it, as transformers 5 saves it —,
``add_bos_token`` / ``add_eos_token`` when tokenizer.json has no post-processor),
``generation_config.json`` and ``config.json`` (their ``eos_token_id``, an int or a list). It is
used the way ``transformers``' tokenizers are (``tok(texts, padding=True, return_tensors="pt")``,
``decode``, ``apply_chat_template``) and gives the same ids on the same files (tests/test_tokenizer.py checks
this against transformers), with two documented choices: padding is on the **left** by default
(what generation needs), and the document separator (below) written in plain text stays text.

Special tokens — one rule for training, generation, sampling and chat:

* Plain text (a training document, a ``--prompt``): the tokenizer's special tokens written in the
  text are encoded as those tokens (Hugging Face's default), so chat markup such as
  ``<|im_start|>`` is one id whether the trainer reads it in a document or ``generate`` reads it
  in a prompt. The exception is the **document separator** (``separator``: ``<|endoftext|>`` when
  the vocabulary has it, else ``<|end_of_text|>``, ``</s>``, ``<eos>``, else the config's
  ``eos_token``), which plain text can never produce: written literally it is encoded as text, so
  data cannot forge a document boundary. The trainer puts the separator id between documents
  itself (``parscale.data.tokens``) and says which token it uses.
* Rendered chat templates: the markup a template writes is the model's own, so every special
  token in it is parsed, separator included (as ``transformers`` does).

Generation stops at any of ``eos_token_ids``: the ``eos_token``, every id of
``generation_config.json``'s and ``config.json``'s ``eos_token_id``, and the separator, in that
order without repeats (a chat model's ``<|im_end|>`` and the ``<|endoftext|>`` its pretraining
ended documents with).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ParScaleError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The document separator: the first of these in the vocabulary, else the config's eos_token.
SEPARATOR_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ParScaleError(f"{path}: {what} is not valid UTF-8") from None
    except ValueError as e:
        raise ParScaleError(f"{path}: {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise ParScaleError(f"{path}: cannot read {what} ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ParScaleError(f"{path}: {what} must be a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _check_unicode(text: str) -> str:
    """``text`` if it can be encoded: a lone surrogate (undecodable command-line bytes, or a JSON
    ``"\\ud800"``) is a ParScaleError, not a TypeError deep in the tokenizers library."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParScaleError(f"text to encode is not valid Unicode (a lone surrogate at character {e.start})") from None
    return text


def refuse_gguf(file: Path) -> None:
    """A ``.gguf`` where a tokenizer.json is expected: say how to get one, not that it is bad JSON."""
    if file.suffix.lower() == ".gguf" and file.is_file():
        raise ParScaleError(f"{file}: a GGUF file has no tokenizer.json; convert it first (`parscale convert "
                            f"{file} --out DIR`, then use DIR), or pass --tokenizer DIR")


def _ids(value) -> list[int]:
    """``eos_token_id`` of a config: an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def find_separator(backend, eos_token: str | None = None) -> str | None:
    """The document separator of a ``tokenizers.Tokenizer`` (see the module docstring)."""
    for t in SEPARATOR_CANDIDATES:
        if backend.token_to_id(t) is not None:
            return t
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        return eos_token
    return None


class TextEncoder:
    """The plain-text encoding rule (module docstring) over a ``tokenizers.Tokenizer``.

    Special tokens in the text are parsed, except the ``separator``, which is encoded as text.
    Shared by :class:`Tokenizer` and the trainer's ``parscale.data.TextTokenizer``.
    """

    def __init__(self, backend, separator: str | None):
        self.backend = backend
        self.backend.encode_special_tokens = False
        self.separator = separator
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        # With no other special token, reading every special token as text is exactly the rule
        # (and one pass over the whole text, as the trainer always encoded it).
        self.only_separator = specials <= {separator}
        self._text_backend = None

    @property
    def _as_text(self):
        """The same pipeline with every special token read as text (built when first needed)."""
        if self._text_backend is None:
            from tokenizers import Tokenizer

            self._text_backend = Tokenizer.from_str(self.backend.to_str())
            self._text_backend.encode_special_tokens = True
        return self._text_backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise ParScaleError(f"text to encode must be a string (got {type(t).__name__})")
            _check_unicode(t)
        sep = self.separator
        plain = [i for i, t in enumerate(texts) if sep is None or sep not in t]
        out: list[list[int] | None] = [None] * len(texts)
        for i, enc in zip(plain, self.backend.encode_batch([texts[i] for i in plain],
                                                           add_special_tokens=add_special_tokens)):
            out[i] = enc.ids
        for i in (i for i in range(len(texts)) if out[i] is None):
            if self.only_separator:
                out[i] = self._as_text.encode(texts[i], add_special_tokens=add_special_tokens).ids
                continue
            ids: list[int] = []
            pieces = texts[i].split(sep)
            for k, piece in enumerate(pieces):
                if k:
                    ids += self._as_text.encode(sep, add_special_tokens=False).ids
                if piece:
                    ids += self.backend.encode(piece, add_special_tokens=False).ids
            if add_special_tokens:  # the post-processor's BOS/EOS around the whole text
                ids = _wrap(self.backend, ids)
            out[i] = ids
        return out  # type: ignore[return-value]


def _wrap(backend, ids: list[int]) -> list[int]:
    """``ids`` with the post-processor's special tokens (BOS/EOS) around them: found from a probe
    text, since a post-processor works on a ``tokenizers`` Encoding, not on an id list."""
    empty = backend.encode("", add_special_tokens=True).ids
    if not empty:
        return ids
    probe_text = "a"
    bare = backend.encode(probe_text, add_special_tokens=False).ids
    full = backend.encode(probe_text, add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k: k + len(bare)] == bare:
            return full[:k] + ids + full[k + len(bare):]
    return empty + ids


class StreamDecoder:
    """Incremental detokenisation: ``put(token)`` returns the text that token completes.

    Text is released only when it is final: a token that ends inside a multi-byte UTF-8 character
    (decoded as U+FFFD for now) is held back until the character is complete, and pieces whose
    decoding depends on what precedes them (SentencePiece's leading space) are decoded with a
    few tokens of context. ``"".join`` of every ``put`` plus ``flush()`` equals ``decode`` of all
    the tokens.
    """

    def __init__(self, tokenizer: "Tokenizer", *, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def _text(self, start: int, end: int | None = None) -> str:
        return self.tok.decode(self.tokens[start:end], skip_special_tokens=self.skip)

    def put(self, token: int) -> str:
        self.tokens.append(int(token))
        prefix = self._text(self.prefix_offset, self.read_offset)
        new = self._text(self.prefix_offset)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return new[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self._text(self.prefix_offset, self.read_offset)
        new = self._text(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new[len(prefix):]


class Tokenizer:
    """A model's tokenizer (``tokenizer.json`` + its configs), used like a ``transformers`` one."""

    def __init__(self, backend, config: Mapping[str, Any] | None = None, *,
                 eos_token_ids: Iterable[int] = (), name: str = "tokenizer"):
        self.backend = backend
        self.config = dict(config or {})
        self.name = name
        self.padding_side = str(self.config.get("padding_side", "left"))
        self.tokens = {k: _token_text(self.config.get(k)) for k in _NAMED_TOKENS}
        for k, t in self.tokens.items():
            if t is not None and backend.token_to_id(t) is None:
                raise ParScaleError(f"{name}: {k} {t!r} is not in the vocabulary")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] form
            named = {d.get("name"): d.get("template") for d in template if isinstance(d, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ParScaleError(f"{name}: chat_template must be a string")
        self.chat_template: str | None = template or None
        self.separator = find_separator(backend, self.tokens["eos_token"])
        self._text = TextEncoder(backend, self.separator)
        # BOS/EOS on encode: tokenizer.json's post-processor decides (as in transformers 5); the
        # config's add_bos_token / add_eos_token (llama.cpp's flags) only when it has none.
        self._bos_eos = None
        if backend.post_processor is None and ("add_bos_token" in self.config or "add_eos_token" in self.config):
            self._bos_eos = (bool(self.config.get("add_bos_token")) and self.bos_token_id is not None,
                             bool(self.config.get("add_eos_token")) and self.eos_token_id is not None)
        ids = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(eos_token_ids)
        if self.separator_id is not None:  # a document's end is the end of any generation too
            ids.append(self.separator_id)
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in ids))
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a model directory (or a ``tokenizer.json`` file; configs are read beside it)."""
        from tokenizers import Tokenizer as Backend

        p = Path(path).expanduser()
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise ParScaleError(f"{file}: no tokenizer.json there")
        refuse_gguf(file)
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON/schema
            raise ParScaleError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        d = file.parent
        config = _read_json(d / TOKENIZER_CONFIG_FILE, "tokenizer_config.json") or {}
        # transformers 5 saves the template beside the config; that file wins, as there
        template_file = d / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            try:
                config["chat_template"] = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ParScaleError(f"{template_file}: cannot read the chat template ({e})") from None
        eos: list[int] = []
        for f in (GENERATION_CONFIG_FILE, "config.json"):
            eos += _ids((_read_json(d / f, f) or {}).get("eos_token_id"))
        return cls(backend, config, eos_token_ids=eos, name=str(file))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` atomically; returns the directory."""
        from .atomic import atomic_write_text

        d = Path(directory)
        atomic_write_text(d / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        atomic_write_text(d / TOKENIZER_CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        return d

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
                f"eos_token_ids={self.eos_token_ids}, chat_template={'yes' if self.chat_template else 'no'})")

    # ------------------------------------------------------------------ special tokens
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    def _id(self, key: str) -> int | None:
        t = self.tokens[key]
        return None if t is None else self.backend.token_to_id(t)

    bos_token = property(lambda self: self.tokens["bos_token"])
    eos_token = property(lambda self: self.tokens["eos_token"])
    pad_token = property(lambda self: self.tokens["pad_token"])
    unk_token = property(lambda self: self.tokens["unk_token"])
    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))

    @property
    def separator_id(self) -> int | None:
        return None if self.separator is None else self.backend.token_to_id(self.separator)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens (what chat templates see as ``bos_token``, ``eos_token``, ...)."""
        return {k: t for k, t in self.tokens.items() if t is not None}

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # ------------------------------------------------------------------ encode / decode
    def _add_special(self, ids: list[int]) -> list[int]:
        bos, eos = self._bos_eos
        return ([self.bos_token_id] if bos else []) + ids + ([self.eos_token_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (plain-text rule; BOS/EOS as the tokenizer adds them)."""
        if self._bos_eos is None:
            return self._text.encode_batch(texts, add_special_tokens)
        return [self._add_special(ids) if add_special_tokens else ids
                for ids in self._text.encode_batch(texts, False)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, or a 1-D tensor / array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            raise ParScaleError("decode takes one sequence of ids; use batch_decode for several")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """A :class:`StreamDecoder` for printing tokens as they are generated."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def pad(self, batch: Sequence[Sequence[int]], *, return_tensors: str | None = None,
            padding_side: str | None = None) -> dict[str, Any]:
        """Pad id lists to one length: ``{"input_ids", "attention_mask"}`` (lists or ``"pt"`` tensors)."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ParScaleError(f"padding_side must be 'left' or 'right' (got {side!r})")
        pad = self.pad_token_id
        if pad is None:  # no pad token: any id does, the attention mask hides it
            pad = self.eos_token_id if self.eos_token_id is not None else 0
        width = max((len(x) for x in batch), default=0)
        ids, mask = [], []
        for x in batch:
            n = width - len(x)
            ids.append(([pad] * n + list(x)) if side == "left" else (list(x) + [pad] * n))
            mask.append(([0] * n + [1] * len(x)) if side == "left" else ([1] * len(x) + [0] * n))
        return self._as(ids, mask, return_tensors)

    @staticmethod
    def _as(ids, mask, return_tensors):
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": mask}
        if return_tensors != "pt":
            raise ParScaleError(f"return_tensors must be 'pt' or None (got {return_tensors!r})")
        import torch

        lengths = {len(x) for x in ids}
        if len(lengths) > 1:
            raise ParScaleError("texts encode to different lengths; pass padding=True to get one tensor")
        return {"input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
                "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(len(ids), -1)}

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False,
                 return_tensors: str | None = None, add_special_tokens: bool = True,
                 padding_side: str | None = None, truncation: bool = False,
                 max_length: int | None = None) -> dict[str, Any]:
        """Encode one text or a list: ``{"input_ids", "attention_mask"}``.

        One string gives one id list (a ``1 s`` tensor with ``return_tensors="pt"``); a list gives
        one per text. ``padding=True`` (or ``"longest"``) pads to the longest, on ``padding_side``
        (default ``self.padding_side``, "left"). ``truncation=True`` keeps the first ``max_length``
        ids of each text (default the config's ``model_max_length``), as transformers does.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not single and not all(isinstance(t, str) for t in texts):
            raise ParScaleError("the tokenizer takes a string or a list of strings")
        if padding not in (False, True, "longest", "do_not_pad"):
            raise ParScaleError(f"padding must be True, False or 'longest' (got {padding!r})")
        ids = self.encode_batch(texts, add_special_tokens)
        if truncation:
            limit = max_length if max_length is not None else self.config.get("model_max_length")
            if not isinstance(limit, int) or limit < 1:
                raise ParScaleError(f"truncation needs max_length >= 1 (got {limit!r})")
            ids = [x[:limit] for x in ids]
        if padding in (True, "longest"):
            out = self.pad(ids, return_tensors=return_tensors, padding_side=padding_side)
        else:
            out = self._as(ids, [[1] * len(x) for x in ids], return_tensors)
        if single and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None,
                            return_dict: bool = False, chat_template: str | None = None,
                            **template_vars):
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the chat template.

        ``tokenize=False`` returns the text; else its ids (every special token in the markup
        parsed, no BOS/EOS added: the template writes them), a ``1 s`` tensor with
        ``return_tensors="pt"``, or ``{"input_ids", "attention_mask"}`` with ``return_dict``
        (transformers 5 returns the dict by default; 4 the ids). ``template_vars`` reach the
        template beside ``messages``, ``add_generation_prompt`` and the special tokens.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ParScaleError(f"{self.name}: this tokenizer has no chat template "
                                "(tokenizer_config.json has no 'chat_template')")
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens_map, **template_vars})
        if not tokenize:
            return text
        ids = self.backend.encode(_check_unicode(text), add_special_tokens=False).ids  # markup: all specials parsed
        if return_dict:
            return self._as([ids], [[1] * len(ids)], return_tensors) if return_tensors else \
                {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_tensors is not None:
            return self._as([ids], [[1] * len(ids)], return_tensors)["input_ids"]
        return ids


# --------------------------------------------------------------------------- chat templates
def _check_messages(messages) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ParScaleError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ParScaleError("messages is empty: a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ParScaleError(f"message {i} must be a dict with 'role' and 'content' (got {type(m).__name__})")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ParScaleError(f"message {i} has no 'role' string")
        if "content" in m and m["content"] is not None and not isinstance(m["content"], (str, list)):
            raise ParScaleError(f"message {i}: 'content' must be a string or a list of parts "
                                f"(got {type(m['content']).__name__})")
        out.append({k: v for k, v in m.items() if v is not None})  # as transformers: None keys dropped
    return out


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ParScaleError("chat templates need jinja2: pip install 'parscale[chat]'") from None
    from datetime import datetime

    class GenerationBlock(Extension):
        # {% generation %}...{% endgeneration %} marks assistant text in some templates: render as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # json.dumps, not jinja's tojson (which HTML-escapes): what chat templates expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template), jinja2.exceptions.TemplateError
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ParScaleError(f"chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render_chat_template(template: str, messages, *, add_generation_prompt: bool = False, **variables) -> str:
    """The text of ``messages`` under a Jinja chat template (sandboxed, as transformers renders it)."""
    compiled, template_error = _compile(template)
    msgs = _check_messages(messages)
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, **variables)
    except template_error as e:
        raise ParScaleError(f"chat template: {e}") from None
