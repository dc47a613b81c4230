"""The `parscale` command line: one subcommand per module under `parscale.commands`.

Every subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a ``run(args) -> int`` function. Bad input raises ParScaleError, printed here as
one line (``parscale: error: ...``) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import ParScaleError

# Order = order in `parscale --help`; each module must exist.
SUBCOMMANDS = ["generate", "train", "fit", "cost", "reproduce", "sample", "score", "serve"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the worked examples in epilogs as written and shows defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parscale",
        description="Parallel scaling of language models (ParScale streams and sample-level scaling).",
        formatter_class=HelpFormatter,
        epilog="Run `parscale COMMAND --help` for a worked example of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"parscale.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ParScaleError as e:
        print(f"parscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `parscale fit ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"parscale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
