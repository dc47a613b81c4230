"""Tests for parscale.data: corpus/split, tokenizer, tokenized cache, deterministic batches."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from parscale.data import (TextTokenizer, TokenBatches, corpus_from_spec, load_corpus, prepare_data,
                           split_value, stdlib_corpus, tokenize_split, validation_windows)
from parscale.data.corpus import TEXT_CHUNK_BYTES, decode_utf8
from parscale.data.tokens import default_cache_dir
from parscale.errors import ParScaleError

CODE = '''def add(a, b):
    """Add two numbers."""
    return a + b


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
'''


def write_tree(root, n=60):
    for i in range(n):
        p = root / f"pkg{i % 3}" / f"mod_{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(CODE.replace("add", f"add{i}") * (1 + i % 4))
    return root


@pytest.fixture(scope="module")
def tiny_tokenizer():
    texts = [CODE.replace("add", f"f{i}") for i in range(30)] + ["héllo wörld ✓ 日本"]
    return TextTokenizer.train(texts, vocab_size=320)


# --------------------------------------------------------------------------- corpus / split
def test_split_is_deterministic_disjoint_and_follows_the_rule(tmp_path):
    write_tree(tmp_path)
    a = load_corpus(tmp_path, val_fraction=0.2)
    b = load_corpus(tmp_path, val_fraction=0.2)
    assert [(d.name, d.split) for d in a.documents] == [(d.name, d.split) for d in b.documents]
    train = {d.name for d in a.split("train")}
    val = {d.name for d in a.split("validation")}
    assert train and val and not (train & val)
    assert train | val == {d.name for d in a.documents} and len(a.documents) == 60
    for d in a.documents:  # the documented rule, exactly
        assert (d.split == "validation") == (split_value(d.name) < 0.2)
    assert a.fingerprint() == b.fingerprint() and a.fingerprint("train") != a.fingerprint("validation")


def test_split_fraction_is_roughly_val_fraction():
    vals = np.array([split_value(f"dir/file_{i}.py") for i in range(20000)])
    assert abs((vals < 0.05).mean() - 0.05) < 0.006
    assert split_value("a/b.py") == int(hashlib.sha1(b"a/b.py").hexdigest()[:8], 16) / 2**32


def test_small_corpus_still_gets_one_validation_document(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    c = load_corpus(tmp_path, val_fraction=1e-9)
    assert c.stats.validation_documents == 1 and c.stats.train_documents == 1
    smallest = min(c.documents, key=lambda d: split_value(d.name))
    assert smallest.split == "validation"
    assert load_corpus(tmp_path, val_fraction=0.0).stats.validation_documents == 0


def test_directory_corpus_skips_hidden_binary_and_filters(tmp_path):
    write_tree(tmp_path, n=6)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / ".hidden.py").write_text("x = 1\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "shard.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    c = load_corpus(tmp_path, val_fraction=0.0)
    names = [d.name for d in c.documents]
    assert "notes.md" in names and "shard.jsonl:1" in names and "pkg0/mod_0.py" in names
    assert not any(n.startswith(".") or "/." in n or n == "blob.bin" for n in names)
    assert c.stats.skipped_binary == 1 and c.stats.skipped_empty == 1
    assert [d.name for d in load_corpus(tmp_path, val_fraction=0.0).documents] == names
    assert c.read(next(d for d in c.documents if d.name == "shard.jsonl:1")) == "from jsonl"
    only_py = load_corpus(tmp_path, include="*.py", val_fraction=0.0)
    assert {d.name for d in only_py.documents} == {f"pkg{i % 3}/mod_{i}.py" for i in range(6)}
    assert only_py.read(only_py.documents[0]) == (tmp_path / only_py.documents[0].name).read_text()


def test_jsonl_corpus_lines_blank_and_empty(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"text": "first doc", "id": 1}) + "\n\n"
                 + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "naïve ✓"}) + "\n")
    c = load_corpus(f, val_fraction=0.0)
    assert [d.name for d in c.documents] == ["data.jsonl:1", "data.jsonl:4"]
    assert list(c.texts()) == ["first doc", "naïve ✓"]
    assert c.stats.skipped_empty == 1 and c.documents[1].size == len("naïve ✓".encode())
    assert corpus_from_spec(str(f), val_fraction=0.0).fingerprint() == c.fingerprint()


@pytest.mark.parametrize("line, problem", [
    ('{"text": "ok"', "line 2: not valid JSON"),
    ('{"content": "x"}', "line 2: no 'text' field (keys: content)"),
    ('["text"]', "line 2: expected a JSON object"),
    ('{"text": 3}', "line 2: field 'text' must be a string"),
])
def test_jsonl_bad_lines_are_named(tmp_path, line, problem):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ParScaleError, match="bad.jsonl") as e:
        load_corpus(f)
    assert problem in str(e.value)


def test_text_file_is_chunked_at_lines_and_reassembles(tmp_path):
    f = tmp_path / "book.txt"
    text = "".join(f"line {i} of the book ✓\n" for i in range(12000))  # ~300 KB
    f.write_text(text)
    c = load_corpus(f)
    assert len(c.documents) >= 4 and all(d.name.startswith("book.txt#") for d in c.documents)
    assert "".join(c.texts()) == text
    assert all(c.read(d).endswith("\n") for d in c.documents)
    assert c.stats.validation_documents >= 1 and c.stats.train_documents >= 1
    assert all(d.size >= TEXT_CHUNK_BYTES for d in c.documents[:-1])
    small = tmp_path / "small.txt"
    small.write_text("tiny\n")
    assert [d.name for d in load_corpus(small).documents] == ["small.txt"]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "latin1.py").write_bytes("café = 'é'\n".encode("latin-1"))  # two bad bytes
    c = load_corpus(tmp_path, val_fraction=0.0)
    assert c.stats.replaced_bytes == 2 and c.stats.replaced_documents == 1
    doc = next(d for d in c.documents if d.name == "latin1.py")
    assert c.read(doc) == "caf\ufffd = '\ufffd'\n"
    assert "invalid UTF-8" in c.describe()
    for raw in [b"\xff\xfe\xfd", b"ok\xe2\x82", b"\xf0\x9f\x98\x80 fine", b"a\x80b\xc3"]:
        text, bad = decode_utf8(raw)
        assert text == raw.decode("utf-8", errors="replace")
    assert decode_utf8(b"\xe2\x82")[1] == 2 and decode_utf8(b"\xff\xfe\xfd")[1] == 3


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ParScaleError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ParScaleError, match="empty_dir is empty"):
        load_corpus(tmp_path / "empty_dir")
    (tmp_path / "only_empty").mkdir()
    (tmp_path / "only_empty" / "a.txt").write_text("")
    with pytest.raises(ParScaleError, match="only_empty is empty"):
        load_corpus(tmp_path / "only_empty")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ParScaleError, match="e.jsonl is empty"):
        load_corpus(tmp_path / "e.jsonl")
    write_tree(tmp_path / "tree", n=3)
    with pytest.raises(ParScaleError, match=r"matches \*\.rs"):
        load_corpus(tmp_path / "tree", include="*.rs")
    with pytest.raises(ParScaleError, match="max_bytes=10 is smaller than every document"):
        load_corpus(tmp_path / "tree", max_bytes=10)
    with pytest.raises(ParScaleError, match="val_fraction"):
        load_corpus(tmp_path / "tree", val_fraction=1.5)
    with pytest.raises(ParScaleError, match="unknown split"):
        load_corpus(tmp_path / "tree").split("test")


def test_max_bytes_takes_a_stable_subset(tmp_path):
    write_tree(tmp_path)
    full = load_corpus(tmp_path)
    a, b = load_corpus(tmp_path, max_bytes=3000), load_corpus(tmp_path, max_bytes=3000)
    assert [d.name for d in a.documents] == [d.name for d in b.documents]
    assert 0 < a.stats.bytes <= 3000 and a.stats.capped_documents == 60 - a.stats.documents
    assert {d.name for d in a.documents} < {d.name for d in full.documents}


def test_fingerprint_tracks_content(tmp_path):
    write_tree(tmp_path, n=5)
    before = load_corpus(tmp_path).fingerprint()
    os.utime(tmp_path / "pkg0" / "mod_0.py", (1, 1))  # mtime alone does not matter
    assert load_corpus(tmp_path).fingerprint() == before
    (tmp_path / "pkg0" / "mod_0.py").write_text("changed = True\n")
    assert load_corpus(tmp_path).fingerprint() != before


def test_stdlib_listing_capped():
    c = stdlib_corpus(max_bytes=200_000)
    assert c.name == "stdlib" and 0 < c.stats.bytes <= 200_000
    assert all(d.name.endswith(".py") and "site-packages" not in d.name for d in c.documents)
    assert [d.name for d in stdlib_corpus(max_bytes=200_000).documents] == [d.name for d in c.documents]
    assert corpus_from_spec("stdlib", max_bytes=200_000).fingerprint() == c.fingerprint()


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_and_reserves_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    # at most the requested size: a tiny corpus runs out of pairs seen twice (min_frequency=2)
    assert tok.eos_id == 0 and 257 < tok.vocab_size <= 320
    for s in [CODE, "héllo wörld ✓ 日本 😀\n\t  x", "\ufffd bad", ""]:
        assert tok.decode(tok.encode(s)) == s
    ids = tok.encode("a <|endoftext|> b")  # literal special text is text, not EOS
    assert tok.eos_id not in ids and tok.decode(ids) == "a <|endoftext|> b"
    assert tok.decode([tok.eos_id]) == "<|endoftext|>" and tok.decode([tok.eos_id], skip_special=True) == ""
    assert tok.encode_batch(["def f", "x"]) == [tok.encode("def f"), tok.encode("x")]


def test_tokenizer_save_load_and_deterministic(tiny_tokenizer, tmp_path):
    path = tiny_tokenizer.save(tmp_path / "model")
    assert path.name == "tokenizer.json" and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = TextTokenizer.load(tmp_path / "model")
    assert loaded.fingerprint() == tiny_tokenizer.fingerprint()
    assert loaded.encode(CODE) == tiny_tokenizer.encode(CODE) and loaded.eos_id == 0
    texts = [CODE.replace("add", f"f{i}") for i in range(30)] + ["héllo wörld ✓ 日本"]
    assert TextTokenizer.train(texts, vocab_size=320).fingerprint() == tiny_tokenizer.fingerprint()
    assert TextTokenizer.train(texts, vocab_size=300).fingerprint() != tiny_tokenizer.fingerprint()
    with pytest.raises(ParScaleError, match="tokenizer file .* not found"):
        TextTokenizer.load(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ParScaleError, match="cannot load"):
        TextTokenizer.load(tmp_path / "broken.json")
    with pytest.raises(ParScaleError, match="vocab_size"):
        TextTokenizer.train(texts, vocab_size=100)


# --------------------------------------------------------------------------- tokenized cache
def test_tokenized_cache_layout_and_hit(tmp_path, tiny_tokenizer):
    write_tree(tmp_path / "src", n=12)
    c = load_corpus(tmp_path / "src", val_fraction=0.3)
    cache = tmp_path / "cache"
    first = tokenize_split(c, tiny_tokenizer, "train", cache_dir=cache, progress=False)
    assert not first.from_cache and first.tokens.dtype == np.uint16
    expected = [t for d in c.split("train") for t in tiny_tokenizer.encode(c.read(d)) + [0]]
    assert first.tokens.tolist() == expected and first.n_documents == c.stats.train_documents
    assert first.meta["n_tokens"] == len(expected) and first.tokens_per_second > 0
    mtime = first.path.stat().st_mtime_ns
    second = tokenize_split(c, tiny_tokenizer, "train", cache_dir=cache, progress=False)
    assert second.from_cache and second.seconds == 0.0 and second.path == first.path
    assert first.path.stat().st_mtime_ns == mtime and np.array_equal(second.tokens, first.tokens)
    val = tokenize_split(c, tiny_tokenizer, "validation", cache_dir=cache, progress=False)
    assert val.path != first.path and val.n_documents == c.stats.validation_documents
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left
    # edited data -> a new entry
    (tmp_path / "src" / "pkg0" / "mod_0.py").write_text("x = 2\n")
    c2 = load_corpus(tmp_path / "src", val_fraction=0.3)
    if c2.fingerprint("train") != c.fingerprint("train"):
        assert not tokenize_split(c2, tiny_tokenizer, "train", cache_dir=cache, progress=False).from_cache


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    monkeypatch.delenv("PARSCALE_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "parscale", "tokens")


def test_prepare_data_end_to_end_cached(tmp_path):
    write_tree(tmp_path / "src", n=20)
    kw = dict(vocab_size=300, val_fraction=0.2, cache_dir=tmp_path / "cache", progress=False)
    a = prepare_data(str(tmp_path / "src"), **kw)
    assert not a.tokenizer_from_cache and not a.train.from_cache and a.validation.n_tokens > 0
    b = prepare_data(str(tmp_path / "src"), **kw)
    assert b.tokenizer_from_cache and b.train.from_cache and b.validation.from_cache
    assert b.tokenizer.fingerprint() == a.tokenizer.fingerprint() and "cached" in b.describe()
    a.tokenizer.save(tmp_path / "model")
    c = prepare_data(str(tmp_path / "src"), **{**kw, "vocab_size": 999}, tokenizer=tmp_path / "model")
    assert c.train.from_cache  # same tokenizer file -> same cache entry


# --------------------------------------------------------------------------- batches
def make_batches(**kw):
    tokens = np.arange(1001, dtype=np.uint16)  # token value == position: easy to check
    return TokenBatches(tokens, **{"seq_len": 10, "global_batch": 8, "seed": 3, **kw})


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = make_batches(), make_batches()
    for step in [0, 7, 12, 5]:  # any order: no hidden iterator state
        x, y = a.batch(step), b.batch(step)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)
        assert x.inputs.dtype == torch.int64 and x.inputs.shape == (8, 10)
    assert not torch.equal(a.batch(0).inputs, make_batches(seed=4).batch(0).inputs)
    assert not torch.equal(a.batch(0).inputs, a.batch(1).inputs)
    assert torch.equal(next(a.iterate(5)).inputs, a.batch(5).inputs)


def test_labels_are_inputs_shifted_by_one_window_aligned():
    b = make_batches().batch(2)
    assert torch.equal(b.labels[:, :-1], b.inputs[:, 1:])
    assert torch.equal(b.labels[:, -1], b.inputs[:, -1] + 1)  # token value == position
    assert torch.all(b.inputs[:, 0] % 10 == 0)  # windows start on seq_len boundaries


def test_rank_shards_and_micro_batches_concatenate_to_global_batch():
    tb = make_batches()
    full = tb.batch(9)
    for world in (1, 2, 4, 8):
        shards = [tb.batch(9, rank=r, world_size=world) for r in range(world)]
        assert torch.equal(torch.cat([s.inputs for s in shards]), full.inputs)
        assert torch.equal(torch.cat([s.labels for s in shards]), full.labels)
        assert [s.row_start for s in shards] == [r * 8 // world for r in range(world)]
    micro = tb.micro_batches(9, rank=1, world_size=2, accum_steps=2)
    assert [len(m) for m in micro] == [2, 2] and [m.row_start for m in micro] == [4, 6]
    assert torch.equal(torch.cat([m.inputs for m in micro]), full.inputs[4:])
    with pytest.raises(ParScaleError, match="not divisible by world_size"):
        tb.batch(0, rank=0, world_size=3)
    with pytest.raises(ParScaleError, match="accum_steps"):
        tb.micro_batches(0, world_size=2, accum_steps=3)
    with pytest.raises(ParScaleError, match="rank must be"):
        tb.batch(0, rank=2, world_size=2)


def test_each_epoch_sees_every_window_once():
    tb = make_batches(global_batch=4)  # 100 windows, 25 steps per epoch
    assert tb.n_windows == 100 and tb.steps_per_epoch == 25
    for epoch in (0, 1):
        starts = np.concatenate([tb.window_starts(s) for s in range(25 * epoch, 25 * (epoch + 1))])
        assert sorted(starts.tolist()) == list(range(0, 1000, 10))
    odd = make_batches(global_batch=7)  # a step straddling epochs still works
    straddle = odd.window_starts(14)  # samples 98..104
    perm0, perm1 = (np.random.default_rng([3, e]).permutation(100) for e in (0, 1))
    assert straddle.tolist() == (np.concatenate([perm0[98:], perm1[:5]]) * 10).tolist()
    with pytest.raises(ParScaleError, match="fewer than seq_len"):
        TokenBatches(np.arange(10, dtype=np.uint16), seq_len=10, global_batch=1)


def test_validation_windows_fixed_and_evenly_spaced():
    tokens = np.arange(1001, dtype=np.uint16)
    v1 = validation_windows(tokens, seq_len=10, n=4)
    v2 = validation_windows(tokens, seq_len=10, n=4)
    assert torch.equal(v1.inputs, v2.inputs) and v1.inputs.shape == (4, 10)
    assert v1.inputs[:, 0].tolist() == [0, 250, 500, 750]
    assert torch.equal(v1.labels[:, :-1], v1.inputs[:, 1:])
    assert len(validation_windows(tokens, seq_len=10, n=500)) == 100  # all windows at most
    with pytest.raises(ParScaleError, match="validation split has 5 tokens"):
        validation_windows(tokens[:5], seq_len=10, n=4)


def test_build_tokenizes_on_main_then_others_hit_the_cache(tmp_path, tiny_tokenizer):
    write_tree(tmp_path / "src", n=12)
    c = load_corpus(tmp_path / "src", val_fraction=0.3)
    events = []
    main = TokenBatches.build(c, tiny_tokenizer, seq_len=16, global_batch=4, seed=1,
                              cache_dir=tmp_path / "cache", progress=False, main=True,
                              barrier=lambda: events.append("barrier"))
    other = TokenBatches.build(c, tiny_tokenizer, seq_len=16, global_batch=4, seed=1,
                               cache_dir=tmp_path / "cache", main=False, barrier=lambda: events.append("b2"))
    assert events == ["barrier", "b2"] and other.validation.from_cache
    inputs, labels = main.batch(3, rank=1, world_size=2)  # a Batch unpacks as (inputs, labels)
    assert torch.equal(inputs, other.batch(3).inputs[2:]) and torch.equal(labels, other.batch(3).labels[2:])
    val = main.validation_windows(3)
    assert val is not None and torch.equal(val.inputs, other.validation_windows(3).inputs)
    assert TokenBatches(main.tokens, seq_len=16, global_batch=4).validation_windows(3) is None
