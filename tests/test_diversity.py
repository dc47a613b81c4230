"""Stream-diversity options (issue 16): the prefix reparameterisation (fold = identical logits,
official files, exact resume, only the intended parameters train), the prefix and aggregator
init scales, the diversity diagnostic the trainer logs, and the reproduce preset fields."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
# test_training's module corpus and its autouse token cache serve this module too
from test_training import corpus, records, tiny, token_cache  # noqa: F401 (fixtures)

from parscale import ParScaleError, ParScaleForCausalLM
from parscale.diagnostics import stream_usage
from parscale.model import reparam_folded
from parscale.training import TrainConfig, train
from parscale.training.reparam import REPARAM_NAME, attach_reparam


def reparam_model(tiny_config, P, std=0.5, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = tiny_config(P, prefix_only=P == 1, **kw)
    model = ParScaleForCausalLM(cfg).to(dtype)
    attach_reparam(model.stream_set, cfg, dim=8, hidden=16, std=std)
    return model


# --------------------------------------------------------------------------- the reparameterisation
@pytest.mark.parametrize("P", [1, 2, 3])
def test_fold_gives_identical_logits_and_official_files(tiny_config, tmp_path, P):
    model = reparam_model(tiny_config, P)
    ids = torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        stored = model.stream_set.prefix_k.clone()
        with reparam_folded(model):
            assert model.stream_set.reparam is None
            folded = model(ids).logits
        assert model.stream_set.reparam is not None  # put back: training goes on
        again = model(ids).logits
    assert not torch.equal(stored, model.stream_set.prefix_k)  # the fold wrote the MLP's prefixes
    assert torch.equal(before, folded) and torch.equal(before, again)

    model.save_pretrained(tmp_path / "m")
    names = load_file(str(tmp_path / "m" / "model.safetensors"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert not [n for n in names if "reparam" in n] and not [k for k in config if "reparam" in k]
    loaded = ParScaleForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64)
    assert loaded.stream_set.reparam is None and model.stream_set.reparam is not None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_reparam_prefixes_start_at_the_requested_std_and_differ_per_stream(tiny_config):
    model = reparam_model(tiny_config, 4, std=0.7, dtype=torch.float32)
    r = model.stream_set.reparam
    for layer in range(2):
        with torch.no_grad():
            k, v = r(layer)  # p h t d
        assert float(torch.cat([k.flatten(), v.flatten()]).std()) == pytest.approx(0.7, rel=1e-4)
        assert (k[0] - k[1]).abs().mean() > 0.1  # different random p': O(1) apart from step one


def test_only_reparam_aggregator_and_backbone_get_gradients(tiny_config):
    model = reparam_model(tiny_config, 2, dtype=torch.float32)
    ids = torch.randint(0, 53, (2, 7))
    model(ids, labels=ids).loss.backward()
    s = model.stream_set
    assert s.prefix_k.grad is None and s.prefix_v.grad is None  # the MLP makes the prefixes
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s.reparam.parameters())
    assert s.aggregate_layer[2].weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_trainer_reparam_run_saves_the_official_format_and_counts_folded_params(tmp_path, corpus):
    res = train(tiny(tmp_path / "r", corpus, streams=2, steps=6, prefix_reparam=True, reparam_dim=8,
                     reparam_hidden=16, prefix_init_std=0.3, checkpoint_every=3))
    model_dir, ckpt = Path(res.model_dir), Path(res.checkpoint_dir)
    for d in (model_dir, ckpt):
        assert not [n for n in load_file(str(d / "model.safetensors")) if "reparam" in n]
        assert not [k for k in json.loads((d / "config.json").read_text()) if "reparam" in k]
    saved = load_file(str(ckpt / REPARAM_NAME))  # the resumable checkpoint keeps the reparam
    assert sorted(saved)[0].startswith("2.") and "2.embedding" in saved
    plain = ParScaleForCausalLM.from_pretrained(model_dir)
    assert res.params == plain.num_parameters(non_embedding=True)  # the reparam folds away
    # the saved prefixes are the MLP's outputs, not the unused init of prefix_k
    attach = ParScaleForCausalLM.from_pretrained(ckpt)
    attach_reparam(attach.stream_set, attach.config, dim=8, hidden=16)
    from parscale.training.reparam import load_reparam_tensors

    load_reparam_tensors(attach, saved, "test")
    k, _ = attach.stream_set.reparam(0)
    assert torch.allclose(k, plain.stream_set.prefix_k[0], atol=1e-6)


def test_reparam_resume_is_bit_identical(tmp_path, corpus):
    class Crash(Exception):
        pass

    def crash(rec):
        if rec["step"] == 7:
            raise Crash

    cfg = tiny(tmp_path / "a", corpus, streams=2, steps=10, checkpoint_every=5, prefix_reparam=True,
               reparam_dim=8, reparam_hidden=16, eval_every=5)
    with pytest.raises(Crash):
        train(cfg, progress_callback=crash)
    resumed = train(cfg.replace(resume=True))
    reference = train(cfg.replace(out=str(tmp_path / "b")))
    for sub, name in (("model", "model.safetensors"), ("checkpoint", "model.safetensors"),
                      ("checkpoint", REPARAM_NAME), ("checkpoint", "optimizer.safetensors")):
        a = load_file(str(Path(resumed.out_dir) / sub / name))
        b = load_file(str(Path(reference.out_dir) / sub / name))
        assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a), (sub, name)
    assert [r["loss"] for r in records(resumed.out_dir)] == [r["loss"] for r in records(reference.out_dir)]


def test_two_stage_reparam_goes_on_the_stage2_set(tmp_path, corpus):
    res = train(tiny(tmp_path / "two", corpus, streams=2, stage1_tokens=2 * 8 * 32, stage2_tokens=3 * 8 * 32,
                     prefix_reparam=True, reparam_dim=8, reparam_hidden=16, checkpoint_every=1))
    saved = load_file(str(Path(res.checkpoint_dir) / REPARAM_NAME))
    assert saved and all(k.startswith("2.") for k in saved)
    model = ParScaleForCausalLM.from_pretrained(res.model_dir)
    assert model.streams == 2 and model.stream_set.reparam is None


def test_frozen_backbone_reparam_trains_only_the_stream_set(tmp_path, corpus):
    base = train(tiny(tmp_path / "base", corpus, streams=1, steps=4))
    res = train(tiny(tmp_path / "p1", corpus, init_from=base.model_dir, streams=1, prefix_only=True,
                     freeze_backbone=True, prefix_reparam=True, stream_init="random", reparam_dim=8,
                     reparam_hidden=16, steps=3, dtype="float32"))
    ckpt = Path(res.checkpoint_dir)
    meta = json.loads((ckpt / "optimizer.json").read_text())
    trained = sum(len(g["params"]) for g in meta["param_groups"])
    assert trained == len(load_file(str(ckpt / REPARAM_NAME)))  # no backbone, no stored prefix
    model = ParScaleForCausalLM.from_pretrained(res.model_dir)  # the adapter, folded
    assert model.config.prefix_only and model.stream_set.reparam is None
    names = load_file(str(Path(res.model_dir) / "adapter.safetensors"))
    assert names and not [n for n in names if "reparam" in n]


# --------------------------------------------------------------------------- init scales
def test_prefix_and_aggregator_init_std(tmp_path, corpus):
    def init_model(**kw):
        res = train(tiny(tmp_path / str(len(list(tmp_path.iterdir()))), corpus, streams=2, steps=1, lr=1e-9,
                         min_lr=0.0, warmup_steps=0, weight_decay=0.0, **kw))
        return ParScaleForCausalLM.from_pretrained(res.model_dir)

    default, big = init_model(), init_model(prefix_init_std=0.8, agg_init_std=0.5)
    assert float(default.stream_set.prefix_k.detach().std()) == pytest.approx(0.02, rel=0.15)
    assert float(big.stream_set.prefix_k.detach().std()) == pytest.approx(0.8, rel=0.15)
    # the backbone is drawn first, so a different stream recipe keeps the same backbone (paired)
    assert torch.allclose(default.model.layers[0].mlp.up_proj.weight, big.model.layers[0].mlp.up_proj.weight,
                          atol=1e-6)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        w0, w1 = default(ids).agg_weights, big(ids).agg_weights
    assert torch.allclose(w0, torch.full_like(w0, 0.5), atol=1e-6)  # one tiny step off exact uniform
    assert (w1 - 0.5).abs().max() > 0.01


def test_option_errors_name_the_field():
    base = dict(steps=1)
    with pytest.raises(ParScaleError, match="prefix_reparam.*--streams >= 2 or --prefix-only"):
        TrainConfig(**base, prefix_reparam=True)
    with pytest.raises(ParScaleError, match="prefix_reparam.*--stream-init random"):
        TrainConfig(**base, streams=2, prefix_reparam=True, init_from="x")
    with pytest.raises(ParScaleError, match="prefix_init_std.*--stream-init random"):
        TrainConfig(**base, streams=2, prefix_init_std=0.5, init_from="x")
    with pytest.raises(ParScaleError, match="'fsdp'"):
        TrainConfig(**base, streams=2, prefix_reparam=True, fsdp=True)
    with pytest.raises(ParScaleError, match="prefix_init_std.*> 0"):
        TrainConfig(**base, prefix_init_std=0.0)
    with pytest.raises(ParScaleError, match="agg_init_std"):
        TrainConfig(**base, agg_init_std=-1.0)
    with pytest.raises(ParScaleError, match="diversity_windows"):
        TrainConfig(**base, diversity_windows=-1)
    TrainConfig(**base, streams=2, prefix_reparam=True, init_from="x", stream_init="random")


def test_reparam_refuses_a_trained_stream_set(tmp_path, corpus):
    p2 = train(tiny(tmp_path / "p2", corpus, streams=2, steps=2))
    with pytest.raises(ParScaleError, match="already holds a P=2 set"):
        train(tiny(tmp_path / "again", corpus, init_from=p2.model_dir, streams=2, prefix_reparam=True,
                   stream_init="random", steps=2))


# --------------------------------------------------------------------------- the diagnostic
def test_trainer_logs_the_diversity_diagnostic_at_each_eval(tmp_path, corpus):
    n = 3
    res = train(tiny(tmp_path / "d", corpus, streams=2, steps=6, eval_every=3, diversity_windows=n,
                     prefix_init_std=0.5))
    evals = [r for r in records(res.out_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    keys = ("loss_correlation", "pairwise_js", "combination_gain")
    assert all(all(k in r for k in keys) for r in evals)
    assert not any(k in r for r in records(res.out_dir) if "val_loss" not in r for k in keys)
    # the last record is stream_usage of the final model on the first n held-out windows
    from parscale.data import prepare_data, validation_windows

    cfg = TrainConfig(**json.loads((Path(res.out_dir) / "train_config.json").read_text()))
    data = prepare_data(cfg.data, tokenizer=res.model_dir, progress=False)
    val = validation_windows(data.validation, seq_len=cfg.seq_len, n=cfg.eval_tokens // cfg.seq_len)
    u = stream_usage(ParScaleForCausalLM.from_pretrained(res.model_dir), val.inputs[:n], val.labels[:n])
    last = evals[-1]
    assert last["loss_correlation"] == pytest.approx(u.loss_correlation, abs=1e-5)
    assert last["pairwise_js"] == pytest.approx(u.pairwise_js, rel=1e-3, abs=1e-9)
    assert last["combination_gain"] == pytest.approx(u.combination_gain, abs=1e-5)
    assert -1.0 <= last["loss_correlation"] <= 1.0 and last["pairwise_js"] > 0


def test_no_diagnostic_at_p1_or_when_off(tmp_path, corpus):
    keys = {"loss_correlation", "pairwise_js", "combination_gain"}
    for name, kw in (("p1", dict(streams=1)), ("off", dict(streams=2, diversity_windows=0))):
        res = train(tiny(tmp_path / name, corpus, steps=2, eval_every=1, **kw))
        assert not any(keys & set(r) for r in records(res.out_dir))


# --------------------------------------------------------------------------- reproduce
def test_reproduce_preset_recipe_reaches_the_stream_runs_only(tmp_path):
    import dataclasses

    from parscale.reproduce import get_preset, plan_runs

    preset = dataclasses.replace(get_preset("micro"), prefix_reparam=True, prefix_init_std=0.5, agg_init_std=0.01,
                                 reparam_lr_scale=0.25)
    plan = plan_runs(preset, tmp_path, baseline="prefix")
    for run in plan:
        c = run.config
        if run.experiment == "two_stage":
            continue
        stream = run.streams > 1 or c.prefix_only
        assert (c.prefix_reparam, c.prefix_init_std, c.agg_init_std, c.reparam_lr_scale) == (
            (True, 0.5, 0.01, 0.25) if stream else (False, None, 0.0, 1.0)), run.name


def test_reproduce_cli_recipe_flags_override_the_preset_and_are_validated_first(tmp_path, monkeypatch, capsys):
    import parscale.reproduce as reproduce_module
    from parscale.cli import main

    seen = {}

    def fake(preset, out, **kw):
        seen.update(preset=preset, command=kw["command"])
        raise SystemExit(0)
    monkeypatch.setattr(reproduce_module, "reproduce", fake)
    with pytest.raises(SystemExit):
        main(["reproduce", "--preset", "micro", "--out", str(tmp_path / "a"), "--prefix-reparam",
              "--reparam-lr-scale", "0.03125", "--prefix-init-std", "0.1"])
    p = seen["preset"]
    assert (p.name, p.prefix_reparam, p.reparam_lr_scale, p.prefix_init_std, p.agg_init_std) == \
        ("micro", True, 0.03125, 0.1, 0.0)
    assert "--prefix-reparam" in seen["command"] and "--reparam-lr-scale 0.03125" in seen["command"]
    monkeypatch.undo()
    for bad, flag in (("--prefix-init-std=nan", "--prefix-init-std"), ("--reparam-lr-scale=0", "--reparam-lr-scale")):
        assert main(["reproduce", "--preset", "micro", "--out", str(tmp_path / "b"), bad]) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "b" / "runs").exists()  # refused before any run was planned on disk


def test_reparam_lr_scale_scales_only_the_reparam_step(tmp_path, corpus):
    """Adam's first step moves every parameter by about its group's rate (m/√v = ±1), so the
    reparam tensors after one step differ between scales in proportion to the scales, while every
    other tensor is the same."""
    after = {}
    for scale in (1.0, 0.5, 0.25):
        res = train(tiny(tmp_path / str(scale), corpus, streams=2, steps=1, checkpoint_every=1,
                         prefix_reparam=True, reparam_dim=8, reparam_hidden=16, reparam_lr_scale=scale))
        ck = Path(res.out_dir) / "checkpoint"
        after[scale] = (load_file(str(ck / REPARAM_NAME)), load_file(str(ck / "model.safetensors")))
    (r1, m1), (r5, _), (r25, m25) = after[1.0], after[0.5], after[0.25]
    moved = 0
    for n in r1:
        d_quarter, d_half = r1[n] - r25[n], r1[n] - r5[n]  # = 0.75 and 0.5 of the unscaled step
        torch.testing.assert_close(d_quarter, 1.5 * d_half, rtol=1e-3, atol=1e-7)
        moved += int((d_half.abs() > 0).sum())
    assert moved > 0
    for n in m1:
        if "prefix" not in n:  # the folded prefixes come from the reparam; everything else is equal
            assert torch.equal(m1[n], m25[n]), n
    with pytest.raises(ParScaleError, match="reparam_lr_scale"):
        TrainConfig(streams=2, prefix_reparam=True, reparam_lr_scale=0.0)
