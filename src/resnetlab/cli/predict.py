"""``resnetlab predict``: top-k classes with probabilities for image files."""

from __future__ import annotations

import argparse

from .common import DefaultsFormatter, add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        formatter_class=DefaultsFormatter,
        help="top-k classes of image files",
        description="Classify image files with a trained model: the top-k classes and their probabilities.",
    )
    p.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_json_flag(p)
    p.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> dict:
    from ..predict import predict

    predictions = predict(args.checkpoint, args.images, top_k=args.top_k, device=args.device)
    if not args.json:
        for item in predictions:
            best = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in item["top"])
            print(f"{item['image']}: {best}")
    return {"predictions": predictions}
