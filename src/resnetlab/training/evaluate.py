"""Evaluation over a loader: loss, accuracy and confusion matrix (summed over processes)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import InMemoryLoader, StreamingLoader
from .distributed import SINGLE_PROCESS, DistInfo, all_reduce_sum


@dataclass
class EvalResult:
    loss: float
    acc: float  # percent
    images: int
    confusion: torch.Tensor  # (classes, classes): rows are true classes, columns predictions

    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1).clamp_min(1)
        return (100 * self.confusion.diag() / totals).tolist()


def tta_logits(model: nn.Module, inputs: torch.Tensor, *, flip: bool = False, translate: int = 0) -> torch.Tensor:
    """The logits of ``model`` on ``inputs``, averaged over test-time views.

    ``flip``: each image and its mirror image. ``translate``: also the images shifted by ``translate``
    pixels up-left and down-right (reflect padding, as the training crops); the two shifted views
    together weigh as much as the unshifted one. That is airbench's test-time augmentation (Jordan,
    "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024, sec. 3.6); with both on, 6 forward passes.
    """
    if not flip and not translate:
        return model(inputs)

    def views(x: torch.Tensor) -> torch.Tensor:
        out = model(x).float()
        return (out + model(x.flip(3)).float()) / 2 if flip else out

    logits = views(inputs)
    if translate:
        h, w = inputs.shape[-2:]
        if translate >= min(h, w):
            raise ValueError(f"a translation of {translate} pixels needs images larger than {h}x{w}")
        padded = F.pad(inputs, (translate,) * 4, mode="reflect")
        up_left = padded[..., :h, :w]
        down_right = padded[..., 2 * translate :, 2 * translate :]
        logits = logits / 2 + (views(up_left) + views(down_right)) / 4
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: InMemoryLoader | StreamingLoader,
    preprocess: nn.Module,
    num_classes: int,
    *,
    dist: DistInfo = SINGLE_PROCESS,
    autocast: contextlib.AbstractContextManager | None = None,
    flip: bool = False,
    translate: int = 0,
) -> EvalResult:
    """Cross-entropy (without label smoothing), accuracy and confusion matrix over ``loader``.

    ``flip`` and ``translate``: test-time augmentation, see :func:`tta_logits`.
    """
    was_training = model.training
    model.eval()
    device = preprocess.scale.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for x, y in loader.batches():
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            inputs = preprocess(x)
            out = tta_logits(model, inputs, flip=flip, translate=translate)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + out.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    all_reduce_sum(loss_sum, dist)
    all_reduce_sum(confusion, dist)
    model.train(was_training)
    n = int(confusion.sum())
    return EvalResult(
        loss=float(loss_sum) / max(n, 1),
        acc=100 * float(confusion.diag().sum()) / max(n, 1),
        images=n,
        confusion=confusion.cpu(),
    )
