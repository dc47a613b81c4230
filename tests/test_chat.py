"""`parscale chat` / `generate --chat`: a tiny random model with a ChatML tokenizer, stdin piped."""

import io
import json

import pytest
import torch

from parscale import ParScaleForCausalLM, Tokenizer
from parscale.cli import main
from parscale.commands.chat import ChatSession
from test_tokenizer import build_tokenizer

TURNS = ["Hello world!", "def add(a, b): ✓", "héllo wörld, hello parscale"]


@pytest.fixture
def chat_dir(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=2, vocab_size=320, stream_sets=[2, 4], eos_token_id=2))
    d = tmp_path / "m"
    model.save_pretrained(d)
    build_tokenizer(d)
    return d


def load(d, streams):
    return ParScaleForCausalLM.from_pretrained(d, streams=streams), Tokenizer.from_pretrained(d)


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_cached_turns_equal_a_fresh_prefill(chat_dir, streams):
    """Each turn prefilled on top of the cache gives exactly the tokens of a full prefill."""
    model, tok = load(chat_dir, streams)
    cached = ChatSession(model, tok, system="Be brief.", max_new_tokens=8)
    fresh = ChatSession(model, tok, system="Be brief.", max_new_tokens=8, reuse_cache=False)
    history = [{"role": "system", "content": "Be brief."}]
    for i, text in enumerate(TURNS):
        a, b = cached.send(text), fresh.send(text)
        history.append({"role": "user", "content": text})
        ids = torch.tensor([tok.apply_chat_template(history, add_generation_prompt=True)])
        ref = model.generate(ids, max_new_tokens=8, eos_token_id=tok.eos_token_ids)[0, ids.shape[1]:].tolist()
        assert a.tokens == b.tokens == ref[: len(a.tokens)]
        history.append({"role": "assistant", "content": a.reply})
        assert b.reused_tokens == 0
        if i:  # the history before this turn came from the cache
            assert a.reused_tokens > 0 and a.reused_tokens >= len(tok.apply_chat_template(history[:2]))


def test_streamed_text_equals_the_full_decode(chat_dir):
    model, tok = load(chat_dir, 2)
    session = ChatSession(model, tok, max_new_tokens=24, do_sample=True, temperature=1.5, seed=3)
    for text in TURNS:
        pieces = []
        turn = session.send(text, on_text=pieces.append)
        assert "".join(pieces) == turn.reply
        assert turn.reply == tok.decode([t for t in turn.tokens if t not in tok.eos_token_ids],
                                        skip_special_tokens=True)
        assert not any(p.endswith("\ufffd") and i < len(pieces) - 1 for i, p in enumerate(pieces))


def test_cli_chat_from_a_pipe(chat_dir, monkeypatch, capsys):
    model, tok = load(chat_dir, 4)
    session = ChatSession(model, tok, system="Be brief.", max_new_tokens=6)
    expect = [session.send(TURNS[0]).reply, session.send(TURNS[1]).reply]
    session.reset()
    expect.append(session.send(TURNS[2]).reply)
    stdin = f"{TURNS[0]}\n\n{TURNS[1]}\n/reset\n{TURNS[2]}\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["chat", "--model", str(chat_dir), "--streams", "4", "--system", "Be brief.",
                 "--max-new-tokens", "6", "--stats"]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(r + "\n" for r in expect)
    assert "history cleared" in out.err and out.err.count("from the cache") == 3
    monkeypatch.setattr("sys.stdin", io.StringIO(TURNS[0]))  # end of input without a newline: exit 0
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "2"]) == 0


def test_generate_chat_is_one_turn(chat_dir, capsys):
    model, tok = load(chat_dir, 2)
    reply = ChatSession(model, tok, system="Be brief.", max_new_tokens=7).send(TURNS[1]).reply
    assert main(["generate", "--model", str(chat_dir), "--chat", "--system", "Be brief.", "--prompt", TURNS[1],
                 "--max-new-tokens", "7"]) == 0
    assert capsys.readouterr().out == reply + "\n"


@pytest.mark.parametrize("argv,msg", [
    (["chat"], "no chat template"),
    (["generate", "--chat", "--prompt", "hi"], "no chat template"),
    (["generate", "--chat", "--ids", "1 2"], "--chat needs --prompt"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["chat", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["chat", "--do-sample", "--temperature", "0"], "--temperature must be > 0"),
    (["chat", "--repetition-penalty", "-1"], "--repetition-penalty must be > 0"),
])
def test_bad_chat_input_is_one_line(chat_dir, capsys, argv, msg):
    cfg = json.loads((chat_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (chat_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main([argv[0], "--model", str(chat_dir), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert main(["chat", "--model", str(chat_dir / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_full_context_is_reported_and_the_session_goes_on(chat_dir, monkeypatch, capsys):
    cfg = json.loads((chat_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = 80
    (chat_dir / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n" + "long " * 60 + "\n/reset\nhi\n"))
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert "no longer fits the model's context (80)" in out.err and out.out.count("\n") >= 2


def test_a_history_that_renders_differently_cuts_the_cache_back(chat_dir):
    """Where the re-rendered history leaves what the cache holds, the cache is cut back there."""
    model, tok = load(chat_dir, 2)
    session = ChatSession(model, tok, max_new_tokens=8)
    fresh = ChatSession(model, tok, max_new_tokens=8, reuse_cache=False)
    session.send(TURNS[0]), fresh.send(TURNS[0])
    cut = len(session.cached) - 5
    session.cached[cut] = -1  # as if the reply had been generated as other tokens than it renders to
    a, b = session.send(TURNS[1]), fresh.send(TURNS[1])
    assert a.reused_tokens == cut and a.tokens == b.tokens


def test_undecodable_input_line_is_skipped(chat_dir, monkeypatch, capsys):
    class Stdin(io.StringIO):  # a pipe: bytes underneath
        buffer = io.BytesIO(b"\xff\xfe bad\nHello world!\n")

    monkeypatch.setattr("sys.stdin", Stdin())
    assert main(["chat", "--model", str(chat_dir), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    model, tok = load(chat_dir, 2)
    reply = ChatSession(model, tok, max_new_tokens=3).send("Hello world!").reply
    assert "not valid UTF-8" in out.err and out.out == reply + "\n"


def test_an_interrupted_reply_leaves_the_session_usable(chat_dir):
    model, tok = load(chat_dir, 2)
    session = ChatSession(model, tok, max_new_tokens=8)
    calls = []

    def stop_midway(piece):
        calls.append(piece)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.send(TURNS[0], on_text=stop_midway)
    assert calls and session.messages == []
    again = session.send(TURNS[1])
    assert again.tokens == ChatSession(model, tok, max_new_tokens=8).send(TURNS[1]).tokens
