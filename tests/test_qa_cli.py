"""Bad input to the newer subcommands (convert, chat, serve, eval, tasks, merge-adapter, generate,
train's --init-from flags): exit status 2, ONE stderr line ``parscale CMD: error: ...`` naming the
problem, no traceback, nothing created on disk.

One tiny random checkpoint (with a ChatML tokenizer) is built per module and damaged copies of it
are made per case; every case runs in-process (``parscale.cli.main``), so an exception that
escapes fails the test with its traceback. ``serve`` never gets to listen: ``uvicorn.run`` is
replaced by a function that fails the test, so a bad input that slips through is reported, not
served.
"""

import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import run_cli, snapshot
from serving import write_model_dir

BINARY = b"\x00\x01\x02\xff\xfe\x80 binary \x00"
LATIN1 = "caf\xe9 cr\xe8me\n".encode("latin-1")
TRUNCATED_GGUF = b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + b"\x05\x00"  # magic, version, counts, then cut


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny P = 1 checkpoint with stream sets 2 and 4, a ChatML tokenizer and template."""
    return write_model_dir(tmp_path_factory.mktemp("qa") / "tiny", context=64)


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def _cfg(d: Path, **edits) -> None:
    f = d / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(edits)
    f.write_text(json.dumps(cfg))


# Each fixture maker turns (tmp_path, base) into a path to pass; all live under tmp_path.
def make(kind: str, tmp: Path, base: Path) -> Path:
    if kind == "model":
        return _copy(base, tmp / "model")
    if kind == "missing":
        return tmp / "absent"
    if kind == "textfile":
        (tmp / "notes.txt").write_text("just some text\n")
        return tmp / "notes.txt"
    if kind == "binfile":
        (tmp / "blob.bin").write_bytes(BINARY)
        return tmp / "blob.bin"
    if kind == "emptyfile":
        (tmp / "empty.txt").write_bytes(b"")
        return tmp / "empty.txt"
    if kind == "latin1file":
        (tmp / "latin.txt").write_bytes(LATIN1)
        return tmp / "latin.txt"
    if kind == "emptydir":
        (tmp / "emptydir").mkdir()
        return tmp / "emptydir"
    d = _copy(base, tmp / kind)
    if kind == "no-tokenizer":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer_config.json").unlink()
    elif kind == "bin-config":
        (d / "config.json").write_bytes(BINARY)
    elif kind == "latin1-config":
        (d / "config.json").write_bytes(LATIN1)
    elif kind == "empty-config":
        (d / "config.json").write_bytes(b"")
    elif kind == "array-config":
        (d / "config.json").write_text("[1, 2]")
    elif kind == "bin-tokenizer":
        (d / "tokenizer.json").write_bytes(BINARY)
    elif kind == "latin1-tokenizer":
        (d / "tokenizer.json").write_bytes(LATIN1)
    elif kind == "empty-tokenizer":
        (d / "tokenizer.json").write_bytes(b"")
    elif kind == "bin-tokenizer-config":
        (d / "tokenizer_config.json").write_bytes(BINARY)
    elif kind == "bin-safetensors":
        (d / "model.safetensors").write_bytes(BINARY * 4)
    elif kind == "no-weights":
        (d / "model.safetensors").unlink()
    elif kind == "no-template":
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif kind == "raising-template":
        _cfg(d, chat_template="{{ raise_exception('this template refuses every conversation') }}")
    elif kind == "broken-template":
        _cfg(d, chat_template="{% for m in messages %}{{ m.content ")
    elif kind == "undefined-template":
        _cfg(d, chat_template="{{ messages[0].content.nope() }}")
    elif kind == "bin-gguf":
        d = tmp / "x.gguf"
        d.write_bytes(BINARY)
    else:
        raise AssertionError(kind)
    return d


def _gguf(kind: str, tmp: Path) -> Path:
    f = tmp / f"{kind}.gguf"
    f.write_bytes({"bin": BINARY, "empty": b"", "text": b"hello, not a model\n", "truncated": TRUNCATED_GGUF,
                   "magic-only": b"GGUF"}[kind])
    return f


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    def no_listen(*a, **k):
        raise AssertionError("serve got past validation and tried to listen")

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", no_listen)
    monkeypatch.setattr(uvicorn.Server, "run", no_listen)


def refuse(argv, capsys, root: Path, expect: str | tuple, *, stdin: bytes | None = None, monkeypatch=None):
    """rc 2, one stderr line ``parscale CMD: error: ...`` containing ``expect``, ``root`` unchanged."""
    before = snapshot(root)
    rc, out, err = run_cli(argv, capsys)
    lines = err.splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"parscale {argv[0]}: error:"), lines[0]
    expects = (expect,) if isinstance(expect, str) else expect
    assert any(e.lower() in lines[0].lower() for e in expects), (expects, lines[0])
    assert snapshot(root) == before, "the refused command changed files on disk"
    return lines[0]


# --------------------------------------------------------------------------- model directories
MODEL_DIR_CASES = [  # (kind, what the line must say)
    ("missing", ("no such file", "does not exist", "not found")),
    ("textfile", ("not a directory", "not a checkpoint", "config.json", "is a file")),
    ("emptydir", ("config.json",)),
    ("bin-config", ("config.json",)),
    ("latin1-config", ("config.json",)),
    ("empty-config", ("config.json",)),
    ("array-config", ("config.json",)),
    ("bin-safetensors", ("safetensors",)),
    ("no-weights", ("safetensors", "weights")),
]

TOKENIZER_CASES = [
    ("no-tokenizer", "tokenizer.json"),
    ("bin-tokenizer", "tokenizer.json"),
    ("latin1-tokenizer", "tokenizer.json"),
    ("empty-tokenizer", "tokenizer.json"),
    ("bin-tokenizer-config", "tokenizer_config.json"),
]

TEMPLATE_CASES = [
    ("no-template", "chat template"),
    ("raising-template", "refuses every conversation"),
    ("broken-template", "chat template"),
    ("undefined-template", "chat template"),
]


def _argv(cmd: str, model: Path, tmp: Path) -> list:
    data = tmp / "held_out.txt"
    data.write_text("Hello, world! The quick brown fox jumps over the lazy dog.\n" * 4)
    return {"generate": ["generate", "--model", model, "--prompt", "Hello", "--max-new-tokens", "2", "--threads", "1"],
            "generate-chat": ["generate", "--model", model, "--chat", "--prompt", "Hi", "--max-new-tokens", "2",
                              "--threads", "1"],
            "chat": ["chat", "--model", model, "--max-new-tokens", "2", "--threads", "1"],
            "serve": ["serve", "--model", model, "--threads", "1", "--device", "cpu", "--port", "0"],
            "eval": ["eval", "--model", model, "--data", data, "--threads", "1", "--device", "cpu"],
            }[cmd]


@pytest.mark.parametrize("cmd", ["generate", "generate-chat", "chat", "serve", "eval"])
@pytest.mark.parametrize("kind,expect", MODEL_DIR_CASES + TOKENIZER_CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_model_dirs(cmd, kind, expect, tmp_path, base, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Stdin(b"hello\n"))
    model = make(kind, tmp_path, base)
    refuse(_argv(cmd, model, tmp_path), capsys, tmp_path, expect)


@pytest.mark.parametrize("cmd", ["generate-chat", "chat"])
@pytest.mark.parametrize("kind,expect", TEMPLATE_CASES)
def test_bad_chat_templates(cmd, kind, expect, tmp_path, base, capsys, monkeypatch):
    """A template that is missing, does not compile, or raises on a plain conversation is named
    before any reply is attempted (chat: not once per line with exit status 0)."""
    monkeypatch.setattr("sys.stdin", _Stdin(b"hello\nagain\n"))
    model = make(kind, tmp_path, base)
    refuse(_argv(cmd, model, tmp_path), capsys, tmp_path, expect)


class _Stdin:
    """A piped stdin with a binary buffer (what `chat` reads)."""

    def __init__(self, data: bytes):
        import io

        self.buffer = io.BytesIO(data)

    def isatty(self):
        return False

    def readline(self):
        return self.buffer.readline().decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- numeric flags
NAN, INF = "nan", "inf"
NUMERIC = {  # cmd -> [(extra argv, what the line must say)]
    "generate": [
        (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--max-new-tokens", "1000000000"], "--max-new-tokens"),
        (["--num-return-sequences", "0"], "--num-return-sequences"),
        (["--num-return-sequences", "1000000000"], ("--num-return-sequences", "--max-new-tokens", "memory")),
        (["--streams", "0"], "--streams"), (["--streams", "3"], "stream set"),
        (["--do-sample", "--temperature", "0"], "--temperature"),
        (["--do-sample", "--temperature", "-1"], "--temperature"),
        (["--do-sample", "--temperature", NAN], "--temperature"),
        (["--do-sample", "--temperature", INF], "--temperature"),
        (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", NAN], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--seed", str(2**70)], "--seed"), (["--seed", str(-2**63 - 1)], "--seed"),
        (["--max-new-tokens", "x"], "invalid int"),
    ],
    "chat": [
        (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--max-new-tokens", "1000000000"], ("--max-new-tokens", "context")),
        (["--streams", "0"], "--streams"), (["--streams", "3"], "stream set"),
        (["--do-sample", "--temperature", "0"], "--temperature"),
        (["--do-sample", "--temperature", NAN], "--temperature"),
        (["--do-sample", "--temperature", INF], "--temperature"),
        (["--top-p", NAN], "--top-p"), (["--top-p", "2"], "--top-p"), (["--top-k", "-2"], "--top-k"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--repetition-penalty", NAN], "--repetition-penalty"),
        (["--repetition-penalty", INF], "--repetition-penalty"),
        (["--seed", str(2**70)], "--seed"),
    ],
    "serve": [
        (["--port", "-1"], "--port"), (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"), (["--max-batch", "-1"], "--max-batch"),
        (["--max-queue", "0"], "--max-queue"),
        (["--max-tokens-per-request", "0"], "--max-tokens-per-request"),
        (["--streams", "0"], "--streams"), (["--streams", "3"], "stream set"),
        (["--device", "bogus"], "--device"), (["--device", "cuda:7"], ("--device", "cuda")),
        (["--threads", "0"], "--threads"),
        (["--served-model-name", ""], "--served-model-name"),
    ],
    "eval": [
        (["--seq-len", "0"], "--seq-len"), (["--seq-len", "-5"], "--seq-len"),
        (["--seq-len", "100000000"], "--seq-len"),
        (["--batch-size", "0"], "--batch-size"), (["--batch-size", "1000000000"], "--batch-size"),
        (["--max-tokens", "1"], "--max-tokens"), (["--max-tokens", "-1"], "--max-tokens"),
        (["--streams", "0"], "--streams"), (["--streams", "3"], "stream set"),
        (["--field", "nope"], "field"),
    ],
}


@pytest.mark.parametrize("cmd,extra,expect", [(c, e, x) for c, cases in NUMERIC.items() for e, x in cases],
                         ids=lambda x: " ".join(x) if isinstance(x, list) else (x if isinstance(x, str) else ""))
def test_bad_numbers(cmd, extra, expect, tmp_path, base, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Stdin(b"hello\n"))
    model = make("model", tmp_path, base)
    argv = _argv(cmd, model, tmp_path)
    if cmd == "eval" and extra[0] == "--field":
        (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
        argv[argv.index("--data") + 1] = tmp_path / "docs.jsonl"
    refuse(argv + extra, capsys, tmp_path, expect)


# --------------------------------------------------------------------------- eval --data
@pytest.mark.parametrize("data,expect", [
    ("missing", "no such file"), ("emptydir", "directory"), ("binfile", "binary"), ("latin1file", "UTF-8"),
    ("emptyfile", "no text"),
])
def test_eval_bad_data(data, expect, tmp_path, base, capsys):
    model = make("model", tmp_path, base)
    path = make(data, tmp_path, base)
    refuse(["eval", "--model", model, "--data", path, "--threads", "1", "--device", "cpu"], capsys, tmp_path, expect)


@pytest.mark.parametrize("text,expect", [
    ('{"text": "ok"}\n{"text": 3}\n', ":2:"), ("[1, 2]\n", ":1:"), ('{"text": "a"\n', ":1:"),
    ('{"other": "x"}\n', "'text'"), ("\n\n", "no text"),
])
def test_eval_bad_jsonl(text, expect, tmp_path, base, capsys):
    model = make("model", tmp_path, base)
    (tmp_path / "d.jsonl").write_text(text)
    refuse(["eval", "--model", model, "--data", "d.jsonl", "--threads", "1", "--device", "cpu"],
           capsys, tmp_path, expect)


# --------------------------------------------------------------------------- convert
@pytest.mark.parametrize("kind,expect", [
    ("bin", "not a GGUF file"), ("empty", ("not a GGUF", "truncated", "empty")), ("text", "not a GGUF file"),
    ("truncated", "truncated"), ("magic-only", ("truncated", "not a readable GGUF")),
])
def test_convert_bad_gguf(kind, expect, tmp_path, capsys):
    refuse(["convert", _gguf(kind, tmp_path), "--out", "out"], capsys, tmp_path, expect)


@pytest.mark.parametrize("src,expect", [("missing", "no such file"), ("emptydir", "directory")])
def test_convert_bad_source(src, expect, tmp_path, base, capsys):
    refuse(["convert", make(src, tmp_path, base), "--out", "out"], capsys, tmp_path, expect)


UNWRITABLE_DIRS = [  # --out values that cannot be a directory (tmp_path has a file 'afile')
    ("afile", "not a directory"), ("afile/sub", "not a directory"), ("/proc/parscale-qa", ("cannot write", "writable")),
    ("", "empty"),
]


@pytest.mark.parametrize("out,expect", UNWRITABLE_DIRS)
def test_convert_unwritable_out(out, expect, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    refuse(["convert", _gguf("bin", tmp_path), "--out", out], capsys, tmp_path, expect)


# --------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("extra,expect", [
    (["--task", "bogus"], "bogus"), (["--n", "0"], "--n"), (["--n", "-1"], "--n"),
    (["--n", "1000000000000"], "--n"), (["--difficulty", "0"], "difficulty"),
    (["--difficulty", "-1"], "difficulty"), (["--difficulty", "100000"], "difficulty"),
    (["--eval-problems", "-1"], "--eval-problems"), (["--eval-problems", "1000000000000"], "--eval-problems"),
    (["--out", "adir"], "directory"), (["--out", "afile/x.jsonl"], "not a directory"),
    (["--out", "/proc/qa.jsonl"], ("cannot write", "writable")), (["--eval-out", "out.jsonl"], "differ"),
    (["--eval-out", "adir"], "directory"),
])
def test_tasks_bad_flags(extra, expect, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    argv = ["tasks", "--task", "arithmetic", "--n", "10", "--out", "out.jsonl"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    refuse(argv, capsys, tmp_path, expect)


# --------------------------------------------------------------------------- merge-adapter
@pytest.mark.parametrize("kind,expect", [
    ("missing", ("no such", "missing")), ("textfile", ("not a directory", "adapter")), ("emptydir", "adapter_config.json"),
    ("model", "adapter_config.json"),
])
def test_merge_adapter_bad_adapter(kind, expect, tmp_path, base, capsys):
    refuse(["merge-adapter", make(kind, tmp_path, base), "--out", "merged"], capsys, tmp_path, expect)


@pytest.mark.parametrize("content,expect", [(BINARY, "adapter_config.json"), (LATIN1, "adapter_config.json"),
                                            (b"[1]", "adapter_config.json"), (b"{}", "adapter_config.json")])
def test_merge_adapter_bad_adapter_config(content, expect, tmp_path, capsys):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_bytes(content)
    refuse(["merge-adapter", tmp_path / "ad", "--out", "merged"], capsys, tmp_path, expect)


# --------------------------------------------------------------------------- train --init-from
@pytest.mark.parametrize("kind,expect", MODEL_DIR_CASES[:7])
def test_train_bad_init_from(kind, expect, tmp_path, base, capsys):
    (tmp_path / "t.txt").write_text("some text to train on\n" * 200)
    refuse(["train", "--init-from", make(kind, tmp_path, base), "--data", "t.txt", "--streams", "2",
            "--steps", "1", "--out", "run", "--threads", "1"], capsys, tmp_path, expect)


@pytest.mark.parametrize("extra,expect", [
    (["--fsdp"], ("--fsdp", "torchrun")),
    (["--freeze-backbone"], ("--freeze-backbone", "--init-from")),
])
def test_train_flags_needing_context(extra, expect, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text to train on\n" * 200)
    refuse(["train", "--data", "t.txt", "--size", "tiny", "--steps", "1", "--out", "run", "--threads", "1",
            *extra], capsys, tmp_path, expect)


# --------------------------------------------------------------------------- more paths
@pytest.mark.parametrize("out,expect", UNWRITABLE_DIRS)
def test_merge_adapter_unwritable_out(out, expect, tmp_path, base, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    refuse(["merge-adapter", tmp_path / "ad", "--out", out], capsys, tmp_path, expect)


@pytest.mark.parametrize("cmd", ["generate", "chat", "eval"])
@pytest.mark.parametrize("tok,expect", [("missing", ("no such", "not found", "no tokenizer")),
                                        ("binfile", "tokenizer"), ("emptydir", "tokenizer.json")])
def test_bad_tokenizer_flag(cmd, tok, expect, tmp_path, base, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Stdin(b"hello\n"))
    model = make("model", tmp_path, base)
    refuse(_argv(cmd, model, tmp_path) + ["--tokenizer", make(tok, tmp_path, base)], capsys, tmp_path, expect)


@pytest.mark.parametrize("ids,expect", [("a b", "--ids"), ("99999", "outside the vocabulary"),
                                        ("-1", "outside the vocabulary"), ("", "empty"), (" , ", "empty")])
def test_generate_bad_ids(ids, expect, tmp_path, base, capsys):
    model = make("model", tmp_path, base)
    refuse(["generate", "--model", model, "--ids", ids, "--threads", "1"], capsys, tmp_path, expect)


def test_serve_gguf_file_needs_convert(tmp_path, capsys):
    refuse(["serve", "--model", _gguf("bin", tmp_path)], capsys, tmp_path, "convert")


@pytest.mark.parametrize("text", [b"\xff\xfe\xfd\n", b"\x00\x00\n", b"caf\xe9\n"])
def test_chat_binary_stdin_skips_the_line(text, tmp_path, base, capsys, monkeypatch):
    """An undecodable line is skipped with one note; the chat goes on and ends cleanly."""
    monkeypatch.setattr("sys.stdin", _Stdin(text + b"Hi\n"))
    model = make("model", tmp_path, base)
    rc, out, err = run_cli(["chat", "--model", model, "--max-new-tokens", "2", "--threads", "1"], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert err.count("not valid UTF-8") == (0 if text.startswith(b"\x00") else 1), err
    assert out.endswith("\n")


def test_serve_port_in_use_and_unknown_host(tmp_path, base, capsys):
    """Said in one line before the model loads (not uvicorn's ERROR line and exit status 3)."""
    import socket

    model = make("model", tmp_path, base)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        refuse(["serve", "--model", model, "--port", port, "--threads", "1", "--device", "cpu"], capsys, tmp_path,
               "cannot listen")
    finally:
        taken.close()
    refuse(["serve", "--model", model, "--host", "no.such.host.invalid", "--threads", "1", "--device", "cpu"],
           capsys, tmp_path, "--host")


@pytest.mark.parametrize("cmd", ["generate", "generate-chat", "chat", "eval"])
def test_a_gguf_model_without_tokenizer_says_convert(cmd, tmp_path, capsys, monkeypatch):
    """A .gguf as --model loads (P = 1), but its tokenizer needs `parscale convert`: say so (not
    "not a valid tokenizer.json"). The header is not read: any bytes named .gguf show it."""
    monkeypatch.setattr("sys.stdin", _Stdin(b"hello\n"))
    refuse(_argv(cmd, _gguf("truncated", tmp_path), tmp_path), capsys, tmp_path, "parscale convert")


def test_merged_adapter_keeps_the_chat_template_and_eos(tmp_path, base, capsys, monkeypatch):
    """merge-adapter's output chats like its base: tokenizer_config.json (chat template, EOS) and
    generation_config.json come along, not only tokenizer.json."""
    import torch

    from parscale import ParScaleForCausalLM, Tokenizer
    from parscale.recycle import save_adapter, weights_hash

    b = make("model", tmp_path, base)
    (b / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    model = ParScaleForCausalLM.from_pretrained(b)
    model.add_stream_set(2, snippets=torch.arange(6).view(2, 3))
    save_adapter(model, tmp_path / "ad", base=str(b), base_sha256=weights_hash(b))
    assert not (tmp_path / "ad" / "tokenizer_config.json").exists()  # the base's is the one to take
    assert run_cli(["merge-adapter", tmp_path / "ad", "--out", tmp_path / "merged"], capsys)[0] == 0
    merged = tmp_path / "merged"
    assert Tokenizer.from_pretrained(merged).chat_template == Tokenizer.from_pretrained(b).chat_template
    assert ParScaleForCausalLM.from_pretrained(merged).generation_config.eos_token_id == [2, 0]
    monkeypatch.setattr("sys.stdin", _Stdin(b"Hi\n"))
    rc, out, err = run_cli(["chat", "--model", merged, "--streams", "2", "--max-new-tokens", "2", "--threads", "1"],
                           capsys)
    assert rc == 0 and err == "", err


@pytest.mark.parametrize("prefix,expect", [("0", "must be >= 1"), ("1000000000", "--prefix-tokens")])
def test_train_init_from_plain_backbone_bad_prefix_tokens(prefix, expect, tmp_path, tmp_path_factory, capsys,
                                                         monkeypatch):
    """A plain backbone takes this run's --prefix-tokens: 0 with P > 1 was a torch.cat traceback
    (and a run folder left behind), 1e9 an endless allocation."""
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path_factory.mktemp("token-cache")))  # a cache may fill
    plain = write_model_dir(tmp_path / "plain", streams=(), context=64)
    (tmp_path / "t.txt").write_text("some text to train on, and more of it.\n" * 100)
    refuse(["train", "--init-from", plain, "--data", "t.txt", "--streams", "2", "--steps", "1", "--out", "run",
            "--threads", "1", "--quiet", "--prefix-tokens", prefix], capsys, tmp_path, expect)
