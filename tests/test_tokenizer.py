"""parscale.Tokenizer against transformers' own tokenizer on the same files (exact ids and text)."""

import json

import pytest
import torch

from parscale import ParScaleError, Tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Exercises what HF's environment adds: trim_blocks / lstrip_blocks (the tags on their own lines
# leave no blank lines), raise_exception, tojson, loop controls, the special-token variables.
FANCY = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' and not loop.first %}{% continue %}{% endif %}
<|im_start|>{{ m['role'] }}
{{ m['content'] | trim }}{% if m.meta is defined %} {{ m.meta | tojson }}{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% if persona is defined %}({{ persona }}) {% endif %}{% endif %}"""

TEXTS = ["def add(a, b):\n    return a + b\n", "Hello world, hello parscale!",
         "héllo wörld — ünïcode ✓ 日本語",
         "x = [1, 2, 3]  # numbers\n\tindent"] * 3


def build_tokenizer(directory, *, template=CHATML, bos=False, add_bos=None, eos="<|im_end|>",
                    generation_eos=None):
    """A small byte-level BPE with ChatML special tokens, as HF files in ``directory``."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<s>"] if bos else [])
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|endoftext|>",
           "model_max_length": 4096}
    if template is not None:
        cfg["chat_template"] = template
    if bos:
        cfg["bos_token"] = "<s>"
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return directory


def hf(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture
def tokdir(tmp_path):
    return build_tokenizer(tmp_path / "tok", generation_eos=[2, 0])


MESSAGES = [{"role": "user", "content": "Hello world!"},
            {"role": "assistant", "content": "hello parscale"},
            {"role": "user", "content": "def add(a, b): ✓"}]


@pytest.mark.parametrize("kind", ["plain", "bos_post_processor", "add_bos_config"])
def test_encode_decode_equal_transformers(tmp_path, kind):
    d = build_tokenizer(tmp_path / kind, bos=kind != "plain", add_bos=True if kind == "add_bos_config" else None)
    if kind == "add_bos_config":  # the config's flag replaces the post-processor (transformers 5)
        t = json.loads((d / "tokenizer.json").read_text())
        t["post_processor"] = None
        (d / "tokenizer.json").write_text(json.dumps(t))
    ours, theirs = Tokenizer.from_pretrained(d), hf(d)
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n", "a<|im_end|>b", ""]
    for text in texts:
        for add in (True, False):
            expect = theirs.encode(text, add_special_tokens=add)
            if add and kind == "add_bos_config":
                # transformers 5 ignores the flag when tokenizer.json exists; we follow it (as
                # llama.cpp does) when tokenizer.json has no post-processor of its own
                expect = [ours.bos_token_id] + expect
            assert ours.encode(text, add_special_tokens=add) == expect
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    if kind != "plain":
        assert ours.encode("hi")[0] == ours.bos_token_id == theirs.bos_token_id


def test_batch_call_left_padding_equals_transformers(tokdir):
    ours, theirs = Tokenizer.from_pretrained(tokdir), hf(tokdir)
    theirs.padding_side = "left"
    texts = ["short", "a much longer text, with more tokens in it", "mid length text"]
    a = ours(texts, padding=True, return_tensors="pt")
    b = theirs(texts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert a["attention_mask"][0, 0] == 0 and a["attention_mask"][:, -1].all()  # left padding
    right = ours(texts, padding=True, padding_side="right")
    theirs.padding_side = "right"
    assert right == {k: v for k, v in theirs(texts, padding=True).items()}
    one = ours("short")
    assert one["input_ids"] == theirs("short")["input_ids"] and one["attention_mask"] == [1] * len(one["input_ids"])
    assert ours("short", return_tensors="pt")["input_ids"].shape == (1, len(one["input_ids"]))
    assert ours.batch_decode(a["input_ids"], skip_special_tokens=True) == texts
    with pytest.raises(ParScaleError, match="padding=True"):
        ours(texts, return_tensors="pt")
    theirs.padding_side = "left"
    cut = ours(texts, padding=True, truncation=True, max_length=4, return_tensors="pt")
    ref = theirs(texts, padding=True, truncation=True, max_length=4, return_tensors="pt")
    assert torch.equal(cut["input_ids"], ref["input_ids"]) and cut["input_ids"].shape[1] == 4


@pytest.mark.parametrize("template", [CHATML, FANCY])
@pytest.mark.parametrize("gen", [False, True])
def test_apply_chat_template_equals_transformers(tmp_path, template, gen):
    d = build_tokenizer(tmp_path / "t", template=template, bos=True)
    ours, theirs = Tokenizer.from_pretrained(d), hf(d)
    msgs = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    msgs[1] = {**msgs[1], "meta": {"lang": "en", "note": "<ü>"}}
    for m in (msgs, MESSAGES):
        kw = dict(add_generation_prompt=gen, persona="pirate")
        text = ours.apply_chat_template(m, tokenize=False, **kw)
        assert text == theirs.apply_chat_template(m, tokenize=False, **kw)
        ids = ours.apply_chat_template(m, **kw)
        assert ids == theirs.apply_chat_template(m, return_dict=False, **kw)
        assert ours.token_to_id("<|im_start|>") in ids  # markup parsed as special tokens
        t = ours.apply_chat_template(m, return_tensors="pt", **kw)
        assert t.shape == (1, len(ids)) and t[0].tolist() == ids
        assert ours.apply_chat_template(m, return_dict=True, **kw)["input_ids"] == ids
    if template is FANCY:  # trim_blocks / lstrip_blocks matter here, and match
        import jinja2

        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        loose = env.from_string(template).render(messages=MESSAGES, bos_token="<s>", **kw)
        assert loose != text and loose.replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_chat_template_errors_are_one_line(tmp_path, tokdir):
    ours = Tokenizer.from_pretrained(tokdir)
    for bad, msg in [([], "empty"), ("hi", "list of"), ([{"content": "x"}], "no 'role'"),
                     ([{"role": "user", "content": 3}], "'content' must be"), (["x"], "must be a dict")]:
        with pytest.raises(ParScaleError, match=msg):
            ours.apply_chat_template(bad)
    fancy = Tokenizer.from_pretrained(build_tokenizer(tmp_path / "f", template=FANCY, bos=True))
    with pytest.raises(ParScaleError, match="chat template: unknown role tool"):
        fancy.apply_chat_template([{"role": "tool", "content": "x"}])
    none = Tokenizer.from_pretrained(build_tokenizer(tmp_path / "n", template=None))
    assert none.chat_template is None
    with pytest.raises(ParScaleError, match="no chat template"):
        none.apply_chat_template(MESSAGES)
    with pytest.raises(ParScaleError, match="not valid Jinja"):
        ours.apply_chat_template(MESSAGES, chat_template="{% for m in messages %}")


def test_strftime_now_and_sandbox(tokdir):
    import datetime

    ours = Tokenizer.from_pretrained(tokdir)
    year = ours.apply_chat_template(MESSAGES, tokenize=False, chat_template="{{ strftime_now('%Y') }}")
    assert year == str(datetime.datetime.now().year)
    with pytest.raises(ParScaleError, match="chat template"):  # the sandbox refuses internals
        ours.apply_chat_template(MESSAGES, chat_template="{{ ''.__class__.__subclasses__() }}")


def test_special_tokens_and_eos_ids(tokdir):
    ours, theirs = Tokenizer.from_pretrained(tokdir), hf(tokdir)
    assert ours.eos_token == theirs.eos_token == "<|im_end|>" and ours.eos_token_id == theirs.eos_token_id
    assert ours.pad_token_id == theirs.pad_token_id and ours.bos_token is None
    # eos_token first, then generation_config's list, then the separator, without repeats
    assert ours.eos_token_ids == [ours.eos_token_id, ours.token_to_id("<|endoftext|>")]
    (tokdir / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    (tokdir / "config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert Tokenizer.from_pretrained(tokdir).eos_token_ids == [2, 1, 0]
    assert ours.separator == "<|endoftext|>" and ours.separator_id == 0


def test_literal_separator_in_plain_text_stays_text(tokdir):
    """The one documented difference from transformers: plain text cannot produce the separator."""
    ours = Tokenizer.from_pretrained(tokdir)
    text = "end<|endoftext|>next <|im_start|>user"
    ids = ours.encode(text)
    assert ours.separator_id not in ids and ours.decode(ids) == text
    assert ours.token_to_id("<|im_start|>") in ids  # other special tokens are parsed
    bos = Tokenizer.from_pretrained(build_tokenizer(tokdir.parent / "bos", bos=True))
    plain = bos.encode(text, add_special_tokens=False)
    assert bos.encode(text) == [bos.bos_token_id] + plain and bos.decode(plain) == text
    # chat markup written by the template may hold the separator: parsed there
    tpl = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    assert ours.apply_chat_template(MESSAGES[:1], chat_template=tpl)[-1] == ours.separator_id


def test_trainer_tokenizer_encodes_like_generate(tokdir):
    """Train and inference tokenise the same: chat markup is one id in both, the separator is text."""
    from parscale.data import load_tokenizer

    trainer, ours = load_tokenizer(tokdir), Tokenizer.from_pretrained(tokdir)
    doc = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|> <|endoftext|> x"
    assert trainer.encode(doc) == ours.encode(doc, add_special_tokens=False)
    assert trainer.encode_batch([doc, "plain"]) == ours.encode_batch([doc, "plain"], add_special_tokens=False)
    assert trainer.eos_token == ours.separator == "<|endoftext|>"  # the document separator


def test_stream_decoder_never_splits_characters(tokdir):
    ours = Tokenizer.from_pretrained(tokdir)
    text = "héllo wörld — ünïcode ✓ 日本語 and emoji 🙂 too"
    ids = ours.encode(text)
    dec = ours.stream_decoder()
    pieces = [dec.put(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # really incremental


def test_bad_files_are_one_line_errors(tmp_path, tokdir):
    with pytest.raises(ParScaleError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ParScaleError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tokdir / "tokenizer_config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ParScaleError, match="not valid UTF-8"):
        Tokenizer.from_pretrained(tokdir)
    (tokdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ParScaleError, match="not in the vocabulary"):
        Tokenizer.from_pretrained(tokdir)


def test_training_keeps_the_chat_template_and_names_the_separator(tmp_path, tokdir, capsys):
    """A model trained with a chat tokenizer can chat afterwards; the trainer says its separator."""
    from conftest import write_corpus

    from parscale.data import load_tokenizer
    from parscale.training import TrainConfig, train

    corpus = write_corpus(tmp_path / "corpus", n_files=6)
    res = train(TrainConfig(data=str(corpus), tokenizer=str(tokdir), vocab_size=320, layers=1, hidden=32, heads=4,
                            kv_heads=2, intermediate=64, prefix_tokens=2, seq_len=32, batch_size=4, steps=2,
                            warmup_steps=1, log_every=1, eval_every=0, eval_tokens=64, checkpoint_every=0,
                            threads=1, quiet=False, out=str(tmp_path / "run")))
    assert "documents are separated by <|endoftext|> (id 0)" in capsys.readouterr().err
    trained = Tokenizer.from_pretrained(res.model_dir)
    assert trained.chat_template == CHATML and trained.eos_token == "<|im_end|>"
    assert set(trained.eos_token_ids) == {2, 0}  # the chat EOS and the separator
    assert load_tokenizer(res.model_dir).eos_token == "<|endoftext|>"


def test_reads_what_transformers_saves(tmp_path, tokdir):
    """transformers 5 writes the chat template to chat_template.jinja beside the config."""
    hf(tokdir).save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    ours, theirs = Tokenizer.from_pretrained(tmp_path / "saved"), hf(tmp_path / "saved")
    assert ours.chat_template == CHATML
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
        theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert ours.encode(TEXTS[2]) == theirs.encode(TEXTS[2])
    from parscale.data import load_tokenizer

    load_tokenizer(tmp_path / "saved").save(tmp_path / "trained")  # what the trainer writes
    assert Tokenizer.from_pretrained(tmp_path / "trained").chat_template == CHATML


def test_save_pretrained_round_trip(tmp_path, tokdir):
    ours = Tokenizer.from_pretrained(tokdir)
    again = Tokenizer.from_pretrained(ours.save_pretrained(tmp_path / "copy"))
    assert again.encode(TEXTS[2]) == ours.encode(TEXTS[2]) and again.chat_template == ours.chat_template
    assert again.special_tokens_map == ours.special_tokens_map
