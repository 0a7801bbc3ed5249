"""``cuttlefish-hf``: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import sys

from . import demo

SUBCOMMANDS = {"demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cuttlefish-hf", description="Cuttlefish low-rank training tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(subparsers.add_parser(name, help=module.HELP, description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
