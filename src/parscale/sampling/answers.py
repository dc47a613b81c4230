"""Answer extraction: turn a generated text into a canonical answer string, or ``INVALID``.

Votes compare answers as strings, so extraction also canonicalises: ``"3.0"``, ``"3"`` and
``"+3"`` must count as the same vote. Extractors are plain callables ``text -> str | INVALID``:

* ``last_number`` — the last number in the text (``-1,234.50`` and ``3/4`` are numbers);
* ``first_line`` — the first non-empty line, whitespace-trimmed (for ``"Q: ...\\nA: 432\\n"``-style
  tasks, where a model that does not stop keeps writing new questions after the answer);
* ``first_line_number`` — the first non-empty line, which must be exactly one number;
* ``boxed`` — the content of the last ``\\boxed{...}`` (nested braces allowed);
* ``regex:PATTERN`` / ``regex(pattern, group=1)`` — the last match's group;
* any user callable ``str -> str | None`` (``None`` or ``""`` means no answer).

Numeric canonicalisation (``canonical_number``) is exact (``fractions.Fraction``):
integers print without a decimal point (``"3.0"`` → ``"3"``, ``"-0"`` → ``"0"``,
``"1,000"`` → ``"1000"``, ``"+5"`` → ``"5"``); a value with a finite decimal expansion prints as
a decimal without trailing zeros (``"0.50"`` → ``"0.5"``, ``"1/2"`` → ``"0.5"``); any other
rational prints as a reduced fraction (``"2/6"`` → ``"1/3"``). Exponents, percent signs and
currency symbols are not numbers here.

``INVALID`` marks "no extractable answer". It is not a string, so it can never equal a real
answer, and the aggregators never let it win a vote unless asked to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import TYPE_CHECKING

from ..errors import ParScaleError

if TYPE_CHECKING:
    from .records import Sample


class Invalid:
    """The type of ``INVALID``; there is exactly one instance."""

    _instance: "Invalid | None" = None

    def __new__(cls) -> "Invalid":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INVALID"

    def __bool__(self) -> bool:  # `if answer:` reads naturally: no answer is falsy
        return False

    def __reduce__(self):  # pickling/copying keeps the singleton
        return (Invalid, ())


INVALID = Invalid()
Extractor = Callable[[str], "str | Invalid"]


def is_invalid(answer: object) -> bool:
    return answer is INVALID


# ----------------------------------------------------------------------------- numbers
# A plain decimal: optional sign, digits with optional thousands separators, optional fraction.
_DECIMAL = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+"
_FRACTION = r"[+-]?\d+\s*/\s*\d+"
_NUMBER_RE = re.compile(rf"^\s*(?:(?P<frac>{_FRACTION})|(?P<dec>{_DECIMAL}))\s*$")
# For searching inside text: a number not glued to letters/digits on its left; the minus sign
# is part of the number only when it is not a binary minus ("5-3" ends in 3, not -3).
_NUMBER_SEARCH = re.compile(
    r"(?:(?<![\w)\].])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?"
)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written as above, or None if ``text`` is not one number."""
    m = _NUMBER_RE.match(text)
    if not m:
        return None
    s = (m.group("frac") or m.group("dec")).replace(",", "").replace(" ", "")
    if s.endswith("."):
        s = s[:-1]
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):  # "1/0"
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of an exact rational (see the module docstring)."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:  # no finite decimal expansion
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * (10**places // value.denominator)
    digits = str(scaled).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0")
    return ("-" if value < 0 else "") + text


def canonical_number(text: str) -> str | None:
    """``"3.0"`` → ``"3"``, ``"1,000"`` → ``"1000"``, ``"2/4"`` → ``"0.5"``; None if not a number."""
    value = parse_number(text)
    return None if value is None else format_number(value)


def canonical_answer(text: str) -> str:
    """A number in canonical form, or any other text with whitespace trimmed and collapsed."""
    number = canonical_number(text)
    return number if number is not None else " ".join(text.split())


# ----------------------------------------------------------------------------- extractors
def last_number(text: str) -> str | Invalid:
    matches = list(_NUMBER_SEARCH.finditer(text))
    for m in reversed(matches):
        number = canonical_number(m.group(0))
        if number is not None:
            return number
    return INVALID


def first_line(text: str) -> str | Invalid:
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return INVALID


def first_line_number(text: str) -> str | Invalid:
    line = first_line(text)
    if line is INVALID:
        return INVALID
    number = canonical_number(line)
    return INVALID if number is None else number


def boxed(text: str) -> str | Invalid:
    """The content of the last ``\\boxed{...}``, braces balanced; a number is canonicalised."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            inner = text[start + len("\\boxed{"): i - 1].strip()
            return canonical_answer(inner) if inner else INVALID
        start = text.rfind("\\boxed{", 0, start)  # unbalanced (cut off): try an earlier one
    return INVALID


def regex(pattern: str, group: int | str = 1) -> Extractor:
    """Extractor returning ``group`` of the pattern's last match, canonicalised."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ParScaleError(f"extractor regex {pattern!r} does not compile: {e}") from None
    if isinstance(group, int) and group > compiled.groups:
        raise ParScaleError(f"extractor regex {pattern!r} has {compiled.groups} group(s), not group {group}")

    def extract(text: str) -> str | Invalid:
        matches = list(compiled.finditer(text))
        if not matches:
            return INVALID
        found = matches[-1].group(group)
        return canonical_answer(found) if found and found.strip() else INVALID

    extract.__name__ = f"regex:{pattern}"
    return extract


EXTRACTORS: dict[str, Extractor] = {
    "last_number": last_number,
    "first_line": first_line,
    "first_line_number": first_line_number,
    "boxed": boxed,
}


def get_extractor(spec: "str | Callable[[str], str | None]") -> Extractor:
    """An extractor from a name (``"boxed"``, ``"regex:Answer: (\\S+)"``) or a user callable.

    A user callable may return ``None`` or ``""`` for "no answer"; that becomes ``INVALID``.
    """
    if callable(spec):
        user = spec

        def extract(text: str) -> str | Invalid:
            out = user(text)
            if out is None or out is INVALID:
                return INVALID
            if not isinstance(out, str):
                raise ParScaleError(f"extractor {getattr(user, '__name__', user)!r} returned "
                                    f"{type(out).__name__}, expected str or None")
            out = out.strip()
            return out if out else INVALID

        extract.__name__ = getattr(user, "__name__", "custom")
        return extract
    if not isinstance(spec, str):
        raise ParScaleError(f"extractor must be a name or a callable, got {type(spec).__name__}")
    if spec.startswith("regex:"):
        return regex(spec[len("regex:"):])
    try:
        return EXTRACTORS[spec]
    except KeyError:
        raise ParScaleError(f"unknown extractor {spec!r}; known: {', '.join(EXTRACTORS)}, regex:PATTERN") from None


def extract_answers(samples: Iterable["Sample"], extractor: "str | Callable" = "last_number") -> None:
    """Fill ``sample.answer`` in place. A pruned row never finished, so its answer is INVALID."""
    extract = get_extractor(extractor)
    for s in samples:
        s.answer = INVALID if s.finish_reason == "pruned" else extract(s.text)
