"""Training checkpoints: model, optimizer, RNG and progress, swapped in atomically; no pickle.

Layout of ``OUT/checkpoint/``:

* ``config.json`` + ``model.safetensors`` — the model via ``save_pretrained`` (every stream set),
  so ``ParScaleForCausalLM.from_pretrained(OUT/checkpoint)`` works on a checkpoint too; with a
  frozen backbone instead ``adapter_config.json`` + ``adapter.safetensors``: only the stream sets,
  the base's path and hash (``parscale.recycle``; ``from_pretrained`` loads that as well);
* ``optimizer.safetensors`` — every optimizer state tensor as ``state.{index}.{key}``;
* ``optimizer.json`` — the param groups (hyper-parameters, parameter indices) and any non-tensor
  state values;
* ``rng.safetensors`` — the torch CPU RNG state (a uint8 tensor) and, on GPU, each CUDA device's;
* ``reparam.safetensors`` — only when training with the prefix reparameterisation
  (``parscale.training.reparam``): its tensors, ``{P}.{name}``; the model files hold the folded
  plain prefixes;
* ``trainer_state.json`` — step, tokens, stage, elapsed time and the run's TrainConfig. Written
  last; a checkpoint directory without it is never used.

Python's ``random`` and numpy's global RNG are not used by training (batches are a pure function
of ``(seed, step)``, there is no dropout), so they are not saved.

Atomic swap: everything is written into ``checkpoint.tmp/`` and fsynced; then the current
``checkpoint/`` is renamed to ``checkpoint.old/``, ``checkpoint.tmp/`` to ``checkpoint/``, and
the old one deleted. ``recover`` (run before every load or save) undoes an interrupted swap: if
``checkpoint/`` is missing but ``checkpoint.old/`` exists, the old one is put back; leftover
``.tmp``/``.old`` directories are removed. So after a SIGKILL at any moment there is either no
checkpoint or one complete one. Loading uses safetensors and JSON only; ``torch.load`` (pickle) is
never called.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ParScaleError

CHECKPOINT = "checkpoint"
STATE_NAME = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
RNG_NAME = "rng.safetensors"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- atomic directory swap
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _paths(out_dir: Path) -> tuple[Path, Path, Path]:
    return out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.tmp", out_dir / f"{CHECKPOINT}.old"


def recover(out_dir: str | os.PathLike) -> Path | None:
    """Finish or undo an interrupted swap; returns the complete checkpoint directory, if any."""
    final, tmp, old = _paths(Path(out_dir))
    if not final.exists() and old.exists():
        os.rename(old, final)  # killed between the two renames: the old one is still complete
    if old.exists():
        shutil.rmtree(old)  # killed after the swap, before the clean-up
    if tmp.exists():
        shutil.rmtree(tmp)  # killed while writing: never half-used
    if final.is_dir() and (final / STATE_NAME).is_file():
        return final
    return None


def write_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_dir)`` fills a fresh directory, which then replaces ``OUT/checkpoint``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    final, tmp, old = _paths(out_dir)
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return final


# --------------------------------------------------------------------------- optimizer state
def optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` (or such a state dict itself) into safetensors tensors
    and a JSON-able dict."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = v
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_files`: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        # JSON turned tuples (betas) into lists; "params" is the one real list
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- RNG
def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# --------------------------------------------------------------------------- save / load
def save_checkpoint(out_dir: str | os.PathLike, model, optimizer,
                    state: dict[str, Any], adapter_base: tuple[str, str] | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write model + optimizer (or its state dict) + RNG + ``state`` (JSON-able) as the new
    ``OUT/checkpoint``; the model as an adapter of ``adapter_base`` = (base path, base hash)
    when given (frozen backbone). ``extra_tensors``: more safetensors files, ``{file name:
    tensors}`` (the prefix reparameterisation's, ``reparam.safetensors``)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        if adapter_base is not None:
            from ..recycle import save_adapter

            save_adapter(model, tmp, base=adapter_base[0], base_sha256=adapter_base[1])
        else:
            model.save_pretrained(tmp)
        tensors, meta = optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / OPTIMIZER_META).write_text(json.dumps(meta, indent=1))
        save_file(rng_tensors(), str(tmp / RNG_NAME))
        for name, tensors_ in (extra_tensors or {}).items():
            save_file(tensors_, str(tmp / name))
        (tmp / STATE_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION, **state}, indent=2))

    return write_atomically(out_dir, write)


@dataclass
class LoadedCheckpoint:
    path: Path  # the checkpoint directory (also a model directory for from_pretrained)
    state: dict[str, Any]  # trainer_state.json
    optimizer_state: dict[str, Any]  # for optimizer.load_state_dict
    rng: dict[str, torch.Tensor]


def load_checkpoint(out_dir: str | os.PathLike) -> LoadedCheckpoint | None:
    """The complete checkpoint of a run directory (after :func:`recover`), or None if there is none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = recover(out_dir)
    if path is None:
        return None
    from ..paths import read_json_file

    # binary, non-UTF-8 or malformed JSON: one line naming the file
    state = read_json_file(path / STATE_NAME, f"checkpoint file {path / STATE_NAME}")
    meta = read_json_file(path / OPTIMIZER_META, f"checkpoint file {path / OPTIMIZER_META}")
    try:
        opt_tensors = load_file(str(path / OPTIMIZER_TENSORS))
        rng = load_file(str(path / RNG_NAME))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise ParScaleError(f"checkpoint {path}: unreadable ({type(e).__name__}: {e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise ParScaleError(f"checkpoint {path}: format_version {state.get('format_version')!r}, "
                            f"this parscale reads {FORMAT_VERSION}")
    return LoadedCheckpoint(path, state, optimizer_from_files(opt_tensors, meta), rng)
