"""Export a trained model to ONNX or TorchScript, checked against the PyTorch model it came from.

The exported graph is the network itself: its input is the *normalised* float image batch
``(N, C, H, W)`` with a free batch size; the normalisation (mean, std on the 0..1 scale) and the class
names travel with it (ONNX ``metadata_props``, TorchScript ``extra_files``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .checkpoint import is_checkpoint_part, load_model, resolve_model_file
from .errors import UserError
from .fileio import atomic_write_bytes

Format = Literal["onnx", "torchscript"]


def export_model(
    checkpoint: str | Path,
    fmt: Format,
    output: str | Path | None = None,
    *,
    model_name: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``output`` (default: beside the weights, ``model.onnx`` / ``model.pt``)."""
    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"--format {fmt!r}: choose onnx or torchscript")
    source = resolve_model_file(checkpoint)
    default_name = "model.onnx" if fmt == "onnx" else "model.pt"
    out = Path(output) if output else source.with_name(default_name)
    _check_output(out, source, default_name)
    model, info = load_model(checkpoint, model_name=model_name, model_option="--model NAME")
    shape = tuple(info.input_shape) if info else model.default_input_size
    meta = {"input_shape": list(shape), "input": "normalised float (x / 255 - mean) / std, NCHW"}
    if info:
        meta.update(model=info.model, classes=info.classes, mean=info.mean, std=info.std)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / out.name
        if fmt == "onnx":
            _to_onnx(model, example, tmp_file, meta)
        else:
            _to_torchscript(model, example, tmp_file, meta)
        data = tmp_file.read_bytes()
    atomic_write_bytes(out, data)
    result: dict[str, Any] = {
        "output": str(out),
        "format": fmt,
        "bytes": len(data),
        "input_shape": list(shape),
    }
    if check:
        result["max_abs_diff"] = check_export(model, out, fmt, shape)
    return result


def _check_output(out: Path, source: Path, default_name: str) -> None:
    """Refuse an output the export cannot write or must not replace, before any work is done."""
    if out.is_dir():
        raise UserError(f"--output {out}: is a folder; name the file to write (e.g. {out / default_name})")
    if not out.parent.is_dir():
        raise UserError(f"--output {out}: folder {out.parent} does not exist")
    # resolve(): the same file through a symbolic link or another relative path; samefile: a hard link.
    if out.resolve() == source.resolve() or (out.exists() and out.samefile(source)):
        raise UserError(f"--output {out}: is the model file being exported; writing there would destroy it")
    if is_checkpoint_part(out):
        raise UserError(f"--output {out}: is part of the checkpoint in {out.parent}; writing there would destroy it")


def _to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx packages: pip install 'resnetlab[export]'") from None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its progress lines are not ours to print
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            dynamo=True,
            verbose=False,
        )
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def _to_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's deprecation notices
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={"resnetlab.json": json.dumps(meta)})


def check_export(model: torch.nn.Module, path: Path, fmt: Format, shape: tuple[int, ...]) -> float:
    """Largest absolute difference of the exported model's outputs from PyTorch's, on a batch of 3
    (not the export's batch of 2, so a fixed batch size would show)."""
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x.numpy()})[0]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = loaded(x).numpy()
    return float(np.abs(got - expected).max())
