"""`parscale tasks` (training text without the evaluation problems), `sample --problems FILE`,
and the scorers behind `sample/score --scorer` (best-of-N, BoM and verify from the CLI)."""

import json
import math

import pytest
import torch

from parscale import ParScaleConfig, ParScaleForCausalLM
from parscale.cli import main
from parscale.sampling import Problem, Sample, SampleSet, get_task, load_problems
from parscale.sampling.aggregators import min_window_logprob
from parscale.sampling.records import CostLedger
from parscale.sampling.scorers import NO_LOGPROBS, make_scorer, score_samples


def prompts_of_jsonl(path):
    return [json.loads(line)["text"].split(" ", 2)[0:2] for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- parscale tasks
@pytest.mark.parametrize("task,difficulty", [("arithmetic", 1), ("arithmetic", 2), ("linear", 1),
                                             ("countdown", 2), ("sudoku", 3)])
def test_tasks_hold_out_what_sample_evaluates(tmp_path, capsys, task, difficulty):
    out, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert main(["tasks", "--task", task, "--difficulty", str(difficulty), "--n", "400", "--out", str(out),
                 "--eval-problems", "20", "--eval-out", str(ev)]) == 0
    t = get_task(task)
    # the problems `parscale sample --task T --problems 20 --difficulty D` scores (default seed 1234)
    evaluated = {p.prompt for p in t.make_problems(20, seed=1234, difficulty=difficulty)}
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(texts) == 400
    trained = {text[:text.index("\nA:") + 3] for text in texts}
    assert not trained & evaluated
    # the evaluation file is those problems, readable by `sample --problems`
    assert [p.prompt for p in load_problems(ev, task)] == \
        [p.prompt for p in t.make_problems(20, seed=1234, difficulty=difficulty)]
    assert "held out" in capsys.readouterr().out


def test_tasks_include_eval_is_contaminated(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    # 300 distinct problems at difficulty 1: 3000 draws cover (nearly) all of them
    assert main(["tasks", "--task", "arithmetic", "--difficulty", "1", "--n", "3000", "--out", str(out),
                 "--include-eval"]) == 0
    texts = {json.loads(line)["text"] for line in out.read_text().splitlines()}
    t = get_task("arithmetic")
    evaluated = t.make_problems(50, seed=1234, difficulty=1)
    assert sum(t.training_text(p) in texts for p in evaluated) > 40
    assert "NOT held out" in capsys.readouterr().out


def test_tasks_list(capsys):
    assert main(["tasks", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("arithmetic", "countdown", "linear", "sudoku", "exact"))


# --------------------------------------------------------------------------- problem files
@pytest.mark.parametrize("line,prompt,ref", [
    ({"question": "2+2=", "answer": "4"}, "Q: 2+2=\nA:", "4"),
    ({"prompt": "What is 2+2?", "answer": 4}, "What is 2+2?", "4"),
    ({"question": "x", "reference": "yes"}, "Q: x\nA:", "yes"),
])
def test_load_plain_problems(tmp_path, line, prompt, ref):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(line) + "\n\n" + json.dumps(line) + "\n")
    ps = load_problems(f, "exact")
    assert [(p.id, p.prompt, p.reference, p.task) for p in ps] == [(0, prompt, ref, "exact"), (1, prompt, ref, "exact")]


@pytest.mark.parametrize("line,expect", [
    ({"question": "2+2=", "answer": "4"}, "cannot verify"),  # arithmetic needs its operands in meta
    ({"question": "2+2=", "answer": "5", "meta": {"a": 2, "b": 2, "op": "+"}}, "cannot verify"),
    ({"id": 0, "task": "linear", "prompt": "Q", "reference": "1", "meta": {}}, "task 'linear'"),
])
def test_problem_files_refuse_unverifiable_problems(tmp_path, line, expect):
    from parscale import ParScaleError

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(line) + "\n")
    with pytest.raises(ParScaleError, match=expect):
        load_problems(f, "arithmetic")


def test_arithmetic_problem_with_meta_loads(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"question": "2+2=", "answer": "4", "meta": {"a": 2, "b": 2, "op": "+"}}) + "\n")
    (p,) = load_problems(f, "arithmetic")
    assert get_task("arithmetic").verify(p, "4") and not get_task("arithmetic").verify(p, "5")


# --------------------------------------------------------------------------- scorers
def sample(pid, i, logprobs, text="1\n", answer=None):
    return Sample(problem_id=pid, index=i, token_ids=list(range(len(logprobs))), text=text, logprobs=logprobs,
                  finish_reason="eos", answer=answer)


@pytest.mark.parametrize("logprobs", [[-0.5], [-0.1, -2.0, -0.3], [-1.0] * 20 + [-5.0] * 3, []])
def test_logprob_scorers(logprobs):
    s = sample(0, 0, logprobs)
    p = Problem(0, "exact", "Q", "1")
    mean = sum(logprobs) / len(logprobs) if logprobs else NO_LOGPROBS
    assert make_scorer("mean_logprob")(s, p) == pytest.approx(mean)
    assert make_scorer("sum_logprob")(s, p) == pytest.approx(sum(logprobs) if logprobs else NO_LOGPROBS)
    assert make_scorer("neg_length")(s, p) == -len(logprobs)
    for w in (1, 2, 16):
        want = min_window_logprob(logprobs, w) if logprobs else NO_LOGPROBS
        assert make_scorer(f"min_window:{w}")(s, p) == pytest.approx(want)
    assert make_scorer("min_window")(s, p) == pytest.approx(min_window_logprob(logprobs, 16) if logprobs
                                                            else NO_LOGPROBS)
    assert math.isfinite(make_scorer("mean_logprob")(s, p))


def test_verifier_scorer_and_bon_equals_any_correct(tmp_path, capsys):
    """With the (oracle) verifier as scorer, best-of-N is right exactly where some sample is."""
    t = get_task("arithmetic")
    problems = t.make_problems(6, seed=3, difficulty=1)
    samples = []
    for p in problems:
        right = p.reference
        texts = [f"{int(right) + 1}\n", f"{right}\n" if p.id % 2 else "x\n", f"{int(right) + 2}\n"]
        samples += [sample(p.id, i, [-0.1 * (i + 1)], text=tx) for i, tx in enumerate(texts)]
    sset = SampleSet(problems, samples, CostLedger(streams=1, params=1), {"task": "arithmetic"})
    score_samples(sset, "verifier")
    assert [s.score for s in sset.samples] == [float(p.id % 2 == 1 and i == 1) for p in problems for i in range(3)]
    f = tmp_path / "s.jsonl"
    sset.save_jsonl(f)
    # score re-scores with --scorer; bon / verify then run from the CLI
    assert main(["score", str(f), "--scorer", "verifier", "--strategy", "bon", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["strategy_accuracy"]["estimate"] == pytest.approx(0.5)
    # mean_logprob prefers sample 0 (never right): bon accuracy 0
    assert main(["score", str(f), "--scorer", "mean_logprob", "--strategy", "bon", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy_accuracy"]["estimate"] == 0.0
    # scores saved in a file serve bon without --scorer
    score_samples(sset, "verifier").save_jsonl(f)
    assert main(["score", str(f), "--strategy", "verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy_accuracy"]["estimate"] == pytest.approx(0.5)


def test_score_without_scores_points_to_scorer(tmp_path, capsys):
    t = get_task("arithmetic")
    problems = t.make_problems(2, seed=0, difficulty=1)
    sset = SampleSet(problems, [sample(p.id, 0, [-1.0]) for p in problems], CostLedger(streams=1, params=1),
                     {"task": "arithmetic"})
    sset.save_jsonl(tmp_path / "s.jsonl")
    assert main(["score", str(tmp_path / "s.jsonl"), "--strategy", "bom"]) == 2
    err = capsys.readouterr().err
    assert "--scorer" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- sample end to end
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from parscale.data.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("m")
    texts = [f"Q: {a}+{b}=\nA: {a + b}\n" for a in range(10) for b in range(10)] * 2
    tok = TextTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = ParScaleConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.eos_id)
    ParScaleForCausalLM(cfg).save_pretrained(root)
    tok.save(root)
    return root


@pytest.mark.parametrize("scorer", ["mean_logprob", "min_window:4", "verifier"])
def test_sample_with_scorer_and_problem_file(tmp_path, capsys, model_dir, scorer):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"question": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(3)))
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(model_dir), "--task", "exact", "--problems", str(f), "--n", "3",
                 "--max-new-tokens", "4", "--scorer", scorer, "--strategy", "bon", "--threads", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    sset = SampleSet.load_jsonl(out)
    assert len(sset.problems) == 3 and len(sset.samples) == 9
    assert all(s.score is not None for s in sset.samples)
    assert sset.meta["scorer"] == scorer and sset.meta["problems_file"] == str(f)
    rescored = score_samples(SampleSet.load_jsonl(out), scorer)
    assert [s.score for s in rescored.samples] == [s.score for s in sset.samples]
    assert main(["score", str(out), "--strategy", "bom"]) == 0  # the saved scores suffice
