"""The trainer: loss falls, metrics/summary/model files, schedule, recipes (recycling, frozen
backbone + dynamic P, two-stage), config files and one-line errors. Tiny models on a tiny corpus."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_corpus

from parscale import ParScaleError, ParScaleForCausalLM
from parscale.cli import build_parser, main
from parscale.training import TrainConfig, lr_at, plan_stages, train
from parscale.training.options import load_config_file

def tiny(out, data, **kw) -> TrainConfig:
    """2 layers, hidden 32, vocab 300, seq 32: a training step takes milliseconds."""
    base = dict(data=str(data), vocab_size=300, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64,
                prefix_tokens=4, seq_len=32, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                log_every=1, eval_every=0, eval_tokens=512, checkpoint_every=0, threads=1, quiet=True,
                out=str(out))
    if "init_from" in kw:
        for k in ("layers", "hidden", "heads", "kv_heads", "intermediate"):
            base.pop(k)
    base.update(kw)
    return TrainConfig(**base)


def train_flags(cfg) -> list[str]:
    """``parscale train`` flags that give the TrainConfig ``cfg`` (for subprocess / torchrun runs)."""
    argv = []
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    # one cache for the module: the tokenizer is trained once, later runs hit the cache
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):
    """A P = 1 model trained for 30 steps: the backbone for the recycling tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARSCALE_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
        return train(tiny(tmp_path_factory.mktemp("base"), corpus, streams=1, steps=30, eval_every=10))


# --------------------------------------------------------------------------- schedule (pure)
def test_lr_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    (stage,) = plan_stages(cfg)
    assert [lr_at(cfg, stage, i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(cfg, stage, 9) == pytest.approx(1.0)
    assert lr_at(cfg, stage, 10) == pytest.approx(1.0)
    assert lr_at(cfg, stage, 60) == pytest.approx(0.55)  # half-way: the mean of lr and min_lr
    assert lr_at(cfg, stage, 109) == pytest.approx(0.1, abs=1e-3)
    const = cfg.replace(schedule="constant")
    assert lr_at(const, stage, 100) == 1.0


def test_two_stage_plan_restarts_schedule_with_short_warmup():
    cfg = TrainConfig(streams=4, stage1_tokens=100 * 16 * 256, stage2_tokens=20 * 16 * 256, warmup_steps=10,
                      lr=1.0, min_lr=0.0)
    s1, s2 = plan_stages(cfg)
    assert (s1.streams, s1.start, s1.steps, s1.warmup) == (1, 0, 100, 10)
    assert (s2.streams, s2.start, s2.steps, s2.warmup) == (4, 100, 20, 2)  # 10% of stage 2
    assert lr_at(cfg, s1, 99) == pytest.approx(0.0, abs=1e-3)
    assert lr_at(cfg, s2, 100) == pytest.approx(0.5)  # warm-up restarts
    assert lr_at(cfg, s2, 101) == pytest.approx(1.0)


# --------------------------------------------------------------------------- a run
def test_loss_falls_and_run_dir_is_complete(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    seen = []
    res = train(tiny(out, corpus, streams=2, steps=40, eval_every=20), progress_callback=seen.append)
    recs = records(out)
    assert [r["step"] for r in recs] == list(range(1, 41)) and seen == recs
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert math.isfinite(first) and last < first - 1.0, (first, last)
    for r in recs:
        assert set(r) >= {"step", "tokens", "lr", "loss", "grad_norm", "tokens_per_s", "agg_entropy"}
        assert 0.0 < r["agg_entropy"] <= math.log(2) + 1e-6
        assert r["tokens"] == r["step"] * 8 * 32
    assert [r["step"] for r in recs if "val_loss" in r] == [20, 40]
    assert res.val_loss == recs[-1]["val_loss"] < recs[19]["val_loss"]
    assert res.train_loss == last and res.steps == 40 and res.tokens == 40 * 256 and res.streams == 2

    model = ParScaleForCausalLM.from_pretrained(out / "model")
    assert model.streams == 2 and res.params == model.num_parameters(non_embedding=True)
    assert first == pytest.approx(math.log(model.config.vocab_size), rel=0.05)  # starts near uniform
    assert (out / "model" / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] == res.val_loss and summary["steps"] == 40
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["finished"] is True

    # the same out dir again: refused without --resume; a finished run with --resume is a no-op
    with pytest.raises(ParScaleError, match="already holds a training run"):
        train(tiny(out, corpus, streams=2, steps=40, eval_every=20))
    before = (out / "model" / "model.safetensors").stat().st_mtime_ns
    again = train(tiny(out, corpus, streams=2, steps=40, eval_every=20, resume=True))
    assert again.already_finished and again.val_loss == res.val_loss
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ParScaleError, match="'lr'"):  # resuming with other maths is refused
        train(tiny(out, corpus, streams=2, steps=40, eval_every=20, resume=True, lr=1e-2))
    # from the command line only --out and --resume are needed: the rest comes from train_config.json
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--resume", "--steps", "50"]) == 2
    assert "'steps'" in capsys.readouterr().err


def test_grad_accum_and_activation_checkpointing_keep_the_maths(tmp_path, corpus):
    a = train(tiny(tmp_path / "a", corpus, streams=2, steps=3))
    b = train(tiny(tmp_path / "b", corpus, streams=2, steps=3, grad_accum=4, activation_checkpointing=True))
    la, lb = [r["loss"] for r in records(a.out_dir)], [r["loss"] for r in records(b.out_dir)]
    assert la == pytest.approx(lb, rel=1e-5)
    c = train(tiny(tmp_path / "c", corpus, streams=2, steps=2, dtype="bfloat16"))
    assert math.isfinite(c.train_loss) and c.train_loss == pytest.approx(la[1], rel=0.05)


# --------------------------------------------------------------------------- recipes
def _loss_on_first_batch(model_dir, corpus, streams):
    """The loss a run with seed 0 sees at its first step, computed outside the trainer."""
    import torch.nn.functional as F

    from parscale.data import TokenBatches, load_corpus, load_tokenizer

    model = ParScaleForCausalLM.from_pretrained(model_dir, streams=streams)
    b = TokenBatches.build(load_corpus(corpus), load_tokenizer(model_dir), seq_len=32, global_batch=8,
                           progress=False).batch(0)
    with torch.no_grad():
        logits = model(b.inputs).logits
    return float(F.cross_entropy(logits.flatten(0, 1), b.labels.flatten()))


def test_frozen_backbone_recycling_and_dynamic_p(tmp_path, corpus, base_run):
    base = Path(base_run.model_dir)
    p2 = train(tiny(tmp_path / "p2", corpus, init_from=str(base), streams=2, freeze_backbone=True, steps=6))
    p4 = train(tiny(tmp_path / "p4", corpus, init_from=p2.model_dir, streams=4, freeze_backbone=True, steps=6))

    # recycling: the first loss of the new streams is the base model's, to within a small margin;
    # step 0 is evaluated, next to the init model's own held-out loss
    base_loss = _loss_on_first_batch(base, corpus, 1)
    for run in (p2, p4):
        step0, first = records(run.out_dir)[:2]
        assert step0["step"] == 0 and "loss" not in step0
        assert abs(step0["val_loss"] - step0["base_val_loss"]) < 0.01 * step0["base_val_loss"], step0
        assert math.isfinite(first["loss"]) and abs(first["loss"] - base_loss) < 0.01 * base_loss, (first, base_loss)

    # frozen runs write adapters: only the stream sets, recorded onto the one real base
    for run in (p2, p4):
        meta = json.loads((Path(run.model_dir) / "adapter_config.json").read_text())
        assert meta["base_model"] == str(base.resolve()) and not (Path(run.model_dir) / "config.json").exists()
        assert set(load_file(str(Path(run.model_dir) / "adapter.safetensors"))) <= {
            f"stream_sets.{p}.{n}" for p in (2, 4) for n in
            ("prefix_k", "prefix_v", *(f"aggregate_layer.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")))}
    B = ParScaleForCausalLM.from_pretrained(base).state_dict()
    M2 = ParScaleForCausalLM.from_pretrained(p2.model_dir).state_dict()
    M4 = ParScaleForCausalLM.from_pretrained(p4.model_dir).state_dict()
    assert all(torch.equal(M4[n], B[n]) and torch.equal(M2[n], B[n]) for n in B)  # frozen: bit-identical
    # P = 4 is the active set of the final adapter; P = 2 is carried along unchanged
    for n in [n for n in M2 if n.startswith("stream_sets.2.")]:
        assert torch.equal(M4[n], M2[n])
    # the stream tensors trained: the aggregator's last layer starts at exactly zero
    assert M2["stream_sets.2.aggregate_layer.2.weight"].abs().sum() > 0
    assert M4["stream_sets.4.aggregate_layer.2.weight"].abs().sum() > 0

    # one directory, two stream sets: dynamic P at load time
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    m2 = ParScaleForCausalLM.from_pretrained(p4.model_dir, streams=2)
    m4 = ParScaleForCausalLM.from_pretrained(p4.model_dir, streams=4)
    ref2 = ParScaleForCausalLM.from_pretrained(p2.model_dir)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, ref2(ids).logits)
        assert not torch.equal(m4(ids).logits, m2(ids).logits)


def test_two_stage_in_one_command(tmp_path, corpus):
    out = tmp_path / "two"
    res = train(tiny(out, corpus, streams=2, stage1_tokens=8 * 256, stage2_tokens=6 * 256, eval_every=8))
    recs = records(out)
    assert [(r["stage"], r["streams"]) for r in recs] == [(1, 1)] * 8 + [(2, 2)] * 6
    assert not any("agg_entropy" in r for r in recs[:8]) and all("agg_entropy" in r for r in recs[8:])
    # adding the streams does not throw the model back: the first stage-2 loss stays near stage 1's
    assert abs(recs[8]["loss"] - recs[7]["loss"]) < 0.1 * recs[7]["loss"]
    assert res.streams == 2 and res.steps == 14
    cfg = ParScaleForCausalLM.from_pretrained(out / "model").config
    assert cfg.streams == 2 and 2 in cfg.stream_sets


# --------------------------------------------------------------------------- config and errors
def test_config_file_keys_and_cli_overrides(tmp_path, corpus):
    f = tmp_path / "run.toml"
    f.write_text(f'data = "{corpus}"\nkv-heads = 1\nseq_len = 64\nsteps = 5\nlr = 0.01\n')
    args = build_parser().parse_args(["train", "--config", str(f), "--lr", "0.02", "--out", str(tmp_path / "o")])
    from parscale.commands.train import build_config

    cfg = build_config(args)
    assert (cfg.kv_heads, cfg.seq_len, cfg.steps, cfg.lr) == (1, 64, 5, 0.02)  # the flag wins
    assert cfg.batch_size == TrainConfig.__dataclass_fields__["batch_size"].default

    y = tmp_path / "run.yaml"
    y.write_text("steps: 7\nfreeze_backbone: false\nlr: 1e-3\n")
    assert load_config_file(y) == {"steps": 7, "freeze_backbone": False, "lr": "1e-3"}
    assert TrainConfig.from_sources(y).lr == 1e-3  # YAML 1.1 reads 1e-3 as text; accepted as a number

    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 5\n")
    with pytest.raises(ParScaleError, match="unknown key 'stepz'.*'steps'"):
        load_config_file(bad)
    bad.write_text('steps = 5\nlr = "fast"\n')
    with pytest.raises(ParScaleError, match="'lr'"):
        TrainConfig.from_sources(bad)
    bad.write_text("steps = [5\n")
    with pytest.raises(ParScaleError, match="cannot parse"):
        load_config_file(bad)


@pytest.mark.parametrize("kw, match", [
    (dict(steps=5, batch_size=6, grad_accum=4), "'grad_accum'"),
    (dict(steps=5, tokens=100), "'steps'"),
    (dict(), "'tokens'.*budget"),
    (dict(steps=5, streams=2, freeze_backbone=True), "'freeze_backbone'.*init-from"),
    (dict(stage1_tokens=100, stage2_tokens=100), "'streams'"),
    (dict(steps=5, init_from="x", layers=3), "'layers'.*init-from"),
    (dict(steps=5, min_lr=1.0), "'min_lr'"),
    (dict(steps=5, schedule="linear"), "'schedule'"),
    (dict(steps=0), "'steps'"),
])
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ParScaleError, match=match):
        TrainConfig(**kw)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    bad_cfg = tmp_path / "c.toml"
    bad_cfg.write_text("layerz = 2\n")
    cases = [
        (["--data", str(tmp_path / "missing"), "--steps", "2"], "does not exist"),
        (["--data", str(empty), "--steps", "2"], "empty"),
        (["--config", str(bad_cfg), "--steps", "2"], "unknown key 'layerz'"),
        (["--steps", "2", "--lr", "-1"], "'lr'"),
    ]
    for i, (argv, match) in enumerate(cases):
        code = main(["train", *argv, "--out", str(tmp_path / f"o{i}"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and "\n" not in err, (argv, err)


def test_recycle_a_hugging_face_llama_dir(tmp_path, corpus, base_run):
    from conftest import official_config, official_tensors, write_checkpoint

    c = official_config(model_type="llama", vocab=320, hidden=32, heads=4, kv=2, inter=48, bias=False)
    hf = write_checkpoint(tmp_path / "llama", c, official_tensors(c, dtype=torch.float32))
    res = train(tiny(tmp_path / "r", corpus, init_from=str(hf), tokenizer=base_run.model_dir, streams=2,
                     prefix_tokens=3, freeze_backbone=True, steps=3))
    assert math.isfinite(res.train_loss)
    model = ParScaleForCausalLM.from_pretrained(res.model_dir)
    assert (model.streams, model.config.prefix_tokens, model.config.attention_bias) == (2, 3, False)
    W, B = model.state_dict(), load_file(str(hf / "model.safetensors"))  # the adapter, onto its base
    assert all(torch.equal(W[n], B[n]) for n in B)
