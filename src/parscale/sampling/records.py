"""Records of a sample-level scaling run: samples, problems, the cost ledger, and their JSONL file.

A ``SampleSet`` is what the sampler writes and what ``parscale score`` reads. On disk it is JSONL:
the first line is a header object ``{"format": "parscale.samples", "version": 1, "meta": ...,
"ledger": ..., "problems": [...]}``, then one line per ``Sample``. An extracted answer is stored
as a string, or as ``"answer": null, "answer_invalid": true`` for ``INVALID`` (``null`` alone
means "not extracted yet").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..cost import flop_per_byte, get_hardware, kinetics_eflops
from ..errors import ParScaleError
from .answers import INVALID, Invalid

FINISH_REASONS = ("eos", "stop", "length", "pruned")
FORMAT = "parscale.samples"
VERSION = 1


@dataclass
class Sample:
    """One generated answer to one problem."""

    problem_id: int
    index: int  # position among its problem's samples (the sampler's row within the problem)
    token_ids: list[int]
    text: str
    logprobs: list[float]  # log-prob of each chosen token, one per generated token
    finish_reason: str  # "eos" | "stop" | "length" | "pruned"
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    finish_step: int | None = None  # decode step at which the row finished
    wall_s: float | None = None  # seconds from the start of decoding to this row's finish
    answer: str | Invalid | None = None  # None: not extracted yet
    score: float | None = None  # from a scorer / verifier, when one was run

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float:
        """Mean chosen-token log-prob; ``-inf`` (zero confidence) when none were recorded."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else -math.inf

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.answer is INVALID:
            d["answer"] = None
            d["answer_invalid"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        """Validated construction; raises ParScaleError naming the bad field."""
        if not isinstance(d, dict):
            raise ParScaleError(f"a sample must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        invalid = d.pop("answer_invalid", False)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ParScaleError(f"unknown sample field(s): {', '.join(unknown)}")
        missing = [n for n in ("problem_id", "index", "token_ids", "text", "logprobs", "finish_reason")
                   if n not in d]
        if missing:
            raise ParScaleError(f"sample is missing field(s): {', '.join(missing)}")

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ParScaleError(f"sample field '{name}' {what} (got {d.get(name)!r:.80})")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        need(is_int(d["problem_id"]), "problem_id", "must be an integer")
        need(is_int(d["index"]) and d["index"] >= 0, "index", "must be an integer >= 0")
        need(isinstance(d["token_ids"], list) and all(map(is_int, d["token_ids"])), "token_ids",
             "must be a list of integers")
        need(isinstance(d["text"], str), "text", "must be a string")
        need(isinstance(d["logprobs"], list) and all(map(is_num, d["logprobs"])), "logprobs",
             "must be a list of numbers")
        need(d["finish_reason"] in FINISH_REASONS, "finish_reason", f"must be one of {', '.join(FINISH_REASONS)}")
        for name in ("seed", "finish_step"):
            need(d.get(name) is None or is_int(d[name]), name, "must be an integer or null")
        for name in ("temperature", "top_p"):
            need(name not in d or is_num(d[name]), name, "must be a number")
        for name in ("wall_s", "score"):
            need(d.get(name) is None or is_num(d[name]), name, "must be a number or null")
        need(d.get("answer") is None or isinstance(d["answer"], str), "answer", "must be a string or null")
        if invalid:
            need(d.get("answer") is None, "answer", "must be null when answer_invalid is true")
            d["answer"] = INVALID
        return cls(**d)


@dataclass
class Problem:
    id: int
    task: str
    prompt: str
    reference: str  # a canonical correct answer (tasks verify exactly; this is for display / exact match)
    meta: dict[str, Any] = field(default_factory=dict)  # task parameters a verifier needs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Problem":
        if not isinstance(d, dict):
            raise ParScaleError(f"a problem must be a JSON object, got {type(d).__name__}")
        fields = {"id", "task", "prompt", "reference", "meta"}
        unknown, missing = sorted(set(d) - fields), sorted(fields - {"meta"} - set(d))
        if unknown or missing:
            raise ParScaleError(f"problem {d.get('id', '?')}: "
                                + (f"unknown field(s) {', '.join(unknown)}" if unknown else
                                   f"missing field(s) {', '.join(missing)}"))
        if not isinstance(d["id"], int) or isinstance(d["id"], bool):
            raise ParScaleError(f"problem field 'id' must be an integer (got {d['id']!r})")
        for name in ("task", "prompt", "reference"):
            if not isinstance(d[name], str):
                raise ParScaleError(f"problem {d['id']}: field '{name}' must be a string")
        if not isinstance(d.get("meta", {}), dict):
            raise ParScaleError(f"problem {d['id']}: field 'meta' must be an object")
        return cls(d["id"], d["task"], d["prompt"], d["reference"], dict(d.get("meta", {})))


@dataclass
class CostLedger:
    """What a run cost. Counts add up over problems; ``per_problem`` divides them out.

    ``row_steps`` is the real decode work (sum over decode steps of the rows still running), so it
    shrinks when early stopping prunes rows; ``decode_steps`` is the sequential latency in steps.
    ``kv_read_bytes`` is the KV cache read by those row-steps, each at its own context length
    (``parscale.cost.decode_kv_read_bytes``); with a hardware's FLOP/byte ratio it gives
    Kinetics' eFLOPs (:meth:`eflops`). ``kv_bytes_per_value`` is the cache dtype's size; 0 means
    the file predates the field (its reads were not recorded).
    """

    prompt_tokens: int = 0  # counted once per prompt when the prefill is shared by its rows
    generated_tokens: int = 0
    decode_steps: int = 0  # steps until the last row finished
    row_steps: int = 0
    wall_s: float = 0.0
    flops: float = 0.0  # estimate
    kv_read_bytes: float = 0.0  # decode steps' KV-cache reads (prefill not counted)
    streams: int = 1  # P of the model
    params: int = 0  # parameter count of the model (0: unknown)
    kv_bytes_per_value: float = 0  # bytes per cached K/V value (0: not recorded, an older file)

    _COUNTS = ("prompt_tokens", "generated_tokens", "decode_steps", "row_steps", "wall_s", "flops",
               "kv_read_bytes")
    _MODEL = ("streams", "params", "kv_bytes_per_value")  # must agree when ledgers are added (see __add__)

    def _is_empty(self) -> bool:
        return all(getattr(self, n) == 0 for n in self._COUNTS) and self.params == 0

    @property
    def kv_recorded(self) -> bool:
        """Whether the run recorded its KV-cache reads (files written before the field did not)."""
        return self.kv_bytes_per_value > 0

    def eflops(self, hardware="A100-80GB") -> float | None:
        """Kinetics' eFLOPs, ``flops + kv_read_bytes · peak_flops / bandwidth`` of ``hardware``
        (a preset name or ``parscale.cost.Hardware``); None when the reads were not recorded."""
        return kinetics_eflops(self.flops, self.kv_read_bytes, hardware) if self.kv_recorded else None

    def __add__(self, other: "CostLedger") -> "CostLedger":
        if not isinstance(other, CostLedger):
            return NotImplemented
        if self._is_empty():
            return dataclasses.replace(other)
        if other._is_empty():
            return dataclasses.replace(self)
        mine, theirs = (tuple(getattr(x, n) for n in self._MODEL) for x in (self, other))
        # a ledger that recorded no KV reads (kv_bytes_per_value 0 and no bytes, e.g. a policy's
        # own work counted without them) adds as zero reads; two recorded dtypes must agree
        kv = {x.kv_bytes_per_value for x in (self, other) if x.kv_recorded or x.kv_read_bytes}
        if mine[:2] != theirs[:2] or len(kv) > 1:
            raise ParScaleError(f"cannot add cost ledgers of different models (streams/params/"
                                f"kv_bytes_per_value {'/'.join(map(str, mine))} vs "
                                f"{'/'.join(map(str, theirs))})")
        sums = {n: getattr(self, n) + getattr(other, n) for n in self._COUNTS}
        return CostLedger(**sums, streams=self.streams, params=self.params,
                          kv_bytes_per_value=max(self.kv_bytes_per_value, other.kv_bytes_per_value))

    def __radd__(self, other: Any) -> "CostLedger":  # so sum(ledgers) works
        if other == 0:
            return dataclasses.replace(self)
        return NotImplemented

    def per_problem(self, n: int, hardware="A100-80GB") -> dict[str, Any]:
        """Each count divided by ``n`` problems (plus total tokens); streams/params as they are;
        ``eflops`` per problem on ``hardware`` (None when the reads were not recorded), with the
        hardware's name and FLOP/byte ratio."""
        if not isinstance(n, int) or n < 1:
            raise ParScaleError(f"per_problem needs n >= 1 problems (got {n!r})")
        hw = get_hardware(hardware)
        out: dict[str, Any] = {name: getattr(self, name) / n for name in self._COUNTS}
        out["tokens"] = (self.prompt_tokens + self.generated_tokens) / n
        out["streams"], out["params"] = self.streams, self.params
        total = self.eflops(hw)
        out["eflops"] = None if total is None else total / n
        out["hardware"], out["flop_per_byte"] = hw.name, flop_per_byte(hw)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "CostLedger":
        if not isinstance(d, dict):
            raise ParScaleError("header field 'ledger' must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ParScaleError(f"unknown ledger field(s): {', '.join(unknown)}")
        for name, v in d.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ParScaleError(f"ledger field '{name}' must be a number >= 0 (got {v!r})")
        return cls(**d)


@dataclass
class SampleSet:
    """Problems, their samples (a flat list; ``by_problem()`` groups them), cost and run metadata."""

    problems: list[Problem]
    samples: list[Sample]
    ledger: CostLedger = field(default_factory=CostLedger)
    meta: dict[str, Any] = field(default_factory=dict)  # model dir, strategy, n, temperature, seeds, date...

    def __post_init__(self) -> None:
        ids = [p.id for p in self.problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ParScaleError(f"problem id {dup} appears more than once")
        known, seen = set(ids), set()
        for s in self.samples:
            if s.problem_id not in known:
                raise ParScaleError(f"sample {s.index} belongs to unknown problem id {s.problem_id}")
            key = (s.problem_id, s.index)
            if key in seen:
                raise ParScaleError(f"problem {s.problem_id} has two samples with index {s.index}")
            seen.add(key)

    def by_problem(self) -> dict[int, list[Sample]]:
        """Samples of each problem (every problem present, maybe with []), ordered by index."""
        groups: dict[int, list[Sample]] = {p.id: [] for p in self.problems}
        for s in self.samples:
            groups[s.problem_id].append(s)
        for group in groups.values():
            group.sort(key=lambda s: s.index)
        return groups

    def problem(self, problem_id: int) -> Problem:
        for p in self.problems:
            if p.id == problem_id:
                return p
        raise ParScaleError(f"no problem with id {problem_id}")

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "meta": self.meta, "ledger": self.ledger.to_dict(),
                "problems": [p.to_dict() for p in self.problems]}

    def save_jsonl(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same directory, then ``os.replace``)."""
        path = Path(path)
        try:
            lines = [json.dumps(self.header())] + [json.dumps(s.to_dict()) for s in self.samples]
        except (TypeError, ValueError) as e:
            raise ParScaleError(f"sample set is not JSON-serialisable (check meta dicts): {e}") from None
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path

    @classmethod
    def load_jsonl(cls, path: str | os.PathLike) -> "SampleSet":
        from ..paths import jsonl_objects, read_text_file

        path = Path(path)
        text = read_text_file(path, str(path))  # missing, binary, not UTF-8, a device: one line
        header, samples = None, []
        for lineno, obj in jsonl_objects(text, str(path)):
            try:
                if header is None:
                    header = _check_header(obj)
                    problems = [Problem.from_dict(p) for p in header["problems"]]
                    ledger = CostLedger.from_dict(header.get("ledger", {}))
                else:
                    samples.append(Sample.from_dict(obj))
            except ParScaleError as e:
                raise ParScaleError(f"{path}:{lineno}: {e}") from None
        if header is None:
            raise ParScaleError(f"{path}: empty file (expected a header line and samples)")
        try:
            return cls(problems, samples, ledger, dict(header.get("meta", {})))
        except ParScaleError as e:
            raise ParScaleError(f"{path}: {e}") from None


def _check_header(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ParScaleError(f"first line must be a header object with \"format\": \"{FORMAT}\"")
    if obj.get("version") != VERSION:
        raise ParScaleError(f"unsupported sample-file version {obj.get('version')!r} (this reads {VERSION})")
    if not isinstance(obj.get("problems"), list):
        raise ParScaleError("header field 'problems' must be a list")
    if not isinstance(obj.get("meta", {}), dict):
        raise ParScaleError("header field 'meta' must be an object")
    return obj
