"""DeepPrune: AUROC and focal loss against hand counts, pair collection, the judge's file, greedy
clustering, the live-row policies in the real decode loop (pruned rows leave the batch; a policy
that prunes nothing equals plain sampling exactly), and the spec errors."""

import itertools
import math

import pytest
import torch

from conftest import CharTok
from parscale import ParScaleForCausalLM
from parscale.errors import ParScaleError
from parscale.sampling import get_task
from parscale.sampling.deepprune import (DeepPrune, PairJudge, Peek, auroc, cluster_vote_weights, collect_pairs,
                                         focal_loss, greedy_clusters, judge_auroc, load_judge, oversample,
                                         train_judge)
from parscale.sampling.policies import make_policy
from parscale.sampling.records import Problem, Sample, SampleSet
from parscale.sampling.sampler import sample_problems

ALPHABET = "0123456789+-*=QA: \nx()/,;>"


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    m = ParScaleForCausalLM(tiny_config(P=1, vocab_size=len(ALPHABET) + 1, eos_token_id=len(ALPHABET))).double().eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(3)
    return m


# ----------------------------------------------------------------------------- metrics
def hand_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_a_hand_count_with_ties():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.9, 0.1, 0.65]
    labels = [0, 0, 1, 1, 1, 0, 1, 1, 0]
    # by hand: positives 0.35, 0.8, 0.4, 0.9, 0.1 vs negatives 0.1, 0.4, 0.4, 0.65:
    # 0.35: 1 win; 0.8: 4; 0.4: 1 + 2 ties; 0.9: 4; 0.1: 1 tie -> (1+4+2+4+0.5)/20
    assert auroc(scores, labels) == pytest.approx(11.5 / 20)
    assert hand_auroc(scores, labels) == pytest.approx(11.5 / 20)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 5, (30,), generator=g).tolist()  # many ties
        y = torch.randint(0, 2, (30,), generator=g).tolist()
        if 0 < sum(y) < 30:
            assert auroc(s, y) == pytest.approx(hand_auroc(s, y))
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert auroc([7, 7, 7], [0, 1, 1]) == 0.5
    with pytest.raises(ParScaleError, match="both labels"):
        auroc([1, 2], [1, 1])
    with pytest.raises(ParScaleError, match="0 or 1"):
        auroc([1, 2], [0, 2])


def test_focal_loss_matches_the_formula():
    logits = torch.tensor([2.0, -1.0, 0.3, -3.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 1])
    gamma, alpha = 2.0, 0.25
    terms = []
    for z, y in zip(logits.tolist(), labels.tolist()):
        p = 1 / (1 + math.exp(-z))
        pt, at = (p, alpha) if y == 1 else (1 - p, 1 - alpha)
        terms.append(-at * (1 - pt) ** gamma * math.log(pt))
    assert focal_loss(logits, labels, gamma, alpha).item() == pytest.approx(sum(terms) / 4, rel=1e-12)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.double())
    assert focal_loss(logits, labels, 0.0, 0.5).item() == pytest.approx(bce.item() / 2, rel=1e-12)


def test_oversample_balances_and_keeps_every_example():
    labels = torch.tensor([1] * 9 + [0] * 3)
    idx = oversample(labels, torch.Generator().manual_seed(0))
    assert set(range(12)) <= set(idx.tolist())
    assert int(labels[idx].sum()) == 9 and len(idx) == 18


# ----------------------------------------------------------------------------- pairs and the judge
def _sset(groups):
    """A SampleSet from {problem id: [(token ids, text), ...]}."""
    problems = [Problem(pid, "exact", f"Q{pid}", "x", {}) for pid in groups]
    samples = [Sample(pid, i, list(ids), text, [0.0] * len(ids), "stop")
               for pid, rows in groups.items() for i, (ids, text) in enumerate(rows)]
    return SampleSet(problems=problems, samples=samples)


def test_collect_pairs_labels_and_truncates():
    sset = _sset({0: [([1, 2, 3, 4], "7"), ([1, 2, 5, 6, 7], "7"), ([9, 9], "7"), ([3, 3, 3, 3], "8")],
                  1: [([4, 4, 4], ""), ([4, 4, 4], "")]})
    pairs = collect_pairs(sset, "first_line", [2, 3])
    p2 = pairs[2]  # rows longer than 2 tokens: problem 0 rows 0, 1, 3; problem 1 rows 0, 1
    assert p2.a.tolist() == [[1, 2], [1, 2], [1, 2], [4, 4]]
    assert p2.b.tolist() == [[1, 2], [3, 3], [3, 3], [4, 4]]
    assert p2.labels.tolist() == [1, 0, 0, 0]  # INVALID == INVALID is not "the same answer"
    assert p2.problem_ids == [0, 0, 0, 1]
    assert pairs[3].a.tolist() == [[1, 2, 3], [1, 2, 3], [1, 2, 5]] and pairs[3].labels.tolist() == [1, 0, 0]
    with pytest.raises(ParScaleError, match="lengths"):
        collect_pairs(sset, "first_line", [0])


def _synthetic_pairs(n, t, seed):
    """Pairs whose label is "same first token": learnable from the ids alone."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 6, (n, t), generator=g)
    b = torch.randint(0, 6, (n, t), generator=g)
    same = torch.rand(n, generator=g) < 0.3
    b[same, 0] = a[same, 0]
    from parscale.sampling.deepprune import PairSet

    return PairSet(t, a, b, (a[:, 0] == b[:, 0]).long(), [0] * n)


def test_train_judge_learns_and_round_trips(tmp_path):
    train = {4: _synthetic_pairs(1500, 4, 0), 6: _synthetic_pairs(1500, 6, 1)}
    judge = train_judge(train, vocab_size=6, epochs=6, batch_size=128, lr=1e-2, dim=8, hidden=16)
    held = {4: _synthetic_pairs(400, 4, 2), 6: _synthetic_pairs(400, 6, 3)}
    report = judge_auroc(judge, held)
    assert all(report[t]["auroc"] > 0.9 for t in held), report
    judge.save(tmp_path / "j")
    again = load_judge(tmp_path / "j")
    x = held[4]
    assert torch.equal(judge(x.a, x.b), again(x.a, x.b))
    assert again.info["gamma"] == 2.0 and again.info["lengths"] == [4, 6]
    m = again.matrix(x.a[:5])
    assert m.shape == (5, 5) and torch.allclose(m, m.T, atol=1e-6)  # the head is symmetric


def test_load_judge_errors(tmp_path):
    with pytest.raises(ParScaleError, match="needs judge.json"):
        load_judge(tmp_path)
    PairJudge(6, dim=4, hidden=4, head=4).save(tmp_path / "j")
    (tmp_path / "j" / "judge.json").write_text('{"format": "parscale.deepprune-judge", "vocab_size": 6, '
                                               '"dim": 4, "hidden": 8, "head": 4}')
    with pytest.raises(ParScaleError, match="does not match"):
        load_judge(tmp_path / "j")
    (tmp_path / "j" / "judge.json").write_text("{not json")
    with pytest.raises(ParScaleError, match="not valid JSON"):
        load_judge(tmp_path / "j")
    (tmp_path / "j" / "judge.json").write_text('{"format": "parscale.deepprune-judge", "vocab_size": 6, '
                                               '"dim": 4, "hidden": 4, "head": 4}')
    (tmp_path / "j" / "judge.safetensors").write_bytes(b"garbage")
    with pytest.raises(ParScaleError, match="cannot read"):
        load_judge(tmp_path / "j")


# ----------------------------------------------------------------------------- clustering
class FirstTokenJudge:
    """Hand-made judge: two partial traces are equivalent iff their first tokens are equal."""

    def matrix(self, ids):
        return (ids[:, None, 0] == ids[None, :, 0]).double()

    def flops(self, rows, length):
        return float(rows * rows)


class NeverJudge(FirstTokenJudge):
    def matrix(self, ids):
        return torch.zeros(len(ids), len(ids))


def test_greedy_clusters_join_the_first_matching_representative():
    # "same" is not transitive here: 2 matches rep 0 and rep 1; it joins the first (0)
    same = {(0, 1): False, (0, 2): True, (1, 2): True, (0, 3): False, (1, 3): True}
    assert greedy_clusters([0, 1, 2, 3], lambda a, b: same[(a, b)]) == [[0, 2], [1, 3]]
    assert greedy_clusters([], lambda a, b: True) == []


def test_deepprune_clusters_with_a_hand_made_judge():
    live = {0: [1, 2], 1: [1, 3], 2: [2, 2], 3: [1, 2], 4: [2, 5], 5: [3, 0]}
    pol = DeepPrune(FirstTokenJudge(), every=2, keep=1)
    action = pol.inspect(2, live)
    assert action.kind == "prune" and sorted(action.rows) == [1, 3, 4]
    assert pol.merged == {1: 0, 3: 0, 4: 2}
    pol = DeepPrune(FirstTokenJudge(), every=2, keep=2)
    assert pol.inspect(2, live).rows == (3,)
    assert DeepPrune(FirstTokenJudge(), keep=3).inspect(2, live).kind == "continue"
    assert DeepPrune(NeverJudge(), keep=1).inspect(2, live).kind == "continue"


def test_cluster_vote_weights_follow_chains():
    sset = _sset({0: [([1], "a"), ([1], "a"), ([1], "b"), ([1], "b")]})
    for s in sset.samples[1:3]:
        s.finish_reason = "pruned"
    sset.meta["pruned_into"] = {"0": {"1": 2, "2": 0}}  # 1 -> 2 (later pruned) -> 0
    assert cluster_vote_weights(sset) == {(0, 0): 3, (0, 1): 0, (0, 2): 0, (0, 3): 1}


# ----------------------------------------------------------------------------- in the decode loop
def _run(model, problems, **kw):
    args = dict(n=6, temperature=1.0, seed=3, max_new_tokens=10, stop_strings=(), extractor="first_line",
                batch_problems=2)
    args.update(kw)
    return sample_problems(model, CharTok(ALPHABET), problems, **args)


def _keyed(sset):
    return {(s.problem_id, s.index): s for s in sset.samples}


def test_a_policy_that_prunes_nothing_equals_plain_sampling(model):
    problems = get_task("arithmetic").make_problems(3, seed=0, difficulty=2)
    plain = _keyed(_run(model, problems))
    for pol in [DeepPrune(NeverJudge(), every=2, keep=1, extractor="first_line"),
                DeepPrune(FirstTokenJudge(), every=3, keep=6, extractor="first_line"),
                Peek(every=3, keep=6, answer_prefix=";", extractor="first_line")]:  # keep=n: no fork needed
        sset = _run(model, problems, policy=pol)
        got = _keyed(sset)
        assert got.keys() == plain.keys()
        for k in plain:
            assert got[k].token_ids == plain[k].token_ids and got[k].finish_reason == plain[k].finish_reason
            assert got[k].logprobs == plain[k].logprobs
        assert "pruned_into" not in sset.meta


def test_pruned_rows_leave_the_batch(model):
    problems = get_task("arithmetic").make_problems(3, seed=1, difficulty=2)
    plain = _run(model, problems)
    sset = _run(model, problems, policy=DeepPrune(FirstTokenJudge(), every=2, keep=1, extractor="first_line"))
    full = _keyed(plain)
    pruned = [s for s in sset.samples if s.finish_reason == "pruned"]
    assert pruned
    for s in sset.samples:
        ref = full[(s.problem_id, s.index)]
        if s.finish_reason == "pruned":  # cut at a multiple of EVERY; what it had is what it would have had
            assert len(s.token_ids) % 2 == 0 and s.token_ids == ref.token_ids[: len(s.token_ids)]
        else:
            assert s.token_ids == ref.token_ids
    # each row was fed every token it got except a finished row's last: the decode work is real
    fed = sum(len(s.token_ids) - (s.finish_reason != "pruned") for s in sset.samples)
    assert sset.ledger.row_steps == fed < plain.ledger.row_steps
    assert sset.ledger.flops < plain.ledger.flops
    # a live cluster keeps one row: at most one unpruned row per first token per problem
    for pid in {p.id for p in problems}:
        kept = [s for s in sset.samples if s.problem_id == pid and s.finish_reason != "pruned"]
        assert len({s.token_ids[0] for s in kept}) == len(kept)
    merged = sset.meta["pruned_into"]
    assert sum(len(m) for m in merged.values()) == len(pruned)
    for pid, m in merged.items():
        for i, j in m.items():
            assert full[(int(pid), int(i))].token_ids[0] == full[(int(pid), j)].token_ids[0]


def test_peek_forks_rows_and_counts_their_work(model):
    problems = get_task("arithmetic").make_problems(2, seed=2, difficulty=2)
    plain = _run(model, problems, temperature=0.5)
    peeked = _run(model, problems, temperature=0.5, policy=Peek(every=3, keep=5, answer_prefix=";"))
    assert peeked.ledger.prompt_tokens > plain.ledger.prompt_tokens  # the forks were prefilled ...
    assert peeked.ledger.generated_tokens > sum(s.length for s in peeked.samples)  # ... and decoded
    full = _keyed(plain)
    for s in peeked.samples:  # the forks (greedy, own decode) do not disturb the sampled rows
        assert s.token_ids == full[(s.problem_id, s.index)].token_ids[: len(s.token_ids)]
    one = _run(model, problems, temperature=0.5, policy=Peek(every=3, keep=1, answer_prefix=";"))
    assert any(s.finish_reason == "pruned" for s in one.samples)
    pol = Peek(every=3, keep=1, answer_prefix=";")
    with pytest.raises(ParScaleError, match="model and tokenizer"):
        pol.inspect(3, {0: [1, 2, 3], 1: [1, 2, 4]})


# ----------------------------------------------------------------------------- specs
def test_specs_parse_and_bad_ones_fail_in_one_line(tmp_path):
    PairJudge(8, dim=4, hidden=4, head=4).save(tmp_path / "j")
    pol = make_policy(f"deepprune:{tmp_path / 'j'}:4:3:0.7")
    assert (pol.every, pol.keep, pol.threshold) == (4, 3, 0.7)
    pol = make_policy(f"deepprune:{tmp_path / 'j'}")
    assert (pol.every, pol.keep, pol.threshold) == (8, 2, 0.5)
    pol = make_policy("peek:6")
    assert isinstance(pol, Peek) and (pol.every, pol.keep) == (6, 2)
    j = tmp_path / "j"
    for bad, msg in [("deepprune", "bad early-stop policy"), ("deepprune:", "bad early-stop policy"),
                     (f"deepprune:{tmp_path / 'none'}", "needs judge.json"), (f"deepprune:{j}:x", "not a number"),
                     (f"deepprune:{j}:0", "EVERY must be"), (f"deepprune:{j}:8:0", "KEEP must be"),
                     (f"deepprune:{j}:8:2:1.5", "THRESHOLD must be"), (f"deepprune:{j}:8:2:0.5:1", "bad early-stop"),
                     ("peek", "bad early-stop policy"), ("peek:0", "EVERY must be"), ("peek:4:0", "KEEP must be"),
                     ("peek:a", "not a number"), ("peek:4:2:1", "bad early-stop")]:
        with pytest.raises(ParScaleError, match=msg) as e:
            make_policy(bad)
        assert "\n" not in str(e.value)


def test_sample_cli_trace_task_with_live_policies(tmp_path, tiny_config, capsys):
    from parscale.cli import main
    from parscale.data.tokenizer import TextTokenizer
    from parscale.sampling import SampleSet

    task = get_task("arithmetic-trace")
    texts = [task.training_text(p) for p in task.make_problems(100, seed=0, difficulty=1)]
    tok = TextTokenizer.train(texts, vocab_size=280)
    model = ParScaleForCausalLM(tiny_config(P=1, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    model.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    PairJudge(tok.vocab_size, dim=4, hidden=4, head=4).save(tmp_path / "judge")
    base = ["sample", "--model", str(tmp_path / "m"), "--task", "arithmetic-trace", "--difficulty", "1",
            "--problems", "2", "--n", "4", "--temperature", "1.5"]
    for spec in [f"deepprune:{tmp_path / 'judge'}:2:1:0.5", "peek:3:1"]:
        out = tmp_path / f"{spec[:4]}.jsonl"
        assert main(base + ["--early-stop", spec, "--out", str(out)]) == 0
        sset = SampleSet.load_jsonl(out)
        assert sset.meta["max_new_tokens"] == task.trace_budget(1) and sset.meta["policy"] == spec
    capsys.readouterr()
    assert main(base + ["--early-stop", "peek:0"]) == 2
    err = capsys.readouterr().err
    assert "parscale sample: error:" in err and "EVERY must be" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--early-stop", f"deepprune:{tmp_path / 'nothing'}"]) == 2
    assert "needs judge.json" in capsys.readouterr().err
