"""``resnetlab list`` and ``resnetlab summary``."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..models import create_model, list_models, model_entry
from ..summary import summarize
from .common import add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the registered models", description="List registered models.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'resnet*'")
    add_json_flag(p)
    p.set_defaults(run=run_list)

    p = sub.add_parser(
        "summary",
        help="per-stage output shapes, parameters and MACs of a model",
        description="Print each stage's output shape, parameters and multiply-accumulates, with totals.",
    )
    p.add_argument("model", help="a registered model name (see `resnetlab list`)")
    p.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        metavar="N",
        help="S, H W or C H W (default: the model's own, e.g. 3 224 224 or 3 32 32)",
    )
    p.add_argument("--plain", action="store_true", help="summarise the plain twin (no shortcuts)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
    add_json_flag(p)
    p.set_defaults(run=run_summary)


def run_list(args: argparse.Namespace) -> dict:
    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}")
    if not args.json:
        width = max(map(len, names))
        for name in names:
            print(f"{name:<{width}}  {model_entry(name).description}")
    return {"models": names}


def run_summary(args: argparse.Namespace) -> dict:
    kwargs: dict = {}
    if args.plain:
        kwargs["plain"] = True
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    size = args.input_size
    if size is not None and (len(size) > 3 or min(size) < 1):
        raise UserError(f"--input-size takes 1 to 3 positive integers (S, H W or C H W), got {size}")
    if size is not None and len(size) == 3:
        kwargs["in_chans"] = size[0]
    try:
        model = create_model(args.model, **kwargs)
    except ValueError as err:  # unknown name or a value the builder rejects
        raise UserError(str(err)) from None
    if size is not None:
        channels = model.default_input_size[0]
        size = {1: (channels, size[0], size[0]), 2: (channels, *size), 3: tuple(size)}[len(size)]
    try:
        summary = summarize(model, size, name=args.model + (" (plain)" if args.plain else ""))
    except RuntimeError as err:  # e.g. an input too small for the network's strides
        raise UserError(f"--input-size {size} does not fit {args.model}: {err}") from None
    if not args.json:
        print(summary.to_text())
    return summary.to_dict()
