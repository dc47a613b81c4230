"""`parscale reproduce`: the micro preset end to end on a tiny corpus (files written, finished runs
skipped, an interrupted run resumed rather than restarted), the presets' promises, conclusions
computed from the numbers, and one-line errors."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import write_corpus

from parscale import ParScaleError
from parscale.cli import main
from parscale.reproduce import (
    PRESETS,
    RunRecord,
    conclude,
    get_preset,
    grid_name,
    plan_runs,
    reproduce,
)
from parscale.scaling_law import fit_law, law
from parscale.training import train

class Spy:
    """Wraps ``train``: counts calls and what each one did."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, progress_callback=None):
        result = train(cfg, progress_callback=progress_callback)
        self.calls.append((Path(cfg.out).name, result.already_finished))
        return result

    @property
    def trained(self):
        return [name for name, finished in self.calls if not finished]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARSCALE_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
        yield corpus


def run_micro(out, corpus, spy=None):
    return reproduce("micro", out, data=str(corpus), threads=1, progress=False, train_fn=spy)


@pytest.fixture(scope="module")
def first(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    spy = Spy()
    return out, run_micro(out, env, spy), spy


# --------------------------------------------------------------------------- end to end
def test_writes_results_report_and_plots(first):
    out, result, spy = first
    preset = PRESETS["micro"]
    n_grid = len(preset.sizes) * len(preset.streams)
    assert len(spy.trained) == n_grid + 2  # the grid and the two continuations, each trained once

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == n_grid
    for r in runs:
        assert {"size", "params", "P", "tokens", "val_loss", "wall_s", "tokens_per_s"} <= set(r)
        assert r["threads"] == 1 and r["trained_now"] and r["resumed_from_step"] == 0
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert (out / "runs" / r["name"] / "model" / "model.safetensors").is_file()
    assert {r["tokens"] for r in runs} == {preset.tokens}  # one token budget for every run
    for size in preset.sizes:  # the stream parameters are counted in N
        ps = sorted((r for r in runs if r["size"] == size.name), key=lambda r: r["P"])
        assert [r["P"] for r in ps] == list(preset.streams)
        assert all(a["params"] < b["params"] for a, b in itertools.pairwise(ps))
    assert {"E", "A", "alpha", "k", "r2"} <= set(results["fit"])
    # the fit is the fit of these very losses
    assert [row["loss"] for row in results["fit"]["residuals"]] == [r["val_loss"] for r in runs]
    assert set(results["bootstrap"]["intervals"]) == {"E", "A", "alpha", "k"}
    bb = results["fit_backbone_n"]  # the same fit with N = the size's P = 1 count
    assert {"E", "A", "alpha", "k", "r2"} <= set(bb) and 0 < bb["stream_params_added_to_N"][0]
    two = results["two_stage"]
    assert two["stage1"]["name"] == grid_name(preset.two_stage.base_size, 1)
    assert two["continued"]["P"] == 1 and two["recycled"]["P"] == preset.two_stage.streams
    assert two["continued"]["tokens"] == two["recycled"]["tokens"] < two["stage1"]["tokens"]
    assert [g["name"] for g in two["grid_reference"]] == [
        grid_name(preset.two_stage.base_size, preset.two_stage.streams)]
    assert two["gain_recycled_vs_continued"] == pytest.approx(
        two["continued"]["val_loss"] - two["recycled"]["val_loss"])
    assert results["conclusions"] and results["preset"]["name"] == "micro"
    assert "load_average" in results["machine"]

    report = (out / "report.md").read_text()
    for text in ("## Conclusions", "## Runs", "## Fitted law", "## Two-stage", "arXiv 2505.10475",
                 "0.3935", "0.1894", *[r["name"] for r in runs]):
        assert text in report
    assert "falls with P at every size: **" in report
    for name in results["plots"].values():
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({name})" in report
    assert set(result.plots) == {"law_fit", "loss_vs_streams", "multiplier", "learning_curves", "stream_gap"}

    # what the streams do: every P > 1 grid model, on the same windows as its held-out loss
    usage = results["stream_usage"]
    assert set(usage) == {r["name"] for r in runs if r["P"] > 1}
    for r in runs:
        if r["P"] > 1:
            assert usage[r["name"]]["loss"] == pytest.approx(r["val_loss"], abs=1e-5)
            assert len(usage[r["name"]]["stream_losses"]) == r["P"]
    assert "## What the streams do" in report and "Combining the streams:" in report


def test_second_invocation_trains_nothing(first, env):
    out, _, _ = first
    summaries = sorted((out / "runs").glob("*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    old = json.loads((out / "results.json").read_text())
    old_mtime = (out / "results.json").stat().st_mtime_ns
    spy = Spy()
    result = run_micro(out, env, spy)
    assert spy.trained == [] and len(spy.calls) == len(summaries)
    assert result.trained == [] and len(result.skipped) == len(summaries)
    assert {p: p.stat().st_mtime_ns for p in summaries} == before  # nothing rewritten
    usage_files = sorted((out / "runs").glob("*/stream_usage.json"))
    assert usage_files and all(p.stat().st_mtime_ns < old_mtime for p in usage_files)  # cached
    new = json.loads((out / "results.json").read_text())
    assert [r["val_loss"] for r in new["runs"]] == [r["val_loss"] for r in old["runs"]]
    assert not any(r["trained_now"] for r in new["runs"])
    assert all(r["threads"] == 1 for r in new["runs"])  # from the runs' saved settings
    assert "already finished" in (out / "report.md").read_text()


class Interrupt(Exception):
    pass


def test_interrupted_run_is_resumed_not_restarted(first, env):
    out, _, _ = first
    name = grid_name("xs", 2)
    old = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}[name]
    run = next(r for r in plan_runs(PRESETS["micro"], out, data=str(env), threads=1) if r.name == name)
    every, total = run.config.checkpoint_every, run.config.total_steps()
    assert 0 < every < total - 1

    # Kill the run after its first checkpoint: a checkpoint, no final model, no summary.
    import shutil

    shutil.rmtree(run.config.out)

    def die(rec):
        if rec["step"] == every + 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(run.config, progress_callback=die)
    run_dir = Path(run.config.out)
    assert (run_dir / "checkpoint").is_dir()
    assert not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()

    spy = Spy()
    result = run_micro(out, env, spy)
    assert spy.trained == [name]  # only the interrupted run trains; the others are skipped
    rec = next(r for r in result.runs if r.name == name)
    assert rec.trained_now and rec.resumed_from_step == every
    # resumed, not restarted: the first session's records are kept, each step is logged once, and
    # exact resume lands on the uninterrupted run's held-out loss
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))
    assert rec.val_loss == pytest.approx(old["val_loss"], rel=1e-6)


# --------------------------------------------------------------------------- presets and plan
def test_presets_keep_their_promises():
    from parscale.config import ParScaleConfig
    from parscale.cost import param_counts

    for name, preset in PRESETS.items():
        plan = plan_runs(preset, "out")
        grid = [r for r in plan if r.experiment == "grid"]
        assert len(grid) >= 6, name  # the 4-constant fit is determined
        assert {r.config.tokens for r in grid} == {preset.tokens}
        assert len({r.config.out for r in plan}) == len(plan)
        assert all(r.config.resume and r.config.quiet for r in plan)
        # both continuations start from the grid's P = 1 model of the base size, trained at a
        # constant LR (the stable phase), and decay the LR over the same extra tokens and batches
        stage1 = next(r for r in grid if r.name == grid_name(preset.two_stage.base_size, 1))
        assert {r.config.schedule for r in grid} == {"constant"}
        cont = [r for r in plan if r.experiment == "two_stage"]
        assert [r.streams for r in cont] == [1, preset.two_stage.streams]
        assert {r.config.schedule for r in cont} == {"cosine"}
        assert {r.config.init_from for r in cont} == {str(Path(stage1.config.out) / "model")}
        assert len({(r.config.tokens, r.config.lr, r.config.schedule, r.config.seed) for r in cont}) == 1
        assert {r.config.data for r in plan} == {preset.data}
    full = PRESETS["full"]
    assert len(full.sizes) >= 3 and full.streams == (1, 2, 4, 8)
    n = [param_counts(ParScaleConfig(vocab_size=full.vocab_size, hidden_size=s.hidden,
                                     intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                                     num_attention_heads=s.heads, num_key_value_heads=s.kv_heads),
                      1).non_embedding for s in full.sizes]
    assert max(n) / min(n) >= 4  # N spans enough to matter
    assert 0.02 <= full.two_stage.extra_fraction <= 0.05
    assert full.prefix_tokens < 48 and full.data_max_bytes is None
    assert PRESETS["quick"].data_max_bytes is not None  # quick caps the corpus: data prep stays short


def test_bad_preset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ParScaleError, match=r"unknown preset 'huge' \(choose one of: micro, quick, full\)"):
        get_preset("huge")
    with pytest.raises(ParScaleError, match="unknown preset 'huge'"):
        reproduce("huge", tmp_path / "x")
    assert main(["reproduce", "--preset", "huge", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown preset 'huge'" in err
    assert not (tmp_path / "y").exists()
    with pytest.raises(ParScaleError, match="threads"):
        reproduce("micro", tmp_path / "z", threads=0)
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--preset", "micro", "--threads", "0", "--out", str(tmp_path / "z")])
    assert e.value.code == 2 and "positive integer or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_auto_threads_uses_the_free_cores(monkeypatch, tmp_path):
    import os

    import parscale.reproduce as rep

    cores = len(os.sched_getaffinity(0))
    assert 1 <= rep.auto_threads(samples=2, interval=0.0) <= cores
    real_open = open

    def fake(running):
        def opener(path, *a, **kw):
            if path == "/proc/loadavg":
                (tmp_path / "loadavg").write_text(f"0.5 0.5 0.5 {running}/90 1234\n")
                return real_open(tmp_path / "loadavg", *a, **kw)
            return real_open(path, *a, **kw)
        return opener

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr("builtins.open", fake(1))  # only the reader runs: every core is free
    assert rep.auto_threads(samples=3, interval=0.0) == 4
    monkeypatch.setattr("builtins.open", fake(3))  # two other runnable tasks
    assert rep.auto_threads(samples=3, interval=0.0) == 2
    monkeypatch.setattr("builtins.open", fake(9))  # busier than the machine: still one thread
    assert rep.auto_threads(samples=3, interval=0.0) == 1


# --------------------------------------------------------------------------- conclusions
def records(losses: dict[tuple[str, int], float], params: dict[str, int]) -> list[RunRecord]:
    return [RunRecord(name=f"{s}-p{P}", size=s, params=params[s] + 1000 * P, P=P, tokens=1000,
                      val_loss=loss, train_loss=None, wall_s=1.0, tokens_per_s=1000.0, steps=1)
            for (s, P), loss in losses.items()]


def test_conclusions_follow_the_numbers():
    params = {"a": 1_000_000, "b": 4_000_000}
    # losses from the law with k = 0.4: loss falls with P and with N everywhere
    true = {"E": 1.5, "A": 0.002, "alpha": 0.3, "k": 0.4}
    losses = {(s, P): float(law(params[s] + 1000 * P, P, **true)) for s in params for P in (1, 2, 4, 8)}
    runs = records(losses, params)
    fit = fit_law([r.params for r in runs], [r.P for r in runs], [r.val_loss for r in runs])
    text = "\n".join(conclude(runs, fit, None, None))
    assert "falls with P at every size: **yes**" in text
    assert "falls with model size at every P: **yes**" in text
    assert "fits the points well" in text and "do **not** rule out" not in text
    assert "Going from P=1 to P=8 changes the held-out loss by -" in text
    assert f"k = {fit.k:.3g}" in text and abs(fit.k - 0.4) < 0.02

    # a fit that puts k at its bound although the loss falls with P: the report says both
    import dataclasses

    text = "\n".join(conclude(runs, dataclasses.replace(fit, k=1e-8), None, None))
    assert "do **not** rule out k ≈ 0" in text and "Yet the measured loss does fall with P" in text

    # stream usage: near-copies (the best single stream as good as the model) vs real combining
    copies = {"a-p2": {"combination_gain": 0.002}, "b-p8": {"combination_gain": -0.001}}
    text = "\n".join(conclude(runs, fit, None, None, None, copies))
    assert "in the 2 P > 1 models the best single stream alone" in text and "-0.0010 to +0.0020" in text
    assert "near-copies" in text
    combined = {**copies, "b-p4": {"combination_gain": 0.05}}
    text = "\n".join(conclude(runs, fit, None, None, None, combined))
    assert "near-copies" not in text and "combining helps most at b-p4" in text
    assert "Combining the streams" not in "\n".join(conclude(runs, fit, None, None))

    # the same numbers with one exception: b at P = 4 no better than at P = 2
    losses[("b", 4)] = losses[("b", 2)] + 0.01
    runs = records(losses, params)
    text = "\n".join(conclude(runs, fit, None, None))
    assert "falls with P at every size: **no** — exceptions: b P=2" in text
    assert "b P=4" in text and "a P=" not in text.split("exceptions:")[1].split("\n")[0]

    # no benefit from P at all: the fit's k goes to its bound and the report says so
    flat = {(s, P): float(law(params[s], 1, **true)) for s in params for P in (1, 2, 4, 8)}
    runs = records(flat, params)
    fit0 = fit_law([r.params for r in runs], [r.P for r in runs], [r.val_loss for r in runs])
    text = "\n".join(conclude(runs, fit0, None, None))
    assert fit0.k < 0.01 and "do **not** rule out k ≈ 0" in text
    assert "falls with P at every size: **no**" in text and "Yet the measured loss" not in text
    assert np.isfinite(fit0.r2)


@pytest.fixture(scope="module")
def ablate():
    """experiments/ablate_streams.py (what docs/reproduction/README.md's tables came from), as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "ablate_streams.py"
    spec = importlib.util.spec_from_file_location("ablate_streams", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablation_script_reads_a_reproduction(first, ablate, capsys):
    mod = ablate
    out, result, _ = first
    gaps = mod.gap_table(out)
    losses = {(r.size, r.P): r.val_loss for r in result.runs}
    want = losses[("xs", 2)] - losses[("xs", 1)]
    row = next(line for line in gaps.splitlines() if line.startswith("| xs-p2 − xs-p1 |"))
    assert row.split("|")[-3].strip() == f"{want:+.3f}"  # the last evaluation is the final loss
    assert "xxs-p4 − xxs-p1" in gaps and "twostage" not in gaps
    same = mod.compare_table(out, out)
    assert same.count("+0.0000") == len(list((out / "runs").iterdir()))
    assert mod.main(["--out", str(out), "--gaps", str(out)]) == 0
    assert capsys.readouterr().out.strip() == gaps


def test_ablation_stream_usage_and_shared_prefix(first, ablate):
    import torch

    from parscale import ParScaleConfig, ParScaleForCausalLM

    mod = ablate
    out, result, _ = first
    run = next(r for r in result.runs if r.P == 4)
    use = mod.stream_usage(out / "runs" / run.name)
    assert use["loss"] == pytest.approx(run.val_loss, abs=1e-5)  # the same windows as the trainer's
    assert len(use["stream_losses"]) == 4 and sum(use["mean_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= use["entropy_over_lnP"] <= 1.0 and use["best_single_stream_loss"] == min(use["stream_losses"])

    # the shared-prefix variant makes every stream the same computation (P = 1 + one prefix)
    cfg = ParScaleConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, streams=3, prefix_tokens=4)
    model = ParScaleForCausalLM(cfg).eval()
    seen = {}
    model.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o.unflatten(0, (3, 2))))
    x = torch.randint(0, 40, (2, 6))
    with mod.shared_prefix(True):
        model(x)
    assert torch.equal(seen["h"][0], seen["h"][1]) and torch.equal(seen["h"][0], seen["h"][2])
    model(x)  # restored on exit: the streams differ again
    assert not torch.equal(seen["h"][0], seen["h"][1])


def test_plot_stream_gap(tmp_path):
    from parscale.plots.reproduce import plot_learning_curves, plot_stream_gap

    def run(size, P, params, losses, role=""):
        return {"name": f"{size}-p{P}", "size": size, "P": P, "params": params, "role": role,
                "curve": [(100 * (i + 1), v) for i, v in enumerate(losses)]}

    runs = [run("a", 1, 10, [5.0, 4.0]), run("a", 2, 11, [4.9, 4.1]), run("b", 1, 40, [4.5, 3.5]),
            run("b", 4, 45, [4.4, 3.4]), run("b", 1, 40, [3.3], role="continued")]
    for fn, name in ((plot_stream_gap, "gap.png"), (plot_learning_curves, "curves.png")):
        data = fn(runs, tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ParScaleError, match="no size has both a P = 1 run and a P > 1 run"):
        plot_stream_gap([run("a", 1, 10, [5.0])], tmp_path / "none.png")
