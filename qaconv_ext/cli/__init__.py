"""The ``qaconv`` command line: ``train``, ``eval``, ``demo``, ``bench`` (and ``match``, ``rank``, ``index``,
``search``).

Each sub-command lives in a module of this package exposing ``register(subparsers)``, which adds
its parser and sets ``func=run``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: Sub-command modules, in the order ``qaconv --help`` lists them.
SUBCOMMANDS = ("train", "eval", "demo", "bench", "match", "rank", "index", "search")


def build_parser() -> argparse.ArgumentParser:
    """The ``qaconv`` parser with every available sub-command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="qaconv",
        description="QAConv person re-identification: train, evaluate, demo, benchmark the fused matching op, "
                    "index and search a gallery.")
    parser.add_argument("--version", action="version", version=f"qaconv-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``qaconv`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
