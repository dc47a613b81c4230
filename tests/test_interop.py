"""Checkpoint I/O: official ParScale format in/out, HF Qwen2/Llama in, clear errors for bad files."""

import json

import pytest
import torch
from conftest import official_config, official_tensors, write_checkpoint
from reference import reference_logits
from safetensors.torch import load_file, save_file

from parscale import ParScaleError, ParScaleForCausalLM
from parscale.interop import checkpoint_tensors


def test_official_checkpoint_loads_with_its_smoothing(tmp_path):
    c = official_config(P=4, smooth=0.1)
    W = official_tensors(c, dtype=torch.float32)
    model = ParScaleForCausalLM.from_pretrained(write_checkpoint(tmp_path / "off", c, W))
    assert model.config.streams == 4 and model.config.agg_smoothing == 0.1
    ids = torch.randint(0, c["vocab_size"], (1, 5))
    torch.testing.assert_close(model(ids).logits, reference_logits(W, c, ids), rtol=1e-4, atol=1e-4)
    # greedy tokens match the reference's greedy choice at every step
    seq = model.generate(ids, max_new_tokens=4)
    ref_next = [int(reference_logits(W, c, seq[:, : 5 + i])[0, -1].argmax()) for i in range(4)]
    assert seq[0, 5:].tolist() == ref_next


def test_missing_smoothing_key_uses_official_class_default(tmp_path):
    c = official_config(P=2)
    del c["parscale_attn_smooth"]
    m = ParScaleForCausalLM.from_pretrained(write_checkpoint(tmp_path / "c", c, official_tensors(official_config(P=2))))
    assert m.config.agg_smoothing == 0.01


@pytest.mark.parametrize("shard", [None, 3000])
def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_config, shard):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=3, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "m", max_shard_bytes=shard)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    if shard:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    else:
        assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_parscale" and cfg["parscale_n"] == 3
    assert cfg["parscale_n_tokens"] == 3 and cfg["parscale_attn_smooth"] == 0.01
    loaded = ParScaleForCausalLM.from_pretrained(tmp_path / "m")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 53, (2, 5))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_saved_names_are_the_official_ones(tmp_path, tiny_config):
    ParScaleForCausalLM(tiny_config(P=2)).save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.self_attn.prefix_k" in names and "model.aggregate_layer.2.bias" in names
    assert load_file(tmp_path / "model.safetensors")["model.layers.0.self_attn.prefix_v"].shape == (2, 2, 3, 8)
    assert "lm_head.weight" not in names  # tied


def test_dynamic_p_checkpoint_holds_several_stream_sets(tmp_path, tiny_config):
    model = ParScaleForCausalLM(tiny_config(P=2, stream_sets=[2, 4]))
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 53, (1, 4))
    for P in (1, 2, 4):
        loaded = ParScaleForCausalLM.from_pretrained(tmp_path, streams=P)
        assert torch.equal(loaded(ids).logits, model.set_streams(P)(ids).logits)


def test_plain_hf_qwen2_and_llama_load_as_p1(tmp_path):
    for mt, bias in [("qwen2", True), ("llama", False)]:
        c = official_config(model_type=mt, bias=bias)
        W = official_tensors(c, dtype=torch.float32)
        model = ParScaleForCausalLM.from_pretrained(write_checkpoint(tmp_path / mt, c, W))
        assert model.config.streams == 1 and model.config.attention_bias is bias
        ids = torch.randint(0, c["vocab_size"], (1, 5))
        ref = reference_logits(W, dict(c, attention_bias=bias), ids)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def _ckpt(tmp_path, P=2):
    c = official_config(P=P)
    return write_checkpoint(tmp_path / "bad", c, official_tensors(c, dtype=torch.float32)), c


def test_bad_checkpoints_name_the_file_and_problem(tmp_path):
    d, c = _ckpt(tmp_path)
    W = load_file(d / "model.safetensors")

    with pytest.raises(ParScaleError, match="not a checkpoint directory"):
        ParScaleForCausalLM.from_pretrained(tmp_path / "nope")

    (d / "config.json").write_text("{not json")
    with pytest.raises(ParScaleError, match=r"config.json: not valid JSON"):
        ParScaleForCausalLM.from_pretrained(d)

    (d / "config.json").write_text(json.dumps(dict(c, model_type="gpt2")))
    with pytest.raises(ParScaleError, match="unsupported model_type 'gpt2'"):
        ParScaleForCausalLM.from_pretrained(d)

    (d / "config.json").write_text(json.dumps(dict(c, parscale_n=0)))
    with pytest.raises(ParScaleError, match="config.json: config field 'streams'"):
        ParScaleForCausalLM.from_pretrained(d)

    (d / "config.json").write_text(json.dumps(c))
    save_file({k: v for k, v in W.items() if k != "model.layers.1.self_attn.prefix_v"}, d / "model.safetensors")
    with pytest.raises(ParScaleError, match=r"model.safetensors: missing tensor\(s\) model.layers.1.self_attn.prefix_v"):
        ParScaleForCausalLM.from_pretrained(d)

    save_file(dict(W, **{"model.norm.weight": torch.ones(7)}), d / "model.safetensors")
    with pytest.raises(ParScaleError, match=r"tensor model.norm.weight has shape \(7,\), config says \(32,\)"):
        ParScaleForCausalLM.from_pretrained(d)

    save_file(dict(W, **{"model.extra.weight": torch.ones(7)}), d / "model.safetensors")
    with pytest.raises(ParScaleError, match=r"unexpected tensor\(s\) model.extra.weight"):
        ParScaleForCausalLM.from_pretrained(d)

    save_file(W, d / "model.safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ParScaleError, match="model.safetensors: not a readable safetensors file"):
        ParScaleForCausalLM.from_pretrained(d)

    (d / "model.safetensors").unlink()
    with pytest.raises(ParScaleError, match="model.safetensors: missing weights file"):
        ParScaleForCausalLM.from_pretrained(d)


def test_save_is_atomic_per_file_and_cleans_stale_shards(tmp_path, tiny_config, monkeypatch):
    model = ParScaleForCausalLM(tiny_config(P=2))
    model.save_pretrained(tmp_path, max_shard_bytes=2000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model.save_pretrained(tmp_path)  # unsharded now: old shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    before = (tmp_path / "model.safetensors").read_bytes()

    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left


def test_checkpoint_tensor_names_cover_every_parameter(tiny_config):
    model = ParScaleForCausalLM(tiny_config(P=2, stream_sets=[2, 3], tie_word_embeddings=False))
    n_ckpt = sum(t.numel() for t in checkpoint_tensors(model).values())
    assert n_ckpt == sum(p.numel() for p in model.parameters())


def test_loaded_model_keeps_ties_and_rope_tables(tmp_path, tiny_config):
    """Loading allocates without random init (meta device): ties and buffers must be restored."""
    model = ParScaleForCausalLM(tiny_config(P=2))  # tied embeddings
    model.save_pretrained(tmp_path)
    loaded = ParScaleForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.rotary.inv_freq, model.model.rotary.inv_freq)
