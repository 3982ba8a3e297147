"""``resnetlab eval``: accuracy, loss, per-class accuracy and confusion matrix of a trained model."""

from __future__ import annotations

import argparse

from .common import DefaultsFormatter, add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        formatter_class=DefaultsFormatter,
        help="evaluate a trained model on a split",
        description=(
            "Evaluate a run folder, checkpoint folder or model.safetensors. Without --data, the run's own "
            "data set; --split val is the part training held out, --split train the rest. A folder whose "
            "class folders sit directly under it is evaluated as a split of its own."
        ),
    )
    p.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    p.add_argument("--data", help="data set name or path (default: the one the model was trained on)")
    p.add_argument("--split", choices=["val", "test", "train"], default="val", help="which split")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--no-tta",
        action="store_true",
        help="each image once, without the test-time flips/translations the run validated with",
    )
    add_json_flag(p)
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> dict:
    from ..errors import UserError
    from ..evaluation import evaluate_checkpoint

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    result = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        tta=not args.no_tta,
    )
    if not args.json:
        tta = result["tta"]
        views = []
        if tta["flip"]:
            views.append("flips")
        if tta["translate"]:
            views.append(f"{tta['translate']}-pixel shifts")
        print(
            f"{result['model']} on {result['data']} ({result['split']}, {result['images']} images"
            f"{', test-time ' + ' and '.join(views) if views else ''}): "
            f"accuracy {result['acc']:.2f}%, loss {result['loss']:.4f}"
        )
        classes = result["classes"]
        width = max(len(c) for c in classes)
        print("per-class accuracy:")
        for name, acc in result["per_class_acc"].items():
            print(f"  {name:<{width}}  {acc:6.2f}%")
        print("confusion matrix (rows: true class, columns: predicted):")
        cell = max(4, max(len(str(v)) for row in result["confusion"] for v in row) + 1)
        print(" " * (width + 2) + "".join(f"{i:>{cell}}" for i in range(len(classes))))
        for i, (name, row) in enumerate(zip(classes, result["confusion"], strict=True)):
            print(f"{name:<{width}} {i:>1}" + "".join(f"{v:>{cell}}" for v in row))
    return result
