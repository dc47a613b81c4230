"""Offline tasks: seeded generators, exact verifiers (no eval), training corpus."""

import json

import pytest

from parscale.errors import ParScaleError
from parscale.sampling.answers import INVALID
from parscale.sampling.records import Problem
from parscale.sampling.tasks import TASKS, get_task, parse_expression, write_training_corpus

GENERATED = ["arithmetic", "countdown", "linear", "sudoku"]


@pytest.mark.parametrize("name", GENERATED)
def test_references_verify_through_the_default_extractor(name):
    task = TASKS[name]
    lo, hi = task.min_difficulty, min(task.max_difficulty or 4, 4 if name != "sudoku" else 11)
    for d in sorted({lo, hi, task.default_difficulty}):
        problems = task.make_problems(25, seed=5, difficulty=d)
        assert [p.id for p in problems] == list(range(25))
        for p in problems:
            assert p.task == name and p.prompt.startswith("Q: ") and p.prompt.endswith("\nA:")
            text = task.training_text(p)
            assert text.startswith(p.prompt + " ") and text.endswith("\n") and text.count("\nA:") == 1
            # what a model would generate after the prompt, running on into a new question
            generated = text[len(p.prompt):] + "Q: 1+1=\nA: 2\n"
            answer = task.extract(generated)
            assert task.verify(p, answer), (p, answer)
            assert not task.verify(p, INVALID) and not task.verify(p, None)


@pytest.mark.parametrize("name", GENERATED)
def test_generators_are_seeded(name):
    task = TASKS[name]
    a, b = task.make_problems(10, seed=1), task.make_problems(10, seed=1)
    assert a == b
    assert [p.prompt for p in task.make_problems(10, seed=2)] != [p.prompt for p in a]


def test_difficulty_is_checked():
    with pytest.raises(ParScaleError, match="difficulty must be an integer in"):
        TASKS["countdown"].make_problems(1, difficulty=1)
    with pytest.raises(ParScaleError, match="difficulty"):
        TASKS["sudoku"].make_problems(1, difficulty=13)
    with pytest.raises(ParScaleError, match="unknown task"):
        get_task("go")


def test_arithmetic():
    task = TASKS["arithmetic"]
    p = Problem(0, "arithmetic", "Q: 47-385=\nA:", "-338", {"a": 47, "b": 385, "op": "-"})
    assert task.verify(p, "-338") and task.verify(p, "-338.0")
    assert not task.verify(p, "338") and not task.verify(p, "-338 apples")
    for p in task.make_problems(50, seed=0, difficulty=3):
        assert all(len(str(p.meta[k])) == 3 for k in ("a", "b"))  # exactly d digits


def test_countdown_verifier():
    task = TASKS["countdown"]
    p = Problem(0, "countdown", "Q: 3 7 25 50 -> 200\nA:", "(3+7)*25-50", {"numbers": [3, 7, 25, 50], "target": 200})
    assert task.verify(p, "(3+7)*25-50")
    assert task.verify(p, " ( 7 + 3 ) × 25 - 50")
    assert task.verify(p, "(3+7)*25-50 = 200")
    assert not task.verify(p, "(3+7)*25-50 = 201")  # a wrong claimed result
    assert not task.verify(p, "(3+7)*25-50-0")  # 0 was not given
    assert not task.verify(p, "(3+3)*25+50")  # 3 used twice
    assert not task.verify(p, "-50+250")  # no unary minus (and 250 was not given)
    assert not task.verify(p, "25/(7-7)")  # division by zero is just wrong
    assert not task.verify(p, "__import__('os').system('true')")  # parsed, never evaluated
    assert not task.verify(p, "(" * 60 + "3" + ")" * 60)
    q = Problem(1, "countdown", "", "", {"numbers": [1, 3, 4, 6], "target": 24})
    assert task.verify(q, "6/(1-3/4)")  # exact rationals: 6 / (1/4) = 24


def test_parse_expression():
    assert parse_expression("2+3*4") == (14, [2, 3, 4])
    assert parse_expression("(2+3)*4") == (20, [2, 3, 4])
    assert parse_expression("8/3")[0] * 3 == 8
    for bad in ["", "2+", "(2", "2)", "2 3", "2**3", "1e3"]:
        with pytest.raises(ValueError):
            parse_expression(bad)


def test_countdown_uses_all_numbers_once():
    task = TASKS["countdown"]
    for p in task.make_problems(30, seed=4, difficulty=5):
        value, used = parse_expression(p.reference)
        assert sorted(used) == p.meta["numbers"] and value == p.meta["target"]
        assert 1 <= p.meta["target"] <= 999


def test_linear():
    task = TASKS["linear"]
    p = Problem(0, "linear", "Q: solve 3x+5=20\nA:", "5", {"a": 3, "b": 5, "c": 0, "e": 20})
    assert task.verify(p, "5") and task.verify(p, "x = 5") and not task.verify(p, "4")
    for d in (1, 2, 3, 5):
        for p in task.make_problems(20, seed=d, difficulty=d):
            m = p.meta
            assert m["a"] != m["c"]
            if d < 3:
                assert m["c"] == 0
    assert "x" in task.make_problems(1, seed=0, difficulty=3)[0].prompt.split("=")[1]  # x on both sides


def test_sudoku_checks_rules_and_givens_not_a_stored_solution():
    task = TASKS["sudoku"]
    givens = "1000" "0000" "0000" "0000"
    p = Problem(0, "sudoku", "", "stored-solution-not-used", {"givens": givens})
    assert task.verify(p, "1234341221434321")
    assert task.verify(p, "1234/3412/2143/4321")
    assert task.verify(p, "1324241331424231")  # another valid completion: fine, givens agree
    assert not task.verify(p, "2134341212434321")  # valid grid, but contradicts the given 1
    assert not task.verify(p, "1234123412341234")  # columns repeat
    assert not task.verify(p, "1234214334124321")  # rows/cols fine, a 2x2 box repeats
    assert not task.verify(p, "123434122143432")  # 15 digits
    for q in task.make_problems(10, seed=0, difficulty=10):
        assert q.meta["givens"].count("0") == 10


def test_exact_match_task():
    task = TASKS["exact"]
    p = Problem(0, "gsm8k", "q", "1,000", {})
    assert task.verify(p, "1000.0") and not task.verify(p, "100")
    with pytest.raises(ParScaleError, match="no generator"):
        task.make_problems(1)


def test_training_corpus(tmp_path):
    held_out = {p.prompt for p in TASKS["arithmetic"].make_problems(40, seed=9, difficulty=1)}
    path = write_training_corpus("arithmetic", 60, 1, 1, tmp_path / "c.jsonl", exclude=held_out)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 60 and all(set(r) == {"text"} for r in rows)
    assert all(r["text"].startswith("Q: ") and r["text"].endswith("\n") for r in rows)
    assert not any(r["text"].split("\nA:")[0] + "\nA:" in held_out for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
