"""OpenAI's request and response schemas for completions and chat completions.

``parse_completion`` / ``parse_chat`` check a decoded JSON body field by field (types first, then
ranges and the model's limits) and return a :class:`parscale.serve.engine.Job` plus what the
response needs; any problem raises :class:`APIError` naming the field (``param``), which the app
turns into OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``. As OpenAI
does, unknown fields are ignored; known fields of the wrong type are refused. The builders below
write the response objects and stream chunks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..errors import ParScaleError
from .engine import Finish, Job, TokenInfo

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_TOP_LOGPROBS = 20


class APIError(ParScaleError):
    """A request the server refuses: HTTP status, OpenAI error type, the offending field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What the served model allows; requests are checked against it."""

    model_id: str
    context: int  # prompt + completion tokens
    vocab_size: int
    max_tokens: int  # per request (--max-tokens-per-request)
    max_rows: int  # prompts × n per request (the batch size)
    streams: list[int]  # the stream sets a request may pick
    default_streams: int


# --------------------------------------------------------------------------- field checks
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}


def _field(body: dict, name: str, kinds: tuple, default=None, *, nullable: bool = True):
    if name not in body or (body[name] is None and nullable):
        return default
    v = body[name]
    ok = any((isinstance(v, k) and not (k in (int, float) and isinstance(v, bool))) for k in kinds)
    if not ok:
        want = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise APIError(f"'{name}' must be {want} (got {type(v).__name__} {v!r:.40})", param=name)
    return float(v) if kinds == (float, int) else v


def _number(body, name, default, lo, hi, *, lo_open=False):
    v = _field(body, name, (float, int), default)
    if v is None:
        return None
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        raise APIError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}] (got {v})", param=name)
    return v


def _int(body, name, default, lo, hi=None):
    v = _field(body, name, (int,), default)
    if v is not None and (v < lo or (hi is not None and v > hi)):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(f"'{name}' must be {bound} (got {v})", param=name)
    return v


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")  # JSON may spell a lone surrogate ("\\ud800"), which no text holds
    except UnicodeEncodeError:
        return False
    return True


def _unsupported(body, name, allowed):
    """Known OpenAI fields we do not implement: accepted only at their neutral value."""
    v = body.get(name)
    if v is not None and v not in allowed:
        raise APIError(f"'{name}' is not supported by this server (got {v!r:.40})", param=name)


def _common(body: dict, limits: Limits) -> dict:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = _field(body, "model", (str,))
    if model is None:
        raise APIError("'model' is required", param="model")
    if model != limits.model_id:
        raise APIError(f"The model '{model}' does not exist (this server has '{limits.model_id}')",
                       status=404, param="model", code="model_not_found")
    stop = _field(body, "stop", (str, list))
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(f"'stop' must be a non-empty string or at most {MAX_STOP} of them", param="stop")
    if not all(_is_unicode(s) for s in stop):
        raise APIError("'stop' must be valid Unicode (it has a lone surrogate)", param="stop")
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,))
    if options is not None and not stream:
        raise APIError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = _field(options or {}, "include_usage", (bool,), False) if options else False
    streams = _int(body, "streams", limits.default_streams, 1)
    if streams not in limits.streams:
        raise APIError(f"'streams': this model has no stream set P={streams} (available: "
                       f"{', '.join(map(str, limits.streams))})", param="streams")
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, None, -2.0, 2.0)
        _unsupported(body, name, (0, 0.0))
    _field(body, "logit_bias", (dict,))
    _unsupported(body, "logit_bias", ({},))
    _field(body, "user", (str,))
    return dict(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                seed=_field(body, "seed", (int,)), stop=stop, n=_int(body, "n", 1, 1),
                stream=stream, include_usage=include_usage, streams=streams)


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None, prompts: list[list[int]],
                limits: Limits, prompt_param: str) -> int:
    """The completion budget: the request's (the last of ``names`` given) or the default, checked
    against the server's per-request limit and the context left after the longest prompt."""
    longest = max(len(p) for p in prompts)
    if longest >= limits.context:
        raise APIError(f"This model's maximum context length is {limits.context} tokens; the prompt has "
                       f"{longest}", param=prompt_param, code="context_length_exceeded")
    given = [(n, _int(body, n, None, 1)) for n in names]
    given = [(n, v) for n, v in given if v is not None]
    if given:
        name, value = given[-1]
        if value > limits.max_tokens:
            raise APIError(f"'{name}' is {value}; this server allows at most {limits.max_tokens} tokens "
                           "per request", param=name)
        if longest + value > limits.context:
            raise APIError(f"This model's maximum context length is {limits.context} tokens; you requested "
                           f"{longest + value} ({longest} in the prompt, {value} for the completion)",
                           param=name, code="context_length_exceeded")
        return value
    room = limits.context - longest
    return min(limits.max_tokens, room, default or room)


def _rows(n: int, prompts: list, limits: Limits) -> None:
    if n * len(prompts) > limits.max_rows:
        raise APIError(f"'n' = {n} for {len(prompts)} prompt(s) asks for {n * len(prompts)} completions; "
                       f"this server runs at most {limits.max_rows} at once", param="n")


def _check_ids(ids: list[int], limits: Limits, param: str) -> list[int]:
    bad = [i for i in ids if not 0 <= i < limits.vocab_size]
    if bad:
        raise APIError(f"token id {bad[0]} is outside the vocabulary (size {limits.vocab_size})", param=param)
    return ids


@dataclass
class Parsed:
    job: Job
    stream: bool
    include_usage: bool


def parse_completion(body: dict, limits: Limits, tokenizer) -> Parsed:
    """``POST /v1/completions``: prompt as a string, a list of strings, token ids or lists of them."""
    c = _common(body, limits)
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError("'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        raw = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in prompt):
        raw = list(prompt)
    else:
        raise APIError("'prompt' must be a string, an array of strings, an array of token ids or an array "
                       "of such arrays (non-empty)", param="prompt")
    prompts = []
    for p in raw:
        if isinstance(p, str) and not _is_unicode(p):
            raise APIError("'prompt' must be valid Unicode (it has a lone surrogate)", param="prompt")
        ids = (tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else _check_ids(p, limits, "prompt"))
        if not ids:
            raise APIError("the prompt is empty", param="prompt")
        prompts.append(list(ids))
    _rows(c["n"], prompts, limits)
    logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    if _field(body, "echo", (bool,), False):
        raise APIError("'echo' is not supported by this server", param="echo")
    _field(body, "suffix", (str,))
    _unsupported(body, "suffix", ("",))
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != c["n"]:
        raise APIError("'best_of' other than 'n' is not supported by this server", param="best_of")
    max_tokens = _max_tokens(body, ("max_tokens",), 16, prompts, limits, "prompt")
    job = Job(prompts=prompts, max_tokens=max_tokens, n=c["n"], temperature=c["temperature"], top_p=c["top_p"],
              seed=c["seed"], stop=c["stop"], top_logprobs=logprobs, streams=c["streams"])
    return Parsed(job, c["stream"], c["include_usage"])


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _message_text(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None:
        if m.get("role") == "assistant":  # OpenAI allows it there (a turn that only called tools)
            return ""
        raise APIError(f"messages[{i}] ({m.get('role')}) needs 'content'", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"messages[{i}].content must be a string or an array of text parts",
                   param=f"messages[{i}].content")


def parse_chat(body: dict, limits: Limits, tokenizer) -> Parsed:
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""
    c = _common(body, limits)
    messages = _field(body, "messages", (list,))
    if not messages:
        raise APIError("'messages' must be a non-empty array", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise APIError(f"messages[{i}] must be an object with a 'role' in {', '.join(_ROLES)}",
                           param=f"messages[{i}].role")
        plain.append({"role": m["role"], "content": _message_text(m, i)})
    if body.get("tools"):
        raise APIError("'tools' are not supported by this server", param="tools")
    fmt = _field(body, "response_format", (dict,))
    if fmt is not None and fmt.get("type") not in (None, "text"):
        raise APIError("'response_format' other than text is not supported by this server",
                       param="response_format")
    if tokenizer.chat_template is None:
        raise APIError("this model has no chat template (no 'chat_template' in its tokenizer_config.json); "
                       "use /v1/completions", param="messages")
    try:  # the template's markup is the model's own: its special tokens are parsed
        ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except ParScaleError as e:
        raise APIError(str(e), param="messages") from None
    if not ids:
        raise APIError("the rendered prompt is empty", param="messages")
    prompts = [list(ids)]
    _rows(c["n"], prompts, limits)
    want = _field(body, "logprobs", (bool,), False)
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise APIError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    max_tokens = _max_tokens(body, ("max_tokens", "max_completion_tokens"), None, prompts, limits,
                             "messages")
    job = Job(prompts=prompts, max_tokens=max_tokens, n=c["n"], temperature=c["temperature"], top_p=c["top_p"],
              seed=c["seed"], stop=c["stop"], top_logprobs=(top or 0) if want else None, streams=c["streams"])
    return Parsed(job, c["stream"], c["include_usage"])


# --------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[TokenInfo]) -> dict:
    """The completions API's log-probs object (parallel arrays). Its top-logprobs maps token text
    to log-prob, so tokens with the same text (e.g. partial UTF-8, shown as U+FFFD) keep the
    likeliest; the chat format lists every token."""
    def top(t: TokenInfo) -> dict:
        out: dict[str, float] = {}
        for _, text, lp in t.top:  # most likely first
            out.setdefault(text, lp)
        return out

    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [top(t) for t in tokens], "text_offset": [t.offset for t in tokens]}


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    """The chat API's log-probs object (one entry per token)."""
    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(t.text, t.logprob), top_logprobs=[entry(s, lp) for _, s, lp in t.top])
                        for t in tokens], "refusal": None}


def completion_choice(f: Finish, with_logprobs: bool) -> dict:
    return {"index": f.index, "text": f.text, "logprobs": completion_logprobs(f.tokens) if with_logprobs else None,
            "finish_reason": f.reason}


def chat_choice(f: Finish, with_logprobs: bool) -> dict:
    return {"index": f.index, "message": {"role": "assistant", "content": f.text, "refusal": None},
            "logprobs": chat_logprobs(f.tokens) if with_logprobs else None, "finish_reason": f.reason}
