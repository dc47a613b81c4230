"""The `parscale` command line: one subcommand per module under `parscale.commands`.

Every subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a ``run(args) -> int`` function. Bad input — a bad flag or a ParScaleError raised
while validating — is printed as one line, ``parscale CMD: error: ...``, with exit status 2,
never a traceback or a usage dump. Subcommand parsers inherit this from ``Parser`` (argparse
builds them with the class of their parent), so a new subcommand gets it without doing anything.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from .errors import ParScaleError

# Order = order in `parscale --help`; each module must exist.
SUBCOMMANDS = ["generate", "chat", "serve", "convert", "train", "merge-adapter", "eval", "fit", "cost",
               "reproduce", "sample", "score", "tasks", "compare"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the worked examples in epilogs as written and shows defaults (not "None" or an off
    switch, and not where the help already says what happens by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        off = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if off or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the flag and why, plus where the help is
    (``parscale train: error: argument --steps: invalid int value: 'x' (see 'parscale train --help')``)."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")

    def unknown_flags(self, extras: list[str]):
        """Report flags this parser does not know, suggesting the closest known one."""
        known = [s for a in self._actions for s in a.option_strings]
        first = next((e for e in extras if e.startswith("-")), extras[0])
        name = first.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="parscale",
        description="Parallel scaling of language models (ParScale streams and sample-level scaling).",
        formatter_class=HelpFormatter,
        epilog="Run `parscale COMMAND --help` for a worked example of each command.",
    )
    parser.add_argument("--version", action="version", version=f"parscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"parscale.commands.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str | None):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _unknown_long_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Report a mistyped ``--flag`` of a subcommand before argparse's own checks (which would
    otherwise complain about a missing required flag first)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = _subparser(parser, command)
    if sub is parser:
        return
    known = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    rest = argv[argv.index(command) + 1:]
    for token in rest[:rest.index("--")] if "--" in rest else rest:
        if token.startswith("--") and len(token) > 2:
            name = token.split("=", 1)[0]
            if not any(k.startswith(name) for k in known):  # argparse accepts unique prefixes
                sub.unknown_flags([token])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _unknown_long_flags(parser, list(sys.argv[1:] if argv is None else argv))
    args, extras = parser.parse_known_args(argv)
    if extras:  # a mistyped flag: report it against the subcommand it was given to
        _subparser(parser, getattr(args, "command", None)).unknown_flags(extras)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prog = f"parscale {args.command}"
    try:
        return int(args.func(args) or 0)
    except ParScaleError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `parscale fit ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:  # the disk filled up, a file vanished, out of memory
        what = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {what}{_one_line(getattr(e, 'strerror', None) or e or type(e).__name__)}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
