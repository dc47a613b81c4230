"""DDP: `torchrun --nproc_per_node 2 parscale train` on CPU (gloo) follows the single-process
loss curve with the same global batch; only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import records, tiny, train_flags, write_corpus

from parscale.training import train


def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    # global batch 8: one process takes all 8 rows; under DDP each rank takes 4, in 2 micro-batches
    cfg = tiny(tmp_path / "single", corpus, streams=2, steps=5, eval_every=5)
    single = train(cfg)

    ddp_out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "parscale.cli", "train"]
    argv += train_flags(cfg.replace(out=str(ddp_out), grad_accum=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parscale train: done") == 1  # only rank 0 reports

    one, two = records(single.out_dir), records(ddp_out)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]  # one line per step: only rank 0 logs
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)
    assert json.loads((ddp_out / "summary.json").read_text())["steps"] == 5
    wa, wb = (load_file(str(Path(d) / "model" / "model.safetensors")) for d in (single.out_dir, ddp_out))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
