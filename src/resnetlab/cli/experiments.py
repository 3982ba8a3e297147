"""``resnetlab demo`` and ``resnetlab study NAME``: every setting of a study is a flag."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .common import add_json_flag


def add_settings_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the settings dataclass ``cls``, documented from its ``knob`` help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"default": default, "dest": f.name}
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if typing.get_origin(hint) is list:
            kwargs.update(type=typing.get_args(hint)[0], nargs="+", metavar="N")
        else:
            kwargs.update(type=hint, metavar=hint.__name__.upper())
        parser.add_argument(f"--{f.name.replace('_', '-')}", help=help_text, **kwargs)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="study folder (default: studies/<time>-<name>); run again to continue it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(p)


def register(sub: argparse._SubParsersAction) -> None:
    from ..experiments import STUDIES, DemoSettings

    p = sub.add_parser(
        "demo",
        help="plain vs residual MLPs on the bundled digits, at several depths (about 3 minutes)",
        description="Residual MLPs and their plain twins at several depths, trained identically on the bundled "
        "8x8 digits: a table of final errors, a figure of training error against steps, and a report.",
    )
    add_settings_flags(p, DemoSettings)
    _add_common(p)
    p.set_defaults(run=_runner("demo"))

    p = sub.add_parser("study", help="run a study: " + ", ".join(STUDIES), description="Run one of the studies.")
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    for name, (settings_cls, _, text) in STUDIES.items():
        sp = studies.add_parser(name, help=text, description=(settings_cls.__doc__ or text).strip())
        add_settings_flags(sp, settings_cls)
        _add_common(sp)
        sp.set_defaults(run=_runner(name))


def _runner(name: str):
    def run(args: argparse.Namespace) -> dict:
        from ..experiments import STUDIES, DemoSettings, run_demo

        settings_cls, function = (DemoSettings, run_demo) if name == "demo" else STUDIES[name][:2]
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_cls)}
        # Each study checks its settings before it writes anything (experiments.study.check_settings).
        return function(settings_cls(**values), out=args.out, progress=not args.no_progress)

    return run
