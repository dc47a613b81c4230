"""`parscale merge-adapter`: a frozen-backbone run's adapter + its base -> one full checkpoint."""

from __future__ import annotations

import argparse

from ..cli import HelpFormatter

EPILOG = """\
examples:
  # a frozen-backbone run wrote runs/p2/model as an adapter (stream sets + the base's path and hash)
  parscale train --init-from runs/smollm2 --streams 2 --freeze-backbone --tokens 40000 --out runs/p2
  parscale merge-adapter runs/p2/model --out runs/p2-full
  parscale generate --model runs/p2-full --prompt "ROMEO."

  # the base moved: name it (its weights must still hash to what the adapter recorded)
  parscale merge-adapter runs/p2/model --base /data/smollm2 --out runs/p2-full
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge-adapter", help="merge an adapter (frozen-backbone run) with its base into one checkpoint",
        description="Load an adapter directory onto its base model (the recorded path, or --base; "
                    "the base's weights must match the recorded sha256) and write the full model "
                    "(official ParScale format, every stream set, the stored dtype) to --out.",
        formatter_class=HelpFormatter, epilog=EPILOG)
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter.safetensors)")
    p.add_argument("--out", required=True, help="directory for the merged checkpoint")
    p.add_argument("--base", default=None, help="base checkpoint directory (default: the recorded path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recycle import merge_adapter

    merge_adapter(args.adapter, args.out, base=args.base)
    print(f"parscale merge-adapter: wrote {args.out}")
    return 0
