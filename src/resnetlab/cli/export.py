"""``resnetlab export``: ONNX or TorchScript, checked against the PyTorch model."""

from __future__ import annotations

import argparse

from .common import DefaultsFormatter, add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        formatter_class=DefaultsFormatter,
        help="export a trained model to ONNX or TorchScript",
        description=(
            "Export a trained model. The graph takes normalised float images (N, C, H, W) with any batch "
            "size; mean, std and class names are stored with it. The export is run once on a test batch "
            "and compared with PyTorch (onnxruntime for ONNX)."
        ),
    )
    p.add_argument("checkpoint", help="run folder, checkpoint folder, model.safetensors or a .pth state_dict")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True, help="what to write")
    p.add_argument("--output", help="file to write (default: model.onnx / model.pt beside the weights)")
    p.add_argument("--model", help="architecture of a bare .pth state_dict (e.g. resnet50)")
    add_json_flag(p)
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> dict:
    from ..export import export_model

    result = export_model(args.checkpoint, args.format, args.output, model_name=args.model)
    if not args.json:
        print(
            f"wrote {result['output']} ({result['bytes']:,} bytes, {args.format}); largest difference from "
            f"PyTorch on a test batch: {result['max_abs_diff']:.2e}"
        )
    return result
