"""Whole-batch augmentation with tensor operations: random crop of a padded image, horizontal flip.

This is the ResNet paper's CIFAR augmentation (sec. 4.2: "4 pixels are padded on each side, and a
32x32 crop is randomly sampled from the padded image or its horizontal flip"), applied to a uint8
batch at once, on whatever device the batch lives on, with no per-image Python (as airbench does).

Flips are drawn anew for each image in each epoch, or alternate (:func:`alternating_flips`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

PadMode = Literal["reflect", "zeros"]
FlipFlags = TypeVar("FlipFlags", torch.Tensor, bool)


def _padded_index(offset: torch.Tensor, size: int, pad: int, mode: PadMode) -> tuple[torch.Tensor, torch.Tensor]:
    """For crops starting at ``offset - pad``: source indices (B, size) and a mask of in-image ones."""
    idx = offset.view(-1, 1) - pad + torch.arange(size, device=offset.device)
    inside = (idx >= 0) & (idx < size)
    if mode == "reflect":  # mirror without repeating the edge pixel, as numpy's/torch's "reflect"
        idx = idx.abs()
        idx = torch.where(idx >= size, 2 * (size - 1) - idx, idx)
        inside = torch.ones_like(inside)
    return idx.clamp(0, size - 1), inside


@dataclass(frozen=True)
class BatchAugment:
    """Random ``crop_padding``-pixel translation (a crop of the padded image) and random flip.

    ``alternate_flip``: the loader replaces the random flips by :func:`alternating_flips` (it knows
    which image is which); the crops stay the ones drawn here.
    """

    crop_padding: int = 4
    flip: bool = True
    pad_mode: PadMode = "reflect"
    alternate_flip: bool = False

    def __post_init__(self) -> None:
        if self.alternate_flip and not self.flip:
            raise ValueError("alternating flips need a training augmentation that flips")

    def params(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image crop offsets (rows, columns) in ``[0, 2 * crop_padding]`` and flip flags."""
        span = 2 * self.crop_padding + 1
        dy = torch.randint(0, span, (n,), generator=generator)
        dx = torch.randint(0, span, (n,), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return dy, dx, flips

    def apply(self, images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Augment uint8 ``images`` (B, C, H, W) with the given parameters (from :meth:`params`)."""
        b, c, h, w = images.shape
        dev = images.device
        if self.crop_padding:
            if self.crop_padding >= min(h, w) and self.pad_mode == "reflect":
                raise ValueError(f"reflect padding of {self.crop_padding} needs images larger than that")
            rows, row_in = _padded_index(dy.to(dev), h, self.crop_padding, self.pad_mode)
            cols, col_in = _padded_index(dx.to(dev), w, self.crop_padding, self.pad_mode)
            images = images.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))
            images = images.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
            if self.pad_mode == "zeros":
                images = images * (row_in.view(b, 1, h, 1) & col_in.view(b, 1, 1, w))
        if self.flip:
            images = torch.where(flips.to(dev).view(b, 1, 1, 1), images.flip(3), images)
        return images

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, *self.params(images.shape[0], generator))


def alternating_flips(start: FlipFlags, epoch: int) -> FlipFlags:
    """Flip flags of images whose flip in epoch 0 was ``start``: flipped in every other epoch after that.

    Airbench's alternating flip (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds", sec. 3.6): with
    random flips an image is seen the same way round in two consecutive epochs half of the time;
    alternating shows both versions in any two consecutive epochs, which helps short runs most.
    """
    return start ^ bool(epoch % 2)
