"""FSDP2: `torchrun --nproc_per_node 2 parscale train --fsdp` on CPU (gloo) follows the
single-process run, frozen backbone included, and resumes bit-exactly like DDP."""

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

from parscale import ParScaleError
from parscale.training import train

# Sharded vs one process: the same maths, a different summation order in the gradient
# reduce-scatter and the norm; measured ~1e-7 relative on the loss, so 1e-5 is a real check.
REL = 1e-5


def torchrun(cfg, timeout=240, wait=True):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "parscale.cli", "train"]
    argv += train_flags(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")


def test_fsdp_two_processes_match_one(tmp_path, corpus):
    cfg = tiny(tmp_path / "single", corpus, streams=2, steps=5, eval_every=5)
    single = train(cfg)
    out = tmp_path / "fsdp"
    proc = torchrun(cfg.replace(out=str(out), grad_accum=2, fsdp=True))
    assert proc.stdout.count("parscale train: done") == 1
    one, two = records(single.out_dir), records(out)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=REL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=10 * REL)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=REL)
    wa, wb = (load_file(str(Path(d) / "model" / "model.safetensors")) for d in (single.out_dir, out))
    assert sorted(wa) == sorted(wb)  # full (gathered) tensors, the single-process format
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)


def test_fsdp_frozen_backbone_resumes_bit_exactly(tmp_path, corpus):
    base = Path(train(tiny(tmp_path / "base", corpus, streams=1, steps=6)).model_dir)
    kw = dict(init_from=str(base), streams=2, freeze_backbone=True, dtype="float32", fsdp=True,
              steps=30, checkpoint_every=4, eval_every=10)
    cfg = tiny(tmp_path / "killed", corpus, **kw)
    proc = torchrun(cfg, wait=False)
    state = Path(cfg.out) / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 200
    try:  # kill the whole torchrun group after the first checkpoint, mid-interval
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and len(records(cfg.out)) >= 7:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 30 and not (Path(cfg.out) / "summary.json").exists()

    torchrun(cfg.replace(resume=True))
    torchrun(cfg.replace(out=str(tmp_path / "reference")))
    for sub in ("model/adapter.safetensors", "checkpoint/adapter.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = (load_file(str(Path(d) / sub)) for d in (cfg.out, tmp_path / "reference"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a), sub
    got, want = records(cfg.out), records(tmp_path / "reference")
    assert [r["step"] for r in got] == list(range(31))  # step 0 (evaluation) and every step once
    assert [(r.get("loss"), r.get("val_loss")) for r in got] == [(r.get("loss"), r.get("val_loss")) for r in want]

    # and the sharded frozen run follows the single-process one
    single = train(cfg.replace(out=str(tmp_path / "single"), fsdp=False))
    for a, b in zip(records(single.out_dir), want):
        assert b.get("loss", 0) == pytest.approx(a.get("loss", 0), rel=REL)
    assert want[-1]["val_loss"] == pytest.approx(single.val_loss, rel=REL)


def test_fsdp_needs_torchrun_and_one_stage(tmp_path, corpus):
    with pytest.raises(ParScaleError, match="'fsdp'.*torchrun"):
        train(tiny(tmp_path / "x", corpus, streams=2, steps=1, fsdp=True))
    with pytest.raises(ParScaleError, match="'fsdp'.*two-stage"):
        tiny(tmp_path / "y", corpus, streams=2, stage1_tokens=100, stage2_tokens=100, fsdp=True)
