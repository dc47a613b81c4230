"""Exact resume: a run SIGKILLed mid-training and resumed ends bit-identical to an uninterrupted
one; an interrupted checkpoint swap is recovered; the optimizer state round-trips without pickle."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import records, tiny, train_flags, write_corpus

from parscale.training import train
from parscale.training.checkpoint import (load_checkpoint, optimizer_from_files, optimizer_to_files, recover,
                                          save_checkpoint)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")


def assert_same_weights(dir_a, dir_b):
    a, b = load_file(str(Path(dir_a) / "model.safetensors")), load_file(str(Path(dir_b) / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigkill_then_resume_is_bit_identical(tmp_path, corpus):
    steps, every = 80, 10
    cfg = tiny(tmp_path / "killed", corpus, streams=2, steps=steps, checkpoint_every=every, eval_every=25)
    argv = [sys.executable, "-m", "parscale.cli", "train"]
    argv += train_flags(cfg)
    proc = subprocess.Popen(argv, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "checkpoint" / "trainer_state.json"
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        # kill it after the first checkpoint, a few steps into the next interval
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= every + 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < steps

    resumed = train(cfg.replace(resume=True))
    reference = train(cfg.replace(out=str(tmp_path / "reference")))
    assert_same_weights(resumed.model_dir, reference.model_dir)
    assert_same_weights(Path(resumed.out_dir) / "checkpoint", Path(reference.out_dir) / "checkpoint")
    # the metrics log has every step once, with the uninterrupted run's numbers
    got, want = records(resumed.out_dir), records(reference.out_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [(r["loss"], r.get("val_loss")) for r in got] == [(r["loss"], r.get("val_loss")) for r in want]
    assert resumed.val_loss == reference.val_loss


def test_two_stage_resume_across_the_stage_boundary(tmp_path, corpus):
    class Crash(Exception):
        pass

    def crash_at(step):
        def cb(rec):
            if rec["step"] == step:
                raise Crash
        return cb

    def state(out):
        s = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
        return s["step"], s["stage"]

    reference = train(tiny(tmp_path / "ref", corpus, streams=3, stage1_tokens=6 * 256,
                           stage2_tokens=6 * 256, checkpoint_every=3))
    # crash in stage 2, with the last checkpoint (step 4) inside stage 1 ...
    a = tiny(tmp_path / "a", corpus, streams=3, stage1_tokens=6 * 256, stage2_tokens=6 * 256,
             checkpoint_every=4)
    with pytest.raises(Crash):
        train(a, progress_callback=crash_at(7))
    assert state(tmp_path / "a") == (4, 0)
    resumed = train(a.replace(resume=True))
    assert_same_weights(resumed.model_dir, reference.model_dir)
    # ... and with the last checkpoint taken exactly at the boundary (step 6, still stage 1)
    cfg = a.replace(out=str(tmp_path / "b"), checkpoint_every=3)
    with pytest.raises(Crash):
        train(cfg, progress_callback=crash_at(8))
    assert state(tmp_path / "b") == (6, 0)
    with pytest.raises(Crash):
        train(cfg.replace(resume=True), progress_callback=crash_at(11))
    assert state(tmp_path / "b") == (9, 1)
    resumed = train(cfg.replace(resume=True))
    assert_same_weights(resumed.model_dir, reference.model_dir)
    assert [r["loss"] for r in records(resumed.out_dir)] == [r["loss"] for r in records(reference.out_dir)]


def test_interrupted_checkpoint_swap_is_recovered(tmp_path):
    from parscale import ParScaleConfig, ParScaleForCausalLM

    model = ParScaleForCausalLM(ParScaleConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, streams=2, prefix_tokens=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randint(0, 64, (2, 5))).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    final, old, tmp = tmp_path / "checkpoint", tmp_path / "checkpoint.old", tmp_path / "checkpoint.tmp"

    os.rename(final, old)  # killed between "rename current to .old" and "rename .tmp to current"
    tmp.mkdir()
    (tmp / "half-written").write_text("x")
    assert recover(tmp_path) == final
    assert not old.exists() and not tmp.exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded.state["step"] == 1

    # optimizer state: tensors and hyper-parameters round-trip exactly, and load into a new AdamW
    sd = opt.state_dict()
    back = optimizer_from_files(*optimizer_to_files(opt))
    assert back["param_groups"] == sd["param_groups"]
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    fresh.load_state_dict(loaded.optimizer_state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])

    # a checkpoint directory without trainer_state.json (killed mid-write, never swapped in) is no checkpoint
    (final / "trainer_state.json").unlink()
    assert load_checkpoint(tmp_path) is None
