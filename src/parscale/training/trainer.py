"""The trainer: one loop for every recipe (from scratch, two-stage, recycling, frozen backbone, DDP).

A run is a list of *stages*; each stage has a stream count P, a step range and its own LR
schedule. A plain run is one stage. Two-stage training (``stage1_tokens`` + ``stage2_tokens``) is
stage 1 at P = 1 followed by stage 2 at P: at the boundary a fresh P-stream set is added to the
trained backbone (``add_stream_set``: small random prefixes, a zero last aggregator layer, so the
model starts as the mean of P near-identical streams) and the whole model keeps training.

Choices (see docs/training.md):

* **Optimizer**: AdamW (decoupled weight decay), betas (0.9, 0.95), eps 1e-8. Weight decay applies
  to weight matrices and the embedding only; norms, biases and the learned prefixes are not
  decayed (prefixes are the stream's only identity: pulling them to zero would pull the streams
  together).
* **LR schedule** per stage: linear warm-up over ``warmup_steps`` then cosine to ``min_lr`` (or
  constant). Stage 2 of two-stage training *restarts* the schedule with a short warm-up of
  ``min(warmup_steps, 10% of stage 2)`` steps: the new stream parameters start with fresh Adam
  moments and a full-size first step on them would jolt the trained backbone. The backbone's
  Adam moments carry over across the boundary; the new parameters get new ones.
* **Loss**: mean next-token cross-entropy over all ``seq_len`` positions of each window.
* **Batches**: the global batch of step ``i`` is a pure function of ``(seed, i)``
  (``parscale.data``); rank ``r`` of ``W`` takes its row slice, then micro-batches are row slices
  of that. So a resumed run, a DDP run and a grad-accumulated run all see the same tokens.
* **Exact resume**: checkpoints hold the model, the optimizer state, the RNG state and the step;
  nothing else carries state (no dropout, batches by step), so resuming reproduces the
  uninterrupted run bit for bit on the same machine and thread count.
* **DDP** (under ``torchrun``): gloo on CPU, nccl on GPU; gradients are averaged by DDP (all ranks
  hold equal token counts, so this equals the global mean); train loss, entropy and eval loss are
  all-reduced; only rank 0 writes files or prints.
* **FSDP2** (``--fsdp`` under ``torchrun``): ``torch.distributed.fsdp.fully_shard`` on every
  decoder layer and on the root (embedding, norm, LM head, stream sets), so each rank holds 1/W of
  the parameters, gradients and Adam moments. Same batches and loss averaging as DDP. Checkpoints
  gather the full tensors (model and Adam state) into the single-process format, so a sharded
  run resumes exactly (bit-identical to an uninterrupted sharded run) and its files load anywhere.
  Evaluation runs every window on every rank (FSDP's all-gathers need every rank in lockstep).
* **Stream sets' recipe**: ``prefix_init_std`` / ``agg_init_std`` change a new stream set's draw
  (after the backbone's: paired across recipes); ``prefix_reparam`` trains the prefixes through
  ``parscale.training.reparam`` (folded into plain prefixes in every saved model; the checkpoint
  keeps it in ``reparam.safetensors`` for exact resume). Every evaluation of a P > 1 run also logs
  ``loss_correlation``, ``pairwise_js`` and ``combination_gain`` on ``diversity_windows`` held-out
  windows (``diversity``; docs/reproduction/diversity/README.md).
* **Recycling** (``--init-from``): a new stream set's prefixes are the backbone's own keys/values
  on P snippets of the training data (``parscale.recycle``), so the run starts at the base loss;
  step 0 is evaluated (``val_loss`` and the init model's ``base_val_loss``). With
  ``--freeze-backbone`` the checkpoints and ``OUT/model`` are *adapters* (stream sets + the base's
  path and hash; the optimizer holds only the trained tensors anyway).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ParScaleError
from .options import RESUME_MUTABLE, TrainConfig

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "train_config.json"
MODEL_DIR = "model"
BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


@dataclass
class TrainResult:
    out_dir: str
    model_dir: str
    checkpoint_dir: str
    steps: int
    tokens: int  # training tokens (input tokens, not × P)
    train_loss: float | None  # loss of the last step
    val_loss: float | None  # held-out loss at the end
    wall_s: float  # training time summed over every (resumed) session
    tokens_per_s: float
    params: int  # non-embedding parameters of the final model at its active P
    streams: int
    already_finished: bool = False  # --resume found a finished run and did nothing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Stage:
    index: int
    streams: int
    start: int  # first global step of the stage
    steps: int
    warmup: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    if cfg.two_stage:
        n1, n2 = cfg.steps_for(cfg.stage1_tokens), cfg.steps_for(cfg.stage2_tokens)
        return [Stage(0, 1, 0, n1, min(cfg.warmup_steps, n1 // 2)),
                Stage(1, cfg.streams, n1, n2, min(cfg.warmup_steps, max(1, n2 // 10)))]
    n = cfg.total_steps()
    # warm-up takes at most half of the run, so a short run still decays its learning rate
    return [Stage(0, cfg.streams, 0, n, min(cfg.warmup_steps, n // 2))]


def lr_at(cfg: TrainConfig, stage: Stage, step: int) -> float:
    """Learning rate for global step ``step`` (0-based) inside ``stage``."""
    i = step - stage.start
    if stage.warmup and i < stage.warmup:
        return cfg.lr * (i + 1) / stage.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, stage.steps - stage.warmup)
    progress = min(1.0, (i - stage.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- distributed
class _Dist:
    """Rank/world from torchrun's environment; a no-op wrapper in a single process."""

    def __init__(self, cfg: TrainConfig):
        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ParScaleError("train option 'device' (--device): cuda requested but no CUDA device is available")
        self.device = torch.device(f"cuda:{self.local_rank}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(self.device)
        self.started = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if want_cuda else "gloo")
                self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64 on the wire)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_error(self, message: str | None) -> None:
        """Raise ``message`` on every rank if rank 0 found an error (keeps ranks from hanging)."""
        if self.world > 1:
            import torch.distributed as dist

            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message:
            raise ParScaleError(message)

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()


# --------------------------------------------------------------------------- run directory
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def saved_config(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The TrainConfig dict a run directory was started with (None if there is none); a damaged
    train_config.json is a ParScaleError naming it, not silently a fresh run."""
    from ..paths import read_json_file

    path = Path(out_dir) / CONFIG_NAME
    if not os.path.lexists(path):
        return None
    return read_json_file(path, f"{path} (the run's saved settings; fix or delete it)")


# Settings that name files: a resume compares where they point, not how they were spelt.
_PATH_OPTIONS = ("data", "tokenizer", "init_from")


def _same_setting(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key in _PATH_OPTIONS and isinstance(a, str) and isinstance(b, str) and "stdlib" not in (a, b):
        from ..paths import same_path

        return same_path(a, b)
    return False


def _check_resume_compatible(cfg: TrainConfig, saved: dict[str, Any], where: Path) -> None:
    for key, value in cfg.to_dict().items():
        if key in RESUME_MUTABLE or key not in saved:
            continue
        if not _same_setting(key, saved[key], value):
            raise ParScaleError(
                f"--resume: option '{key}' is {value!r} but the run in {where} was started with "
                f"{saved[key]!r}; resume with the same settings (or use another --out)")


def _trim_metrics(path: Path, upto_step: int) -> None:
    """Keep the records of steps <= ``upto_step`` (a killed run may have logged past its checkpoint,
    and its last line may be cut off)."""
    from ..interop import atomic_write_text

    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= upto_step:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _result_from_summary(summary: dict[str, Any], already_finished: bool) -> TrainResult:
    fields = {k: summary[k] for k in TrainResult.__dataclass_fields__ if k in summary}
    fields["already_finished"] = already_finished
    return TrainResult(**fields)


# --------------------------------------------------------------------------- data
class _Data:
    """The trainer's view of ``parscale.data``: corpus, tokenizer, train batches by step, and the
    fixed validation windows. Rank 0 trains the tokenizer and fills the token cache first; the
    other ranks then read them (cache hits)."""

    def __init__(self, cfg: TrainConfig, dist: _Dist, out: Path, resuming: bool):
        from ..data import TokenBatches, corpus_from_spec, load_or_train_tokenizer, load_tokenizer

        self.corpus = corpus_from_spec(cfg.data, max_bytes=cfg.data_max_bytes)
        if dist.main and not cfg.quiet:  # say what is tokenized (the first run of a corpus takes a while)
            print(f"parscale train: data {self.corpus.describe()}", file=sys.stderr)
        tok_path = cfg.tokenizer
        if tok_path is None and cfg.init_from is not None:
            tok_path = cfg.init_from
            if not (Path(tok_path) / "tokenizer.json").is_file():
                raise ParScaleError(f"--init-from {cfg.init_from}: no tokenizer.json there; "
                                    "pass --tokenizer DIR with the backbone's tokenizer")
        if tok_path is None and resuming and (out / "tokenizer.json").is_file():
            tok_path = str(out)  # the tokenizer this run trained, whatever the cache holds now
        if tok_path is not None:
            self.tokenizer = load_tokenizer(tok_path)
        else:
            if dist.main:
                self.tokenizer, _ = load_or_train_tokenizer(self.corpus, vocab_size=cfg.vocab_size)
            dist.barrier()
            if not dist.main:
                self.tokenizer, _ = load_or_train_tokenizer(self.corpus, vocab_size=cfg.vocab_size)
        if dist.main:
            self.tokenizer.save(out)
            if not cfg.quiet:
                t = self.tokenizer
                print(f"parscale train: documents are separated by {t.eos_token} (id {t.eos_id}); the same "
                      "token ends generation (parscale generate, chat, sample)", file=sys.stderr)
        self.batches = TokenBatches.build(self.corpus, self.tokenizer, seq_len=cfg.seq_len,
                                          global_batch=cfg.batch_size, seed=cfg.seed,
                                          progress=dist.main and not cfg.quiet and sys.stderr.isatty(),
                                          main=dist.main,
                                          barrier=dist.barrier)
        self.val = self.batches.validation_windows(max(1, cfg.eval_tokens // cfg.seq_len))
        if dist.main and not cfg.quiet:
            val = self.batches.validation
            print(f"parscale train: data ready: {len(self.batches.tokens):,} training tokens, "
                  f"{len(val) if val is not None else 0:,} validation tokens", file=sys.stderr)


# --------------------------------------------------------------------------- the run
class _Run:
    def __init__(self, cfg: TrainConfig, dist: _Dist, progress_callback: Callable[[dict], None] | None):
        self.cfg, self.dist, self.callback = cfg, dist, progress_callback
        self.out = Path(cfg.out)
        self.stages = plan_stages(cfg)
        self.total_steps = self.stages[-1].end
        self.model = None
        self.fresh_sets: set[str] = set()  # stream sets this run created (not loaded): keys "P"
        self.reparam_saved = None  # the resumed checkpoint's prefix-reparam tensors, if any
        self.ddp = None
        self.optimizer = None
        self.stage: Stage | None = None
        self.started = False  # set once training steps begin

    # ------------------------------------------------------------------ setup
    def _prepare_dir(self):
        """Rank 0 decides what the run directory holds; every rank learns the verdict."""
        from .checkpoint import load_checkpoint, recover

        cfg, out = self.cfg, self.out
        error, finished = None, False
        if self.dist.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                recover(out)
                saved = saved_config(out)
                summary = _read_json(out / SUMMARY_NAME)
                if saved is not None and not cfg.resume:
                    raise ParScaleError(f"--out {out} already holds a training run; pass --resume to "
                                        "continue it or choose another --out")
                if saved is not None:
                    _check_resume_compatible(cfg, saved, out)
                finished = summary is not None and summary.get("steps") == self.total_steps
            except ParScaleError as e:
                error = str(e)
        self.dist.broadcast_error(error)
        if self.dist.world > 1:
            import torch.distributed as dist

            box = [finished]
            dist.broadcast_object_list(box, src=0)
            finished = box[0]
        if finished:
            return "finished", None
        ckpt = load_checkpoint(out) if self.dist.main else None
        self.dist.barrier()
        if not self.dist.main:
            ckpt = load_checkpoint(out)  # rank 0's recover() already ran: nothing left to repair
        return "resume" if ckpt is not None else "fresh", ckpt

    def _build_model(self, ckpt, vocab: int, eos_id: int | None):
        import torch

        from ..config import ParScaleConfig
        from ..model import ParScaleForCausalLM

        cfg = self.cfg
        if ckpt is not None:
            model = ParScaleForCausalLM.from_pretrained(ckpt.path)
            from .reparam import REPARAM_NAME

            if (ckpt.path / REPARAM_NAME).is_file():
                from safetensors.torch import load_file

                self.reparam_saved = load_file(str(ckpt.path / REPARAM_NAME))
            model.set_streams(int(ckpt.state["streams"]))
        elif cfg.init_from is not None:
            model = ParScaleForCausalLM.from_pretrained(cfg.init_from)
            mc = model.config
            if not model.stream_sets:
                # a plain backbone (ours at P = 1, HF Qwen2/Llama): the ParScale settings are this run's
                if cfg.prefix_tokens > mc.max_position_embeddings:
                    raise ParScaleError(f"--prefix-tokens {cfg.prefix_tokens}: longer than the context of "
                                        f"{cfg.init_from} ({mc.max_position_embeddings} tokens)")
                mc.prefix_tokens, mc.agg_smoothing = cfg.prefix_tokens, cfg.agg_smoothing
            elif (mc.prefix_tokens, mc.agg_smoothing) != (cfg.prefix_tokens, cfg.agg_smoothing) and \
                    self.dist.main and not cfg.quiet:
                # every stream set of one model shares these two settings: the checkpoint's win
                print(f"parscale train: note: {cfg.init_from} already holds stream sets; using its "
                      f"prefix_tokens={mc.prefix_tokens} and agg_smoothing={mc.agg_smoothing}",
                      file=sys.stderr)
        else:
            s = cfg.shape()
            mcfg = ParScaleConfig(
                vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], max_position_embeddings=max(2048, cfg.seq_len),
                streams=self.stages[0].streams, prefix_tokens=cfg.prefix_tokens,
                agg_smoothing=cfg.agg_smoothing, eos_token_id=eos_id, tie_word_embeddings=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = ParScaleForCausalLM(mcfg)
                if cfg.prefix_init_std is not None or cfg.agg_init_std > 0:  # drawn after the backbone: still paired
                    for sset in model.stream_sets.values():
                        sset.reset_parameters(mcfg.initializer_range if cfg.prefix_init_std is None
                                              else cfg.prefix_init_std, cfg.agg_init_std,
                                              hidden_std=mcfg.initializer_range)
            self.fresh_sets = set(model.stream_sets)  # this run's own new sets (a reparam may go on them)
        if model.config.vocab_size < vocab:
            raise ParScaleError(f"the tokenizer has {vocab} tokens but the model's vocab_size is "
                                f"{model.config.vocab_size}")
        model.gradient_checkpointing = cfg.activation_checkpointing
        return model.to(self.dist.device).train()

    def _enter_stage(self, stage: Stage) -> None:
        """Activate the stage's stream set (adding it if new), pick trainable parameters, and
        (re)build the optimizer, carrying over the Adam state of parameters that keep training."""
        import torch

        cfg, model = self.cfg, self.model
        P = stage.streams
        if (P > 1 or cfg.prefix_only) and str(P) not in model.stream_sets:
            # Seeded per stage so the new set's init does not depend on how the run got here
            # (uninterrupted or resumed): that keeps resume bit-exact across the stage boundary.
            init, snippets = cfg.new_stream_init, None
            if init == "snippets":
                from ..recycle import snippets_from_tokens

                need, rows, i = P * model.config.prefix_tokens, [], 0
                while sum(r.numel() for r in rows) < need:  # the first training windows' tokens
                    rows.append(self.data.batches.batch(i).inputs)
                    i += 1
                snippets = snippets_from_tokens(torch.cat([r.reshape(-1) for r in rows]), P,
                                                model.config.prefix_tokens)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed * 1000 + 17 + stage.index)
                model.add_stream_set(P, init=init, snippets=snippets, std=cfg.prefix_init_std,
                                     agg_std=cfg.agg_init_std)
            model.to(self.dist.device)
            self.fresh_sets.add(str(P))
        model.set_streams(P)
        if P > 1 and model.config.prefix_tokens < 1:
            raise ParScaleError("the model's prefix_tokens is 0; cannot train P > 1 streams")
        if cfg.prefix_reparam and model.stream_set is not None:  # not two-stage's plain stage 1
            self._attach_reparam(stage)

        trainable = set(map(id, model.stream_parameters(P))) if model.stream_set is not None else set()
        if model.stream_set is not None and model.stream_set.reparam is not None:
            # the reparameterisation makes the prefixes; the stored ones are only written when saving
            trainable -= {id(model.stream_set.prefix_k), id(model.stream_set.prefix_v)}
        if not cfg.freeze_backbone:
            trainable |= set(map(id, model.backbone_parameters()))
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        if cfg.fsdp:
            self._shard(model)  # parameters become DTensor shards: groups are built from them below

        groups: list[dict[str, Any]] = []
        for part in ("backbone", "streams"):
            decay, no_decay, reparam = [], [], []
            for name, p in model.named_parameters():
                if not p.requires_grad or name.startswith("stream_sets.") != (part == "streams"):
                    continue
                # weight matrices and the embedding decay; norms, biases, prefixes and the prefix
                # reparameterisation (it is the prefix) do not. The reparam gets a group of its own
                # only at a rate of its own: at 1 the groups (and checkpoints) stay as they were
                if ".reparam." in name and cfg.reparam_lr_scale != 1.0:
                    reparam.append(p)
                    continue
                prefix = "prefix" in name or ".reparam." in name
                (decay if p.dim() >= 2 and not prefix else no_decay).append(p)
            groups += [{"params": decay, "weight_decay": cfg.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0},
                       {"params": reparam, "weight_decay": 0.0, "lr_scale": cfg.reparam_lr_scale}]
        groups = [g for g in groups if g["params"]]
        old = self.optimizer
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, eps=ADAM_EPS)
        if old is not None:
            for p, st in old.state.items():
                if p.requires_grad:
                    self.optimizer.state[p] = st
        self.params = [p for g in groups for p in g["params"]]
        if cfg.fsdp:
            self.ddp = model  # fully_shard wrapped the module in place
        elif self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.ddp = DDP(model, device_ids=ids)
        else:
            self.ddp = model
        self.stage = stage

    def _attach_reparam(self, stage: Stage) -> None:
        """Put the prefix reparameterisation on the stage's stream set: restored from the
        checkpoint being resumed, or fresh (seeded per stage) on a set this run created."""
        import torch

        from .reparam import attach_reparam, load_reparam_tensors

        cfg, model, key = self.cfg, self.model, str(stage.streams)
        sset = model.stream_sets[key]
        if sset.reparam is not None:
            return
        saved = self.reparam_saved
        if saved is not None and any(k.startswith(f"{key}.") for k in saved):
            attach_reparam(sset, model.config, dim=cfg.reparam_dim, hidden=cfg.reparam_hidden)
            load_reparam_tensors(model, saved, f"checkpoint {self.out}")
        elif key in self.fresh_sets:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed * 1000 + 31 + stage.index)
                attach_reparam(sset, model.config, dim=cfg.reparam_dim, hidden=cfg.reparam_hidden,
                               std=cfg.prefix_init_std)
        else:
            where = cfg.init_from if saved is None else f"the checkpoint in {self.out}"
            raise ParScaleError(f"train option 'prefix_reparam' (--prefix-reparam): trains a new stream set, but "
                                f"{where} already holds a P={stage.streams} set without one")

    def _shard(self, model) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    def _full_state(self):
        """(model, optimizer state dict) with full tensors for writing: under FSDP every rank
        gathers (collectives, in the same order everywhere) and rank 0 gets an unsharded copy of
        the model; otherwise the live ones."""
        if not self.cfg.fsdp:
            return self.model, self.optimizer.state_dict()
        import torch
        from torch.distributed.tensor import DTensor

        from ..model import ParScaleForCausalLM

        def full(t):
            return t.full_tensor() if isinstance(t, DTensor) else t

        weights = {n: full(t) for n, t in self.model.state_dict().items()}
        sd = self.optimizer.state_dict()  # its state dicts are the live ones: copy, do not mutate
        sd["state"] = {i: {k: full(v) for k, v in st.items()} for i, st in sorted(sd["state"].items())}
        if not self.dist.main:
            return None, sd
        plain = ParScaleForCausalLM.empty(self.model.config.replace(), device="cpu")
        with torch.no_grad():
            for n, t in plain.state_dict().items():
                t.copy_(weights[n])
        return plain, sd

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        """Load a single-process-format optimizer state; under FSDP each tensor is cut into this
        rank's shard of its parameter first."""
        if self.cfg.fsdp:
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            for i, st in state["state"].items():
                p = params[int(i)]
                for k, v in st.items():
                    if isinstance(p, DTensor) and v.dim() > 0:
                        st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
        self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        import torch

        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.autocast_dtype == "bfloat16")

    def _train_step(self, step: int) -> tuple[float, float | None, float]:
        import contextlib

        import torch
        import torch.nn.functional as F

        from ..diagnostics import aggregation_entropy

        cfg, dist = self.cfg, self.dist
        inputs, labels = self.data.batches.batch(step, rank=dist.rank, world_size=dist.world)
        inputs, labels = inputs.to(dist.device), labels.to(dist.device)
        self.optimizer.zero_grad(set_to_none=True)
        micro = inputs.shape[0] // cfg.grad_accum
        loss_sum, ent_sum = 0.0, 0.0
        for k in range(cfg.grad_accum):
            x, y = inputs[k * micro:(k + 1) * micro], labels[k * micro:(k + 1) * micro]
            last = k == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or dist.world == 1 or cfg.fsdp) else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    out = self.ddp(x)
                # float32 loss over every position of the window (labels = inputs shifted by one)
                loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
            if out.agg_weights is not None:
                ent_sum += aggregation_entropy(out.agg_weights.detach())
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)  # FSDP: a DTensor
        self.optimizer.step()
        loss_avg, ent_avg = (v / cfg.grad_accum for v in (loss_sum, ent_sum))
        loss_avg, ent_avg = (v / dist.world for v in dist.sum([loss_avg, ent_avg]))
        return loss_avg, (ent_avg if self.stage.streams > 1 else None), gnorm

    def evaluate(self) -> float | None:
        """Mean loss over the fixed validation windows (shared out over ranks, then all-reduced)."""
        import torch
        import torch.nn.functional as F

        val = self.data.val
        if val is None:
            return None
        inputs, labels = val.inputs, val.labels
        share = 1 if self.cfg.fsdp else self.dist.world  # FSDP: every rank, every window, in lockstep
        mine = range(self.dist.rank if share > 1 else 0, inputs.shape[0], share)
        bs = max(1, self.cfg.batch_size // (self.cfg.grad_accum * self.dist.world))
        total, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            idx = list(mine)
            for i in range(0, len(idx), bs):
                rows = idx[i:i + bs]
                x, y = inputs[rows].to(self.dist.device), labels[rows].to(self.dist.device)
                with self._autocast():
                    logits = self.model(x).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
                total += float(loss.view(len(rows), -1).mean(-1).sum())
                count += len(rows)
        self.model.train()
        if share > 1:
            total, count = self.dist.sum([total, float(count)])
        return total / count if count else None

    def diversity(self) -> dict[str, float]:
        """How different the streams are, on the first ``diversity_windows`` held-out windows
        (``parscale.diagnostics.stream_usage``): ``loss_correlation`` (ρ, the mean pairwise
        correlation of the streams' per-token losses), ``pairwise_js`` (nats) and
        ``combination_gain`` (best single stream's loss minus the aggregate's, nats). Empty at
        P = 1 or with the diagnostic off. Every rank computes it (FSDP's forward needs them all);
        it draws no random numbers, so it does not change training."""
        from ..diagnostics import stream_usage

        n, val = self.cfg.diversity_windows, self.data.val
        if n == 0 or val is None or self.stage.streams < 2:
            return {}
        bs = max(1, self.cfg.batch_size // (self.cfg.grad_accum * self.dist.world))
        with self._autocast():
            u = stream_usage(self.model, val.inputs[:n], val.labels[:n], batch_size=bs)
        return {"loss_correlation": u.loss_correlation, "pairwise_js": u.pairwise_js,
                "combination_gain": u.combination_gain}

    # ------------------------------------------------------------------ files
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.out / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.callback is not None:
            self.callback(dict(record))

    def _checkpoint(self, step: int, elapsed: float, finished: bool) -> None:
        from .checkpoint import save_checkpoint

        model, opt_state = self._full_state()  # every rank: FSDP gathers
        if self.dist.main:
            state = {"step": step, "tokens": step * self.cfg.tokens_per_step, "stage": self.stage.index,
                     "streams": self.stage.streams, "elapsed_s": elapsed, "total_steps": self.total_steps,
                     "finished": finished, "train_config": self.cfg.to_dict()}
            from ..model import reparam_folded
            from .reparam import REPARAM_NAME, reparam_tensors

            extra = reparam_tensors(model)  # kept beside the folded model: resume trains on through it
            with reparam_folded(model):
                save_checkpoint(self.out, model, opt_state, state, adapter_base=self.adapter_base,
                                extra_tensors={REPARAM_NAME: extra} if extra else None)
        self.dist.barrier()

    def _resolve_adapter_base(self) -> tuple[str, str] | None:
        """(base path, base hash) when this run's model files are adapters (frozen backbone)."""
        from ..recycle import adapter_base, is_adapter, weights_hash

        cfg = self.cfg
        if not (cfg.freeze_backbone and self.dist.main):
            return None
        if is_adapter(cfg.init_from):  # chained frozen runs share the one real base
            return adapter_base(cfg.init_from)
        return str(Path(cfg.init_from).resolve()), weights_hash(cfg.init_from)

    # ------------------------------------------------------------------ main loop
    def run(self) -> TrainResult:
        import torch

        from ..interop import atomic_write_text
        from .checkpoint import CHECKPOINT

        cfg, dist, out = self.cfg, self.dist, self.out
        if cfg.batch_size % (dist.world * cfg.grad_accum):
            raise ParScaleError(f"train option 'batch_size' (--batch-size): {cfg.batch_size} sequences "
                                f"do not split into {dist.world} rank(s) x {cfg.grad_accum} micro-batches")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.fsdp and dist.world < 2:
            raise ParScaleError("train option 'fsdp' (--fsdp): shards over torchrun processes; run it under "
                                "`torchrun --nproc_per_node N` with N >= 2")
        verdict, ckpt = self._prepare_dir()
        if verdict == "finished":
            summary = _read_json(out / SUMMARY_NAME)
            return _result_from_summary(summary, already_finished=True)
        if dist.main:
            atomic_write_text(out / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=2) + "\n")
            _trim_metrics(out / METRICS_NAME, ckpt.state["step"] if ckpt else 0)
        self.data = _Data(cfg, dist, out, resuming=ckpt is not None)
        tok = self.data.tokenizer
        self.model = self._build_model(ckpt, tok.vocab_size, tok.eos_id)
        self.adapter_base = self._resolve_adapter_base()
        base_val = self.evaluate() if (ckpt is None and cfg.init_from is not None) else None

        start = int(ckpt.state["step"]) if ckpt else 0
        elapsed_before = float(ckpt.state["elapsed_s"]) if ckpt else 0.0
        # Enter the checkpoint's own stage so its optimizer state fits; if it was taken right at
        # the stage boundary, the loop below then crosses it exactly as the uninterrupted run did.
        self._enter_stage(self.stages[int(ckpt.state["stage"])] if ckpt else self.stages[0])
        if ckpt is not None:
            from .checkpoint import restore_rng

            self._load_optimizer(ckpt.optimizer_state)
            restore_rng(ckpt.rng)

        bar = None
        if dist.main and not cfg.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=start, unit="step", dynamic_ncols=True)
        if dist.main and not cfg.quiet:
            n = self.model.num_parameters(non_embedding=True)
            what = "resuming at step %d" % start if start else "starting"
            if len(self.stages) > 1:  # the params counted are the current stage's (P = 1 in stage 1)
                s1, s2 = self.stages
                shape = (f"two-stage: {s1.steps} steps at P=1 then {s2.steps} at P={s2.streams}, "
                         f"{n:,} non-embedding params at P={self.stage.streams}")
            else:
                shape = f"P={self.stage.streams}, {n:,} non-embedding params"
            print(f"parscale train: {what}; {self.total_steps} steps of {cfg.tokens_per_step} tokens, "
                  f"{shape}, world size {dist.world}, data {self.data.corpus.name}", file=sys.stderr)

        if ckpt is None and cfg.init_from is not None:
            # step 0: the recycled model before any training, next to the model it came from
            self._log({"step": 0, "tokens": 0, "val_loss": self.evaluate(), "base_val_loss": base_val,
                       **self.diversity()})

        self.started = True  # from here on the run folder holds real work
        t_session = time.perf_counter()
        t_last, tokens_last = t_session, start * cfg.tokens_per_step
        loss = val_loss = None
        step = start
        while step < self.total_steps:
            stage = next(s for s in self.stages if s.start <= step < s.end)
            if stage.index != self.stage.index:
                self._enter_stage(stage)
                if dist.main and not cfg.quiet:
                    msg = (f"parscale train: stage {stage.index + 1} at step {step}: P={stage.streams}, "
                           f"{self.model.num_parameters(non_embedding=True):,} non-embedding params, "
                           f"learning rate restarts with {stage.warmup} warm-up steps")
                    (bar.write if bar is not None else lambda m: print(m, file=sys.stderr))(msg)
            lr = lr_at(cfg, stage, step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            loss, entropy, gnorm = self._train_step(step)
            if not math.isfinite(loss):
                raise ParScaleError(f"training diverged: loss is {loss} at step {step + 1} "
                                    "(try a lower --lr or --grad-clip)")
            step += 1
            tokens = step * cfg.tokens_per_step
            is_last = step == self.total_steps
            do_eval = is_last or (cfg.eval_every and step % cfg.eval_every == 0)
            if do_eval:
                val_loss = self.evaluate()
                diversity = self.diversity()
            if is_last or do_eval or (cfg.log_every and step % cfg.log_every == 0):
                now = time.perf_counter()
                rec = {"step": step, "tokens": tokens, "lr": lr, "loss": loss, "grad_norm": gnorm,
                       "tokens_per_s": (tokens - tokens_last) / max(now - t_last, 1e-9)}
                t_last, tokens_last = now, tokens
                if entropy is not None:
                    rec["agg_entropy"] = entropy
                if len(self.stages) > 1:
                    rec["stage"] = stage.index + 1
                    rec["streams"] = stage.streams
                if do_eval and val_loss is not None:
                    rec["val_loss"] = val_loss
                if do_eval:
                    rec.update(diversity)
                self._log(rec)
                if bar is None and dist.main and not cfg.quiet:
                    extra = f" val {val_loss:.4f}" if do_eval and val_loss is not None else ""
                    print(f"step {step}/{self.total_steps} loss {loss:.4f}{extra} "
                          f"lr {lr:.2e} {rec['tokens_per_s']:.0f} tok/s", file=sys.stderr)
            if bar is not None:
                bar.update(1)
                rate = (step - start) * cfg.tokens_per_step / max(time.perf_counter() - t_session, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            if is_last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                elapsed = elapsed_before + time.perf_counter() - t_session
                self._checkpoint(step, elapsed, finished=is_last)
        if bar is not None:
            bar.close()

        wall = elapsed_before + time.perf_counter() - t_session
        if ckpt is not None and start >= self.total_steps:
            wall = elapsed_before  # killed after the final checkpoint: only the files below were missing
            val_loss = self.evaluate()
        model_dir = out / MODEL_DIR
        final, _ = self._full_state()  # every rank: FSDP gathers
        if dist.main:
            if self.adapter_base is not None:
                from ..recycle import save_adapter

                from ..model import reparam_folded

                with reparam_folded(final):  # the official stream-set tensors, no reparam
                    save_adapter(final, model_dir, base=self.adapter_base[0], base_sha256=self.adapter_base[1])
            else:
                final.save_pretrained(model_dir)
            self.data.tokenizer.save(model_dir)
        if loss is None:  # nothing trained in this session: take the last logged loss
            last = _last_record(out / METRICS_NAME) if dist.main else {}
            loss = last.get("loss")
        tokens = self.total_steps * cfg.tokens_per_step
        result = TrainResult(
            out_dir=str(out), model_dir=str(model_dir), checkpoint_dir=str(out / CHECKPOINT),
            steps=self.total_steps, tokens=tokens, train_loss=loss, val_loss=val_loss, wall_s=wall,
            tokens_per_s=tokens / wall if wall > 0 else 0.0,
            params=self.model.num_parameters(non_embedding=True), streams=self.stage.streams)
        if dist.main:
            atomic_write_text(out / SUMMARY_NAME, json.dumps(result.to_dict(), indent=2) + "\n")
        dist.barrier()
        return result


def _last_record(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def train(cfg: TrainConfig, progress_callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume, or recognise as finished) the run ``cfg`` describes; see the module docstring.

    ``progress_callback(record)`` is called on rank 0 with every metrics record (the dicts written
    to ``metrics.jsonl``).
    """
    import shutil

    from ..paths import check_checkpoint_path, ensure_writable_dir

    if not isinstance(cfg, TrainConfig):
        raise ParScaleError(f"train() needs a TrainConfig (got {type(cfg).__name__})")
    cfg.validate()
    ensure_writable_dir(cfg.out, "--out")  # before any work, and creating nothing
    if cfg.init_from is not None:  # before the data is read (which can take a while)
        check_checkpoint_path(cfg.init_from, "--init-from")
    created = _first_missing(Path(cfg.out))
    dist = _Dist(cfg)
    run = _Run(cfg, dist, progress_callback)
    try:
        return run.run()
    except ParScaleError:
        # A run refused before its first step (bad data, missing tokenizer, too little data)
        # leaves no folder behind to block the corrected command.
        if created is not None and dist.main and not run.started and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        dist.close()


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what mkdir -p would create)."""
    path = path.absolute()
    missing = None
    while not os.path.lexists(path):
        missing, path = path, path.parent
    return missing


def format_summary(result: TrainResult) -> str:
    """The few lines ``parscale train`` prints at the end."""
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    head = "already finished; nothing to do" if result.already_finished else "done"
    return "\n".join([
        f"parscale train: {head}",
        f"  steps {result.steps}, tokens {result.tokens:,}, P={result.streams}, "
        f"{result.params:,} non-embedding params",
        f"  time {result.wall_s:.1f} s ({result.tokens_per_s:,.0f} tokens/s)",
        f"  final train loss {f(result.train_loss)}, val loss {f(result.val_loss)}",
        f"  model {result.model_dir}  (checkpoint {result.checkpoint_dir})",
    ])
