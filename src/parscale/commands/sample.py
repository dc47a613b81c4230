"""`parscale sample`: N answers per problem of an offline task, aggregated and scored, with the cost."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import ParScaleError

EXAMPLE = """\
examples:
  # 16 samples per arithmetic problem, majority vote, saved for re-scoring
  parscale sample --model runs/arith/model --task arithmetic --problems 50 --n 16 \\
      --strategy majority --out samples.jsonl

  # stop a problem's sampling once the first 3 finished answers agree (saves decode work)
  parscale sample --model runs/arith/model --task arithmetic --n 16 --early-stop agree:3

  # mix temperatures across the 4 rows of each problem; keep the first 2 to finish
  parscale sample --model runs/arith/model --task linear --n 4 --temperature 0.5,0.7,1.0,1.2 \\
      --early-stop first:2

  # best-of-N by the lowest-window log-prob (scores are saved with the samples)
  parscale sample --model runs/arith/model --task arithmetic --n 8 --scorer min_window:8 \
      --strategy bon --out scored.jsonl

  # your own problems (JSONL: {"question": "2+2=", "answer": "4"} per line), exact-match verified
  parscale sample --model runs/arith/model --task exact --problems my_problems.jsonl --n 8

  # a task with worked reasoning traces (one line of steps, then "=> ANSWER"); the token budget
  # defaults to what the task's longest trace needs
  parscale sample --model runs/trace/model --task arithmetic-trace --difficulty 3 --n 16

  # DeepPrune: every 8 tokens cluster the live rows by a trained judge (a directory with
  # judge.safetensors + judge.json; benchmarks/bench_deepprune.py trains one), keep 2 per
  # cluster (equivalent at probability >= 0.5), prune the rest; majority over the survivors
  parscale sample --model runs/trace/model --task arithmetic-trace --n 32 \
      --early-stop deepprune:runs/trace/judge:8:2:0.5

  # judge-free: every 12 tokens fork each live row, force the answer, keep 1 row per forced answer
  parscale sample --model runs/trace/model --task arithmetic-trace --n 16 --early-stop peek:12:1

  # re-score later without regenerating
  parscale score samples.jsonl --strategy majority --k 1,2,4,8,16

Training text that leaves these evaluation problems out: `parscale tasks --task arithmetic ...`.
"""


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ..sampling.scorers import SCORERS
    from ._common import add_threads_argument

    p = sub.add_parser("sample", help="sample N answers per problem, aggregate, score, count the cost",
                       epilog=EXAMPLE, formatter_class=HelpFormatter,
                       description="Sample-level parallel scaling on an offline task with an exact verifier.")
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --model)")
    p.add_argument("--streams", type=int, help="pick a stored stream set P (dynamic P)")
    p.add_argument("--task", required=True, help="arithmetic | countdown | linear | sudoku | arithmetic-trace | countdown-trace | exact "
                   "(exact: match the reference of --problems FILE)")
    p.add_argument("--problems", default="50", metavar="N|FILE.jsonl",
                   help="number of generated problems, or a JSONL file of your own problems "
                        "(question/answer per line, or what `parscale tasks --eval-out` writes)")
    p.add_argument("--difficulty", type=int, default=None, help="task difficulty (task default if unset)")
    p.add_argument("--problem-seed", type=int, default=1234, help="seed of the problem generator")
    p.add_argument("--n", type=int, default=16, help="samples per problem")
    p.add_argument("--strategy", default="majority",
                   help="majority | weighted | bon | bom | verify | shortest | first (bon, bom, verify "
                        "need --scorer)")
    p.add_argument("--scorer", default=None, help=f"score every sample: {' | '.join(SCORERS)}")
    p.add_argument("--early-stop", default=None,
                   help="agree:W | posterior:THRESHOLD[:PRIOR] | first:K | deepprune:JUDGE[:EVERY[:KEEP[:THRESHOLD]]] "
                        "| peek:EVERY[:KEEP]")
    p.add_argument("--temperature", default="1.0", help="one value, or one per sample index (comma list)")
    p.add_argument("--top-p", default="1.0", help="one value, or one per sample index (comma list)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per-row seeds derive from it)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="token budget per answer (default 24; a trace task: enough for its longest trace)")
    p.add_argument("--batch-problems", type=int, default=4, help="problems prefilled together")
    p.add_argument("--k", default=None, help="k values for the estimators (default 1,2,4,..,n)")
    p.add_argument("--out", help="write the SampleSet here (JSONL) for `parscale score`")
    p.add_argument("--json", action="store_true", help="print the score report as JSON")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _floats(text: str, flag: str) -> list[float] | float:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ParScaleError(f"{flag} must be a number or a comma list of numbers (got {text!r})") from None
    if not vals:
        raise ParScaleError(f"{flag} is empty")
    return vals[0] if len(vals) == 1 else vals


def _problems(args: argparse.Namespace, task):
    """``--problems N`` generated ones, or the problems of a JSONL file."""
    from ..sampling.tasks import load_problems

    text = str(args.problems).strip()
    try:
        count = int(text)
    except ValueError:
        return load_problems(text, task)
    if count < 1:
        raise ParScaleError(f"--problems must be >= 1 or a file (got {count})")
    from ._common import check_count

    check_count("--problems", count * args.n, 4096, "samples (--problems x --n)")
    if task.name == "exact":
        raise ParScaleError("--task exact has no generator: pass --problems FILE.jsonl")
    return task.make_problems(count, seed=args.problem_seed, difficulty=args.difficulty)


def run(args: argparse.Namespace) -> int:
    from ..generation import default_eos_ids
    from ..model import ParScaleForCausalLM
    from ..sampling.aggregators import NEEDS_SCORES, get_strategy
    from ..sampling.estimators import score_sample_set
    from ..sampling.policies import make_policy
    from ..sampling.sampler import sample_problems
    from ..sampling.scorers import make_scorer, score_samples
    from ..sampling.tasks import get_task
    from ..tokenizer import Tokenizer
    from ._common import apply_threads, check_generation_budget, ensure_writable_file
    from .score import check_flags, parse_ks, print_report

    # everything is checked before the model loads, so a bad flag or output costs nothing
    task = get_task(args.task)
    if args.max_new_tokens is None:
        budget = getattr(task, "trace_budget", None)
        args.max_new_tokens = 24 if budget is None else budget(
            task.default_difficulty if args.difficulty is None else max(args.difficulty, task.min_difficulty))
    for flag, value, low in [("--n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-problems", args.batch_problems, 1)]:
        if value < low:
            raise ParScaleError(f"{flag} must be >= {low} (got {value})")
    get_strategy(args.strategy)
    if args.scorer:
        make_scorer(args.scorer, task=task)
    elif args.strategy in NEEDS_SCORES:
        raise ParScaleError(f"--strategy {args.strategy} picks by sample score: add --scorer "
                            "(e.g. mean_logprob, min_window:16, verifier)")
    if args.early_stop:
        make_policy(args.early_stop)  # a bad spec fails before the model loads
    temps, top_ps = _floats(args.temperature, "--temperature"), _floats(args.top_p, "--top-p")
    for flag, values, ok, need in [("--temperature", temps, lambda t: t >= 0, ">= 0 (0: greedy)"),
                                   ("--top-p", top_ps, lambda p: 0 < p <= 1, "in (0, 1]")]:
        values = values if isinstance(values, list) else [values]
        if len(values) not in (1, args.n):
            raise ParScaleError(f"{flag}: {len(values)} values for --n {args.n} (give one, or one per sample)")
        bad = [v for v in values if not (math.isfinite(v) and ok(v))]
        if bad:
            raise ParScaleError(f"{flag} must be {need} (got {bad[0]})")
    if args.top_k is not None and args.top_k < 0:
        raise ParScaleError(f"--top-k must be >= 0 (got {args.top_k}; 0 = off)")
    check_flags(args)  # --seed
    ks = parse_ks(args.k) if args.k else None
    if ks and max(ks) > args.n:
        raise ParScaleError(f"--k: k={max(ks)} is larger than the number of samples --n {args.n}")
    if args.out:
        ensure_writable_file(args.out, "--out")
    problems = _problems(args, task)
    tok = Tokenizer.from_pretrained(Path(args.tokenizer or args.model))  # the same text rule as training
    apply_threads(args.threads)
    model = ParScaleForCausalLM.from_pretrained(args.model, streams=args.streams)
    longest = max(len(tok.encode(p.prompt)) for p in problems)
    check_generation_budget(model.config, longest, args.max_new_tokens, rows=args.n * args.batch_problems,
                            device=model.device, dtype_bytes=model.dtype.itemsize)
    meta = {"task": task.name, "model": str(args.model), "difficulty": args.difficulty,
            "problem_seed": args.problem_seed, "strategy": args.strategy}
    if not str(args.problems).strip().isdigit():
        meta.update(problems_file=str(args.problems), difficulty=None, problem_seed=None)
    sset = sample_problems(model, tok, problems, n=args.n, temperature=temps, top_p=top_ps, top_k=args.top_k,
                           seed=args.seed, max_new_tokens=args.max_new_tokens, eos_token_id=default_eos_ids(model, tok),
                           policy=args.early_stop, extractor=task.extractor,
                           batch_problems=args.batch_problems, progress=True, meta=meta)
    if args.scorer:
        score_samples(sset, args.scorer, task=task.name)
    if args.out:
        sset.save_jsonl(args.out)
    report = score_sample_set(sset, task=task.name, strategy=args.strategy, ks=ks)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_report(report, args.out or f"{task.name} (not saved)", 0.95)
        if args.out:
            print(f"samples written to {args.out}")
    return 0
