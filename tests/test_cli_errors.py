"""Every class of bad CLI input ends the same way: exit status 2, exactly one line on stderr that
names the problem, no traceback, and nothing created or changed on disk.

Each test parametrizes over many inputs of one class (malformed files, unwritable outputs,
refused trains, bad text and sizes, argparse mistakes). The commands run in-process
(``parscale.cli.main``), so an uncaught exception fails the test with its traceback.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from parscale import ParScaleForCausalLM
from parscale.cli import SUBCOMMANDS, main

from conftest import run_cli, snapshot, write_corpus


# --------------------------------------------------------------------------- harness
def assert_clean_refusal(argv, capsys, root: Path, expect: str, *, cmd: str | None = None):
    """rc 2, one stderr line containing ``expect`` (and `parscale CMD: error:`), no traceback,
    ``root`` unchanged."""
    before = snapshot(root)
    rc, out, err = run_cli(argv, capsys)
    cmd = cmd or argv[0]
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"parscale {cmd}: error:"), lines[0]
    assert expect.lower() in lines[0].lower(), (expect, lines[0])
    assert snapshot(root) == before, "the refused command changed files on disk"
    return lines[0]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # token and tokenizer caches inside the test's folder, the working directory too
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny P = 2 checkpoint with a real tokenizer.json (trained on a small corpus)."""
    from parscale import ParScaleConfig
    from parscale.data.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("model")
    texts = [f"Q: {a}+{b}=\nA: {a + b}\n" for a in range(10) for b in range(10)] * 3
    tok = TextTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = ParScaleConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, streams=2, prefix_tokens=2,
                         max_position_embeddings=64, eos_token_id=tok.eos_id)
    model = ParScaleForCausalLM(cfg)
    model.save_pretrained(root)
    tok.save(root)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step `parscale train` run (to damage its files on --resume)."""
    import subprocess

    root = tmp_path_factory.mktemp("run")
    write_corpus(root / "corpus", n_files=6)
    env = {**os.environ, "PARSCALE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "parscale.cli", "train", "--data", "corpus", "--size", "tiny",
            "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--eval-tokens", "32",
            "--threads", "1", "--out", "run", "--quiet"]
    subprocess.run(argv, cwd=root, env=env, check=True, capture_output=True)
    return root


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "run", dst / "run")
    shutil.copytree(src / "corpus", dst / "corpus")
    return dst / "run"


# --------------------------------------------------------------------------- 1. malformed files
BAD_CONTENT = {
    "binary": b"\x00\x01\x02\xff\xfe binary \x00",
    "latin-1": "steps = 3\nout = 'caf\xe9'\n".encode("latin-1"),
    "utf-16": "steps = 3\n".encode("utf-16"),
    "truncated-utf8": b"steps = 3\nout = '\xe2\x82'\n",
    "empty-bytes-nul": b"\x00",
}


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
@pytest.mark.parametrize("kind", sorted(BAD_CONTENT))
def test_train_config_undecodable(tmp_path, capsys, suffix, kind):
    f = tmp_path / f"run{suffix}"
    f.write_bytes(BAD_CONTENT[kind])
    line = assert_clean_refusal(["train", "--config", f, "--out", "out"], capsys, tmp_path, str(f.name))
    assert any(w in line for w in ("UTF-8", "binary", "NUL"))


@pytest.mark.parametrize("name,text,expect", [
    ("bad.toml", "steps = = 3\n", "cannot parse"),
    ("bad.toml", "[section]\nsteps = 3\n", "is a table"),
    ("bad.toml", "stepz = 3\n", "did you mean 'steps'"),
    ("bad.yaml", "steps: [1, 2\n", "cannot parse"),
    ("bad.yaml", "- 1\n- 2\n", "top level"),
    ("bad.json", "{\"steps\": 3,}", "cannot parse"),
    ("bad.json", "[1, 2, 3]", "top level"),
    ("bad.json", "{\"steps\": \"many\"}", "must be an integer"),
    ("bad.json", "{\"lr\": [1]}", "finite number"),
    ("bad.ini", "steps=3", "unknown file type"),
    ("missing.toml", None, "no such file"),
])
def test_train_config_malformed(tmp_path, capsys, name, text, expect):
    f = tmp_path / name
    if text is not None:
        f.write_text(text)
    assert_clean_refusal(["train", "--config", f, "--out", "out"], capsys, tmp_path, expect)


def test_train_config_directory(tmp_path, capsys):
    (tmp_path / "cfg.toml").mkdir()
    assert_clean_refusal(["train", "--config", "cfg.toml", "--out", "out"], capsys, tmp_path, "directory")


@pytest.mark.parametrize("content,expect", [
    (b"\x00\x00binary", "binary"),
    (b"{\"hidden_size\": \"caf\xe9\"}", "UTF-8"),
    (b"{\"hidden_size\": 64,", "not valid JSON"),
    (b"[64]", "JSON object"),
    (b"{\"hidden_sise\": 64}", "unknown config field"),
    (b"{\"hidden_size\": \"big\"}", "must be an integer"),
    (b"{\"num_attention_heads\": 3}", "num_key_value_heads"),
    (b"", "not valid JSON"),
])
def test_cost_config_malformed(tmp_path, capsys, content, expect):
    f = tmp_path / "model.json"
    f.write_bytes(content)
    assert_clean_refusal(["cost", "--config", f], capsys, tmp_path, expect)


RUN_FILE_DAMAGE = {
    "binary": b"\x00\xff\x00",
    "latin-1": '{"out": "caf\xe9"}'.encode("latin-1"),
    "cut-off": b'{"size": "tiny", "steps": ',
    "a-list": b"[1, 2]",
}


@pytest.mark.parametrize("damage", sorted(RUN_FILE_DAMAGE))
def test_resume_damaged_train_config_is_named(tmp_path, capsys, finished_run, damage):
    run = copy_run(finished_run, tmp_path)
    (run / "train_config.json").write_bytes(RUN_FILE_DAMAGE[damage])
    assert_clean_refusal(["train", "--out", "run", "--resume"], capsys, tmp_path, "train_config.json")


@pytest.mark.parametrize("file", ["trainer_state.json", "optimizer.json"])
@pytest.mark.parametrize("damage", sorted(RUN_FILE_DAMAGE))
def test_resume_damaged_checkpoint_state_is_named(tmp_path, capsys, finished_run, file, damage):
    run = copy_run(finished_run, tmp_path)
    (run / "summary.json").unlink()  # not finished: the resume reads the checkpoint
    (run / "checkpoint" / file).write_bytes(RUN_FILE_DAMAGE[damage])
    assert_clean_refusal(["train", "--out", "run", "--resume"], capsys, tmp_path, file)


@pytest.mark.parametrize("content,expect", [
    (b"\x00\x01", "binary"),
    (b"params,P,loss\n1e6,1,3.\xe9\n", "UTF-8"),
])
def test_fit_data_undecodable(tmp_path, capsys, content, expect):
    f = tmp_path / "runs.csv"
    f.write_bytes(content)
    assert_clean_refusal(["fit", "--data", f], capsys, tmp_path, "")


# --------------------------------------------------------------------------- 2. unwritable outputs
def _unwritable(kind: str, tmp_path: Path, want: str, suffix: str = ".png") -> tuple[str, str]:
    """An output path of ``kind`` and the words the error should contain (``want``: the output
    is a "dir" or a "file" named ``*suffix``)."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / f"a_dir{suffix}").mkdir(exist_ok=True)
    if kind == "under-a-file":
        return str(tmp_path / "a_file" / ("sub" if want == "dir" else f"out{suffix}")), "is a file"
    if kind == "proc":
        return "/proc/parscale-test/" + ("sub" if want == "dir" else f"out{suffix}"), "cannot write"
    if kind == "file-for-dir":
        return str(tmp_path / "a_file"), "not a directory"
    if kind == "dir-for-file":
        return str(tmp_path / f"a_dir{suffix}"), "is a directory"
    raise AssertionError(kind)


DIR_KINDS = ["under-a-file", "proc", "file-for-dir"]
FILE_KINDS = ["under-a-file", "proc", "dir-for-file"]


@pytest.mark.parametrize("kind", DIR_KINDS)
def test_train_out_unwritable(tmp_path, capsys, kind):
    write_corpus(tmp_path / "corpus", n_files=2)
    out, expect = _unwritable(kind, tmp_path, "dir")
    assert_clean_refusal(["train", "--data", "corpus", "--steps", "1", "--out", out], capsys, tmp_path, expect)


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("cmd", ["fit", "cost", "sample", "tasks", "tasks-eval"])
def test_file_outputs_unwritable_checked_first(tmp_path, capsys, model_dir, kind, cmd):
    out, expect = _unwritable(kind, tmp_path, "file", ".png" if cmd in ("fit", "cost") else ".jsonl")
    argv = {
        "fit": ["fit", "--data", "paper-stack", "--plot", out, "--bootstrap", "50"],
        "cost": ["cost", "--plot", out],
        "sample": ["sample", "--model", model_dir, "--task", "arithmetic", "--problems", "2", "--n", "2",
                   "--out", out],
        "tasks": ["tasks", "--task", "arithmetic", "--n", "10", "--out", out],
        "tasks-eval": ["tasks", "--task", "arithmetic", "--n", "10", "--out", "ok.jsonl", "--eval-out", out],
    }[cmd]
    assert_clean_refusal(argv, capsys, tmp_path, expect, cmd=argv[0])


@pytest.mark.parametrize("argv,expect", [
    (["fit", "--data", "paper-stack", "--plot", "law.jpg"], ".png"),
    (["cost", "--plot", "sweep.svg"], ".png"),
    (["tasks", "--task", "arithmetic", "--out", "same.jsonl", "--eval-out", "same.jsonl"], "differ"),
])
def test_output_names_checked(tmp_path, capsys, argv, expect):
    assert_clean_refusal(argv, capsys, tmp_path, expect)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_clean_refusal(["cost", "--plot", ro / "x.png"], capsys, tmp_path, "not writable")
    finally:
        ro.chmod(0o755)


def test_ensure_writable_creates_nothing(tmp_path):
    from parscale.paths import ensure_writable_dir, ensure_writable_file

    before = snapshot(tmp_path)
    assert ensure_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert ensure_writable_file(tmp_path / "c" / "d.png", "--plot", suffixes=(".png",))
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 3. refused train, no folder
@pytest.mark.parametrize("case", ["missing-data", "binary-data", "too-little-data", "missing-tokenizer",
                                  "missing-init", "init-without-tokenizer", "bad-tokenizer", "nested-out"])
def test_refused_train_leaves_no_run_folder(tmp_path, capsys, model_dir, case):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "tiny.txt").write_text("def f(): pass\n")
    (tmp_path / "badtok").mkdir()
    (tmp_path / "badtok" / "tokenizer.json").write_text("{not json")
    (tmp_path / "notok").mkdir()
    ParScaleForCausalLM.from_pretrained(model_dir).save_pretrained(tmp_path / "notok")
    write_corpus(tmp_path / "corpus", n_files=3)
    out = "runs/deep/new" if case == "nested-out" else "new_run"
    base = ["train", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--vocab-size", "300",
            "--threads", "1", "--quiet", "--out", out]
    extra, expect = {
        "missing-data": (["--data", "nowhere/"], "does not exist"),
        "binary-data": (["--data", "blob.bin"], "binary"),
        "too-little-data": (["--data", "tiny.txt"], "tokens"),
        "missing-tokenizer": (["--data", "corpus", "--tokenizer", "nowhere"], "not found"),
        "missing-init": (["--data", "corpus", "--init-from", "nowhere"], "nowhere"),
        "init-without-tokenizer": (["--data", "corpus", "--init-from", "notok", "--streams", "2"],
                                   "tokenizer"),
        "bad-tokenizer": (["--data", "corpus", "--tokenizer", "badtok"], "tokenizer"),
        "nested-out": (["--data", "nowhere/"], "does not exist"),
    }[case]
    before = {k for k in snapshot(tmp_path) if not k.startswith("cache")}
    rc, _, err = run_cli(base + extra, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expect.lower() in err.lower(), err
    assert not (tmp_path / "new_run").exists() and not (tmp_path / "runs").exists()
    assert {k for k in snapshot(tmp_path) if not k.startswith("cache")} == before


def test_refused_train_keeps_an_existing_out_dir(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc, _, _ = run_cli(["train", "--data", "nowhere/", "--steps", "1", "--out", "mine"], capsys)
    assert rc == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- 4. text and sizes
@pytest.mark.parametrize("argv_tail,expect", [
    (["--prompt", "caf\udce9"], "--prompt: not valid UTF-8"),
    (["--prompt", "\udcff\udcfe"], "--prompt: not valid UTF-8"),
    (["--ids", "1 2", "--max-new-tokens", "1000000000"], "context"),
    (["--ids", "1 2", "--max-new-tokens", "63"], "context"),
    (["--ids", "1", "--max-new-tokens", "8", "--num-return-sequences", "100000000000"], "KV cache"),
    (["--ids", "1", "--max-new-tokens", "1e9"], "invalid int value"),
    (["--ids", "1", "--dtype", "fp8"], "unknown dtype"),
    (["--ids", "1", "--threads", "0"], "positive integer or 'auto'"),
])
def test_generate_text_and_sizes(tmp_path, capsys, model_dir, argv_tail, expect):
    assert_clean_refusal(["generate", "--model", model_dir, *argv_tail], capsys, tmp_path, expect)


@pytest.mark.parametrize("content,expect", [
    (b"\xff\xfe\x00Q", "binary"),
    (b'{"question": "caf\xe9", "answer": "1"}\n', "UTF-8"),
    (b'{"question": "1+1=", "answer": "2"\n', "not valid JSON"),
    (b'["1+1=", "2"]\n', "JSON object"),
    (b'{"question": "1+1="}\n', "reference answer"),
    (b'{"q": "1+1=", "answer": "2"}\n', "unknown field"),
    (b"\n\n", "no problems"),
])
def test_sample_problem_files(tmp_path, capsys, model_dir, content, expect):
    f = tmp_path / "problems.jsonl"
    f.write_bytes(content)
    assert_clean_refusal(["sample", "--model", model_dir, "--task", "exact", "--problems", f, "--n", "2"],
                         capsys, tmp_path, expect)


@pytest.mark.parametrize("argv_tail,expect", [
    (["--problems", "2", "--max-new-tokens", "1000000000"], "context"),
    (["--problems", "0"], ">= 1"),
    (["--problems", "2", "--n", "0"], "--n must be >= 1"),
    (["--problems", "2", "--strategy", "bon"], "--scorer"),
    (["--problems", "2", "--scorer", "min_window:0"], "window"),
    (["--problems", "2", "--scorer", "likelihood"], "unknown scorer"),
    (["--problems", "2", "--task", "exact"], "no generator"),
])
def test_sample_sizes_and_scorers(tmp_path, capsys, model_dir, argv_tail, expect):
    argv = ["sample", "--model", model_dir, "--task", "arithmetic", *argv_tail]
    assert_clean_refusal(argv, capsys, tmp_path, expect)


@pytest.mark.parametrize("content,argv_tail,expect", [
    (b"caf\xe9 au lait", [], "UTF-8"),
    (b"\x00\x00\x00", [], "binary"),
    (b"", [], "no text"),
    (b"hello world", ["--seq-len", "100000"], "context"),
    (b"hello world", ["--seq-len", "0"], ">= 1"),
    (b"hello world", ["--batch-size", "0"], ">= 1"),
    (b'{"text": 1}\n', [], "string field"),
])
def test_eval_bad_data_and_sizes(tmp_path, capsys, model_dir, content, argv_tail, expect):
    f = tmp_path / ("d.jsonl" if content.startswith(b"{") else "d.txt")
    f.write_bytes(content)
    assert_clean_refusal(["eval", "--model", model_dir, "--data", f, *argv_tail], capsys, tmp_path, expect)


# --------------------------------------------------------------------------- 5. argparse
@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_mistyped_flag_reports_against_its_subcommand(tmp_path, capsys, cmd):
    rc, _, err = run_cli([cmd, "--no-such-flag", "1"], capsys)
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"parscale {cmd}: error:") and f"see 'parscale {cmd} --help'" in lines[0]
    assert "--no-such-flag" in lines[0]


@pytest.mark.parametrize("argv,expect", [
    (["train", "--steps", "x"], "argument --steps: invalid int value"),
    (["train", "--dtype", "int4"], "unknown dtype"),
    (["train", "--threads", "-2"], "positive integer"),
    (["train", "--size", "huge"], "invalid choice"),
    (["generate"], "required"),
    (["sample", "--model", "m"], "required: --task"),
    (["fit"], "required: --data"),
    (["cost", "--streams", "two"], "invalid int value"),
    (["cost", "--preset", "1.6b", "--config", "x.json"], "not allowed with"),
    (["eval", "--model", "m"], "required: --data"),
    (["score"], "required"),
    (["reproduce", "--threads", "none"], "positive integer"),
    (["generate", "--model", "m", "--max-new-tkens", "3", "--ids", "1"], "did you mean --max-new-tokens"),
    (["frobnicate"], "invalid choice"),
])
def test_argparse_errors_are_one_line(tmp_path, capsys, argv, expect):
    rc, _, err = run_cli(argv, capsys)
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert expect in lines[0] and "--help" in lines[0], lines[0]


def test_version(capsys):
    from parscale import __version__

    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.strip() == f"parscale {__version__}"


# --------------------------------------------------------------------------- 6. resolved paths on resume
def test_resume_compares_resolved_paths(tmp_path, capsys, finished_run):
    copy_run(finished_run, tmp_path)
    # started as `--data corpus --out run`; resumed with absolute spellings of both
    rc, out, err = run_cli(["train", "--out", tmp_path / "run", "--resume", "--data", tmp_path / "corpus",
                            "--quiet"], capsys)
    assert rc == 0, err
    assert "already finished" in out
    rc, _, err = run_cli(["train", "--out", "./run/", "--resume", "--data", "./corpus/../corpus", "--quiet"],
                         capsys)
    assert rc == 0, err
    # a really different setting is still refused
    write_corpus(tmp_path / "other", n_files=2)
    assert_clean_refusal(["train", "--out", "run", "--resume", "--data", "other", "--quiet"], capsys,
                         tmp_path, "option 'data'")


def test_same_path():
    from parscale.paths import same_path

    cwd = Path.cwd()
    assert same_path("micro", cwd / "micro") and same_path("a/../micro", "micro/")
    assert not same_path("micro", "macro")


# --------------------------------------------------------------------------- 7. threads auto
@pytest.mark.parametrize("cmd,extra", [("generate", ["--model", "m", "--ids", "1"]),
                                       ("sample", ["--model", "m", "--task", "arithmetic"]),
                                       ("eval", ["--model", "m", "--data", "d"]),
                                       ("reproduce", [])])
def test_threads_default_auto(cmd, extra):
    from parscale.cli import build_parser

    args = build_parser().parse_args([cmd, *extra])
    assert args.threads == "auto"
    assert build_parser().parse_args([cmd, *extra, "--threads", "3"]).threads == 3


def test_train_threads_auto_resolves(tmp_path, monkeypatch):
    from parscale.cli import build_parser
    from parscale.commands import train as train_cmd
    from parscale.commands import _common

    monkeypatch.setattr(_common, "resolve_threads", lambda v: 7 if v == "auto" else v)
    parse = build_parser().parse_args
    cfg = train_cmd.build_config(parse(["train", "--steps", "1", "--out", "x"]))
    assert cfg.threads == 7
    assert train_cmd.build_config(parse(["train", "--steps", "1", "--out", "x", "--threads", "2"])).threads == 2
    (tmp_path / "t.toml").write_text('threads = "auto"\nsteps = 1\n')
    assert train_cmd.build_config(parse(["train", "--config", "t.toml"])).threads == 7


# --------------------------------------------------------------------------- dtype vocabulary
@pytest.mark.parametrize("spelling,canon", [("fp32", "float32"), ("FP16", "float16"), ("bf16", "bfloat16"),
                                            ("half", "float16"), ("torch.bfloat16", "bfloat16"),
                                            ("float32", "float32")])
def test_one_dtype_vocabulary(spelling, canon, tmp_path):
    from parscale.cli import build_parser
    from parscale.dtypes import canonical_dtype
    from parscale.training.options import TrainConfig

    assert canonical_dtype(spelling) == canon
    parse = build_parser().parse_args
    assert parse(["generate", "--model", "m", "--ids", "1", "--dtype", spelling]).dtype == canon
    assert parse(["eval", "--model", "m", "--data", "d", "--dtype", spelling]).dtype == canon
    assert parse(["cost", "--dtype", spelling]).dtype == canon
    if canon != "float16":
        assert parse(["train", "--dtype", spelling]).dtype == canon
        assert TrainConfig(steps=1, dtype=spelling).dtype == canon


def test_cost_dtype_aliases_give_the_same_numbers(capsys):
    outs = []
    for d in ("fp16", "float16", "half"):
        assert main(["cost", "--json", "--dtype", d]) == 0
        outs.append(json.loads(capsys.readouterr().out)["comparison"])
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("flags", [["--seq-len", "1000000000"], ["--batch-size", "100000000"],
                                   ["--vocab-size", "2000000000"], ["--size", "medium", "--seq-len", "200000"]])
def test_train_sizes_checked_against_memory_first(tmp_path, capsys, flags):
    write_corpus(tmp_path / "corpus", n_files=2)
    assert_clean_refusal(["train", "--data", "corpus", "--steps", "1", "--out", "run", *flags], capsys, tmp_path,
                         "GiB available")


def test_train_memory_estimate_allows_the_presets():
    from parscale.commands.train import memory_estimate
    from parscale.reproduce import get_preset, plan_runs

    for name in ("quick", "full"):
        for run in plan_runs(get_preset(name), "x"):
            assert sum(memory_estimate(run.config)) < 4 * 2**30, run.name


@pytest.mark.parametrize("argv,expect", [
    (["cost", "--max-batch", "1000000000"], "at most"),
    (["cost", "--batch", "0"], ">= 1"),
    (["cost", "--flops-eff", "2"], "(0, 1]"),
    (["tasks", "--task", "arithmetic", "--n", "0", "--out", "x.jsonl"], ">= 1"),
    (["tasks", "--task", "exact", "--out", "x.jsonl"], "no problem generator"),
    (["tasks", "--task", "arithmetic"], "--out"),
    (["tasks", "--task", "nope", "--out", "x.jsonl"], "unknown task"),
    (["tasks", "--task", "arithmetic", "--difficulty", "99", "--out", "x.jsonl"], "difficulty"),
])
def test_more_size_and_value_flags(tmp_path, capsys, argv, expect):
    assert_clean_refusal(argv, capsys, tmp_path, expect)


@pytest.mark.parametrize("argv", [["tasks", "--task", "arithmetic", "--n", "100000000000", "--out", "x.jsonl"],
                                  ["tasks", "--task", "arithmetic", "--eval-problems", "100000000000",
                                   "--out", "x.jsonl"]])
def test_counts_checked_against_memory(tmp_path, capsys, argv):
    assert_clean_refusal(argv, capsys, tmp_path, "memory available")


def test_sample_counts_checked_against_memory(tmp_path, capsys, model_dir):
    assert_clean_refusal(["sample", "--model", model_dir, "--task", "arithmetic", "--problems", "1000000000",
                          "--n", "1000"], capsys, tmp_path, "memory available")


@pytest.mark.parametrize("key,saved,now,same", [
    ("init_from", "micro/runs/xs-p1/model", "{cwd}/micro/runs/xs-p1/model", True),  # reproduce --out spelt two ways
    ("data", "corpus", "./corpus/", True),
    ("tokenizer", "tok", "{cwd}/tok", True),
    ("data", "stdlib", "./stdlib", False),  # the stdlib is not the file called stdlib
    ("data", "corpus", "other", False),
    ("seq_len", 16, 32, False),
])
def test_resume_setting_comparison(tmp_path, key, saved, now, same):
    from parscale.training.trainer import _same_setting

    now = now.format(cwd=tmp_path) if isinstance(now, str) else now
    assert _same_setting(key, saved, now) is same


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_help_renders_with_examples(capsys, cmd):
    rc, out, _ = run_cli([cmd, "--help"], capsys)
    assert rc == 0 and f"parscale {cmd}" in out and "example" in out


@pytest.mark.parametrize("argv_tail,expect", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--temperature", "1,x"], "comma list"),
    (["--temperature", "0.5,1"], "2 values for --n 4"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--k", "1,100"], "larger than the number of samples"),
    (["--early-stop", "agree:0"], "W must be"),
    (["--difficulty", "0"], "difficulty"),
    (["--strategy", "vote"], "unknown strategy"),
])
def test_sample_flags_checked_before_sampling(tmp_path, capsys, model_dir, argv_tail, expect):
    argv = ["sample", "--model", model_dir, "--task", "arithmetic", "--problems", "2", "--n", "4", *argv_tail]
    assert_clean_refusal(argv, capsys, tmp_path, expect)


@pytest.mark.parametrize("argv,expect", [
    (["cost", "--config", "/dev/zero"], "not a regular file"),
    (["train", "--config", "/dev/null.toml"], "no such file"),
    (["fit", "--data", "/dev/zero"], "not a regular file"),
    (["score", "/dev/zero"], "not a regular file"),
    (["fit", "--data", "paper-stack", "--bootstrap", "3", "--seed", "-1"], "--seed must be >= 0"),
    (["fit", "--data", "paper-stack", "--bootstrap", "10000000000"], "memory available"),
    (["score", "x.jsonl", "--seed", "-1"], "--seed must be >= 0"),
    (["score", "x.jsonl", "--boot", "0"], "--boot must be >= 1"),
    (["score", "x.jsonl", "--threshold", "nan"], "finite"),
])
def test_devices_seeds_and_counts(tmp_path, capsys, argv, expect):
    assert_clean_refusal(argv, capsys, tmp_path, expect)


@pytest.mark.parametrize("kind", DIR_KINDS)
def test_reproduce_out_unwritable(tmp_path, capsys, kind):
    out, expect = _unwritable(kind, tmp_path, "dir")
    assert_clean_refusal(["reproduce", "--preset", "micro", "--out", out, "--quiet"], capsys, tmp_path, expect)


def test_a_trailing_slash_names_a_directory(tmp_path, capsys):
    assert_clean_refusal(["tasks", "--task", "arithmetic", "--out", "new/"], capsys, tmp_path, "is a directory")
