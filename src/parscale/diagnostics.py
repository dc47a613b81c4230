"""What the streams of a trained ParScale model do: are they combined, or is it one stream?

``stream_usage(model, inputs, labels)`` runs the model on held-out windows and reads every
stream's final hidden state (a hook on the final norm, ``(p b) s h``). It reports the model's loss
next to the loss of each stream alone through the LM head and of the streams' uniform mean, plus
how the aggregator spreads its weights. A model whose best single stream is as good as the
aggregate is, in effect, one stream with a learned prefix: its P copies add compute but not
quality. (At `parscale reproduce`'s CPU scale that is what we measured; see
docs/reproduction/README.md.)

It also measures how *different* the streams are, the quantity the paper's theory ties the gain
to (arXiv 2505.10475, §2: the aggregate's loss falls with P through ``(P−1)ρ + 1``, ρ the
correlation between the streams' residuals): ``loss_correlation`` is the mean pairwise Pearson
correlation, over tokens, of the streams' per-token losses (our estimate of ρ; 1 = the streams err
on exactly the same tokens by the same amounts), and ``pairwise_js`` the mean Jensen–Shannon
divergence between two streams' next-token distributions (nats; 0 = identical predictions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ParScaleError

PEAKED = 0.9  # a token's weights are "peaked" when one stream takes more than this


def aggregation_entropy(weights: torch.Tensor) -> float:
    """Mean over tokens of −Σ_p w log w of aggregation weights ``... p`` (ln P = uniform weights;
    0 = one stream takes all). The trainer logs it as ``agg_entropy``."""
    w = weights.double()
    return float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean())


@dataclass(frozen=True)
class StreamUsage:
    """Mean next-token losses (nats) on the same tokens, and the aggregation weights' spread."""

    P: int
    tokens: int
    loss: float  # the model as it is (learned aggregation)
    uniform_mean_loss: float  # the P streams averaged with equal weights
    stream_losses: tuple[float, ...]  # each stream alone through the LM head
    mean_weights: tuple[float, ...]  # each stream's mean aggregation weight over the tokens
    entropy_over_lnP: float  # mean per-token weight entropy / ln P (1: uniform, 0: one stream)
    share_peaked: float  # share of tokens where one stream's weight exceeds PEAKED
    loss_correlation: float = float("nan")  # mean pairwise corr. of per-token stream losses (ρ)
    pairwise_js: float = float("nan")  # mean JS divergence between two streams' predictions, nats

    @property
    def best_single_stream_loss(self) -> float:
        return min(self.stream_losses)

    @property
    def combination_gain(self) -> float:
        """Best single stream's loss minus the model's: what combining the streams buys (nats)."""
        return self.best_single_stream_loss - self.loss

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "best_single_stream_loss": self.best_single_stream_loss,
                "combination_gain": self.combination_gain}


def stream_usage(model, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 16) -> StreamUsage:
    """``StreamUsage`` of ``model`` (active P > 1) on ``inputs``/``labels`` (``b s`` token ids;
    ``labels[:, t]`` is the token after ``inputs[:, t]``, as in ``parscale.data.Batch``)."""
    P = model.streams
    if P < 2 or model.stream_set is None:  # P = 1 (prefix-only or not): nothing to combine
        raise ParScaleError(f"stream_usage needs a model with P > 1 streams (this one has P = {P})")
    if inputs.dim() != 2 or inputs.shape != labels.shape:
        raise ParScaleError(f"stream_usage: inputs and labels must be the same 2-D shape, got "
                            f"{tuple(inputs.shape)} and {tuple(labels.shape)}")
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    sums = torch.zeros(P + 2, dtype=torch.float64)  # model, uniform mean, then each stream
    cross = torch.zeros(P, P, dtype=torch.float64)  # Σ over tokens of loss_i · loss_j
    js_sum = 0.0
    weight_sum = torch.zeros(P, dtype=torch.float64)
    entropy, peaked, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for i in range(0, inputs.shape[0], batch_size):
                x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
                out = model(x)
                h = captured["h"].unflatten(0, (P, x.shape[0]))  # (p b) s h -> p b s h
                heads = [out.logits, model.lm_head(h.mean(0)), *(model.lm_head(h[p]) for p in range(P))]
                for j, logits in enumerate(heads[:2]):
                    sums[j] += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
                logp = torch.stack([F.log_softmax(lg.float(), -1) for lg in heads[2:]])  # p b s v
                nll = -logp.gather(-1, y[None, ..., None].expand(P, *y.shape, 1))[..., 0]  # p b s
                nll = nll.flatten(1).double().cpu()  # p (b s)
                sums[2:] += nll.sum(1)
                cross += nll @ nll.T
                js_sum += _pairwise_js_sum(logp)
                w = out.agg_weights.double()  # b s p
                weight_sum += w.sum((0, 1)).cpu()
                entropy += aggregation_entropy(w) * y.numel()
                peaked += int((w.max(-1).values > PEAKED).sum())
                count += y.numel()
    finally:
        hook.remove()
        model.train(was_training)
    mean = (sums / count).tolist()
    m = sums[2:] / count
    cov = cross / count - m[:, None] * m[None, :]
    sd = cov.diagonal().clamp_min(0).sqrt()
    corr = cov / (sd[:, None] * sd[None, :])  # nan where a stream's loss is constant
    off = ~torch.eye(P, dtype=torch.bool)
    return StreamUsage(P=P, tokens=count, loss=mean[0], uniform_mean_loss=mean[1],
                       stream_losses=tuple(mean[2:]), mean_weights=tuple((weight_sum / count).tolist()),
                       entropy_over_lnP=entropy / count / math.log(P), share_peaked=peaked / count,
                       loss_correlation=float(corr[off].mean()),
                       pairwise_js=js_sum / count / (P * (P - 1) / 2))


def _pairwise_js_sum(logp: torch.Tensor) -> float:
    """Σ over tokens and stream pairs i < j of JS(p_i, p_j), from log-probs ``p b s v``."""
    total = 0.0
    P = logp.shape[0]
    for i in range(P):
        for j in range(i + 1, P):
            mix = torch.logaddexp(logp[i], logp[j]) - math.log(2)  # log of (p_i + p_j) / 2
            kl_i = (logp[i].exp() * (logp[i] - mix)).sum(-1)
            kl_j = (logp[j].exp() * (logp[j] - mix)).sum(-1)
            total += float((0.5 * (kl_i + kl_j)).double().sum())
    return total
