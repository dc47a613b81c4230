"""`parscale serve` against a corpus of bad requests and the habits of OpenAI clients.

Every bad request gets a 4xx with OpenAI's error JSON (``{"error": {"message", "type", "param",
"code"}}``, the offending field in ``param``) and leaves the server healthy and idle; what
clients really send (content as a list of text parts, a streamed chat with n, stop, logprobs and
usage) works and equals the non-streamed answer. Runs a tiny random model on 127.0.0.1.
"""

import json

import httpx
import pytest

from serving import LocalServer, write_model_dir

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
COMP = {"model": "tiny", "prompt": "def f", "max_tokens": 3}
C, H = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = write_model_dir(tmp_path_factory.mktemp("qa-serve") / "tiny", context=96)
    with LocalServer(d, max_batch=8, max_queue=16, max_tokens_per_request=32) as s:
        yield s


def send(server, path, body, *, method="POST", content_type="application/json"):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return httpx.request(method, server.url + path, content=content, timeout=30,
                         headers={"Content-Type": content_type} if content_type else {})


def _with(base, **fields):
    return {**base, **fields}


BAD = [  # (path, body, status, param)
    (C, b"{not json", 400, None), (C, b"", 400, None), (C, b"\xff\xfe\x00\x81", 400, None),
    (C, b"[1, 2]", 400, None), (C, b'"text"', 400, None), (C, b"null", 400, None), (C, b"42", 400, None),
    (C, b"[" * 100_000 + b"]" * 100_000, 400, None), (H, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 400, None),
    (C, b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    (C, b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    (C, b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', 400, "temperature"),
    (C, _with(COMP, max_tokens="10"), 400, "max_tokens"), (C, _with(COMP, max_tokens=0), 400, "max_tokens"),
    (C, _with(COMP, max_tokens=-1), 400, "max_tokens"), (C, _with(COMP, max_tokens=10**12), 400, "max_tokens"),
    (C, _with(COMP, max_tokens=2.5), 400, "max_tokens"), (C, _with(COMP, max_tokens=True), 400, "max_tokens"),
    (C, _with(COMP, temperature="hot"), 400, "temperature"), (C, _with(COMP, temperature=-1), 400, "temperature"),
    (C, _with(COMP, top_p=0), 400, "top_p"), (C, _with(COMP, top_p=[1]), 400, "top_p"),
    (C, _with(COMP, n=0), 400, "n"), (C, _with(COMP, n=1000), 400, "n"), (C, _with(COMP, n="2"), 400, "n"),
    (C, _with(COMP, stop=5), 400, "stop"), (C, _with(COMP, stop=["a"] * 10), 400, "stop"),
    (C, _with(COMP, stop=[1]), 400, "stop"), (C, _with(COMP, stop=""), 400, "stop"),
    (C, _with(COMP, stop="\ud800"), 400, "stop"),
    (C, _with(COMP, logprobs="yes"), 400, "logprobs"), (C, _with(COMP, logprobs=True), 400, "logprobs"),
    (C, _with(COMP, logprobs=100), 400, "logprobs"), (C, _with(COMP, logprobs=-1), 400, "logprobs"),
    (C, _with(COMP, seed="x"), 400, "seed"), (C, _with(COMP, seed=1.5), 400, "seed"),
    (C, _with(COMP, stream="yes"), 400, "stream"), (C, _with(COMP, stream_options={"include_usage": True}), 400,
                                                     "stream_options"),
    (C, _with(COMP, model=5), 400, "model"), (C, {"prompt": "x"}, 400, "model"),
    (C, _with(COMP, model="gpt-4o"), 404, "model"), (H, _with(CHAT, model="gpt-4o"), 404, "model"),
    (C, _with(COMP, prompt=""), 400, "prompt"), (C, _with(COMP, prompt=[]), 400, "prompt"),
    (C, _with(COMP, prompt=[[]]), 400, "prompt"), (C, _with(COMP, prompt=5), 400, "prompt"),
    (C, _with(COMP, prompt=[1, "a"]), 400, "prompt"), (C, _with(COMP, prompt=[10**9]), 400, "prompt"),
    (C, _with(COMP, prompt=[-1]), 400, "prompt"), (C, _with(COMP, prompt="\ud800 x"), 400, "prompt"),
    (C, _with(COMP, prompt="x " * 600), 400, "prompt"), (C, _with(COMP, streams=3), 400, "streams"),
    (H, _with(CHAT, messages=[]), 400, "messages"), (H, _with(CHAT, messages="hi"), 400, "messages"),
    (H, _with(CHAT, messages=None), 400, "messages"), (H, _with(CHAT, messages=["hi"]), 400, "messages[0].role"),
    (H, _with(CHAT, messages=[{"content": "x"}]), 400, "messages[0].role"),
    (H, _with(CHAT, messages=[{"role": "user"}]), 400, "messages[0].content"),
    (H, _with(CHAT, messages=[{"role": "user", "content": None}]), 400, "messages[0].content"),
    (H, _with(CHAT, messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    (H, _with(CHAT, messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    (H, _with(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages[0].content"),
    (H, _with(CHAT, messages=[{"role": "user", "content": [{"type": "text"}]}]), 400, "messages[0].content"),
    (H, _with(CHAT, messages=[{"role": "user", "content": "\ud800"}]), 400, "messages"),
    (H, _with(CHAT, logprobs="yes"), 400, "logprobs"), (H, _with(CHAT, logprobs=1), 400, "logprobs"),
    (H, _with(CHAT, top_logprobs=2), 400, "top_logprobs"), (H, _with(CHAT, logprobs=True, top_logprobs=99), 400,
                                                           "top_logprobs"),
    (H, _with(CHAT, max_completion_tokens="4"), 400, "max_completion_tokens"),
    (H, _with(CHAT, max_tokens=10**9), 400, "max_tokens"), (H, _with(CHAT, stop=3), 400, "stop"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_request_is_an_openai_error(server, path, body, status, param):
    r = send(server, path, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("method,path,status", [("GET", C, 405), ("PUT", H, 405), ("POST", "/v1/models", 405),
                                                ("DELETE", "/health", 405), ("GET", "/nope", 404),
                                                ("POST", "/v1/embeddings", 404)])
def test_wrong_method_or_path(server, method, path, status):
    r = send(server, path, b"{}" if method != "GET" else None, method=method)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_after_the_corpus_the_server_is_healthy_and_idle(server):
    for path, body, _, _ in BAD:
        send(server, path, body)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    s = server.wait_idle()
    assert (s["running"], s["rows"], s["owned"], s["queued"]) == (0, 0, 0, 0)
    assert send(server, C, COMP).status_code == 200


def test_an_unexpected_exception_is_a_500_in_openai_json(server, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(server.tokenizer, "encode", boom)
    r = send(server, C, COMP)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert send(server, C, COMP).status_code == 200


# --------------------------------------------------------------------------- what clients send
def test_content_as_text_parts_equals_the_string(server):
    """OpenAI clients send content as [{"type": "text", "text": ...}]; for system and user it is
    the joined text."""
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    parts = [{"role": m["role"], "content": [{"type": "text", "text": w} for w in m["content"].split(" ")]}
             for m in plain]
    for m in parts:  # split on spaces: put them back into the parts
        for p in m["content"][:-1]:
            p["text"] += " "
    a = send(server, H, _with(CHAT, messages=plain, temperature=0, max_tokens=8)).json()
    b = send(server, H, _with(CHAT, messages=parts, temperature=0, max_tokens=8)).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_is_read_whatever_the_content_type(server, content_type):
    """`curl -d '{...}'` without -H sends form-urlencoded: the JSON body is still read (and a
    non-JSON body is still the JSON error)."""
    assert send(server, C, COMP, content_type=content_type).status_code == 200
    r = send(server, C, b"a=1&b=2", content_type=content_type)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_openai_client_streamed_chat_with_everything_equals_the_whole(server):
    client = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}],
              max_tokens=12, temperature=0.9, seed=7, n=2, stop=["zzz", "qqq"], logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    texts, lps, usage, finish = ["", ""], [[], []], None, [None, None]
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            lps[c.index] += [(e.token, e.logprob, len(e.top_logprobs)) for e in (c.logprobs.content if c.logprobs else [])]
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert lps == [[(e.token, e.logprob, len(e.top_logprobs)) for e in c.logprobs.content] for c in whole.choices]
    assert all(n == 2 for row in lps for _, _, n in row)
    assert usage.completion_tokens == whole.usage.completion_tokens >= sum(len(r) for r in lps)  # EOS: no entry
    again = client.chat.completions.create(**kw)  # seeded: the same samples
    assert [c.message.content for c in again.choices] == texts
