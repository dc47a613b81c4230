"""Adapters: a frozen-backbone run saves only its stream sets (plus the base's path and hash),
loadable onto the base, mergeable into one checkpoint, and resumable bit-exactly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training import records, tiny, write_corpus

from parscale import ParScaleConfig, ParScaleError, ParScaleForCausalLM
from parscale.cli import main
from parscale.recycle import is_adapter, load_adapter, merge_adapter, save_adapter, weights_hash
from parscale.training import train
from parscale.training.checkpoint import load_checkpoint


def base_model(tmp_path, **kw) -> Path:
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, prefix_tokens=3, attention_bias=False)
    cfg.update(kw)
    torch.manual_seed(0)
    model = ParScaleForCausalLM(ParScaleConfig(**cfg))
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_adapter_round_trip_onto_its_base(tmp_path):
    base = base_model(tmp_path)
    model = ParScaleForCausalLM.from_pretrained(base)
    model.add_stream_set(1, snippets=torch.arange(3)[None])
    model.add_stream_set(2, snippets=torch.arange(6).view(2, 3))
    with torch.no_grad():
        model.stream_set.aggregate_layer[2].weight.normal_()  # "trained": not uniform
    save_adapter(model, tmp_path / "ad", base=str(base), base_sha256=weights_hash(base))
    assert is_adapter(tmp_path / "ad") and not is_adapter(base)
    W = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert all(n.startswith(("stream_sets.1.prefix_", "stream_sets.2.")) for n in W)  # no backbone tensor
    assert sum(t.numel() for t in W.values()) == sum(p.numel() for p in model.stream_parameters())

    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the inference (packed) path, as for the loaded models below
        want2, want1 = model(ids).logits, model.set_streams(1)(ids).logits
    for loaded in (ParScaleForCausalLM.from_pretrained(tmp_path / "ad"),
                   ParScaleForCausalLM.from_pretrained(base, adapter=tmp_path / "ad")):
        assert loaded.streams == 2 and loaded.config.prefix_only and loaded.config.stream_sets == [1, 2]
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want2)
            assert torch.equal(loaded.set_streams(1)(ids).logits, want1)

    merge_adapter(tmp_path / "ad", tmp_path / "merged")
    merged = ParScaleForCausalLM.from_pretrained(tmp_path / "merged", streams=2)
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, want2)


def test_the_base_hash_is_checked_and_ignores_file_layout(tmp_path):
    base = base_model(tmp_path)
    model = ParScaleForCausalLM.from_pretrained(base)
    h = weights_hash(base)
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)  # same weights, 3+ files
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert weights_hash(tmp_path / "sharded") == h
    model.add_stream_set(2)
    save_adapter(model, tmp_path / "ad", base=str(base), base_sha256=h)
    model.save_pretrained(tmp_path / "with-streams")
    assert weights_hash(tmp_path / "with-streams") == h  # stream sets are not part of the hash
    ParScaleForCausalLM.from_pretrained(tmp_path / "sharded", adapter=tmp_path / "ad")  # another copy: fine

    W = load_file(str(base / "model.safetensors"))
    W["model.norm.weight"] = W["model.norm.weight"] + 1e-3
    save_file(W, str(base / "model.safetensors"))
    with pytest.raises(ParScaleError, match="different weights than the one it was trained on"):
        ParScaleForCausalLM.from_pretrained(tmp_path / "ad")
    (base / "model.safetensors").unlink()
    (base / "config.json").unlink()
    base.rmdir()
    with pytest.raises(ParScaleError, match="does not exist .moved"):
        ParScaleForCausalLM.from_pretrained(tmp_path / "ad")


def test_malformed_adapters_are_one_line_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ParScaleError, match="not valid JSON"):
        load_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"format": "lora"}))
    with pytest.raises(ParScaleError, match="not a parscale adapter config"):
        load_adapter(tmp_path / "a")
    code = main(["merge-adapter", str(tmp_path / "a"), "--out", str(tmp_path / "a")])
    assert code == 2


def test_merge_adapter_cli(tmp_path, capsys):
    base = base_model(tmp_path)
    model = ParScaleForCausalLM.from_pretrained(base)
    model.add_stream_set(2)
    save_adapter(model, tmp_path / "ad", base=str(base), base_sha256=weights_hash(base))
    assert main(["merge-adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "full")]) == 0
    assert "wrote" in capsys.readouterr().out
    raw = json.loads((tmp_path / "full" / "config.json").read_text())
    assert raw["parscale_n"] == 2 and raw["model_type"] == "qwen2_parscale"


# --------------------------------------------------------------------------- the trainer
@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def trained_base(tmp_path, corpus):
    return Path(train(tiny(tmp_path / "base", corpus, streams=1, steps=8)).model_dir)


class Stop(Exception):
    pass


@pytest.mark.parametrize("streams", [1, 2])
def test_frozen_run_saves_adapters_and_resumes_bit_exactly(tmp_path, corpus, trained_base, streams):
    kw = dict(init_from=str(trained_base), streams=streams, prefix_only=streams == 1, freeze_backbone=True,
              steps=8, checkpoint_every=3, eval_every=4)
    cfg = tiny(tmp_path / "stopped", corpus, **kw)

    def stop_at_5(rec):
        if rec["step"] == 5:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, progress_callback=stop_at_5)
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.state["step"] == 3 and is_adapter(ckpt.path) and not (ckpt.path / "model.safetensors").exists()
    opt = load_file(str(ckpt.path / "optimizer.safetensors"))
    n_trained = len(ParScaleForCausalLM.from_pretrained(ckpt.path).stream_parameters(streams))
    assert {k.split(".")[1] for k in opt} == {str(i) for i in range(n_trained)}  # only the trained tensors

    resumed = train(cfg.replace(resume=True))
    reference = train(cfg.replace(out=str(tmp_path / "reference")))
    a, b = (load_file(str(Path(r.model_dir) / "adapter.safetensors")) for r in (resumed, reference))
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    got, want = records(resumed.out_dir), records(reference.out_dir)
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in got] == \
        [(r["step"], r.get("loss"), r.get("val_loss")) for r in want]
    assert got[0]["step"] == 0 and "base_val_loss" in got[0]

    # the adapter is tiny next to the base, holds only stream tensors, and the backbone is untouched
    size = (Path(reference.model_dir) / "adapter.safetensors").stat().st_size
    assert size < (trained_base / "model.safetensors").stat().st_size / 3
    expect = {f"stream_sets.1.prefix_{x}" for x in "kv"} if streams == 1 else None
    if expect is not None:
        assert set(b) == expect
    final = ParScaleForCausalLM.from_pretrained(reference.model_dir)
    B = ParScaleForCausalLM.from_pretrained(trained_base).state_dict()
    assert all(torch.equal(final.state_dict()[n], B[n]) for n in B)
    assert final.streams == streams and final.stream_set is not None


def test_prefix_only_options_are_checked(tmp_path, corpus):
    with pytest.raises(ParScaleError, match="'prefix_only'.*--streams 1"):
        tiny(tmp_path / "x", corpus, streams=2, prefix_only=True, steps=1)
    with pytest.raises(ParScaleError, match="--prefix-only for the P = 1"):
        tiny(tmp_path / "x", corpus, init_from="somewhere", streams=1, freeze_backbone=True, steps=1)
    with pytest.raises(ParScaleError, match="'stream_init'"):
        tiny(tmp_path / "x", corpus, streams=2, stream_init="snippets", steps=1)
