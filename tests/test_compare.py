"""`parscale compare`: the k-subset cost accounting against a hand count and against the sampler's
own ledger, Best-of-Majority at k against the aggregator on every subset, the Pareto frontier on a
hand-made set, the smoke preset end to end (results.json schema, finished work skipped, the
eval-only mode), and one-line errors that leave nothing on disk."""

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, snapshot

from parscale.compare import (PRESETS, bom_at_k, compare, expected_max, pareto_front, prefill_flops, row_cost,
                              subset_costs)
from parscale.cost import ModelShape, flop_per_byte, forward_flops
from parscale.sampling import INVALID, Sample, best_of_majority


# --------------------------------------------------------------------------- cost accounting
def test_subset_costs_equal_a_hand_count(tiny_config):
    """n = 3 rows of 2, 4 and 1 new tokens after a 3-token prompt, k = 2: the three subsets by hand."""
    cfg = tiny_config(P=2)
    prompt, lengths, k, kv_tok = 3, [2, 4, 1], 2, 10.0

    def step(t):  # one decode step feeding the token at position t (0-based after the prompt)
        return forward_flops(cfg, tokens=1, context=prompt + t)

    prefill = forward_flops(cfg, tokens=prompt, context=(prompt + 1) / 2)
    # a row of L tokens is fed L - 1 of them (its last token ends it): 2 -> [1], 4 -> [1, 2, 3], 1 -> []
    row = {2: step(1), 4: step(1) + step(2) + step(3), 1: 0.0}
    subsets = [(2, 4), (2, 1), (4, 1)]
    flops = [prefill + row[a] + row[b] for a, b in subsets]
    steps = [3, 1, 3]  # the longest row's L - 1: the rows of a problem run side by side
    kv = [2 * 2 * (cfg.prefix_tokens + prompt + longest) * kv_tok for longest in (4, 2, 4)]  # k rows x P streams
    got = subset_costs(cfg, prompt, lengths, k, kv_bytes_per_token=kv_tok, streams=2, prefix_tokens=cfg.prefix_tokens,
                       bytes_per_value=4, hardware="A100-80GB")
    # KV reads: the step feeding position t reads prompt + t + 1 positions (itself included) plus the prefix,
    # in every layer and stream: 2 (k, v) x layers x kv_heads x head_dim x 4 bytes x P per position
    per_pos = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * 2
    reads_row = {L: sum(prompt + t + 1 + cfg.prefix_tokens for t in range(L - 1)) * per_pos for L in (2, 4, 1)}
    reads = [reads_row[a] + reads_row[b] for a, b in subsets]
    assert got["kv_read_bytes"] == pytest.approx(sum(reads) / 3)
    ratio = flop_per_byte("A100-80GB")
    assert got["eflops"] == pytest.approx(sum(f + r * ratio for f, r in zip(flops, reads)) / 3)
    assert got["inference_flops"] == pytest.approx(sum(flops) / 3, rel=1e-12)
    assert got["decode_steps"] == pytest.approx(sum(steps) / 3)
    assert got["kv_cache_bytes"] == pytest.approx(sum(kv) / 3)
    assert got["row_steps"] == pytest.approx((1 + 3 + 1 + 0 + 3 + 0) / 3)
    assert got["generated_tokens"] == pytest.approx((6 + 3 + 5) / 3)
    assert row_cost(cfg, prompt, 4) == pytest.approx(row[4], rel=1e-12)
    assert prefill_flops(cfg, prompt) == prefill


def test_expected_max_is_the_mean_over_every_subset():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 7)
        values = [rng.randint(0, 5) for _ in range(n)]
        for k in range(1, n + 1):
            brute = np.mean([max(c) for c in itertools.combinations(values, k)])
            assert expected_max(values, k) == pytest.approx(brute)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke preset, once for the module (trained + evaluated in a few seconds)."""
    out = tmp_path_factory.mktemp("smoke") / "cmp"
    return compare("smoke", out, threads=1, progress=False)


def test_costs_at_k_equal_n_add_up_to_the_sampler_ledger(smoke_run):
    """At k = n the per-problem FLOPs and row steps, summed over problems, are the ledger's own."""
    from parscale.compare import evaluate_model, eval_problems, get_preset
    from parscale.model import ParScaleForCausalLM
    from parscale.tokenizer import Tokenizer

    res = smoke_run
    preset = get_preset("smoke")
    ev = json.loads((res.out_dir / "evals" / "micro-p2.json").read_text())
    n_prob = preset.eval_problems
    for run, key in (("sampled", f"majority@{preset.n_samples}"), ("greedy", "greedy@1")):
        ledger = ev["ledger"][run]
        assert ev["costs"][key]["inference_flops"] * n_prob == pytest.approx(ledger["flops"], rel=1e-9)
        assert ev["costs"][key]["row_steps"] * n_prob == pytest.approx(ledger["row_steps"])
        assert ev["costs"][key]["generated_tokens"] * n_prob == pytest.approx(ledger["generated_tokens"])
        assert ev["costs"][key]["kv_read_bytes"] * n_prob == pytest.approx(ledger["kv_read_bytes"], rel=1e-12)
    # and a fresh evaluation of the same model reproduces the saved one (seeded sampling)
    model_dir = Path(next(m for m in json.loads(res.results_path.read_text())["models"]
                          if m["name"] == "micro-p2")["model_dir"])
    model = ParScaleForCausalLM.from_pretrained(model_dir)
    again = evaluate_model(model, Tokenizer.from_pretrained(model_dir), eval_problems(preset), preset)
    assert again["values"] == ev["values"]
    kv = ModelShape.from_config(model.config).kv_bytes_per_token(4)
    assert again["kv_bytes_per_token"] == kv


# --------------------------------------------------------------------------- Best-of-Majority at k
def _samples(answers, scores):
    return [Sample(problem_id=0, index=i, token_ids=[1], text=str(a), logprobs=[s], finish_reason="stop",
                   answer=a, score=s) for i, (a, s) in enumerate(zip(answers, scores))]


@pytest.mark.parametrize("seed", range(12))
def test_bom_at_k_equals_the_aggregator_on_every_subset(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    pool = ["1", "2", "3", INVALID]
    answers = [rng.choice(pool[: rng.randint(1, 4)]) for _ in range(n)]
    scores = [rng.choice([-1.0, -0.5, -0.25, rng.random()]) for _ in range(n)]  # ties too
    correct = [a == "2" for a in answers]
    samples = _samples(answers, scores)
    for k in range(1, n + 1):
        for frac in (0.2, 0.5):
            brute = []
            for idx in itertools.combinations(range(n), k):
                d = best_of_majority([samples[i] for i in idx], min_fraction=frac)
                brute.append(d.answer is not INVALID and d.answer == "2")
            got = bom_at_k(answers, scores, correct, k, min_fraction=frac, invalid=INVALID)
            assert got == pytest.approx(np.mean(brute), abs=1e-12), (answers, scores, k, frac)


def test_bom_at_k_without_any_answer_is_zero():
    assert bom_at_k([INVALID] * 3, [0.0] * 3, [False] * 3, 2, invalid=INVALID) == 0.0


# --------------------------------------------------------------------------- Pareto frontier
def test_pareto_front_on_a_hand_made_set():
    pts = [
        {"accuracy": 0.10, "inference_flops": 1.0, "train_flops": 5.0},  # 0: cheapest: on it
        {"accuracy": 0.30, "inference_flops": 2.0, "train_flops": 5.0},  # 1: on it
        {"accuracy": 0.25, "inference_flops": 3.0, "train_flops": 1.0},  # 2: dominated by 1 in inference
        {"accuracy": 0.30, "inference_flops": 4.0, "train_flops": 5.0},  # 3: same accuracy, dearer: off
        {"accuracy": 0.50, "inference_flops": 8.0, "train_flops": 9.0},  # 4: on it
        {"accuracy": 0.50, "inference_flops": 8.0, "train_flops": 9.0},  # 5: a duplicate of 4: once
        {"accuracy": 0.40, "inference_flops": None, "train_flops": 1.0},  # 6: no cost: skipped
    ]
    assert pareto_front(pts, ("inference_flops",)) == [0, 1, 4]
    # jointly over both costs, 2 (cheapest to train) survives; 6 is skipped for its missing cost
    assert pareto_front(pts, ("inference_flops", "train_flops")) == [0, 1, 2, 4]
    assert pareto_front(pts, ("train_flops",)) == [6, 4]


# --------------------------------------------------------------------------- end to end
POINT_KEYS = {"id", "model", "size", "P", "params", "train_seed", "average_of", "method", "k", "oracle", "accuracy",
              "ci", "axes",
              "category", "train_flops", "inference_flops", "decode_steps", "row_steps", "generated_tokens",
              "kv_cache_bytes", "kv_read_bytes", "eflops", "wall_s", "wall_s_from"}


def test_smoke_preset_end_to_end(smoke_run, tmp_path, capsys):
    out = smoke_run.out_dir
    res = json.loads((out / "results.json").read_text())
    preset = PRESETS["smoke"]
    assert res["format"] == "parscale.compare" and res["version"] == 1 and res["complete"] is True
    names = [m["name"] for m in res["models"]]
    assert sorted(names) == sorted(f"{s.name}-p{P}" for s in preset.sizes for P in preset.streams)
    # cheapest to train first (a cut run keeps the most models)
    flops = [m["train_flops"] for m in res["models"]]
    assert flops == sorted(flops)
    per_model = 1 + 1 + 4 * (len(preset.ks) - 1)  # greedy, sample@1, then 4 methods per k > 1
    assert len(res["points"]) == per_model * len(names)
    ids = {p["id"] for p in res["points"]}
    for p in res["points"]:
        assert set(p) == POINT_KEYS
        assert 0 <= p["ci"][0] <= p["accuracy"] <= p["ci"][1] <= 1
        assert p["inference_flops"] > 0 and p["train_flops"] > 0 and p["kv_cache_bytes"] > 0
        assert p["oracle"] == (p["method"] == "pass")
        assert ("samples" in p["axes"]) == (p["k"] > 1)
        assert ("streams" in p["axes"]) == (p["P"] > 1)
    for key, front in res["frontiers"].items():
        assert front and set(front) <= ids
        assert not any(i.split("/")[1].startswith("pass@") for i in front)
    # more samples cost more inference FLOPs and KV cache, never more training FLOPs
    m1 = {p["k"]: p for p in res["points"] if p["model"] == names[0] and p["method"] in ("sample", "majority")}
    ks = sorted(m1)
    assert all(m1[a]["inference_flops"] < m1[b]["inference_flops"] for a, b in zip(ks, ks[1:]))
    assert len({m1[k]["train_flops"] for k in ks}) == 1
    assert res["conclusions"] and all(isinstance(c, str) for c in res["conclusions"])
    # the loss-vs-accuracy rank correlation only when accuracy varies (the smoke models are all at 0%)
    acc = [next(p["accuracy"] for p in res["points"] if p["id"] == f"{n}/greedy@1") for n in names]
    assert any("Spearman" in c for c in res["conclusions"]) == (len(set(acc)) > 1)
    report = (out / "report.md").read_text()
    assert "## Conclusions" in report and res["conclusions"][0] in report
    for name in res["plots"].values():
        assert (out / name).stat().st_size > 1000
    # again, from the command line: nothing is trained or evaluated twice
    rc, stdout, err = run_cli(["compare", "--preset", "smoke", "--out", out, "--threads", "1", "--quiet"], capsys)
    assert rc == 0, err
    assert "report:" in stdout
    again = json.loads((out / "results.json").read_text())
    assert again["trained"] == [] and again["evaluated"] == [] and again["skipped"] == names
    assert again["points"] == res["points"]
    # eval-only over the trained model directories (what runs on any model parscale loads)
    dirs = [m["model_dir"] for m in res["models"][:2]]
    rc, stdout, err = run_cli(["compare", "--preset", "smoke", "--models", *dirs, "--out", tmp_path / "eval-only",
                               "--threads", "1", "--quiet"], capsys)
    assert rc == 0, err
    only = json.loads((tmp_path / "eval-only" / "results.json").read_text())
    assert [m["name"] for m in only["models"]] == names[:2] and only["trained"] == []
    assert only["models"][0]["train_flops"] == res["models"][0]["train_flops"]  # read from the run's files
    same = {p["id"]: p["accuracy"] for p in res["points"]}
    assert all(same[p["id"]] == p["accuracy"] for p in only["points"])
    # another task from the registry (a trace task: its answers get the task's own token budget)
    from parscale.sampling import get_task

    rc, stdout, err = run_cli(["compare", "--preset", "smoke", "--models", dirs[0], "--task", "arithmetic-trace",
                               "--difficulty", "1", "--problems", "2", "--out", tmp_path / "trace", "--threads", "1",
                               "--quiet"], capsys)
    assert rc == 0, err
    trace = json.loads((tmp_path / "trace" / "results.json").read_text())
    assert trace["preset"]["task"] == "arithmetic-trace" and trace["preset"]["eval_problems"] == 2
    assert trace["preset"]["max_new_tokens"] == get_task("arithmetic-trace").trace_budget(1)


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--preset", "smoke", "--problems", "0"], "--problems must be >= 1"),
    (["--preset", "smoke", "--difficulty", "99"], "difficulty must be an integer in"),
    (["--preset", "smoke", "--task", "nosuch"], "unknown task 'nosuch'"),
    (["--preset", "smoke", "--task", "exact"], "--task exact has no generator"),
    (["--preset", "smoke", "--temperature", "0"], "temperature must be > 0"),
    (["--preset", "smoke", "--threads", "0"], "--threads"),
    (["--preset", "smoke", "--bogus"], "unrecognized arguments: --bogus"),
    (["--preset", "smoke", "--device", "tpu"], "invalid choice: 'tpu'"),
    pytest.param(["--preset", "smoke", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["compare", *argv, "--out", out], capsys)
    assert rc == 2
    assert err.startswith("parscale compare: error:") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_unwritable_out_and_bad_model_dirs(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = snapshot(tmp_path)
    for argv, needle in [
        (["--out", blocker / "sub"], "--out"),
        (["--out", blocker], "--out"),
        (["--models", tmp_path / "missing", "--out", tmp_path / "o"], "not a directory"),
        (["--models", tmp_path, "--out", tmp_path / "o"], "no config.json"),
    ]:
        rc, stdout, err = run_cli(["compare", "--preset", "smoke", *argv], capsys)
        assert rc == 2 and err.startswith("parscale compare: error:") and err.count("\n") == 1, err
        assert needle in err, err
    assert snapshot(tmp_path) == before


def test_presets_promise_the_grid_the_issue_asks_for():
    for name in ("quick", "full"):
        p = PRESETS[name]
        assert set(p.streams) == {1, 2, 4} and len(p.sizes) >= 2
        assert p.n_samples == 16 and p.ks == (1, 2, 4, 8, 16)
        assert math.isclose(p.temperature, p.temperature) and p.why


def test_training_seed_replicas_measure_the_spread_and_stay_off_the_frontier(tmp_path):
    preset = PRESETS["smoke"]
    res = compare("smoke", tmp_path / "seeds", threads=1, progress=False,
                  overrides={"sizes": [preset.sizes[0]], "streams": [1], "train_seeds": [7]})
    results = json.loads(res.results_path.read_text())
    assert [m["name"] for m in results["models"]] == ["micro-p1", "micro-p1-s7"]
    assert [m["train_seed"] for m in results["models"]] == [preset.seed, 7]
    saved = json.loads((tmp_path / "seeds" / "runs" / "micro-p1-s7" / "train_config.json").read_text())
    assert saved["seed"] == 7
    replica = {p["id"] for p in results["points"] if p["train_seed"] == 7}
    assert replica and not any(replica & set(ids) for ids in results["frontiers"].values())
    # the axes are compared on the per-problem average over the seeds
    assert [c["name"] for c in results["seed_averages"]] == ["micro-p1-avg2"]
    assert results["seed_averages"][0]["average_of"] == ["micro-p1", "micro-p1-s7"]
    acc = {p["id"]: p["accuracy"] for p in results["points"]}
    for key in ("greedy@1", "majority@4", "bom@2"):
        assert acc[f"micro-p1-avg2/{key}"] == pytest.approx((acc[f"micro-p1/{key}"] + acc[f"micro-p1-s7/{key}"]) / 2)
    assert all(i.startswith("micro-p1-avg2/") for ids in results["frontiers"].values() for i in ids)
    spread = [c for c in results["conclusions"] if c.startswith("Training seeds")]
    g = {p["train_seed"]: p["accuracy"] for p in results["points"] if p["method"] == "greedy"}
    assert len(spread) == 1 and f"micro P=1 {100 * g[0]:.1f}% / {100 * g[7]:.1f}%" in spread[0]
