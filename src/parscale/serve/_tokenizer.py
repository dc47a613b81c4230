"""Stand-in for ``parscale.tokenizer.Tokenizer`` until that module is merged (then this file goes).

Only the interface the server uses: ``from_pretrained(dir)``, ``encode``, ``decode``,
``apply_chat_template`` (jinja2, the model's ``tokenizer_config.json`` ``chat_template``),
``chat_template`` and ``eos_token_ids``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ParScaleError


class Tokenizer:
    def __init__(self, tok, config: dict, eos_ids: list[int]):
        self._tok, self._config = tok, config
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.eos_token_ids: list[int] = eos_ids

    @staticmethod
    def _token(config: dict, key: str) -> str | None:
        v = config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise ParScaleError(f"{path}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ParScaleError(f"{f}: not a valid tokenizer.json ({e})") from None
        config = {}
        cf = path / "tokenizer_config.json"
        if cf.is_file():
            try:
                config = json.loads(cf.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ParScaleError(f"{cf}: not valid JSON ({e})") from None
        eos = set()
        name = cls._token(config, "eos_token")
        if name and tok.token_to_id(name) is not None:
            eos.add(tok.token_to_id(name))
        for extra in ("generation_config.json", "config.json"):
            try:
                v = json.loads((path / extra).read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            eos.update(v if isinstance(v, list) else [] if v is None else [v])
        return cls(tok, config, sorted(int(e) for e in eos))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        if self.chat_template is None:
            raise ParScaleError("the tokenizer has no chat_template")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._token(self._config, "bos_token") or "",
                eos_token=self._token(self._config, "eos_token") or "")
        except TemplateError as e:
            raise ParScaleError(f"chat template: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text
