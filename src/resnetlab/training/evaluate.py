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
) -> EvalResult:
    """Cross-entropy (without label smoothing), accuracy and confusion matrix over ``loader``.

    ``flip``: test-time augmentation, the logits averaged over each image and its mirror image.
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
            out = model(inputs)
            if flip:
                out = (out.float() + model(inputs.flip(3)).float()) / 2
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
