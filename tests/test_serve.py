"""`parscale serve` over HTTP on 127.0.0.1 with the official openai client and a tiny random model.

Expected outputs come from an independent path: ``decode()`` on a second copy of the model and the
tokenizer run by the test, never from the server itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from parscale import ParScaleForCausalLM
from parscale.generation import decode
from parscale.serve import load_tokenizer
from serving import LocalServer, write_model_dir

MAX_TOKENS = 48  # the server's --max-tokens-per-request
CONTEXT = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("serve") / "tiny", context=CONTEXT)


@pytest.fixture(scope="module")
def server(model_dir):
    with LocalServer(model_dir, max_batch=16, max_queue=64, max_tokens_per_request=MAX_TOKENS) as s:
        yield s


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One row, one waiting request, no chat template. Each forward sleeps a little, and waits
    while ``small.gate`` is closed (``small.entered`` is set when a forward waits there)."""
    d = write_model_dir(tmp_path_factory.mktemp("serve") / "small", context=CONTEXT, chat_template=False)
    with LocalServer(d, model_id="small", max_batch=1, max_queue=1, max_tokens_per_request=100) as s:
        s.gate, s.entered = threading.Event(), threading.Event()
        s.gate.set()

        def hook(mod, args):
            if not s.gate.is_set():
                s.entered.set()
                s.gate.wait(30)
            time.sleep(0.02)

        s.model.register_forward_pre_hook(hook)
        yield s
        s.gate.set()


def until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def ref(model_dir):
    """An independent copy of the model and tokenizer: what the server should return."""
    model = ParScaleForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    eos = tok.eos_token_ids

    def run(ids, max_tokens, streams=1, **kw):
        model.set_streams(streams)
        res = decode(model, torch.tensor([ids]), max_new_tokens=max_tokens, eos_token_id=eos,
                     return_logprobs=True, **kw)
        toks = res.tokens[0]
        text = tok.decode([t for t in toks if t not in eos], skip_special_tokens=True)
        return toks, text, res.logprobs[0], {"eos": "stop", "length": "length"}[res.finish_reason[0]]

    run.tok = tok
    return run


def chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def post(server, path, body, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                      timeout=30, **kw)


# --------------------------------------------------------------------------- endpoints
def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].streams == [1, 2, 4]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_completion_equals_decode(server, ref):
    prompt = "def fibonacci(n):"
    ids = ref.tok.encode(prompt)
    toks, text, lps, why = ref(ids, 20)
    r = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, logprobs=3)
    (c,) = r.choices
    assert (c.text, c.finish_reason, c.index) == (text, why, 0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(toks)
    assert r.usage.total_tokens == len(ids) + len(toks) and r.object == "text_completion"
    assert c.logprobs.token_logprobs == pytest.approx(lps[: len(c.logprobs.tokens)], abs=1e-5)
    eos = ref.tok.eos_token_ids
    assert c.logprobs.tokens == [ref.tok.decode([t], skip_special_tokens=False) for t in toks if t not in eos]
    for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        # greedy takes the top one; tokens sharing a text (partial UTF-8) share a key
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-6)


def test_completion_prompt_forms_and_n(server, ref):
    a, b = ref.tok.encode("import os"), ref.tok.encode("Hello")
    client = server.client()
    for prompt in (["import os", "Hello"], [a, b]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text for c in r.choices] == [ref(a, 6)[1]] * 2 + [ref(b, 6)[1]] * 2
        assert r.usage.prompt_tokens == len(a) + len(b)
    r = client.completions.create(model="tiny", prompt=a, max_tokens=6, temperature=0)
    assert r.choices[0].text == ref(a, 6)[1]


def test_chat_renders_the_template(server, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = ref.tok.encode(chatml(messages), add_special_tokens=False)
    toks, text, lps, why = ref(ids, 12)
    r = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                logprobs=True, top_logprobs=2)
    (c,) = r.choices
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", text, why)
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"
    assert [e.logprob for e in c.logprobs.content] == pytest.approx(lps[: len(c.logprobs.content)], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in c.logprobs.content)
    # max_completion_tokens is the chat name of max_tokens; content parts are joined
    r = server.client().chat.completions.create(
        model="tiny", messages=[messages[0], {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                          {"type": "text", "text": "there"}]}],
        max_completion_tokens=12, temperature=0)
    assert r.choices[0].message.content == text


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_equals_the_whole_response(server, chat):
    client = server.client()
    kw = dict(model="tiny", max_tokens=16, temperature=0.8, seed=3, n=2)
    if chat:
        kw["messages"] = [{"role": "user", "content": "Tell me about Ünïcödé"}]
        whole = client.chat.completions.create(**kw)
        texts = [c.message.content for c in whole.choices]
        stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    else:
        kw["prompt"] = "The quick brown"
        whole = client.completions.create(**kw)
        texts = [c.text for c in whole.choices]
        stream = client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    got, finish, usage, roles = ["", ""], [None, None], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            if chat:
                got[c.index] += c.delta.content or ""
                roles += [c.delta.role] if c.delta.role else []
            else:
                got[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert got == texts and texts[0] != texts[1]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert roles == (["assistant", "assistant"] if chat else [])


def test_stream_is_server_sent_events_ending_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them(server, ref, stream):
    ids = ref.tok.encode("for i in range(10):")
    _, text, _, _ = ref(ids, 30)
    start = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i: i + 2])
    stop = text[start: start + 2]
    expect = text[: text.index(stop)]
    client = server.client()
    kw = dict(model="tiny", prompt="for i in range(10):", max_tokens=30, temperature=0, stop=[stop, "never-seen"])
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert (got, reason) == (expect, ["stop"])
    else:
        c = client.completions.create(**kw).choices[0]
        assert (c.text, c.finish_reason) == (expect, "stop")


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    kw = dict(model="tiny", prompt="import sys", max_tokens=12, temperature=1.0, top_p=0.9, n=3)
    a = [c.text for c in client.completions.create(seed=5, **kw).choices]
    assert a == [c.text for c in client.completions.create(seed=5, **kw).choices]
    assert a != [c.text for c in client.completions.create(seed=6, **kw).choices]
    b = [c.text for c in client.completions.create(seed=-(2**63), **kw).choices]  # any int64
    assert b == [c.text for c in client.completions.create(seed=-(2**63), **kw).choices] != a
    assert len(set(a)) == 3  # n samples, each its own generator


def test_dynamic_streams_per_request(server, ref):
    ids = ref.tok.encode("Hello")
    client = server.client()
    lps = {}
    for P in (1, 2, 4):
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0, logprobs=0,
                                      extra_body={"streams": P})
        _, text, expect, _ = ref(ids, 10, streams=P)
        lps[P] = r.choices[0].logprobs.token_logprobs
        assert r.choices[0].text == text and lps[P] == pytest.approx(expect[: len(lps[P])], abs=1e-5)
    assert lps[1] != pytest.approx(lps[2], abs=1e-5) and lps[2] != pytest.approx(lps[4], abs=1e-5)


def _request(server, i, *, seeded):
    """Request i of a mixed batch (completions/chat, P, lengths); returns its texts."""
    client = server.client()
    kw = dict(model="tiny", max_tokens=4 + (i * 5) % 13, extra_body={"streams": (1, 2, 4)[i % 3]})
    kw.update(temperature=0.9, seed=100 + i) if seeded else kw.update(temperature=0)
    if i % 2:
        r = client.chat.completions.create(messages=[{"role": "user", "content": f"request {i} " * (1 + i % 4)}], **kw)
        return [c.message.content for c in r.choices]
    r = client.completions.create(prompt=f"def f{i}(x):" + " x" * (i % 5), **kw)
    return [c.text for c in r.choices]


@pytest.mark.parametrize("seeded", [False, True])
def test_a_request_beside_15_others_equals_it_alone(server, seeded):
    alone = [_request(server, i, seeded=seeded) for i in range(16)]
    start = server.engine.steps
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: _request(server, i, seeded=seeded), range(16)))
    assert together == alone
    # they really shared steps: far fewer batch steps than the tokens they produced one by one
    assert server.engine.steps - start < sum(4 + (i * 5) % 13 for i in range(16))
    assert server.wait_idle()["rows"] == 0


# --------------------------------------------------------------------------- bad input
ERRORS = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": True}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "' + b"x" * (33 * 2**20) + b'"}', 413, None),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": "3"}, 400, "logprobs"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, 400, "model"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": [1] * 100, "max_tokens": 40}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": [1] * CONTEXT}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 17}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "n": 9}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "streams": 3}, 400, "streams"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x " * 200}]}, 400,
     "messages"),
]


def test_bad_requests_get_openai_errors_and_disturb_nothing(server):
    for path, body, status, param in ERRORS:
        r = post(server, path, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        assert err["param"] == param, (body, err)
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": "x"}).json()["choices"][0]["text"] is not None
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client().completions.create(model="tiny", prompt="x", max_tokens=0)
    s = server.wait_idle()
    assert (s["running"], s["rows"], s["owned"], s["queued"]) == (0, 0, 0, 0)


def test_unknown_fields_are_ignored(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "foo": {"bar": [1]},
                                          "user": "me"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_chat_without_a_template_is_a_clear_400(small):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        small.client().chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------- faults
def test_disconnect_mid_stream_frees_the_row(small):
    start = small.engine.steps
    with httpx.stream("POST", small.url + "/v1/completions", timeout=30,
                      json={"model": "small", "prompt": "x", "max_tokens": 100, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # the first text chunk: now go away
    s = small.wait_idle(5)
    assert (s["running"], s["rows"], s["owned"]) == (0, 0, 0)
    assert small.engine.steps - start < 60  # freed long before its 100 tokens


def test_disconnect_while_waiting_for_a_whole_response_frees_the_row(small):
    start = small.engine.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 100,
                                                         "seed": 1},  # seeded: no early EOS by chance
                   timeout=0.3)
    s = small.wait_idle(5)
    assert (s["running"], s["rows"], s["owned"]) == (0, 0, 0)
    assert small.engine.steps - start < 60


def test_beyond_the_queue_429(small):
    def slow(tokens):
        return post(small, "/v1/completions", {"model": "small", "prompt": "x", "max_tokens": tokens})

    def fill(pool):
        """The only row taken (its forward held at the gate), the one queue place taken."""
        until(lambda: not any(small.engine.stats()[k] for k in ("running", "queued", "rows")))
        small.entered.clear()
        small.gate.clear()
        busy = pool.submit(slow, 5)
        until(small.entered.is_set)  # the engine is inside the busy request's forward
        waiting = pool.submit(slow, 2)
        until(lambda: small.engine.stats()["queued"] == 1)  # and cannot admit it meanwhile
        return busy, waiting

    try:
        with ThreadPoolExecutor(2) as pool:
            busy, waiting = fill(pool)
            r = slow(2)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            small.gate.set()
            assert busy.result().status_code == 200 and waiting.result().status_code == 200
        with ThreadPoolExecutor(2) as pool:
            fill(pool)
            with pytest.raises(openai.RateLimitError):  # the client's own error class for it
                small.client().completions.create(model="small", prompt="x", max_tokens=2)
            small.gate.set()
    finally:
        small.gate.set()
    s = small.wait_idle()
    assert (s["running"], s["rows"], s["owned"]) == (0, 0, 0)


def test_a_request_that_fails_in_the_model_fails_alone(server, ref):
    poison = ref.tok.encode("@@")[0]

    def hook(mod, args):
        if args[0].shape[1] > 1 and bool((args[0] == poison).any()):  # the poisoned request's prefill
            raise RuntimeError("poisoned prompt")

    h = server.model.register_forward_pre_hook(hook)
    try:
        with ThreadPoolExecutor(4) as pool:
            fine = [pool.submit(_request, server, i, seeded=False) for i in range(3)]
            with pytest.raises(openai.InternalServerError, match="poisoned"):
                server.client().completions.create(model="tiny", prompt="x @@ y", max_tokens=5)
            assert [f.result() for f in fine] == [_request(server, i, seeded=False) for i in range(3)]
    finally:
        h.remove()
    assert server.wait_idle()["rows"] == 0


def test_a_failing_batch_step_fails_its_requests_and_the_server_serves_on(server):
    fired = threading.Event()

    def hook(mod, args):
        if args[0].shape[1] == 1 and not fired.is_set():  # the next decode step of the batch
            fired.set()
            raise RuntimeError("step failed")

    h = server.model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(openai.InternalServerError, match="step failed"):
            server.client().completions.create(model="tiny", prompt="import os\nimport sys", max_tokens=10)
        chunks = list(server.client().completions.create(model="tiny", prompt="x", max_tokens=3, stream=True))
    finally:
        h.remove()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    s = server.wait_idle()
    assert (s["running"], s["rows"], s["owned"]) == (0, 0, 0)


def test_load_64_requests_from_16_clients(server):
    def one(i):
        client = server.client()
        kw = dict(model="tiny", max_tokens=2 + i % 9, temperature=(0, 0.7)[i % 2], n=1 + i % 2,
                  extra_body={"streams": (1, 2, 4)[i % 3]})
        if i % 4 == 0:
            chunks = list(client.completions.create(prompt=f"load {i}", stream=True, **kw))
            return sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == kw["n"]
        r = client.chat.completions.create(messages=[{"role": "user", "content": f"load {i}"}], **kw)
        return len(r.choices) == kw["n"] and r.usage.completion_tokens <= kw["n"] * kw["max_tokens"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    assert all(results)
    s = server.wait_idle()
    assert (s["running"], s["rows"], s["owned"], s["queued"]) == (0, 0, 0, 0)


# --------------------------------------------------------------------------- the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_loop_runs_in_the_calling_thread(model_dir, ref):
    """``Engine.host`` + ``run``: the loop (every forward) runs in the thread that calls ``run``
    (``parscale serve``: the one that loaded the model; a second thread's OpenMP pool halved the
    decode speed), the app's start-up starts no thread, and ``shutdown`` from another thread
    drains and ends ``run``. The text equals the reference decode."""
    import asyncio

    from parscale.serve import build_app
    from parscale.serve.engine import Done, Finish, Job

    model, tok = ParScaleForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir)
    _, engine = build_app(model, tok, model_id="tiny")
    threads = set()
    model.register_forward_pre_hook(lambda mod, args: threads.add(threading.current_thread()))
    ids = tok.encode("def add(a, b):")
    got = {}

    def client():
        async def go():
            job = Job(prompts=[ids], max_tokens=12, temperature=0.0, loop=asyncio.get_running_loop(),
                      events=asyncio.Queue())
            engine.start()  # the app's start-up: a no-op for a hosted engine
            engine.submit(job)
            while not isinstance(ev := await job.events.get(), Done):
                if isinstance(ev, Finish):
                    got["text"] = ev.text
        try:
            asyncio.run(go())
        finally:
            got["drained"] = engine.shutdown(timeout=30)

    engine.host()
    t = threading.Thread(target=client)
    t.start()
    engine.run()  # returns once the client's shutdown has drained it
    t.join(30)
    assert threads == {threading.current_thread()} and engine._thread is None
    assert got == {"text": ref(ids, 12)[1], "drained": True}
    with pytest.raises(Exception, match="shutting down"):
        engine.submit(Job(prompts=[ids], max_tokens=1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_a_signal_drains_running_requests(model_dir, sig):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "parscale.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--threads", "1", "--served-model-name", "tiny", "--max-tokens-per-request",
                             "100"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        streams = [client.completions.create(model="tiny", prompt=f"drain {i}", max_tokens=100, temperature=0,
                                             stream=True) for i in range(4)]
        firsts = [next(iter(s)) for s in streams]  # every request is running
        proc.send_signal(sig)
        for first, s in zip(firsts, streams):
            chunks = [first, *s]
            assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "drained" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_flags(tmp_path, model_dir):
    from parscale.cli import main

    assert main(["serve", "--model", str(tmp_path), "--port", "1"]) == 2  # no tokenizer.json
    assert main(["serve", "--model", str(model_dir), "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--port", "70000"]) == 2


def test_text_stream_holds_back_a_possible_stop_string(model_dir):
    from parscale.serve.engine import TextStream

    tok = load_tokenizer(model_dir)
    text = "for i in range(10): Ünïcödé €"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # no stop strings: the pieces join to the text, and no piece ends inside a character
    ts = TextStream(tok, [])
    pieces = []
    for t in ids:
        assert not ts.push(t)
        pieces.append(ts.delta())
    pieces.append(ts.delta(final=True))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    # a stop string spanning tokens: nothing of it is ever handed out, the text ends before it
    ts, out, stopped = TextStream(tok, ["ge(1", "never"]), "", False
    for t in ids:
        stopped = ts.push(t)
        out += ts.delta()
        assert "ge(" not in out
        if stopped:
            break
    out += ts.delta(final=True)
    assert stopped and out == "for i in ran"
