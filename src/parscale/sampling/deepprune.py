"""DeepPrune: prune parallel traces that a judge says will end in the same answer.

DeepPrune ("Parallel Scaling without Inter-trace Redundancy") observes that most parallel traces
of a problem end in the same answer; a judge that predicts answer equivalence from *partial*
traces lets an online greedy clustering stop the redundant rows early. Here:

(a) ``collect_pairs`` — pairs of partial traces of the same problem, both cut at the same token
    count t (rows of a problem decode in lockstep, so at step t every live row has t tokens), from
    SampleSets the sampler produced; label 1 when both final answers are the same real answer.
    Only rows still running after t tokens take part (finished rows are not live).
(b) ``PairJudge`` — a small model on token ids: an embedding and a GRU encode each partial trace;
    a symmetric head reads ``[|ha - hb|, ha * hb, agree, prefix]`` (``agree``: the share of
    positions where the two token sequences match; ``prefix``: their common prefix as a share of
    t) and gives the logit of "same final answer". ``train_judge`` trains it with the focal loss
    (``focal_loss``) on a set where the minority label is oversampled to balance; ``auroc`` is
    the tie-aware area under the ROC curve. A judge is saved as ``judge.safetensors`` +
    ``judge.json`` (``save`` / ``load_judge``).
(c) ``DeepPrune`` — the online policy (``deepprune:JUDGE[:EVERY[:KEEP[:THRESHOLD]]]``): after
    every EVERY-th token it walks the live rows of a problem in index order; a row joins the first
    cluster whose representative (its first row) the judge calls equivalent (probability >=
    THRESHOLD), else it starts a cluster; each cluster keeps its first KEEP rows and the rest are
    pruned (they leave the running batch: the ledger's ``row_steps`` falls). The vote is then over
    the rows that finished. ``policy.merged`` (and the SampleSet's ``meta["pruned_into"]``) record
    which kept row each pruned row was judged equal to, for a vote that counts clusters by size.
(d) ``Peek`` — judge-free (``peek:EVERY[:KEEP]``): every EVERY tokens each live row is forked,
    the task's answer mark (``answer_prefix``, e.g. `` ; =>``) is appended and the fork is decoded
    greedily to the end of the line; rows whose forced answers are equal form a cluster, and
    clusters are cut to KEEP rows as above. The forks are re-prefilled (prompt + partial trace +
    mark) by the one decode loop, and their work is added to the run's ledger, so the saving
    reported is net of the peeking.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ParScaleError
from .answers import INVALID, canonical_answer, first_line, get_extractor
from .policies import CONTINUE, Action, Policy
from .records import CostLedger, SampleSet

JUDGE_WEIGHTS, JUDGE_CONFIG = "judge.safetensors", "judge.json"
JUDGE_FORMAT = "parscale.deepprune-judge"


# ----------------------------------------------------------------------------- metrics and loss
def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties
    counting one half (the Mann-Whitney U statistic over #pos·#neg, from average ranks)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise ParScaleError(f"auroc: scores {s.shape} and labels {y.shape} must be equal-length 1-D arrays")
    if not np.isin(y, (0, 1)).all():
        raise ParScaleError("auroc: labels must be 0 or 1")
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        raise ParScaleError(f"auroc needs both labels (got {pos} positives, {neg} negatives)")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average rank (1-based) over each run of tied scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Mean binary focal loss ``-a_t (1 - p_t)^gamma log p_t`` (Lin et al.): ``p_t`` is the
    probability given to the true label, ``a_t = alpha`` for label 1 and ``1 - alpha`` for 0.
    ``gamma = 0, alpha = 0.5`` is half the binary cross-entropy."""
    labels = labels.to(logits.dtype)
    log_p = nn.functional.logsigmoid(logits)  # log P(label 1)
    log_q = nn.functional.logsigmoid(-logits)  # log P(label 0)
    log_pt = labels * log_p + (1 - labels) * log_q
    a_t = labels * alpha + (1 - labels) * (1 - alpha)
    return (-a_t * (1 - log_pt.exp()) ** gamma * log_pt).mean()


# ----------------------------------------------------------------------------- pairs
@dataclass
class PairSet:
    """Pairs of partial traces cut at ``length`` tokens: ``a``, ``b`` are ``m t`` token ids."""

    length: int
    a: torch.Tensor
    b: torch.Tensor
    labels: torch.Tensor  # m, 1 = same final answer
    problem_ids: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def collect_pairs(sample_sets: SampleSet | Sequence[SampleSet], extractor: str | Callable,
                  lengths: Sequence[int], *, max_pairs_per_problem: int | None = None,
                  seed: int = 0) -> dict[int, PairSet]:
    """Per truncation length t, every pair (i < j) of a problem's samples still running after t
    tokens, both cut to t tokens, labelled by final-answer equality (INVALID never equals).

    ``max_pairs_per_problem`` keeps a seeded random subset per problem and length."""
    sets = [sample_sets] if isinstance(sample_sets, SampleSet) else list(sample_sets)
    if not lengths or any(not isinstance(t, int) or t < 1 for t in lengths):
        raise ParScaleError(f"truncation lengths must be integers >= 1 (got {list(lengths)!r})")
    extract = get_extractor(extractor)
    rng = random.Random(seed)
    out = {}
    for t in lengths:
        a, b, y, pids = [], [], [], []
        for sset in sets:
            for pid, group in sset.by_problem().items():
                rows = [s for s in group if len(s.token_ids) > t and s.finish_reason != "pruned"]
                answers = [extract(s.text) for s in rows]
                pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
                if max_pairs_per_problem is not None and len(pairs) > max_pairs_per_problem:
                    pairs = rng.sample(pairs, max_pairs_per_problem)
                for i, j in pairs:
                    a.append(rows[i].token_ids[:t])
                    b.append(rows[j].token_ids[:t])
                    y.append(int(answers[i] is not INVALID and answers[i] == answers[j]))
                    pids.append(pid)
        out[t] = PairSet(t, torch.tensor(a, dtype=torch.long).reshape(len(a), t),
                         torch.tensor(b, dtype=torch.long).reshape(len(b), t), torch.tensor(y), pids)
    return out


# ----------------------------------------------------------------------------- the judge
class PairJudge(nn.Module):
    """Logit that two equal-length partial traces of one problem end in the same answer."""

    def __init__(self, vocab_size: int, dim: int = 32, hidden: int = 64, head: int = 64) -> None:
        super().__init__()
        for name, v in [("vocab_size", vocab_size), ("dim", dim), ("hidden", hidden), ("head", head)]:
            if not isinstance(v, int) or v < 1:
                raise ParScaleError(f"PairJudge: {name} must be an integer >= 1 (got {v!r})")
        self.config = {"vocab_size": vocab_size, "dim": dim, "hidden": hidden, "head": head}
        self.embed = nn.Embedding(vocab_size, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden + 2, head), nn.GELU(), nn.Linear(head, 1))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """``m t`` token ids -> ``m hidden`` (the GRU's last state)."""
        ids = ids.to(self.device).clamp(0, self.config["vocab_size"] - 1)  # an unseen id reads the last row
        _, h = self.gru(self.embed(ids))  # h: 1 m hidden
        return h[0]

    def pair_logits(self, ha: torch.Tensor, hb: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits for the pairs (ha[k], hb[k]) with token ids a[k], b[k] (``m t`` each)."""
        same = (a == b).to(ha.dtype).to(self.device)  # m t
        agree = same.mean(-1, keepdim=True)
        prefix = same.cumprod(-1).mean(-1, keepdim=True)  # common prefix / t
        return self.head(torch.cat([(ha - hb).abs(), ha * hb, agree, prefix], dim=-1))[:, 0]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.pair_logits(self.encode(a), self.encode(b), a, b)

    @torch.no_grad()
    def matrix(self, ids: torch.Tensor) -> torch.Tensor:
        """``r t`` rows -> ``r r`` probabilities that rows i and j end in the same answer."""
        r = ids.shape[0]
        h = self.encode(ids)
        ii, jj = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        ii, jj = ii.flatten(), jj.flatten()  # r·r pairs
        ids = ids.to(self.device)
        return torch.sigmoid(self.pair_logits(h[ii], h[jj], ids[ii], ids[jj])).reshape(r, r).cpu()

    def flops(self, rows: int, length: int) -> float:
        """Matmul FLOPs of ``matrix`` on ``rows`` rows of ``length`` tokens (multiply-add = 2)."""
        d, h, k = self.config["dim"], self.config["hidden"], self.config["head"]
        gru = 2 * 3 * (d * h + h * h) * length * rows
        head = 2 * ((2 * h + 2) * k + k) * rows * rows
        return float(gru + head)

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save as st_save

        from ..atomic import atomic_write_bytes, atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(d / JUDGE_WEIGHTS, st_save(tensors))
        atomic_write_text(d / JUDGE_CONFIG, json.dumps({"format": JUDGE_FORMAT, "version": 1, **self.config,
                                                        **getattr(self, "info", {})}, indent=2) + "\n")
        return d


def load_judge(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PairJudge:
    """A judge saved by ``PairJudge.save`` (safetensors + JSON; nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / JUDGE_CONFIG, d / JUDGE_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ParScaleError(f"deepprune judge: {d} needs {JUDGE_CONFIG} and {JUDGE_WEIGHTS} "
                            "(write them with parscale.sampling.deepprune.train_judge(...).save(DIR))")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParScaleError(f"deepprune judge: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != JUDGE_FORMAT:
        raise ParScaleError(f"deepprune judge: {cfg_path} is not a {JUDGE_FORMAT} file")
    try:
        judge = PairJudge(*(cfg[k] for k in ("vocab_size", "dim", "hidden", "head")))
    except KeyError as e:
        raise ParScaleError(f"deepprune judge: {cfg_path} lacks {e.args[0]!r}") from None
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise ParScaleError(f"deepprune judge: cannot read {w_path} ({e})") from None
    try:
        judge.load_state_dict(state)
    except RuntimeError as e:
        raise ParScaleError(f"deepprune judge: {w_path} does not match {JUDGE_CONFIG}: "
                            f"{str(e).splitlines()[0]}") from None
    judge.info = {k: v for k, v in cfg.items() if k not in judge.config and k not in ("format", "version")}
    return judge.to(device).eval()


def oversample(labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Indices of a balanced set: every example once, the minority label drawn again with
    replacement until both labels are equally many."""
    pos, neg = torch.nonzero(labels == 1)[:, 0], torch.nonzero(labels == 0)[:, 0]
    if len(pos) == 0 or len(neg) == 0:
        return torch.arange(len(labels))
    small, big = (pos, neg) if len(pos) < len(neg) else (neg, pos)
    extra = small[torch.randint(len(small), (len(big) - len(small),), generator=rng)]
    return torch.cat([big, small, extra])


def train_judge(pairs: dict[int, PairSet], vocab_size: int, *, epochs: int = 3, batch_size: int = 256,
                lr: float = 3e-3, gamma: float = 2.0, alpha: float = 0.5, seed: int = 0,
                max_examples: int | None = None, dim: int = 32, hidden: int = 64,
                log: Callable[[str], None] | None = None) -> PairJudge:
    """Train a ``PairJudge`` on pairs of every truncation length (focal loss, minority oversampled
    per length and epoch; batches hold one length each, shuffled together)."""
    torch.manual_seed(seed)
    judge = PairJudge(vocab_size, dim=dim, hidden=hidden)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    usable = {t: p for t, p in pairs.items() if len(p)}
    if not usable:
        raise ParScaleError("train_judge: no pairs to train on")
    for epoch in range(epochs):
        batches = []
        for t, p in usable.items():
            idx = oversample(p.labels, g)
            idx = idx[torch.randperm(len(idx), generator=g)]
            if max_examples is not None:
                idx = idx[:max_examples]
            batches += [(t, idx[i: i + batch_size]) for i in range(0, len(idx), batch_size)]
        random.Random(seed + epoch).shuffle(batches)
        total = 0.0
        for t, idx in batches:
            p = usable[t]
            loss = focal_loss(judge(p.a[idx], p.b[idx]), p.labels[idx], gamma, alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if log is not None:
            log(f"judge epoch {epoch + 1}/{epochs}: focal loss {total / max(len(batches), 1):.4f}")
    judge.info = {"gamma": gamma, "alpha": alpha, "lengths": sorted(usable), "epochs": epochs}
    return judge.eval()


@torch.no_grad()
def judge_auroc(judge: PairJudge, pairs: dict[int, PairSet]) -> dict[int, dict]:
    """Per truncation length: AUROC, pair count and the share of equivalent pairs."""
    out = {}
    for t, p in sorted(pairs.items()):
        n_pos = int(p.labels.sum())
        row = {"pairs": len(p), "equivalent": n_pos / len(p) if len(p) else float("nan"), "auroc": float("nan")}
        if 0 < n_pos < len(p):
            scores = torch.cat([judge(p.a[i: i + 1024], p.b[i: i + 1024]) for i in range(0, len(p), 1024)])
            row["auroc"] = auroc(scores.tolist(), p.labels.tolist())
        out[t] = row
    return out


# ----------------------------------------------------------------------------- online policies
def greedy_clusters(rows: Sequence[int], same: Callable[[int, int], bool]) -> list[list[int]]:
    """Rows in order; each joins the first cluster whose representative (first row) it is
    ``same`` as, else starts a new cluster."""
    clusters: list[list[int]] = []
    for r in rows:
        for c in clusters:
            if same(c[0], r):
                c.append(r)
                break
        else:
            clusters.append([r])
    return clusters


class _ClusterPolicy(Policy):
    """Shared by DeepPrune and Peek: cluster the live rows every ``every`` tokens, keep ``keep``."""

    def __init__(self, every: int, keep: int, extractor=None) -> None:
        for name, v in [("EVERY", every), ("KEEP", keep)]:
            if not isinstance(v, int) or v < 1:
                raise ParScaleError(f"{type(self).__name__.lower()} policy: {name} must be an integer >= 1 (got {v!r})")
        self.every, self.keep = every, keep
        super().__init__(extractor)

    def _answer(self, sample):  # votes happen after sampling; the policy does not need answers
        return INVALID

    def _add_cost(self, **counts) -> None:
        model = self.context.model
        ident = {} if model is None else {"streams": model.streams, "params": model.num_parameters(),
                                          "kv_bytes_per_value": model.model.norm.weight.element_size()}
        self.extra_cost = self.extra_cost + CostLedger(**counts, **ident)

    def _prune(self, clusters: list[list[int]]) -> Action:
        pruned = [r for c in clusters for r in c[self.keep:]]
        for c in clusters:
            for r in c[self.keep:]:
                self.merged[r] = c[0]
        return Action.prune(pruned) if pruned else CONTINUE


class DeepPrune(_ClusterPolicy):
    def __init__(self, judge: PairJudge | str | os.PathLike, every: int = 8, keep: int = 2,
                 threshold: float = 0.5, extractor=None) -> None:
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
            raise ParScaleError(f"deepprune policy: THRESHOLD must be in (0, 1) (got {threshold!r})")
        # a PairJudge, a directory holding one, or any object with PairJudge's ``matrix`` / ``flops``
        self.judge = judge if hasattr(judge, "matrix") else load_judge(judge)
        self.threshold = float(threshold)
        super().__init__(every, keep, extractor)

    def inspect(self, step: int, live: dict[int, list[int]]) -> Action:
        if len(live) <= self.keep:
            return CONTINUE
        order = sorted(live)
        by_len: dict[int, list[int]] = {}
        for r in order:  # rows of one problem decode in lockstep; group by length to be safe
            by_len.setdefault(len(live[r]), []).append(r)
        clusters = []
        for length, rows in by_len.items():
            ids = torch.tensor([live[r] for r in rows], dtype=torch.long)
            prob = self.judge.matrix(ids)
            pos = {r: k for k, r in enumerate(rows)}
            clusters += greedy_clusters(rows, lambda a, b: bool(prob[pos[a], pos[b]] >= self.threshold))
            self._add_cost(flops=self.judge.flops(len(rows), length))
        return self._prune(clusters)

    def __repr__(self) -> str:
        return f"DeepPrune(every={self.every}, keep={self.keep}, threshold={self.threshold})"


class Peek(_ClusterPolicy):
    def __init__(self, every: int = 8, keep: int = 2, answer_prefix: str | None = None,
                 answer_tokens: int = 16, extractor=None) -> None:
        self.answer_prefix, self.answer_tokens = answer_prefix, int(answer_tokens)
        super().__init__(every, keep, extractor)

    def forced_answers(self, live: dict[int, list[int]]) -> dict[int, str | None]:
        """Each live row's answer when forced now: fork it (prompt + its tokens + the answer mark),
        decode greedily to the end of the line; the work is added to ``extra_cost``."""
        from ..cost import decode_kv_read_bytes, forward_flops
        from ..generation import decode, left_pad
        from .tasks import get_task

        ctx = self.context
        if ctx.model is None or ctx.tokenizer is None:
            raise ParScaleError("peek policy: needs the sampler's model and tokenizer (bind a PolicyContext)")
        mark = self.answer_prefix
        if mark is None:
            mark = getattr(get_task(ctx.problem.task), "answer_prefix", " =>") if ctx.problem else " =>"
        mark_ids = ctx.tokenizer.encode(mark)
        rows = sorted(live)
        seqs = [ctx.prompt_ids + [t for t in live[r] if t not in ctx.eos] + mark_ids for r in rows]
        ids, mask = left_pad(seqs)
        tok = ctx.tokenizer

        def stop(row: int, tokens: list[int]) -> bool:
            return "\n" in tok.decode(tokens[-4:])

        res = decode(ctx.model, ids, mask, max_new_tokens=self.answer_tokens, temperature=0.0,
                     eos_token_id=ctx.eos, stop=stop)
        cfg = ctx.model.config
        flops = sum(forward_flops(cfg, tokens=len(s), context=(len(s) + 1) / 2) for s in seqs)
        fed = [(len(t) - 1, len(s)) for t, s in zip(res.tokens, seqs)]
        n_fed = sum(m for m, _ in fed)
        if n_fed:
            flops += forward_flops(cfg, tokens=n_fed, context=sum(m * p + m * (m + 1) / 2 for m, p in fed) / n_fed)
        kv_value = ctx.model.model.norm.weight.element_size()  # the cache's dtype (model.new_cache)
        self._add_cost(prompt_tokens=res.prefill_tokens, generated_tokens=sum(map(len, res.tokens)),
                       decode_steps=res.decode_steps, row_steps=res.row_steps, flops=flops,
                       kv_read_bytes=decode_kv_read_bytes(cfg, fed, kv_value, ctx.model.streams))
        out = {}
        for r, toks in zip(rows, res.tokens):
            line = first_line(tok.decode([t for t in toks if t not in ctx.eos]))
            out[r] = None if line is INVALID else canonical_answer(line)
        return out

    def inspect(self, step: int, live: dict[int, list[int]]) -> Action:
        if len(live) <= self.keep:
            return CONTINUE
        answers = self.forced_answers(live)
        return self._prune(greedy_clusters(sorted(live), lambda a, b: answers[a] is not None
                                           and answers[a] == answers[b]))

    def __repr__(self) -> str:
        return f"Peek(every={self.every}, keep={self.keep})"


def make_live_policy(spec: str, extractor, usage: str) -> Policy:
    """``deepprune:JUDGE[:EVERY[:KEEP[:THRESHOLD]]]`` or ``peek:EVERY[:KEEP]`` (see ``policies``)."""
    name, *args = spec.strip().split(":")
    try:
        if name == "deepprune" and 1 <= len(args) <= 4 and args[0]:
            every = int(args[1]) if len(args) > 1 else 8
            keep = int(args[2]) if len(args) > 2 else 2
            threshold = float(args[3]) if len(args) > 3 else 0.5
            return DeepPrune(args[0], every, keep, threshold, extractor)
        if name == "peek" and 1 <= len(args) <= 2:
            return Peek(int(args[0]), int(args[1]) if len(args) > 1 else 2, extractor=extractor)
    except ValueError:
        raise ParScaleError(f"bad early-stop policy {spec!r}: a parameter is not a number; {usage}") from None
    raise ParScaleError(f"bad early-stop policy {spec!r}; {usage}")


def cluster_vote_weights(sset: SampleSet) -> dict[tuple[int, int], int]:
    """(problem id, sample index) -> how many rows a sample stands for in a cluster-size vote: a
    finished sample counts itself plus every row pruned into it (following chains: a row pruned
    into a row that a later round pruned counts for that row's keeper); pruned samples get 0, as
    do pruned rows without a keeper (e.g. those another policy stopped). ``meta["pruned_into"]``
    (``{problem id: {pruned index: kept index}}``, string keys) says who was pruned into whom."""
    merged_all = sset.meta.get("pruned_into") or {}
    pruned = {(s.problem_id, s.index) for s in sset.samples if s.finish_reason == "pruned"}
    weights = {(s.problem_id, s.index): 0 for s in sset.samples}
    for s in sset.samples:
        merged = merged_all.get(str(s.problem_id), {})
        key, hops = (s.problem_id, s.index), 0
        while key in pruned and str(key[1]) in merged and hops <= len(merged):
            key, hops = (key[0], int(merged[str(key[1])])), hops + 1
        if key not in pruned and key in weights:
            weights[key] += 1
    return weights
