"""`parscale tasks`: training text for an offline task, with the evaluation problems held out.

Writes JSONL (``{"text": "Q: 47+385=\\nA: 432\\n"}`` per line) for ``parscale train --data``. By
default the problems that ``parscale sample`` evaluates with the same task, difficulty,
``--eval-problems`` and ``--eval-seed`` (sample's ``--problems`` and ``--problem-seed``; the
defaults match) are left out, so a model is never scored on problems it trained on.
``--eval-out`` writes those evaluation problems as JSONL for ``parscale sample --problems FILE``.
"""

from __future__ import annotations

import argparse
import json

from ..errors import ParScaleError

EXAMPLE = """\
examples:
  # 20k arithmetic problems to train on, without the 50 that `parscale sample` evaluates
  parscale tasks --task arithmetic --difficulty 1 --n 20000 --out arith_train.jsonl
  parscale train --data arith_train.jsonl --size tiny --steps 300 --out runs/arith
  parscale sample --model runs/arith/model --task arithmetic --difficulty 1 --n 16

  # the evaluation problems themselves, as a file sample can read
  parscale tasks --task linear --n 5000 --out lin.jsonl --eval-out lin_eval.jsonl
  parscale sample --model runs/lin/model --task linear --problems lin_eval.jsonl --n 8

  # the tasks, their difficulty ranges and an example problem each
  parscale tasks --list
"""

SAMPLE_PROBLEMS, SAMPLE_SEED = 50, 1234  # `parscale sample`'s --problems / --problem-seed defaults


def register(sub) -> None:
    from ..cli import HelpFormatter

    p = sub.add_parser("tasks", help="write training text for a task, holding out the evaluation problems",
                       epilog=EXAMPLE, formatter_class=HelpFormatter, description=__doc__)
    p.add_argument("--task", help="arithmetic | countdown | linear | sudoku | arithmetic-trace | countdown-trace | "
                                  "sum-trace (--list: every task with its difficulties)")
    p.add_argument("--n", type=int, default=10000, help="training problems to write (repeats allowed)")
    p.add_argument("--difficulty", type=int, default=None, help="task difficulty (task default if unset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training problems")
    p.add_argument("--out", metavar="FILE.jsonl", help="training text (JSONL) to write")
    p.add_argument("--eval-problems", type=int, default=SAMPLE_PROBLEMS,
                   help="how many evaluation problems to hold out (sample's --problems)")
    p.add_argument("--eval-seed", type=int, default=SAMPLE_SEED,
                   help="seed of the evaluation problems (sample's --problem-seed)")
    p.add_argument("--eval-out", metavar="FILE.jsonl", help="also write the evaluation problems here")
    p.add_argument("--include-eval", action="store_true",
                   help="do not hold the evaluation problems out (contaminated: for ablations only)")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    p.set_defaults(func=run)


def _list() -> int:
    from ..sampling.tasks import TASKS

    for name, task in TASKS.items():
        if name == "exact":
            print(f"{name:<11} no generator: verifies saved problems by their reference answer")
            continue
        top = task.max_difficulty or "..."
        example = task.make_problems(1, seed=0)[0]
        print(f"{name:<11} difficulty {task.min_difficulty}..{top} (default {task.default_difficulty}); "
              f"e.g. {task.training_text(example)!r}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..sampling.tasks import TASKS, get_task
    from ._common import at_least, check_count, ensure_writable_file

    if args.list:
        return _list()
    if not args.task:
        raise ParScaleError("--task is required (or --list to see the tasks)")
    if not args.out:
        raise ParScaleError("--out FILE.jsonl is required")
    task = get_task(args.task)
    if task.name == "exact":
        raise ParScaleError("--task exact has no problem generator; pick one of "
                            + ", ".join(n for n in TASKS if n != "exact"))
    at_least("--n", args.n, 1)
    at_least("--eval-problems", args.eval_problems, 0)
    check_count("--n", args.n, 1024, "problems")  # a Problem plus its line of text, generously
    check_count("--eval-problems", args.eval_problems, 1024, "problems")
    out = ensure_writable_file(args.out, "--out")
    eval_out = ensure_writable_file(args.eval_out, "--eval-out") if args.eval_out else None
    if eval_out is not None and eval_out.resolve() == out.resolve():
        raise ParScaleError("--eval-out must differ from --out")

    held_out = task.make_problems(args.eval_problems, seed=args.eval_seed, difficulty=args.difficulty)
    exclude = set() if args.include_eval else {p.prompt for p in held_out}
    train = task.make_problems(args.n, seed=args.seed, difficulty=args.difficulty, exclude=exclude)
    trained = {p.prompt for p in train}
    overlap = sum(p.prompt in trained for p in held_out)  # evaluation problems (repeats count) seen in training
    atomic_write_text(out, "".join(json.dumps({"text": task.training_text(p)}) + "\n" for p in train))
    if eval_out is not None:
        atomic_write_text(eval_out, "".join(json.dumps(p.to_dict()) + "\n" for p in held_out))
    d = train[0].meta["difficulty"]
    distinct = len({p.prompt for p in train})
    print(f"parscale tasks: {len(train)} {task.name} problems at difficulty {d} ({distinct} distinct) "
          f"written to {out}")
    held = f"{len(held_out)} evaluation problems (seed {args.eval_seed})"
    if args.include_eval:
        print(f"  NOT held out: {overlap} of the {held} are in the training text")
    else:
        print(f"  held out: the {held} that `parscale sample --task {task.name} --problems "
              f"{args.eval_problems} --problem-seed {args.eval_seed}"
              + (f" --difficulty {args.difficulty}" if args.difficulty is not None else "") + "` scores")
    if eval_out is not None:
        print(f"  evaluation problems written to {eval_out} (parscale sample --problems {eval_out})")
    return 0
