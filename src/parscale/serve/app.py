"""The HTTP layer: starlette routes for OpenAI's API on top of the engine.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /health``.
Handlers parse and validate the body (``protocol``), submit a job to the engine and either wait
for its result or stream it as server-sent events (``data: {...}`` chunks, then ``data:
[DONE]``). A client that disconnects cancels its job, which frees its rows at the engine's next
step. Every error is OpenAI's error JSON with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import ParScaleError
from .engine import Delta, Done, Engine, Failed, Finish, QueueFull, ShuttingDown
from .protocol import (APIError, Limits, chat_choice, chat_logprobs, completion_choice, completion_logprobs, new_id,
                       now, parse_chat, parse_completion, usage)


MAX_BODY_BYTES = 32 * 2**20  # a prompt of a million tokens is far below this


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj) -> str:
    return f"data: {_dumps(obj)}\n\n"


class _Chat:
    """What differs between the two generation endpoints."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.prefix = "chatcmpl" if chat else "cmpl"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.parse = parse_chat if chat else parse_completion
        self.choice = chat_choice if chat else completion_choice
        self.logprobs = chat_logprobs if chat else completion_logprobs

    def chunk_choice(self, index: int, text: str | None, tokens, with_logprobs: bool, finish: str | None,
                     first: bool = False) -> dict:
        lp = self.logprobs(tokens) if (with_logprobs and tokens) else None
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}


def create_app(engine: Engine, limits: Limits, tokenizer) -> Starlette:
    """The ASGI app. It starts the engine on startup and drains it on shutdown."""
    created = now()

    async def _json(request: Request) -> dict:
        length = request.headers.get("content-length", "0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise APIError("the request body is not valid JSON") from None
        except RecursionError:
            raise APIError("the request body is not valid JSON (nested too deeply)") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    def _submit(job) -> None:
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(str(e), status=429, type="rate_limit_error", code="rate_limit_exceeded") from None
        except ShuttingDown as e:
            raise APIError(str(e), status=503, type="server_error", code="shutting_down") from None

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": limits.model_id, "object": "model", "created": created, "owned_by": "parscale",
             "streams": limits.streams, "max_model_len": limits.context}]})

    async def health(request: Request) -> JSONResponse:
        s = engine.stats()
        ok = not s["draining"] and engine.error is None
        return JSONResponse({"status": "ok" if ok else "unavailable", "running": s["running"], "queued": s["queued"]},
                            status_code=200 if ok else 503)

    async def _wait_disconnect(request: Request) -> None:
        # the body is read: the next ASGI message is the client going away
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _collect(request: Request, kind: _Chat, parsed) -> JSONResponse:
        job = parsed.job
        finishes: dict[int, Finish] = {}
        watch = asyncio.ensure_future(_wait_disconnect(request))
        completed = False
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client left: stop the work
                    get.cancel()
                    return JSONResponse({}, status_code=499)
                ev = get.result()
                if isinstance(ev, Finish):
                    finishes[ev.index] = ev
                elif isinstance(ev, Failed):
                    completed = True
                    raise APIError(ev.message, status=500, type="server_error")
                elif isinstance(ev, Done):
                    completed = True
                    with_lp = job.top_logprobs is not None
                    return JSONResponse({
                        "id": new_id(kind.prefix), "object": kind.object, "created": now(), "model": limits.model_id,
                        "choices": [kind.choice(finishes[i], with_lp) for i in sorted(finishes)],
                        "usage": usage(ev.prompt_tokens, ev.completion_tokens)})
        finally:
            watch.cancel()
            if not completed:
                engine.cancel(job)

    async def _stream(kind: _Chat, parsed, rid: str):
        job, stamp = parsed.job, now()
        with_lp = job.top_logprobs is not None
        completed = False

        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": kind.chunk_object, "created": stamp, "model": limits.model_id,
                    "choices": choices}
            if parsed.include_usage:
                body["usage"] = None
            body.update(extra)
            return _sse(body)

        try:
            if kind.chat:  # the role comes first, once per choice
                yield chunk([kind.chunk_choice(i, "", [], False, None, first=True) for i in range(job.rows)])
            while True:
                ev = await job.events.get()
                if isinstance(ev, Delta):
                    yield chunk([kind.chunk_choice(ev.index, ev.text, ev.tokens, with_lp, None)])
                elif isinstance(ev, Finish):
                    yield chunk([kind.chunk_choice(ev.index, None, [], False, ev.reason)])
                elif isinstance(ev, Done):
                    completed = True
                    if parsed.include_usage:
                        yield chunk([], usage=usage(ev.prompt_tokens, ev.completion_tokens))
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(ev, Failed):
                    completed = True
                    yield _sse(APIError(ev.message, status=500, type="server_error").body())
                    yield "data: [DONE]\n\n"
                    return
        finally:  # also when the client disconnects (the response task is cancelled)
            if not completed:
                engine.cancel(job)

    def _endpoint(kind: _Chat):
        async def handle(request: Request):
            parsed = kind.parse(await _json(request), limits, tokenizer)
            _submit(parsed.job)
            if parsed.stream:
                return StreamingResponse(_stream(kind, parsed, new_id(kind.prefix)), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await _collect(request, kind, parsed)

        return handle

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def bad_input(request: Request, exc: ParScaleError) -> JSONResponse:
        # bad input found below the protocol checks (the tokenizer, the chat template)
        return JSONResponse(APIError(str(exc)).body(), status_code=400)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # anything else: still OpenAI's error JSON (starlette logs the traceback)
        err = APIError(f"internal error ({type(exc).__name__})", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = APIError(exc.detail or "error", status=exc.status_code,
                       type="invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:  # the server has stopped accepting requests: finish what runs, then stop
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/completions", _endpoint(_Chat(False)), methods=["POST"]),
              Route("/v1/chat/completions", _endpoint(_Chat(True)), methods=["POST"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={APIError: api_error, HTTPException: http_error,
                                         ParScaleError: bad_input, Exception: server_error})
