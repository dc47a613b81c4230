"""``model.generation_config``: a checkpoint's generation defaults, as Hugging Face keeps them.

Read from ``generation_config.json`` next to ``config.json`` when the checkpoint has one (HF
models ship it: special token ids, sampling defaults), else built from the model config's
bos/eos/pad token ids. Unknown keys of the file are kept in ``extra`` (HF's file has many we do
not use), so nothing in it is lost or an error; the known keys are type-checked.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ParScaleError

FILE_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of the file we do not interpret

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> None:
            raise ParScaleError(f"generation config '{name}': {what} (got {getattr(self, name)!r})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("bos_token_id", "pad_token_id", "max_new_tokens", "top_k"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 0):
                bad(name, "must be null or an integer >= 0")
        eos = self.eos_token_id
        if eos is not None and not (is_int(eos) and eos >= 0) and not (
                isinstance(eos, list) and eos and all(is_int(t) and t >= 0 for t in eos)):
            bad("eos_token_id", "must be null, a token id or a list of token ids")
        if not isinstance(self.do_sample, bool):
            bad("do_sample", "must be true or false")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v < 0):
                bad(name, "must be a finite number >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id)

    @classmethod
    def load(cls, directory: str | os.PathLike, config=None) -> "GenerationConfig":
        """``directory/generation_config.json`` if present, else ``from_model_config(config)``."""
        from .paths import read_json_file

        path = Path(directory) / FILE_NAME
        if not path.is_file():
            if config is None:
                raise ParScaleError(f"{path}: missing")
            return cls.from_model_config(config)
        try:
            return cls.from_dict(read_json_file(path, str(path)))
        except ParScaleError as e:
            msg = str(e)
            raise ParScaleError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        import json

        from .atomic import atomic_write_text

        return atomic_write_text(Path(directory) / FILE_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **d}
