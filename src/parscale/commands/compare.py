"""`parscale compare`: parameters vs streams vs samples at equal compute (a training grid, greedy and
n-sample evaluation with exact k-subset estimators, costs, Pareto frontiers, a report); see
parscale.compare."""

from __future__ import annotations

import argparse
import shlex

from ..cli import HelpFormatter
from ._common import threads_type

DESCRIPTION = """\
Which axis buys the most accuracy for the compute: more parameters, more ParScale streams (P),
or more samples per question (majority vote, Best-of-Majority, best-of-N)?

Trains every (size, P) of a preset on an offline task with an exact verifier (training text
leaves the evaluation problems out), each to the same token budget; evaluates every model
greedily and with n = 16 samples per problem (every k < 16 is the exact expectation over all
k-subsets of those samples, not a separate run); puts every point on the same costs: training
FLOPs, inference FLOPs per problem (prefill once + k rows of decode), decode steps at batch 1,
KV-cache bytes, measured wall time. Writes evals/, results.json, report.md (accuracy +- 95% CI,
Pareto frontiers, conclusions computed from the numbers) and PNG plots into --out, after every
model; running the same command again skips what finished.

presets:
  quick   sudoku (4 blanks), 2 sizes (305k, 737k params) x P in {1, 2, 4}, 200k tokens each,
          100 problems; 4.4 core-minutes, 9 minutes on a 2-core CPU shared with other work
  full    sudoku (6 blanks), 3 sizes (93k, 305k, 739k params) x P in {1, 2, 4} x 2 training
          seeds, 500k tokens each, 200 problems; 25 core-minutes (42 minutes on the shared 2-core
          CPU; the committed run: docs/compare/)
  smoke   seconds; for tests (micro shapes, a few steps, 6 problems, n = 4)
"""

EPILOG = """\
examples:
  # the quick grid (<= 15 min on 2 cores), then read the report
  parscale compare --preset quick --out runs/compare-quick
  less runs/compare-quick/report.md

  # the committed experiment, in the background; run it again to continue after a cut
  nohup parscale compare --preset full --threads 1 --out runs/compare-full > compare.log 2>&1 &

  # evaluate models you already have (any model parscale loads, with a tokenizer.json)
  parscale compare --models runs/a/model runs/b/model --task linear --difficulty 1 --out runs/cmp-ab

  # a converted real model, a few problems (slow on a CPU: 16 samples per problem)
  parscale compare --models smollm2/ --task arithmetic --difficulty 1 --problems 20 --out runs/cmp-smol
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="parameters vs streams vs samples at equal compute (grid, costs, Pareto frontier)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="quick", metavar="quick|full|smoke", help="which experiment (see above)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory; unset: runs/compare-PRESET")
    parser.add_argument("--models", nargs="+", metavar="DIR", default=None,
                        help="evaluate these model directories instead of training the preset's grid")
    from ..sampling.tasks import TASKS

    generated = " | ".join(name for name in TASKS if name != "exact")
    parser.add_argument("--task", default=None, help=f"{generated}; unset: the preset's")
    parser.add_argument("--difficulty", type=int, default=None, help="task difficulty; unset: the preset's (another --task: its default)")
    parser.add_argument("--problems", type=int, default=None, metavar="N",
                        help="held-out problems to evaluate; unset: the preset's")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature; unset: the preset's")
    parser.add_argument("--threads", type=threads_type, default="auto", metavar="N|auto",
                        help="torch CPU threads; auto: the cores not busy with other work when each model starts")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the models are evaluated (and trained); auto: CUDA when present")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["parscale", "compare", "--preset", args.preset]
    for flag, value in (("--out", args.out), ("--task", args.task), ("--difficulty", args.difficulty),
                        ("--problems", args.problems), ("--temperature", args.temperature),
                        ("--threads", args.threads), ("--device", args.device)):
        if value is not None and value != "auto":
            parts += [flag, str(value)]
    if args.models:
        parts += ["--models", *map(str, args.models)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from ..compare import compare, get_preset
    from ..errors import ParScaleError
    from ._common import ensure_writable_dir

    preset = get_preset(args.preset)  # a bad name fails before anything is prepared
    if args.problems is not None and args.problems < 1:
        raise ParScaleError(f"--problems must be >= 1 (got {args.problems})")
    ensure_writable_dir(args.out or f"runs/compare-{preset.name}", "--out")
    difficulty, max_new = args.difficulty, None
    if args.task is not None:
        from ..sampling.tasks import get_task

        task = get_task(args.task)
        if difficulty is None:  # another task: its own default difficulty
            difficulty = task.default_difficulty
        budget = getattr(task, "trace_budget", None)  # a trace task's answers are long: room for any trace
        if budget is not None:
            task.make_problems(0, difficulty=difficulty)  # a bad difficulty fails first, naming the range
            max_new = budget(difficulty)
    overrides = {"task": args.task, "difficulty": difficulty, "max_new_tokens": max_new, "eval_problems": args.problems,
                 "temperature": args.temperature}
    result = compare(preset, args.out, models=args.models, threads=args.threads, progress=not args.quiet,
                     command=_command_line(args), overrides=overrides, device=args.device)
    print(f"parscale compare: {len(result.trained)} models trained, {len(result.evaluated)} evaluated, "
          f"{len(result.skipped)} evaluations reused; {len(result.points)} points")
    for line in result.conclusions:
        print(f"  - {line}")
    print(f"report: {result.report_path}")
    print(f"results: {result.results_path}; plots: {', '.join(str(p) for p in result.plots.values())}")
    return 0
