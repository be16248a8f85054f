"""The ``qaconv`` command line: ``train``, ``eval``, ``demo``, ``bench`` (and ``match``, ``rank``, ``index``,
``search``).

Each sub-command lives in a module of this package exposing ``register(subparsers)``, which adds
its parser and sets ``func=run``. Building the parsers imports no PyTorch (the sub-commands import
the library inside ``run``), so ``qaconv --help`` and ``qaconv <command> --help`` answer at once.

Errors a user can act on end a command with one line ``qaconv <command>: <message>`` on stderr and
exit status 2 (bad input, found before the work starts) or 1 (a failure during the work, such as a
training run that diverged); see :func:`qaconv_ext.cli.common.run_command`. An interrupted command
(Ctrl-C, SIGINT) exits with status 130; ``qaconv train`` then says what was kept and the command that
continues or starts the run again.
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
                    "index and search a gallery. `qaconv COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"qaconv-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``qaconv`` script; returns the exit status (or raises
    :class:`~qaconv_ext.cli.common.CommandError`, a ``SystemExit``, after printing its one line)."""
    from .common import run_command

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # what was typed, for messages
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args, f"qaconv {args.command}")
