"""``cuttlefish-hf``: one subcommand per module of this package.

Every subcommand module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit code``. A subcommand
reports bad input by raising ``ValueError`` (or ``OSError`` for files): ``main`` prints its message on one line
and exits 1; argparse's own errors exit 2.
"""

from __future__ import annotations

import argparse
import sys

from . import demo, inspect, merge, profile

SUBCOMMANDS = {"inspect": inspect, "profile": profile, "merge": merge, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cuttlefish-hf", description="Cuttlefish low-rank training tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(subparsers.add_parser(name, help=module.HELP, description=module.__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split("\n")) or type(error).__name__
        print(f"cuttlefish-hf {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
