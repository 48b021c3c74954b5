"""The ``emlab`` command: one subcommand per capability (``emlab --help`` lists them).

>>> main(["data", "check", "train.jsonl"])   # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import importlib
import sys

from emlab.version import __version__

#: Modules under ``emlab._cli`` that each define ``register(subparsers)``.
COMMAND_MODULES = ("data", "toy", "judge", "notebooks", "sweep", "claims")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every registered subcommand.

    >>> "data" in build_parser().format_help()
    True
    """
    parser = argparse.ArgumentParser(
        prog="emlab", description="emlab: a workbench for studying emergent misalignment."
    )
    parser.add_argument("--version", action="version", version=f"emlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"emlab._cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emlab`` console script; returns the exit code.

    >>> main(["--help"])   # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
