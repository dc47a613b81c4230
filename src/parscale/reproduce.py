"""Reproduce the parallel scaling law on a laptop CPU: a grid of tiny training runs, the law's fit,
a two-stage experiment, and a report.

Chen et al., "Parallel Scaling Law for Language Models" (arXiv 2505.10475) train models of 6 sizes
with P = 1, 2, 4, 8 parallel streams on the same 42B tokens and fit

    L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^alpha

(Stack-V2-Python: k = 0.39, alpha = 0.19). ``reproduce`` does the same in miniature: every
(size, P) of a *preset* is one ordinary ``parscale.training.train`` run on the same data and
token budget, in its own directory ``OUT/runs/NAME`` (checkpoints, ``--resume`` semantics); the
final held-out losses are fitted with ``parscale.scaling_law.fit_law`` (with bootstrap
intervals), and the two-stage recipe is tried once: the grid's P = 1 model of one size (trained at
a constant learning rate) is continued, with the rate decaying, for a few percent more tokens
(a) at P = 1 and (b) recycled into P = 4 streams.

Outputs in OUT: ``results.json`` (runs, fit, bootstrap, two-stage, settings, machine),
``report.md`` (tables, the fit next to the paper's, conclusions generated from the numbers) and
PNG plots. Running again skips finished runs and resumes interrupted ones (the trainer's resume:
at most one checkpoint interval is lost), then refits and rewrites the outputs.

Presets (see docs/reproduction.md for why these numbers):

* ``micro`` — seconds; for tests (tiny shapes, a few steps, any small corpus via ``data``).
* ``quick`` — what ``make demo`` runs: ≤ 10 minutes on a 2-core CPU including data preparation.
* ``full``  — 3 sizes × P ∈ {1, 2, 4, 8} on the whole stdlib corpus plus the two-stage experiment;
  about 2 hours on an idle 2-core CPU (115 min measured; docs/reproduction/README.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ParScaleError
from .training.options import TrainConfig

RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
RUNS_DIR = "runs"
PLOT_NAMES = {
    "law_fit": "law_fit.png",  # held-out loss vs N per P, with the fitted curves
    "loss_vs_streams": "loss_vs_streams.png",  # held-out loss vs P per size
    "multiplier": "multiplier.png",  # k·ln P + 1, ours vs the paper's
    "learning_curves": "learning_curves.png",  # held-out loss vs tokens for every run
    "stream_gap": "stream_gap.png",  # loss minus the same size's P = 1 loss, during training
}

BASELINES = ("prefix",)  # --baseline prefix: a P = 1 + one learned prefix run per size (the fair control)
PAPER = 'Chen et al., "Parallel Scaling Law for Language Models", arXiv 2505.10475'
# The paper's fitted constants on Stack-V2-Python (Python code, like our stdlib corpus); the
# fit in parscale.scaling_law reproduces them from the paper's 24 losses (tests check 0.5 %).
PAPER_STACK = {"E": 0.6912, "A": 0.01131, "alpha": 0.1894, "k": 0.3935, "r2": 0.9978}


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SizeSpec:
    """One model shape of the grid."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    def shape(self) -> dict[str, int]:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "intermediate": self.intermediate}


@dataclass(frozen=True)
class TwoStageSpec:
    """The paper's two-stage recipe in miniature, on the ``base_size`` shape.

    Stage 1 is the grid's P = 1 run of that size: with the presets' constant learning rate (after
    warm-up) it is the stable phase of the paper's warmup-stable-decay schedule. Stage 2 continues
    it for ``extra_fraction`` × the grid's token budget twice: (a) at P = 1 and (b) recycled into
    P = ``streams`` (a fresh stream set). Both continuations get the same schedule (a short
    warm-up, then cosine from the preset's ``lr`` to ``min_lr``: the decay phase) and the same
    batches (seed + 1: new windows in a new order, not a replay of stage 1's first steps), so they
    differ only in P.
    """

    base_size: str
    extra_fraction: float = 0.05
    streams: int = 4


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    sizes: tuple[SizeSpec, ...]
    streams: tuple[int, ...]
    tokens: int  # training tokens of every grid run (the same for every size and P, as in the paper)
    seq_len: int
    batch_size: int
    vocab_size: int
    data_max_bytes: int | None  # None: the whole corpus
    prefix_tokens: int
    lr: float
    min_lr: float  # the end of the two-stage continuations' decay (and of the grid's, with "cosine")
    warmup_steps: int
    eval_every: int
    eval_tokens: int
    checkpoint_every: int
    log_every: int
    bootstrap: int  # bootstrap resamples for the fit's confidence intervals
    two_stage: TwoStageSpec | None = None
    schedule: str = "constant"  # the grid's learning rate after warm-up (see docs/reproduction.md)
    data: str = "stdlib"
    seed: int = 0
    # the stream-set recipe of every P > 1 (and prefix-baseline) run, as the TrainConfig fields
    # of the same names (docs/reproduction/diversity/README.md)
    prefix_reparam: bool = False
    prefix_init_std: float | None = None  # None: initializer_range (0.02)
    agg_init_std: float = 0.0
    reparam_lr_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        name="micro", description="seconds; for tests (tiny shapes, a few steps)",
        sizes=(SizeSpec("xxs", 1, 32, 4, 2, 64), SizeSpec("xs", 2, 48, 4, 2, 96)),
        streams=(1, 2, 4), tokens=8 * 32 * 8, seq_len=32, batch_size=8, vocab_size=300,
        data_max_bytes=200_000, prefix_tokens=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4,
        eval_tokens=512, checkpoint_every=3, log_every=1, bootstrap=8,
        two_stage=TwoStageSpec("xs", extra_fraction=0.25, streams=4)),
    "quick": Preset(
        name="quick", description="make demo: <= 10 minutes on a 2-core CPU, data preparation included",
        sizes=(SizeSpec("xs", 2, 64, 4, 2, 176), SizeSpec("s", 3, 96, 3, 1, 256)),
        streams=(1, 2, 4), tokens=500_000, seq_len=128, batch_size=16, vocab_size=1024,
        data_max_bytes=3_000_000, prefix_tokens=8, lr=2e-3, min_lr=2e-4, warmup_steps=25,
        eval_every=50, eval_tokens=32768, checkpoint_every=50, log_every=5, bootstrap=100,
        two_stage=TwoStageSpec("s", extra_fraction=0.05, streams=4)),
    "full": Preset(
        name="full", description="3 sizes x P in {1, 2, 4, 8} plus two-stage; ~2 hours on an idle 2-core CPU",
        sizes=(SizeSpec("xs", 2, 64, 4, 2, 176), SizeSpec("s", 3, 96, 3, 1, 256),
               SizeSpec("m", 4, 128, 4, 2, 352)),
        streams=(1, 2, 4, 8), tokens=1_750_000, seq_len=256, batch_size=16, vocab_size=2048,
        data_max_bytes=None, prefix_tokens=16, lr=2e-3, min_lr=2e-4, warmup_steps=25,
        eval_every=107, eval_tokens=65536, checkpoint_every=50, log_every=5, bootstrap=200,
        two_stage=TwoStageSpec("m", extra_fraction=0.05, streams=4)),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ParScaleError naming the choices otherwise."""
    if name not in PRESETS:
        raise ParScaleError(f"unknown preset {name!r} (choose one of: {', '.join(PRESETS)})")
    return PRESETS[name]


# --------------------------------------------------------------------------- the plan
@dataclass
class PlannedRun:
    """One training run of the reproduction: its name, what it measures, and its TrainConfig."""

    name: str
    experiment: str  # "grid" (enters the fit), "baseline" (P = 1 + prefix) or "two_stage"
    size: SizeSpec
    streams: int
    config: TrainConfig
    role: str = ""  # two-stage: "continued" or "recycled"


def grid_name(size: str, streams: int) -> str:
    return f"{size}-p{streams}"


def plan_runs(preset: Preset, out: str | os.PathLike, *, data: str | None = None,
              threads: int | None = None, baseline: str | None = None) -> list[PlannedRun]:
    """Every run of ``preset`` in training order: the grid (size by size, P ascending; with
    ``baseline="prefix"`` each size's P = 1 + one learned prefix run after its grid runs), then the
    two-stage continuations (which start from the grid's P = 1 model of the base size)."""
    if baseline is not None and baseline not in BASELINES:
        raise ParScaleError(f"unknown baseline {baseline!r} (choose one of: {', '.join(BASELINES)})")
    runs_dir = Path(os.path.normpath(out)) / RUNS_DIR
    common = {"vocab_size": preset.vocab_size, "prefix_tokens": preset.prefix_tokens,
              "seq_len": preset.seq_len, "batch_size": preset.batch_size,
              "eval_every": preset.eval_every, "eval_tokens": preset.eval_tokens,
              "checkpoint_every": preset.checkpoint_every, "log_every": preset.log_every,
              "data": data or preset.data, "data_max_bytes": preset.data_max_bytes,
              "threads": threads, "quiet": True, "resume": True}
    recipe = {"prefix_reparam": preset.prefix_reparam, "prefix_init_std": preset.prefix_init_std,
              "agg_init_std": preset.agg_init_std, "reparam_lr_scale": preset.reparam_lr_scale}
    plan: list[PlannedRun] = []
    for size in preset.sizes:
        for P in preset.streams:
            name = grid_name(size.name, P)
            cfg = TrainConfig(**common, **size.shape(), **(recipe if P > 1 else {}), streams=P,
                              tokens=preset.tokens, lr=preset.lr,
                              min_lr=preset.min_lr, warmup_steps=preset.warmup_steps,
                              schedule=preset.schedule, seed=preset.seed, out=str(runs_dir / name))
            plan.append(PlannedRun(name, "grid", size, P, cfg))
        if baseline == "prefix":  # same seed: the same backbone init as the size's grid runs
            name = f"{grid_name(size.name, 1)}-prefix"
            cfg = TrainConfig(**common, **size.shape(), **recipe, streams=1, prefix_only=True, tokens=preset.tokens,
                              lr=preset.lr, min_lr=preset.min_lr, warmup_steps=preset.warmup_steps,
                              schedule=preset.schedule, seed=preset.seed, out=str(runs_dir / name))
            plan.append(PlannedRun(name, "baseline", size, 1, cfg, "prefix"))
    ts = preset.two_stage
    if ts is not None:
        base = next((s for s in preset.sizes if s.name == ts.base_size), None)
        if base is None:
            raise ParScaleError(f"preset {preset.name!r}: two-stage base size {ts.base_size!r} is not one of "
                                f"its sizes ({', '.join(s.name for s in preset.sizes)})")
        if 1 not in preset.streams:
            raise ParScaleError(f"preset {preset.name!r}: the two-stage experiment starts from the grid's "
                                "P = 1 run, but the grid has no P = 1")
        stage1_name = grid_name(base.name, 1)
        extra = max(1, round(ts.extra_fraction * preset.tokens))
        steps = math.ceil(extra / (preset.batch_size * preset.seq_len))
        for P, role in ((1, "continued"), (ts.streams, "recycled")):
            name = f"twostage-{base.name}-{role}-p{P}"
            # float32 and random prefixes, as in every committed reproduction (the trainer's
            # --init-from defaults are bf16 autocast and snippet prefixes, docs/recycling.md)
            cfg = TrainConfig(**common, init_from=str(runs_dir / stage1_name / "model"),
                              dtype="float32", stream_init="random",
                              streams=P, tokens=extra, lr=preset.lr, min_lr=preset.min_lr,
                              warmup_steps=max(1, steps // 10), seed=preset.seed + 1,
                              out=str(runs_dir / name))
            plan.append(PlannedRun(name, "two_stage", base, P, cfg, role))
    return plan


def estimated_work(run: PlannedRun, vocab_size: int) -> float:
    """Training + evaluation FLOPs of a run (GFLOP), from the cost model: the progress bar's unit,
    so its ETA weighs a P = 8 step about 5x a P = 1 step, as measured."""
    from .config import ParScaleConfig
    from .cost import forward_flops

    cfg, s = run.config, run.size
    mcfg = ParScaleConfig(vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
                          num_hidden_layers=s.layers, num_attention_heads=s.heads,
                          num_key_value_heads=s.kv_heads, streams=run.streams,
                          prefix_tokens=cfg.prefix_tokens)
    per_token = forward_flops(mcfg, tokens=1, context=(cfg.seq_len + 1) / 2)
    steps = cfg.total_steps()
    evals = (steps // cfg.eval_every if cfg.eval_every else 0) + 1
    eval_tokens = (cfg.eval_tokens // cfg.seq_len) * cfg.seq_len
    return (3 * steps * cfg.tokens_per_step + evals * eval_tokens) * per_token / 1e9


def _run_state(run: PlannedRun) -> tuple[str, int]:
    """("finished" | "partial" | "new", steps already done) from the run directory's files."""
    from .training.checkpoint import CHECKPOINT, STATE_NAME
    from .training.trainer import SUMMARY_NAME

    out = Path(run.config.out)
    total = run.config.total_steps()
    try:
        summary = json.loads((out / SUMMARY_NAME).read_text())
        if summary.get("steps") == total:
            return "finished", total
    except (OSError, json.JSONDecodeError):
        pass
    try:
        state = json.loads((out / CHECKPOINT / STATE_NAME).read_text())
        return "partial", min(int(state["step"]), total)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return "new", 0


# --------------------------------------------------------------------------- results
@dataclass
class RunRecord:
    """One finished run, as listed in results.json."""

    name: str
    size: str
    params: int  # non-embedding parameters at the run's P (stream prefixes and aggregator included)
    P: int
    tokens: int
    val_loss: float
    train_loss: float | None
    wall_s: float
    tokens_per_s: float
    steps: int
    experiment: str = "grid"
    role: str = ""
    threads: int | None = None  # torch CPU threads of this invocation's training (None: torch's default)
    trained_now: bool = False  # trained (or resumed) in this invocation, not found finished
    resumed_from_step: int = 0  # > 0: this invocation resumed an interrupted run at that step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TwoStageResult:
    stage1: RunRecord  # the grid's P = 1 run of the base size
    continued: RunRecord  # stage 1 + extra tokens at P = 1, learning rate decaying
    recycled: RunRecord  # stage 1 + the same extra tokens at P = streams
    # the grid's run of the same size at the recycled P, from scratch on the whole budget (reference)
    grid: list[RunRecord] = field(default_factory=list)

    @property
    def gain(self) -> float:
        """Held-out loss of the P = 1 continuation minus that of the recycled model (> 0: recycling helps)."""
        return self.continued.val_loss - self.recycled.val_loss

    def to_dict(self) -> dict[str, Any]:
        return {"stage1": self.stage1.to_dict(), "continued": self.continued.to_dict(),
                "recycled": self.recycled.to_dict(), "extra_tokens": self.continued.tokens,
                "extra_fraction": self.continued.tokens / self.stage1.tokens,
                "gain_recycled_vs_continued": self.gain,
                "grid_reference": [r.to_dict() for r in self.grid]}


@dataclass
class ReproductionResult:
    out_dir: Path
    results_path: Path
    report_path: Path
    plots: dict[str, Path]
    preset: Preset
    runs: list[RunRecord]  # the grid
    fit: Any  # parscale.scaling_law.LawFit
    bootstrap: Any | None  # parscale.scaling_law.BootstrapResult
    two_stage: TwoStageResult | None
    conclusions: list[str]
    wall_s: float
    trained: list[str] = field(default_factory=list)  # runs trained or resumed now
    skipped: list[str] = field(default_factory=list)  # runs found finished


# --------------------------------------------------------------------------- progress
class _Progress:
    """One bar over the whole reproduction, in estimated GFLOPs (so the ETA accounts for P),
    fed by the trainer's progress callback. Without a terminal: one line per run instead."""

    def __init__(self, total: float, done: float, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="GFLOP", unit_scale=False, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        self.per_step = 0.0
        self.last_step = 0
        self.loss = self.val = None

    def start(self, index: int, count: int, run: PlannedRun, work: float, done_steps: int) -> None:
        steps = run.config.total_steps()
        self.per_step = work / steps
        self.last_step = done_steps
        self.loss = self.val = None
        what = f"resuming at step {done_steps}/{steps}" if done_steps else f"{steps} steps"
        if self.bar is not None:
            self.bar.set_description_str(f"run {index}/{count} {run.name}")
            self.bar.set_postfix_str(what)
        elif self.enabled:
            print(f"parscale reproduce: run {index}/{count} {run.name} ({what})", file=sys.stderr, flush=True)

    def record(self, rec: dict) -> None:
        step = int(rec.get("step", self.last_step))
        self.loss = rec.get("loss", self.loss)
        self.val = rec.get("val_loss", self.val)
        if self.bar is not None:
            self.bar.update(max(0, step - self.last_step) * self.per_step)
            parts = [f"loss {self.loss:.3f}" if self.loss is not None else "",
                     f"val {self.val:.3f}" if self.val is not None else ""]
            self.bar.set_postfix_str(" ".join(p for p in parts if p), refresh=False)
        self.last_step = step

    def finish(self, run: PlannedRun, record: RunRecord, skipped: bool) -> None:
        if self.bar is None and self.enabled:
            how = "already finished" if skipped else f"{record.wall_s:.0f} s"
            print(f"parscale reproduce:   {run.name}: held-out loss {record.val_loss:.4f} ({how})",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the reproduction
def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # not on every platform
        return None


def _machine(threads: int | None, load_start: list[float] | None) -> dict[str, Any]:
    """Where the numbers were measured; the load averages say how busy the machine was."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": threads,  # what was asked for; each run's own count is in its record
            "load_average": load_start,
            "load_average_end": _load_average()}


def auto_threads(samples: int = 10, interval: float = 0.05) -> int:
    """CPU threads for the next run: the cores that other work is not using right now.

    Why: torch's OpenMP threads spin-wait for each other, so on a shared machine two threads on
    two cores with one other busy process ran 3x *slower* than one thread (measured here; see
    docs/reproduction.md), while on an idle machine two threads are 1.6x faster than one. The
    number of runnable tasks in /proc/loadavg (median of a few samples, minus this reader) says
    how many cores are taken; without /proc (not Linux) all cores are used.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    running = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval)
            with open("/proc/loadavg") as f:
                running.append(int(f.read().split()[3].split("/")[0]))
    except (OSError, ValueError, IndexError):
        return cores
    busy = max(0, sorted(running)[len(running) // 2] - 1)
    return max(1, cores - busy)


def _saved_threads(run: PlannedRun) -> int | None:
    """The threads a finished run was started with (its train_config.json)."""
    from .training.trainer import saved_config

    saved = saved_config(run.config.out) or {}
    return saved.get("threads")


def _record(run: PlannedRun, result, trained_now: bool, resumed_from: int) -> RunRecord:
    if result.val_loss is None:
        raise ParScaleError(f"run {run.name}: no held-out loss (the corpus has no validation split); "
                            "use a corpus with more documents")
    return RunRecord(name=run.name, size=run.size.name, params=int(result.params), P=int(result.streams),
                     tokens=int(result.tokens), val_loss=float(result.val_loss),
                     train_loss=None if result.train_loss is None else float(result.train_loss),
                     wall_s=float(result.wall_s), tokens_per_s=float(result.tokens_per_s),
                     steps=int(result.steps), experiment=run.experiment, role=run.role,
                     threads=run.config.threads if trained_now else _saved_threads(run),
                     trained_now=trained_now,
                     resumed_from_step=resumed_from)


def reproduce(preset: str | Preset = "quick", out: str | os.PathLike | None = None, *,
              threads: int | str | None = "auto", data: str | None = None, progress: bool = True,
              command: str | None = None, baseline: str | None = None,
              train_fn: Callable[..., Any] | None = None) -> ReproductionResult:
    """Train every run of ``preset`` (skipping finished ones, resuming interrupted ones), fit the
    law, and write results.json, report.md and the plots into ``out``.

    ``data`` replaces the preset's corpus (``"stdlib"``, a directory or a file, as for
    ``parscale train --data``); ``threads``: torch's CPU threads for every run, ``"auto"`` (the
    cores that are free when each run starts, see ``auto_threads``) or None (torch's default);
    ``train_fn`` replaces ``parscale.training.train`` (tests use it to count or interrupt runs).
    ``baseline="prefix"`` adds a P = 1 + one learned prefix run per size, reported beside every
    P > 1 result (not part of the fit).
    """
    from .data import prepare_data
    from .training import train

    t0 = time.perf_counter()
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if threads is not None and threads != "auto" and (not isinstance(threads, int) or threads < 1):
        raise ParScaleError(f"--threads must be a positive integer or 'auto' (got {threads!r})")
    out_dir = Path(out if out is not None else f"runs/reproduce-{preset.name}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ParScaleError(f"--out {out_dir}: exists and is not a directory")
    train_fn = train_fn or train
    plan = plan_runs(preset, out_dir, data=data, threads=None if threads == "auto" else threads,
                     baseline=baseline)
    started = datetime.datetime.now(datetime.UTC)
    load_start = _load_average()

    # Data first, so its cost is visible on its own; the trainer's runs then hit the same cache.
    t_data = time.perf_counter()
    prepared = prepare_data(data or preset.data, vocab_size=preset.vocab_size,
                            max_bytes=preset.data_max_bytes, progress=progress and sys.stderr.isatty())
    data_info = {"spec": data or preset.data, "corpus": prepared.corpus.name,
                 "max_bytes": preset.data_max_bytes, "vocab_size": prepared.tokenizer.vocab_size,
                 "train_tokens": prepared.train.n_tokens, "validation_tokens": prepared.validation.n_tokens,
                 "prepare_s": time.perf_counter() - t_data}
    if progress:
        print(f"parscale reproduce: preset {preset.name}, {len(plan)} runs into {out_dir}; data: "
              f"{data_info['train_tokens']:,} train / {data_info['validation_tokens']:,} held-out tokens "
              f"(prepared in {data_info['prepare_s']:.1f} s)", file=sys.stderr, flush=True)

    work = [estimated_work(r, preset.vocab_size) for r in plan]
    states = [_run_state(r) for r in plan]
    done = sum(w * s / r.config.total_steps() for w, r, (_, s) in zip(work, plan, states))
    bar = _Progress(sum(work), done, progress)
    records: dict[str, RunRecord] = {}
    trained, skipped = [], []
    try:
        for i, (run, w, (state, done_steps)) in enumerate(zip(plan, work, states), start=1):
            if threads == "auto" and state != "finished":
                run = dataclasses.replace(run, config=run.config.replace(threads=auto_threads()))
            bar.start(i, len(plan), run, w, done_steps if state != "finished" else run.config.total_steps())
            result = train_fn(run.config, progress_callback=bar.record)
            finished_before = bool(getattr(result, "already_finished", False))
            rec = _record(run, result, trained_now=not finished_before,
                          resumed_from=done_steps if state == "partial" else 0)
            records[run.name] = rec
            (skipped if finished_before else trained).append(run.name)
            bar.finish(run, rec, finished_before)
    finally:
        bar.close()

    grid = [records[r.name] for r in plan if r.experiment == "grid"]
    fit, boot = fit_runs(grid, preset.bootstrap, seed=preset.seed)
    backbone = fit_backbone_n(grid)
    two = None
    if preset.two_stage is not None:
        ts = preset.two_stage
        stage = {r.role: records[r.name] for r in plan if r.experiment == "two_stage"}
        two = TwoStageResult(records[grid_name(ts.base_size, 1)], stage["continued"], stage["recycled"],
                             [r for r in grid if r.size == ts.base_size and r.P == ts.streams])
    usage = measure_streams(plan, prepared, preset, trained)
    conclusions = conclude(grid, fit, boot, two, backbone, usage)
    prefix_runs = [records[r.name] for r in plan if r.experiment == "baseline"]
    if prefix_runs:
        conclusions.append(prefix_conclusion(grid, prefix_runs))
    plots = write_plots(out_dir, grid, fit, [records[r.name] for r in plan], preset, boot=boot)
    wall = time.perf_counter() - t0
    results = {
        "runs": [r.to_dict() for r in grid],
        "baseline_prefix": [r.to_dict() for r in prefix_runs],
        "fit": fit.to_dict(),
        "fit_backbone_n": backbone,
        "stream_usage": usage,
        "bootstrap": boot.to_dict() if boot is not None else None,
        "paper": {"source": PAPER, "dataset": "Stack-V2-Python", **PAPER_STACK},
        "two_stage": two.to_dict() if two is not None else None,
        "conclusions": conclusions,
        "preset": preset.to_dict(),
        "data": data_info,
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "machine": _machine(threads, load_start),
        "wall_s": wall,
        "trained": trained,
        "skipped": skipped,
        "plots": {k: p.name for k, p in plots.items()},
    }
    from .atomic import atomic_write_text

    results_path = atomic_write_text(out_dir / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    report_path = atomic_write_text(out_dir / REPORT_NAME, render_report(results))
    return ReproductionResult(out_dir, results_path, report_path, plots, preset, grid, fit, boot, two,
                              conclusions, wall, trained, skipped)


USAGE_NAME = "stream_usage.json"


def measure_streams(plan: Sequence[PlannedRun], prepared, preset: Preset,
                    trained: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``parscale.diagnostics.stream_usage`` of every P > 1 grid model on the runs' held-out
    windows (the same windows as their held-out loss), by run name.

    Cached in each run's directory (``stream_usage.json``) and recomputed only for runs trained in
    this invocation, so a re-run that skips every run stays quick. Runs without a saved model
    (a ``train_fn`` that writes none) are left out.
    """
    from .atomic import atomic_write_text
    from .data import validation_windows
    from .diagnostics import stream_usage
    from .model import ParScaleForCausalLM

    val = None
    out: dict[str, dict[str, Any]] = {}
    for run in plan:
        run_dir = Path(run.config.out)
        if run.experiment != "grid" or run.streams == 1 or not (run_dir / "model").is_dir():
            continue
        cached = run_dir / USAGE_NAME
        if run.name not in trained and cached.is_file():
            try:
                out[run.name] = json.loads(cached.read_text())
                continue
            except json.JSONDecodeError:
                pass  # recompute a damaged cache
        if val is None:
            val = validation_windows(prepared.validation, seq_len=preset.seq_len,
                                     n=max(1, preset.eval_tokens // preset.seq_len))
        model = ParScaleForCausalLM.from_pretrained(run_dir / "model")
        out[run.name] = stream_usage(model, val.inputs, val.labels, batch_size=preset.batch_size).to_dict()
        atomic_write_text(cached, json.dumps(out[run.name], indent=1) + "\n")
    return out


def prefix_conclusion(grid: Sequence[RunRecord], prefix_runs: Sequence[RunRecord]) -> str:
    """One line: in how many (size, P > 1) cells the streams beat the P = 1 + prefix control."""
    base = {r.size: r.val_loss for r in prefix_runs}
    cells = [(r, r.val_loss - base[r.size]) for r in grid if r.P > 1 and r.size in base]
    wins = [f"{r.name} ({d:+.4f})" for r, d in cells if d < 0]
    return (f"Against the fair control (P = 1 + one learned prefix, same tokens): P > 1 has the lower "
            f"held-out loss in {len(wins)} of {len(cells)} cells" + (f": {', '.join(wins)}." if wins else ".")
            + " Differences are the P-stream model's loss minus the control's (nats).")


def prefix_table(grid: Sequence[Mapping[str, Any]], prefix_runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: every grid run beside its size's P = 1 + prefix control."""
    base = {r["size"]: r for r in prefix_runs}
    lines = ["| run | P | held-out loss | P = 1 + prefix (same size) | difference | plain P = 1 |",
             "|---|---|---|---|---|---|"]
    plain = {r["size"]: r["val_loss"] for r in grid if r["P"] == 1}
    for r in grid:
        b = base.get(r["size"])
        if b is None:
            continue
        lines.append(f"| {r['name']} | {r['P']} | {r['val_loss']:.4f} | {b['val_loss']:.4f} | "
                     f"{r['val_loss'] - b['val_loss']:+.4f} | {_fmt(plain.get(r['size']))} |")
    return lines


def fit_runs(runs: Sequence[RunRecord], bootstrap: int, seed: int = 0):
    """The law fitted to the grid's (params, P, held-out loss), and its bootstrap intervals."""
    from .scaling_law import fit_law

    fit = fit_law([r.params for r in runs], [r.P for r in runs], [r.val_loss for r in runs])
    boot = fit.bootstrap(n=bootstrap, seed=seed) if bootstrap >= 2 else None
    return fit, boot


def fit_backbone_n(runs: Sequence[RunRecord]) -> dict[str, Any] | None:
    """The same fit with N = the backbone's parameters (the size's P = 1 count), i.e. without the
    streams' prefixes and aggregator.

    Why a second fit: the paper counts those parameters in N, where they are under 2% of it; in
    models this small the aggregator alone (P·H² weights) adds up to half of N, so the main fit
    can credit P's gain to N. Comparing the two shows how much that choice matters here.
    """
    from .scaling_law import fit_law

    base = {r.size: r.params for r in runs if r.P == 1}
    if set(base) != {r.size for r in runs}:
        return None  # some size has no P = 1 run to count its backbone
    fit = fit_law([base[r.size] for r in runs], [r.P for r in runs], [r.val_loss for r in runs])
    extra = [r.params / base[r.size] - 1 for r in runs if r.P > 1]
    return {**{k: v for k, v in fit.to_dict().items() if k in ("E", "A", "alpha", "k", "r2")},
            "stream_params_added_to_N": [min(extra), max(extra)] if extra else None}


def write_plots(out_dir: Path, grid: Sequence[RunRecord], fit, all_runs: Sequence[RunRecord],
                preset: Preset, boot=None) -> dict[str, Path]:
    from .plots.law import plot_law_fit, plot_multiplier
    from .plots.reproduce import plot_learning_curves, plot_loss_vs_streams, plot_stream_gap

    paths = {k: out_dir / v for k, v in PLOT_NAMES.items()}
    plot_law_fit(fit, paths["law_fit"], title=f"parscale reproduce ({preset.name}): held-out loss vs N",
                 boot=boot)
    plot_loss_vs_streams([r.to_dict() for r in grid], paths["loss_vs_streams"], fit=fit)
    trained_p = max(r.P for r in grid)
    plot_multiplier({"ours": fit, "paper (Stack-V2-Python)": PAPER_STACK["k"]}, paths["multiplier"],
                    p_max=max(8, 2 * trained_p), trained_p=trained_p,
                    bands={"ours": boot.intervals["k"]} if boot is not None else None)
    # continuations are drawn after their stage 1 (a grid run: the same budget), at the tokens
    # the model has seen in all
    stage1 = preset.tokens
    curves = [{**r.to_dict(), "curve": [(t + (stage1 if r.role in ("continued", "recycled") else 0), loss)
                                        for t, loss in _val_curve(out_dir / RUNS_DIR / r.name)]}
              for r in all_runs]
    plot_learning_curves(curves, paths["learning_curves"])
    if len({r.P for r in grid}) > 1:
        plot_stream_gap(curves, paths["stream_gap"])
    else:
        del paths["stream_gap"]
    return paths


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens, held-out loss) of every evaluation logged in the run's metrics.jsonl."""
    from .training.trainer import METRICS_NAME

    points = []
    try:
        lines = (run_dir / METRICS_NAME).read_text().splitlines()
    except OSError:
        return points
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("val_loss") is not None:
            points.append((int(rec["tokens"]), float(rec["val_loss"])))
    return points


# --------------------------------------------------------------------------- conclusions
# below this (nats), the aggregate is no better than its best stream for the conclusions' purposes:
# about the seed-to-seed noise of one run's loss in the full preset (docs/reproduction/README.md)
COMBINATION_NEGLIGIBLE = 0.01


def _exceptions_along(groups: Mapping[Any, Sequence[RunRecord]], key: Callable[[RunRecord], float],
                      label: Callable[[RunRecord], str]) -> list[str]:
    """Where the held-out loss does not fall along ``key`` inside a group: 'label: a -> b'."""
    out = []
    for runs in groups.values():
        ordered = sorted(runs, key=key)
        for a, b in itertools.pairwise(ordered):
            if b.val_loss >= a.val_loss:
                out.append(f"{label(a)} {a.val_loss:.4f} → {label(b)} {b.val_loss:.4f}")
    return out


def conclude(runs: Sequence[RunRecord], fit, boot, two: TwoStageResult | None,
             backbone: Mapping[str, Any] | None = None,
             usage: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Plain-language conclusions, each one computed from the numbers (no fixed verdicts)."""
    import numpy as np

    lines = []
    by_size: dict[str, list[RunRecord]] = {}
    by_p: dict[int, list[RunRecord]] = {}
    for r in runs:
        by_size.setdefault(r.size, []).append(r)
        by_p.setdefault(r.P, []).append(r)

    exc = _exceptions_along(by_size, lambda r: r.P, lambda r: f"{r.size} P={r.P}")
    if len({r.P for r in runs}) > 1:
        lines.append("Held-out loss falls with P at every size: " +
                     ("**yes**." if not exc else f"**no** — exceptions: {'; '.join(exc)}."))
    exc = _exceptions_along(by_p, lambda r: r.params, lambda r: f"P={r.P} {r.size}")
    if len(by_size) > 1:
        lines.append("Held-out loss falls with model size at every P: " +
                     ("**yes**." if not exc else f"**no** — exceptions: {'; '.join(exc)}."))

    ps = sorted(by_p)
    mean_gain = None  # mean relative loss reduction from the smallest to the largest P
    if len(ps) > 1:
        gains = []
        for rs in by_size.values():
            d = {r.P: r.val_loss for r in rs}
            if ps[0] in d and ps[-1] in d:
                gains.append((d[ps[0]] - d[ps[-1]]) / d[ps[0]])
        sizes = sorted(by_size, key=lambda s: min(r.params for r in by_size[s]))
        size_gain = []
        for rs in by_p.values():
            d = {r.size: r.val_loss for r in rs}
            if sizes[0] in d and sizes[-1] in d:
                size_gain.append((d[sizes[0]] - d[sizes[-1]]) / d[sizes[0]])
        if gains:
            mean_gain = float(np.mean(gains))
            text = (f"Going from P={ps[0]} to P={ps[-1]} changes the held-out loss by "
                    f"{-100 * np.mean(gains):+.2f}% on average over sizes")
            if len(sizes) > 1 and size_gain:
                n_ratio = (min(r.params for r in by_size[sizes[-1]]) / min(r.params for r in by_size[sizes[0]]))
                text += (f"; going from the smallest to the largest size ({n_ratio:.1f}x the parameters) "
                         f"changes it by {-100 * np.mean(size_gain):+.2f}% on average over P")
            lines.append(text + ".")

    quality = "fits the points well" if fit.r2 >= 0.95 else (
        "fits the points only roughly" if fit.r2 >= 0.8 else "does not describe these points well")
    lines.append(f"The law L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^α {quality}: R² = {fit.r2:.4f} "
                 f"over {fit.n_points} runs (paper, Stack-V2-Python: {PAPER_STACK['r2']}).")
    resid = np.array([row.residual for row in fit.residuals()])  # in the order of ``runs``
    worst = int(np.argmax(np.abs(resid)))
    lines.append(f"Fit residuals (predicted − measured): RMS {np.sqrt(np.mean(resid ** 2)):.4f} nats, "
                 f"largest {resid[worst]:+.4f} at {runs[worst].name}; compare them with the effects above "
                 "before reading much into small differences (one seed per run).")

    k_ci = boot.intervals["k"] if boot is not None else None
    a_ci = boot.intervals["alpha"] if boot is not None else None
    k_text = f"k = {fit.k:.3g}" + (f" (95% bootstrap CI {k_ci[0]:.3g}–{k_ci[1]:.3g})" if k_ci else "")
    mult = ", ".join(f"P={p}: {fit.k * math.log(p) + 1:.2f}x (paper {PAPER_STACK['k'] * math.log(p) + 1:.2f}x)"
                     for p in ps if p > 1)
    if mult:
        lines.append(f"{k_text}, paper {PAPER_STACK['k']}: P streams act like {mult} the parameters.")
    if fit.k < 0.01 or (k_ci is not None and k_ci[0] < 0.01):
        lines.append("The data do **not** rule out k ≈ 0, i.e. no benefit from parallel streams "
                     "beyond their few extra parameters at this scale and budget.")
        if fit.k < 0.01 and mean_gain is not None and mean_gain > 0:
            lines.append("Yet the measured loss does fall with P on average: the fit puts that gain on N "
                         "(the streams' extra parameters) or leaves it in the residuals of outlying runs; "
                         "these runs cannot separate the two.")
    elif k_ci is not None:
        inside = k_ci[0] <= PAPER_STACK["k"] <= k_ci[1]
        lines.append(f"k is clearly above 0; the paper's k = {PAPER_STACK['k']} is "
                     f"{'inside' if inside else 'outside'} our interval.")
    if backbone is not None and backbone.get("stream_params_added_to_N"):
        lo, hi = backbone["stream_params_added_to_N"]
        lines.append(f"The streams' prefixes and aggregator add {100 * lo:.0f}–{100 * hi:.0f}% to N here "
                     "(under 2% in the paper's models). Counting N without them (backbone only), the same fit "
                     f"gives k = {backbone['k']:.3g}, α = {backbone['alpha']:.3g}, R² = {_fmt(backbone['r2'])}.")
    alpha_text = f"α = {fit.alpha:.3g}" + (f" (95% CI {a_ci[0]:.3g}–{a_ci[1]:.3g})" if a_ci else "")
    lines.append(f"{alpha_text}, paper {PAPER_STACK['alpha']}. E and A depend on the data and the "
                 "tokenizer (loss per BPE token of ours vs theirs) and are not comparable with the paper's.")
    if fit.n_points < 8:
        lines.append(f"Only {fit.n_points} runs for 4 constants: the fit is barely determined and the "
                     "bootstrap intervals are not reliable (the full preset has 12 runs).")

    if usage:
        gains = {name: u["combination_gain"] for name, u in usage.items()}
        top = max(gains, key=gains.get)
        text = (f"Combining the streams: in the {len(gains)} P > 1 models the best single stream alone (through "
                f"the LM head) is {min(gains.values()):+.4f} to {gains[top]:+.4f} nats from the model's loss "
                "(positive: the aggregate is better)")
        if gains[top] < COMBINATION_NEGLIGIBLE:
            text += (f", under {COMBINATION_NEGLIGIBLE} everywhere: the streams are near-copies, so whatever P "
                     "changes here comes from what each stream learned (its prefix, its training), not from "
                     "combining streams.")
        else:
            text += f"; combining helps most at {top}."
        lines.append(text)

    if two is not None:
        better = "lower" if two.gain > 0 else "not lower"
        lines.append(
            f"Two-stage: the stage-1 P=1 model ({two.stage1.size}, held-out loss {two.stage1.val_loss:.4f}) "
            f"continued for {two.continued.tokens:,} more tokens "
            f"({100 * two.continued.tokens / two.stage1.tokens:.0f}%) reaches {two.continued.val_loss:.4f} "
            f"at P=1 and {two.recycled.val_loss:.4f} recycled into P={two.recycled.P}: the recycled model's "
            f"loss is {better} by {abs(two.gain):.4f} nats ({100 * two.gain / two.continued.val_loss:+.2f}% "
            "of the P=1 loss).")
    return lines


# --------------------------------------------------------------------------- report
def usage_table(usage: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of ``StreamUsage.to_dict()`` results by run name (report.md's "What the
    streams do"; experiments/ablate_streams.py prints the same)."""
    lines = ["| run | loss | uniform mean | best single stream | worst single stream | mean weight per stream "
             "| entropy / ln P | tokens with one stream > 90% | loss correlation ρ | pairwise JS (nats) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, u in usage.items():
        lines.append(f"| {name} | {u['loss']:.4f} | {u['uniform_mean_loss']:.4f} | "
                     f"{u['best_single_stream_loss']:.4f} | {max(u['stream_losses']):.4f} | "
                     f"{', '.join(f'{w:.2f}' for w in u['mean_weights'])} | {u['entropy_over_lnP']:.2f} | "
                     f"{100 * u['share_peaked']:.0f}% | {_fmt(u.get('loss_correlation'), '.3f')} | "
                     f"{_fmt(u.get('pairwise_js'), '.4f')} |")
    return "\n".join(lines)


def _recipe_line(preset: Mapping[str, Any]) -> str:
    """The stream-set recipe of the P > 1 runs (results.json written before these fields: the default)."""
    std = preset.get("prefix_init_std")
    scale = preset.get("reparam_lr_scale", 1.0)
    reparam = "through the MLP reparameterisation" + (f" (its learning rate x {scale:g})" if scale != 1.0 else "")
    parts = ["prefixes " + (reparam if preset.get("prefix_reparam") else "learned directly"),
             f"init std {0.02 if std is None else std:g}",
             "aggregator starting exactly uniform" if not preset.get("agg_init_std") else
             f"aggregator's last layer ~ N(0, {preset['agg_init_std']:g}) at init"]
    return "- Stream sets: " + ", ".join(parts) + " (docs/reproduction/diversity/README.md)."


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_report(results: Mapping[str, Any]) -> str:
    """report.md from the results.json dict (so the report can be regenerated from the JSON)."""
    fit, boot, preset, data = results["fit"], results["bootstrap"], results["preset"], results["data"]
    runs = results["runs"]
    machine = results["machine"]
    load = machine.get("load_average")
    lines = [
        f"# Parallel scaling law, reproduced on a CPU (preset `{preset['name']}`)",
        "",
        f"Paper: {PAPER}. Generated by `{results.get('command') or 'parscale reproduce'}` on "
        f"{results['date']} ({machine['platform']}, {machine['cpu_count']} CPUs, torch "
        f"{machine['torch']}, threads {machine['threads']}"
        + (f", load average {load[0]:.2f} at the start" if load else "") +
        f"); this invocation took {results['wall_s'] / 60:.1f} min"
        + (f" ({len(results['trained'])} runs trained, {len(results['skipped'])} already finished)."
           if results.get("skipped") else "."),
        "",
        "## Conclusions",
        "",
        *[f"- {c}" for c in results["conclusions"]],
        "",
        "## Setup",
        "",
        f"- Data: `{data['spec']}` (corpus `{data['corpus']}`"
        + (f", capped at {data['max_bytes']:,} bytes" if data.get("max_bytes") else "") +
        f"), byte-level BPE with {data['vocab_size']:,} tokens; {data['train_tokens']:,} training and "
        f"{data['validation_tokens']:,} held-out tokens (prepared in {data['prepare_s']:.1f} s).",
        f"- Every grid run: {preset['tokens']:,} training tokens (the same for every size and P, as in the "
        f"paper), sequence length {preset['seq_len']}, batch {preset['batch_size']} sequences, AdamW, "
        f"LR {preset['lr']:g} ({preset['warmup_steps']} warm-up steps, then "
        + ("constant" if preset["schedule"] == "constant" else f"cosine to {preset['min_lr']:g}") + "), "
        f"{preset['prefix_tokens']} prefix tokens per stream and layer, seed {preset['seed']}.",
        _recipe_line(preset),
        (f"- Held-out loss: mean next-token cross-entropy (nats) on up to {preset['eval_tokens']:,} fixed "
         "validation tokens, the same windows for every run."),
        ("- N = non-embedding parameters at the run's P (the streams' prefixes and aggregator included, "
         "as in the paper's table)."),
        "",
        "| size | layers | hidden | heads (kv) | MLP |",
        "|---|---|---|---|---|",
        *[f"| {s['name']} | {s['layers']} | {s['hidden']} | {s['heads']} ({s['kv_heads']}) | {s['intermediate']} |"
          for s in preset["sizes"]],
        "",
        "## Runs",
        "",
        "| run | size | P | N (non-embedding) | tokens | held-out loss | last train loss | time (s) | tokens/s | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['name']} | {r['size']} | {r['P']} | {r['params']:,} | {r['tokens']:,} | {r['val_loss']:.4f} | "
          f"{_fmt(r['train_loss'])} | {r['wall_s']:.0f} | {r['tokens_per_s']:,.0f} | {_fmt(r.get('threads'), '')} |"
          for r in runs],
        "",
        "## Fitted law",
        "",
        "L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^α, fitted as the paper does (Huber loss on log loss, "
        f"L-BFGS-B from {fit['n_starts']} grid starts; `parscale.scaling_law.fit_law`)"
        + (f"; {boot['level']:.0%} intervals from {boot['n']} bootstrap refits." if boot else "."),
        "",
        "| constant | ours | " + (f"{boot['level']:.0%} bootstrap interval | " if boot else "") +
        "paper (Stack-V2-Python) |",
        "|---|---|" + ("---|" if boot else "") + "---|",
    ]
    for name in ("E", "A", "alpha", "k"):
        ci = ""
        if boot:
            lo, hi = boot["intervals"][name]
            ci = f"{lo:.4g} – {hi:.4g} | "
        lines.append(f"| {name} | {fit[name]:.4g} | {ci}{PAPER_STACK[name]} |")
    lines.append(f"| R² | {_fmt(fit['r2'])} | " + ("| " if boot else "") + f"{PAPER_STACK['r2']} |")
    bb = results.get("fit_backbone_n")
    if bb:
        lines += ["", (f"The same fit with N = backbone parameters only (the size's P = 1 count; the streams' "
                       f"parameters add {100 * bb['stream_params_added_to_N'][0]:.0f}–"
                       f"{100 * bb['stream_params_added_to_N'][1]:.0f}% to it here): E = {bb['E']:.4g}, "
                       f"A = {bb['A']:.4g}, α = {bb['alpha']:.4g}, k = {bb['k']:.4g}, R² = {_fmt(bb['r2'])}.")]
    lines += ["", "| P | k·ln P + 1 (ours) | paper |", "|---|---|---|"]
    for p in sorted({r["P"] for r in runs}):
        lines.append(f"| {p} | {fit['k'] * math.log(p) + 1:.3f} | {PAPER_STACK['k'] * math.log(p) + 1:.3f} |")
    lines += ["", "| run | N | P | held-out loss | predicted | residual |", "|---|---|---|---|---|---|"]
    for r, row in zip(runs, fit["residuals"]):
        lines.append(f"| {r['name']} | {row['N']:,.0f} | {row['P']:g} | {row['loss']:.4f} | "
                     f"{row['predicted']:.4f} | {row['residual']:+.4f} |")

    prefix_runs = results.get("baseline_prefix")
    if prefix_runs:
        lines += ["", "## Beside the fair control: P = 1 + one learned prefix", "",
                  ("Each size's P = 1 model with one learned prefix (`--prefix-only`, the same tokens, seed "
                   "and backbone init): what a prefix alone buys. Difference < 0: the P streams beat it."),
                  "", *prefix_table(runs, prefix_runs)]
    usage = results.get("stream_usage")
    if usage:
        lines += [
            "",
            "## What the streams do",
            "",
            ("Every P > 1 model on the same held-out tokens (`parscale.diagnostics.stream_usage`): its loss, "
             "the loss of the streams' uniform mean and of each stream alone through the LM head, each stream's "
             "mean aggregation weight, the per-token weight entropy as a share of ln P, and the share of tokens "
             "where one stream takes over 90% of the weight. A best single stream as good as the model means "
             "the streams are not being combined."),
            "",
            usage_table(usage),
        ]

    two = results.get("two_stage")
    if two:
        b, c, r = two["stage1"], two["continued"], two["recycled"]
        lines += [
            "",
            "## Two-stage recipe in miniature",
            "",
            ("The paper's two-stage strategy (pre-train at P = 1, then add streams for a short second "
             f"stage) at our scale. Stage 1 is the grid's `{b['name']}` run (learning rate "
             f"{preset['schedule']} after warm-up; constant = the stable phase of a warmup-stable-decay "
             "schedule). "
             f"Stage 2 continues it for {two['extra_tokens']:,} more tokens ({100 * two['extra_fraction']:.0f}% "
             f"of stage 1) with the learning rate decaying (cosine to {preset['min_lr']:g}), once at P = 1 "
             f"and once recycled into P = {r['P']} (a fresh stream set: small random prefixes, uniform "
             "aggregation at the start). Both continuations use the same schedule and batches."),
            "",
            "| model | P | N | training tokens | held-out loss |",
            "|---|---|---|---|---|",
            f"| stage 1 (`{b['name']}`) | 1 | {b['params']:,} | {b['tokens']:,} | {b['val_loss']:.4f} |",
            (f"| continued (`{c['name']}`) | 1 | {c['params']:,} | {b['tokens']:,} + {c['tokens']:,} | "
             f"{c['val_loss']:.4f} |"),
            (f"| recycled (`{r['name']}`) | {r['P']} | {r['params']:,} | {b['tokens']:,} + {r['tokens']:,} | "
             f"{r['val_loss']:.4f} |"),
            *[f"| for reference: grid `{g['name']}` (from scratch) | {g['P']} | {g['params']:,} | "
              f"{g['tokens']:,} | {g['val_loss']:.4f} |" for g in two.get("grid_reference", [])],
            "",
            f"Recycled minus continued: {-two['gain_recycled_vs_continued']:+.4f} nats.",
        ]
    plots = results.get("plots", {})
    lines += ["", "## Plots", ""]
    captions = {"law_fit": "Held-out loss against N, one colour per P, with the fitted law",
                "loss_vs_streams": "Held-out loss against P, one line per size (dashed: the fit)",
                "multiplier": "Equivalent-parameter multiplier k·ln P + 1, ours and the paper's",
                "learning_curves": "Held-out loss during training, every run (colour: size; line style: P)",
                "stream_gap": "Held-out loss minus the same size's P = 1 loss during training (below 0: P helps)"}
    for key, name in plots.items():
        lines += [f"![{captions.get(key, key)}]({name})", "", f"*{captions.get(key, key)}.*", ""]
    lines += [
        "## Caveats",
        "",
        ("- Tiny models (tens of thousands to a million parameters) and a few million tokens at most, "
         "against the paper's 0.5–4.4B parameters and 42B tokens; one seed per run."),
        ("- A P-stream model does about P times the backbone's work per token; the law compares models "
         "at equal parameters and tokens, not at equal compute."),
        (f"- Raw numbers: `results.json`; each run's metrics, checkpoint and model: `{RUNS_DIR}/NAME/`. "
         "Re-running the same command skips finished runs and rewrites this report."),
        "",
    ]
    return "\n".join(lines)


def replot(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Redraw a finished reproduction's plots from its files, without training: the law, loss-vs-P
    and multiplier plots from ``results.json`` (the fit and its bootstrap are recomputed with the
    recorded resamples and seed: deterministic, so the same constants), and the learning-curve and
    stream-gap plots when the runs' ``runs/NAME/metrics.jsonl`` files are there."""
    from .paths import read_json_file
    from .plots.law import plot_law_fit, plot_multiplier
    from .plots.reproduce import plot_learning_curves, plot_loss_vs_streams, plot_stream_gap

    out = Path(out_dir)
    results = read_json_file(out / RESULTS_NAME, str(out / RESULTS_NAME))
    known = set(RunRecord.__dataclass_fields__)
    grid = [RunRecord(**{k: v for k, v in r.items() if k in known}) for r in results["runs"]]
    boot_info = results.get("bootstrap") or {}
    fit, boot = fit_runs(grid, int(boot_info.get("n", 0)), seed=int(boot_info.get("seed", 0)))
    # draw the constants the run reported (a refit can land elsewhere along the law's flat
    # directions in E, A, alpha); the band comes from the refits above
    fit = dataclasses.replace(fit, **{k: results["fit"][k] for k in ("E", "A", "alpha", "k", "r2")})
    k_band = boot_info.get("intervals", {}).get("k") or (boot.intervals["k"] if boot is not None else None)
    name = results.get("preset", {}).get("name", "?")
    paths = {k: out / v for k, v in PLOT_NAMES.items()}
    drawn = {"law_fit": plot_law_fit(fit, paths["law_fit"], boot=boot,
                                     title=f"parscale reproduce ({name}): held-out loss vs N"),
             "loss_vs_streams": plot_loss_vs_streams([r.to_dict() for r in grid], paths["loss_vs_streams"],
                                                     fit=fit)}
    trained_p = max(r.P for r in grid)
    drawn["multiplier"] = plot_multiplier(
        {"ours": fit, "paper (Stack-V2-Python)": PAPER_STACK["k"]}, paths["multiplier"],
        p_max=max(8, 2 * trained_p), trained_p=trained_p, bands={"ours": k_band} if k_band else None)
    runs_dir = out / RUNS_DIR
    if all((runs_dir / r.name / "metrics.jsonl").is_file() for r in grid):
        curves = [{**r.to_dict(), "curve": _val_curve(runs_dir / r.name)} for r in grid]
        drawn["learning_curves"] = plot_learning_curves(curves, paths["learning_curves"])
        if len({r.P for r in grid}) > 1:
            drawn["stream_gap"] = plot_stream_gap(curves, paths["stream_gap"])
    return drawn
