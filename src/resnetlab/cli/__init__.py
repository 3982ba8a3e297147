"""The ``resnetlab`` command: one subcommand per job, each with ``--json``.

A user mistake ends with one line ``resnetlab <command>: error: <what and where>`` on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

from .. import __version__
from ..capabilities import SlowPathWarning
from ..errors import UserError
from ..training.engine import TrainingStopped
from . import evaluate, experiments, export, models, predict, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnetlab", description="Build, train and study residual networks.")
    parser.add_argument("--version", action="version", version=f"resnetlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, evaluate, predict, export, experiments, models):
        module.register(sub)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as its own default ``_parser``: the innermost one chosen is the one
    that reports arguments it does not know, with its own prog (``resnetlab study lesion: error: ...``),
    where argparse leaves that to the top-level parser."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _remember_parsers(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with warnings.catch_warnings():
            # A SlowPathWarning is meant for the user: it reads as one line naming the command, like
            # the errors, not as Python's file:line report.
            warnings.showwarning = _show_warning(args.command)
            result = args.run(args)
    except UserError as err:
        print(f"resnetlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        print(f"resnetlab {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"resnetlab {args.command}: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result))
    return 0


def _show_warning(command: str):
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SlowPathWarning):
            print(f"resnetlab {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main_exit() -> None:
    """Console-script entry point (also ``python -m resnetlab``)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``resnetlab eval RUN | head``): stop quietly with SIGPIPE's status, as
        # shell tools do; stdout goes to /dev/null so the flush at exit cannot fail again (Python's
        # signal docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)
