"""Evaluate a trained model on a split: loss, accuracy, per-class accuracy and confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import ModelInfo, load_trained_model
from .data.prepare import load_source
from .data.split import stratified_split
from .data.types import DataSource, ImageArray, Split
from .errors import UserError
from .training.config import TrainConfig, config_from_toml_text
from .training.evaluate import evaluate
from .training.setup import Preprocess, make_loader, resolve_device


def _training_config(info: ModelInfo) -> TrainConfig:
    return config_from_toml_text(info.config, "checkpoint metadata") if info.config else TrainConfig()


def pick_split(source: DataSource, split: str, config: TrainConfig, spec: str) -> Split:
    """The split to evaluate on.

    A folder whose class folders sit directly under it is a split of its own. ``val`` is the data
    set's own val split if it has one, else the part of its training split that training held out
    (same fraction and split seed as the run), and ``train`` the rest: the images the run could train
    on. ``test`` exists only where the data set has one.
    """
    if "images" in source.splits:
        return source.splits["images"]
    if split in source.splits and split != "train":
        return source.splits[split]
    if split in ("train", "val") and "train" in source.splits:
        whole = source.splits["train"]
        if "val" in source.splits:
            return whole
        if not config.val_fraction:
            if split == "val":
                raise UserError(
                    f"--split val: the run held none of {spec}'s training images out (--val-fraction 0) and "
                    "the data set has no val split of its own"
                )
            return whole
        train_idx, val_idx = stratified_split(whole.labels, config.val_fraction, config.split_seed)
        return whole.subset(val_idx if split == "val" else train_idx)
    have = ", ".join(sorted(source.splits)) or "none"
    raise UserError(f"--data {spec}: has no {split!r} split (it has: {have})")


def _relabel(split: Split, data_classes: list[str], model_classes: list[str], spec: str) -> Split:
    """Map the data set's labels onto the model's classes by name; unknown classes are an error."""
    if data_classes == model_classes:
        return split
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise UserError(
            f"--data {spec}: classes {', '.join(missing[:5])} are not among the model's "
            f"{len(model_classes)} classes ({', '.join(model_classes[:5])}, ...)"
        )
    table = torch.tensor([model_classes.index(c) for c in data_classes])
    if isinstance(split, ImageArray):
        return ImageArray(split.images, table[split.labels])
    return type(split)(split.paths, table[split.labels])


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: Literal["train", "val", "test"] = "val",
    batch_size: int = 256,
    device: str = "auto",
    tta: bool = True,
) -> dict[str, Any]:
    """Evaluate the model in ``checkpoint`` (a run folder, checkpoint folder or weights file).

    ``tta``: use the test-time augmentation the run validated with (``eval_flip``, ``eval_translate``),
    so that the run's own validation accuracy is reproduced; ``False``: each image once. The model
    computes in the precision the run validated in (its ``amp``), for the same reason.
    """
    dev = resolve_device(device)
    model, info = load_trained_model(checkpoint, "eval", map_location=dev)
    config = _training_config(info)
    spec = data or config.data
    c, h, w = info.input_shape
    source = load_source(
        spec,
        data_root=config.data_root,
        image_size=h if h == w else None,
        channels=c,
        skip_bad_images=config.skip_bad_images,
        seed=config.seed,
        # A model validated on streamed images is evaluated on streamed images: the same crop (see
        # ModelInfo.crop_fraction), whatever size this data set has.
        in_memory=False if info.crop_fraction != 1 else None,
    )
    chosen = _relabel(pick_split(source, split, config, spec), source.classes, info.classes, spec)
    if isinstance(chosen, ImageArray) and tuple(chosen.images.shape[1:]) != tuple(info.input_shape):
        raise UserError(
            f"--data {spec}: images are {tuple(chosen.images.shape[1:])} (C, H, W), the model was trained on "
            f"{tuple(info.input_shape)}"
        )
    loader = make_loader(
        chosen,
        batch_size,
        train=False,
        device=dev,
        input_shape=info.input_shape,
        workers=config.workers,
        skip_bad_images=config.skip_bad_images,
    )
    views = {"flip": config.eval_flip and tta, "translate": config.eval_translate if tta else 0}
    # The precision the run validated in (its --amp), so that its validation accuracy is reproduced;
    # float16 autocast exists on CUDA only, so a float16 run evaluated on a CPU computes in float32.
    amp = config.amp if config.amp == "bf16" or (config.amp == "fp16" and dev.type == "cuda") else "none"
    autocast = None
    if amp != "none":
        autocast = torch.autocast(dev.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
    preprocess = Preprocess(info.mean, info.std).to(dev)
    result = evaluate(model, loader, preprocess, len(info.classes), autocast=autocast, **views)
    return {
        "checkpoint": str(checkpoint),
        "model": info.model,
        "data": spec,
        "split": "images" if "images" in source.splits else split,
        "images": result.images,
        "tta": views,
        "amp": amp,
        "loss": round(result.loss, 6),
        "acc": round(result.acc, 4),
        "per_class_acc": dict(zip(info.classes, [round(a, 2) for a in result.per_class_acc()], strict=True)),
        "classes": info.classes,
        "confusion": result.confusion.tolist(),
    }
