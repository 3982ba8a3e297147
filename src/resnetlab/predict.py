"""Top-k predictions of a trained model for image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_trained_model
from .data.folder import decode_image, fit_image
from .errors import UserError
from .training.setup import Preprocess, resolve_device


def load_images(paths: list[str | Path], shape: tuple[int, int, int], crop_fraction: float = 1.0) -> torch.Tensor:
    """Decode files into a uint8 batch of ``shape`` (C, H, W): converted to the model's channels and
    prepared as its validation images were (:func:`fit_image` with the model's ``crop_fraction``); a
    non-square shape (native-size training images) is a plain resize where the size differs."""
    c, h, w = shape
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such image file")
        img = decode_image(str(path), channels=c)
        if h == w:
            img = fit_image(img, h, crop_fraction)
        elif img.size != (w, h):
            img = img.resize((w, h))
        array = np.asarray(img, dtype=np.uint8)
        images.append(torch.from_numpy(array.reshape(h, w, c).copy()).permute(2, 0, 1))
    return torch.stack(images)


def predict(
    checkpoint: str | Path, images: list[str | Path], *, top_k: int = 5, device: str = "auto"
) -> list[dict[str, Any]]:
    """For each image, the ``top_k`` classes with their probabilities (softmax of the logits)."""
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    dev = resolve_device(device)
    model, info = load_trained_model(checkpoint, "predict", map_location=dev)
    channels = info.input_shape[0]
    if channels not in (1, 3):  # an image file decodes to "L" or "RGB"; other channel counts have no file form
        raise UserError(
            f"{checkpoint}: predict reads images as grayscale (1 channel) or RGB (3), and this model "
            f"takes {channels} channels"
        )
    batch = load_images(images, info.input_shape, info.crop_fraction).to(dev)
    with torch.no_grad():
        probs = model(Preprocess(info.mean, info.std).to(dev)(batch)).softmax(1).cpu()
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [
        {
            "image": str(path),
            "top": [
                {"class": info.classes[int(i)], "probability": round(float(p), 6)}
                for p, i in zip(top.values[n], top.indices[n], strict=True)
            ],
        }
        for n, path in enumerate(images)
    ]
