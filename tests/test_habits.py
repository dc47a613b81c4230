"""Everyday habits: Hugging Face-style model attributes, the shipped example config, training's
progress lines and short-run schedule, --init-from's data, and the plots' bands and axes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from parscale import ParScaleError, ParScaleForCausalLM

from conftest import write_corpus

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- model attributes
def test_device_dtype_and_gradient_checkpointing(tiny_config):
    m = ParScaleForCausalLM(tiny_config(P=2))
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    m = m.to(torch.bfloat16)
    assert m.dtype == torch.bfloat16
    m.gradient_checkpointing_enable()
    assert m.gradient_checkpointing
    m.gradient_checkpointing_disable()
    assert not m.gradient_checkpointing


@pytest.mark.parametrize("spelling,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                            ("float32", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_from_pretrained_torch_dtype_alias(tmp_path, tiny_config, spelling, dtype):
    torch.manual_seed(0)
    ref = ParScaleForCausalLM(tiny_config(P=2))
    ref.save_pretrained(tmp_path)
    a = ParScaleForCausalLM.from_pretrained(tmp_path, torch_dtype=spelling)
    b = ParScaleForCausalLM.from_pretrained(tmp_path, dtype=spelling)
    assert a.dtype == b.dtype == dtype
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ParScaleError, match="disagree"):
        ParScaleForCausalLM.from_pretrained(tmp_path, dtype="float32", torch_dtype="bfloat16")


def test_generation_config_from_file_or_config(tmp_path, tiny_config):
    m = ParScaleForCausalLM(tiny_config(eos_token_id=5, bos_token_id=1))
    assert (m.generation_config.eos_token_id, m.generation_config.bos_token_id) == (5, 1)
    m.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "generation_config.json").exists()  # nothing beyond config.json
    assert ParScaleForCausalLM.from_pretrained(tmp_path / "plain").generation_config.eos_token_id == 5
    gen = {"eos_token_id": [5, 7], "do_sample": True, "top_p": 0.9, "transformers_version": "4.51"}
    (tmp_path / "plain" / "generation_config.json").write_text(json.dumps(gen))
    g = ParScaleForCausalLM.from_pretrained(tmp_path / "plain").generation_config
    assert g.eos_token_id == [5, 7] and g.do_sample and g.top_p == 0.9
    assert g.extra == {"transformers_version": "4.51"}
    # saved again, the file round-trips (unknown keys included)
    m2 = ParScaleForCausalLM.from_pretrained(tmp_path / "plain")
    m2.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text())["transformers_version"] == "4.51"


@pytest.mark.parametrize("content,expect", [(b"\x00\x01", "binary"), (b"{", "not valid JSON"),
                                            (b'{"top_k": -1}', "top_k"), (b'{"eos_token_id": "x"}', "eos_token_id"),
                                            (b'{"do_sample": 1}', "do_sample")])
def test_generation_config_bad_file(tmp_path, tiny_config, content, expect):
    ParScaleForCausalLM(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_bytes(content)
    with pytest.raises(ParScaleError, match=expect):
        ParScaleForCausalLM.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- examples
def test_example_run_toml_parses_to_a_valid_ddp_config():
    from parscale.training.options import TrainConfig, load_config_file

    values = load_config_file(ROOT / "examples" / "run.toml")
    values["threads"] = 1  # "auto" is resolved by the CLI
    cfg = TrainConfig(**values)
    assert cfg.batch_size % 2 == 0  # splits over the README's 2 ranks
    assert cfg.out == "runs/ddp" and cfg.streams == 2


def test_example_runs_csv_fits():
    from parscale.scaling_law import fit_law, load_csv

    N, P, loss = load_csv(ROOT / "examples" / "runs.csv")
    assert len(N) == 12 and set(P) == {1, 2, 4, 8}
    results = json.loads((ROOT / "docs" / "reproduction" / "results.json").read_text())
    assert fit_law(N, P, loss).r2 == pytest.approx(results["fit"]["r2"], abs=1e-3)


# --------------------------------------------------------------------------- training
def test_short_runs_decay_the_learning_rate():
    from parscale.training.options import TrainConfig
    from parscale.training.trainer import lr_at, plan_stages

    for steps in (1, 2, 5, 10, 39):
        cfg = TrainConfig(steps=steps, warmup_steps=20, lr=1e-3, min_lr=1e-4)
        (stage,) = plan_stages(cfg)
        assert stage.warmup <= steps // 2
        lrs = [lr_at(cfg, stage, s) for s in range(steps)]
        if steps >= 3:  # (2 steps: one warm-up step, then the peak)
            assert lrs[-1] < cfg.lr  # decaying by the end, not still warming up
    cfg = TrainConfig(steps=1000, warmup_steps=20)
    assert plan_stages(cfg)[0].warmup == 20  # long runs keep their warm-up


def test_two_stage_lines_and_init_from_inherits_the_parents_data(tmp_path):
    import os

    write_corpus(tmp_path / "corpus", n_files=6)
    env = {**os.environ, "PARSCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--eval-tokens", "32",
              "--threads", "1", "--prefix-tokens", "2"]
    r = subprocess.run([sys.executable, "-m", "parscale.cli", "train", "--data", "corpus", "--data-max-bytes",
                        "20000", "--size", "tiny", "--streams", "2", "--stage1-tokens", "96",
                        "--stage2-tokens", "64", "--out", "two", *common],
                       cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert "two-stage: 3 steps at P=1 then 2 at P=2" in r.stderr and "at P=1" in r.stderr
    assert "stage 2 at step 3: P=2" in r.stderr
    assert "parscale train: data corpus:" in r.stderr  # says what it tokenizes
    r = subprocess.run([sys.executable, "-m", "parscale.cli", "train", "--init-from", "two/model", "--streams", "4",
                        "--freeze-backbone", "--steps", "1", "--out", "rec", *common],
                       cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert "using the data of the run two/model came from" in r.stderr
    saved = json.loads((tmp_path / "rec" / "train_config.json").read_text())
    assert (saved["data"], saved["data_max_bytes"]) == ("corpus", 20000)


# --------------------------------------------------------------------------- plots
def test_law_band_contains_the_fit_and_widens_away_from_the_data():
    from parscale.plots.law import _band
    from parscale.scaling_law import fit_law, law

    rng = np.random.default_rng(0)
    N = np.repeat([1e8, 3e8, 1e9, 3e9], 3)
    P = np.tile([1, 2, 4], 4).astype(float)
    loss = law(N, P, 1.0, 0.05, 0.2, 0.4) * (1 + 0.003 * rng.standard_normal(N.size))
    fit = fit_law(N, P, loss)
    boot = fit.bootstrap(n=20, seed=0)
    grid = np.geomspace(3e7, 1e10, 50)
    lo, hi = _band(fit, boot, grid, 2.0)
    assert np.all(lo <= hi)
    inside = (lo <= fit.predict(grid, 2.0) + 1e-9) & (fit.predict(grid, 2.0) <= hi + 1e-9)
    assert inside.mean() > 0.9
    width = hi - lo
    assert width[0] > width[25] and width[-1] > width[25]  # extrapolation is less certain


def test_plots_write_with_bands_and_extrapolation(tmp_path):
    from parscale.plots.law import plot_law_fit, plot_multiplier
    from parscale.scaling_law import fit_law, law

    N = np.repeat([1e8, 3e8, 1e9], 2)
    P = np.tile([1, 4], 3).astype(float)
    fit = fit_law(N, P, law(N, P, 1.0, 0.05, 0.2, 0.4))
    boot = fit.bootstrap(n=4, seed=0)
    assert plot_law_fit(fit, tmp_path / "a.png", boot=boot).stat().st_size > 0
    assert plot_multiplier({"ours": fit, "same": fit.k, "paper": 0.39}, tmp_path / "m.png", p_max=16,
                           trained_p=4, bands={"ours": boot.intervals["k"]}).stat().st_size > 0
    with pytest.raises(ParScaleError, match="trained_p"):
        plot_multiplier(0.3, tmp_path / "x.png", trained_p=0)


def test_plot_style_helpers():
    from matplotlib.figure import Figure

    from parscale.plots.style import coincident, p_axis, tokens_axis

    assert coincident([0.39, 1e-8, 0.39, 0.3900001, 0.5]) == {2: 0, 3: 0}
    ax = Figure().add_subplot()
    ax.plot([1, 8], [0, 1])
    p_axis(ax, [1, 2, 4, 8])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    ax2 = Figure().add_subplot()
    ax2.plot([0, 1_750_000], [0, 1])
    tokens_axis(ax2)
    labels = [ax2.xaxis.get_major_formatter()(x, 0) for x in ax2.get_xticks()]
    assert len(ax2.get_xticks()) <= 6 and all(len(s) <= 5 for s in labels)


def test_replot_the_committed_reproduction(tmp_path):
    import shutil

    from parscale.reproduce import replot

    src = ROOT / "docs" / "reproduction"
    shutil.copy(src / "results.json", tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    results["bootstrap"]["n"] = 4  # keep the test fast; the committed plots used the recorded 200
    (tmp_path / "results.json").write_text(json.dumps(results))
    drawn = replot(tmp_path)
    assert set(drawn) == {"law_fit", "loss_vs_streams", "multiplier"}  # no runs/*/metrics.jsonl here
    assert all(p.stat().st_size > 0 for p in drawn.values())
