"""One dtype vocabulary for the API and every CLI flag: float32, bfloat16, float16.

The short spellings people type (fp32, bf16, fp16, half, float) are accepted everywhere and turned
into the long name, so ``--dtype bf16`` means the same to ``train``, ``generate`` and ``cost``.
"""

from __future__ import annotations

from .errors import ParScaleError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# spelling -> canonical name (lower-cased input; "torch." prefixes are dropped)
ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16"}


def canonical_dtype(name, *, what: str = "dtype", allowed=DTYPE_NAMES, extra=()) -> str:
    """The canonical name of ``name`` (a string or a torch dtype); ``extra`` adds spellings that
    some callers accept as they are (``"auto"``; ``cost``'s ``"fp8"``, ``"int8"``).

    Raises ParScaleError naming ``what`` (e.g. ``--dtype``) and the choices.
    """
    text = str(name).strip().lower().removeprefix("torch.")
    if text in extra:
        return text
    canon = ALIASES.get(text)
    if canon is None or canon not in allowed:
        choices = ", ".join([*allowed, *extra])
        raise ParScaleError(f"{what}: unknown dtype {str(name)!r}; use one of {choices} "
                            "(fp32, bf16, fp16 are accepted too)")
    return canon


def torch_dtype(name):
    """The torch dtype for a name in the vocabulary (or a torch dtype, returned as it is)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, canonical_dtype(name))
