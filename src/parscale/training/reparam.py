"""The prefix reparameterisation of the ParScale paper's supplement (training only).

Instead of learning every layer's prefix keys/values directly, each attention layer ``l`` learns a
small per-stream embedding ``p'_l ∈ R^{P×D}`` (drawn from ``randn``) and an MLP shared by the
streams, ``D → H → tanh → 2·n_kv·T·d``, whose output is that layer's prefix key and value for each
stream (Li & Liang's prefix-tuning trick; the paper uses D = 128, H = 512). Different random
``p'`` give streams whose prefixes differ at O(1) from step one, and the shared MLP couples their
updates.

It is a training device only: :func:`attach_reparam` hangs a ``PrefixReparam`` on a ``StreamSet``
(its ``reparam`` child, so DDP, the optimizer and gradient clipping see its parameters), the
stream set's ``prefix()`` then asks it for the prefixes, and saving a model folds it
(``parscale.model.reparam_folded``): the MLP's outputs are written into the plain
``prefix_k``/``prefix_v`` and the file is the official format, without reparam tensors or config
fields. The trainer's resumable checkpoints keep the reparam parameters next to the folded model
(``reparam.safetensors``), so a resumed run continues the reparameterised training exactly.

Initial scale: after the default ``nn.Linear`` init, the output layer of each layer's MLP is
rescaled so that the generated prefixes have standard deviation ``std`` (the run's
``prefix_init_std``), the same meaning the option has for plain prefixes.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

REPARAM_NAME = "reparam.safetensors"  # in a trainer checkpoint: every stream set's reparam tensors


class PrefixReparam(nn.Module):
    """Per-layer ``p'`` (``l p D``) and per-layer MLPs producing prefixes ``p h t d`` (keys, values)."""

    def __init__(self, layers: int, streams: int, kv_heads: int, prefix_tokens: int, head_dim: int,
                 dim: int = 128, hidden: int = 512):
        super().__init__()
        self.kv_heads, self.prefix_tokens, self.head_dim = kv_heads, prefix_tokens, head_dim
        self.embedding = nn.Parameter(torch.randn(layers, streams, dim))  # l p D
        out = 2 * kv_heads * prefix_tokens * head_dim
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
                                  for _ in range(layers))

    @torch.no_grad()
    def rescale_(self, std: float) -> None:
        """Scale each layer's output Linear so its prefixes have standard deviation ``std``."""
        for layer, mlp in enumerate(self.mlps):
            nn.init.zeros_(mlp[2].bias)
            actual = float(mlp(self.embedding[layer].float()).std())
            mlp[2].weight.mul_(std / max(actual, 1e-12))

    def forward(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s prefix keys and values, two ``p h t d`` tensors."""
        flat = self.mlps[layer](self.embedding[layer])  # p (two h t d)
        kv = rearrange(flat, "p (two h t d) -> two p h t d", two=2, h=self.kv_heads, t=self.prefix_tokens)
        return kv[0], kv[1]


def attach_reparam(stream_set, config, *, dim: int = 128, hidden: int = 512,
                   std: float | None = None) -> PrefixReparam:
    """Give ``stream_set`` (of a model with ParScaleConfig ``config``) a fresh ``PrefixReparam``
    whose prefixes start with standard deviation ``std`` (default ``config.initializer_range``).
    The stored ``prefix_k``/``prefix_v`` stop being trained (``requires_grad`` off) until folded."""
    ref = stream_set.prefix_k
    r = PrefixReparam(config.num_hidden_layers, stream_set.streams, config.num_key_value_heads,
                      config.prefix_tokens, config.head_dim, dim=dim, hidden=hidden)
    r.rescale_(config.initializer_range if std is None else std)
    r.to(device=ref.device, dtype=ref.dtype)
    stream_set.reparam = r
    stream_set.prefix_k.requires_grad_(False)
    stream_set.prefix_v.requires_grad_(False)
    return r


def reparam_tensors(model) -> dict[str, torch.Tensor]:
    """Every stream set's reparam parameters as ``{P}.{name}`` (for the trainer's checkpoint)."""
    return {f"{key}.{n}": t.detach().cpu().contiguous().clone()
            for key, s in model.stream_sets.items() if s.reparam is not None
            for n, t in s.reparam.state_dict().items()}


def load_reparam_tensors(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy :func:`reparam_tensors` output back into the model's (already attached) reparams."""
    from ..errors import ParScaleError

    for key, s in model.stream_sets.items():
        if s.reparam is None:
            continue
        for n, t in s.reparam.state_dict().items():
            saved = tensors.get(f"{key}.{n}")
            if saved is None or saved.shape != t.shape:
                raise ParScaleError(f"{source}: no reparam tensor {key}.{n} of shape {tuple(t.shape)}")
            with torch.no_grad():
                t.copy_(saved)
