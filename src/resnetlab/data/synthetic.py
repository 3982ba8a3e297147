"""Random images and labels of any shape, for benchmarks and tests (nothing to learn)."""

from __future__ import annotations

import re

import torch

from ..errors import UserError
from .types import DataSource, ImageArray

DEFAULT_SPEC = (3, 32, 32, 10, 5000)


def parse_synthetic(spec: str) -> tuple[int, int, int, int, int]:
    """``synthetic[:CxHxW[:classes[:images]]]`` -> (C, H, W, classes, images)."""
    m = re.fullmatch(r"synthetic(?::(\d+)x(\d+)x(\d+))?(?::(\d+))?(?::(\d+))?", spec)
    if m is None:
        raise UserError(f"--data {spec!r}: write synthetic, synthetic:CxHxW, synthetic:CxHxW:CLASSES[:IMAGES]")
    values = [int(v) if v is not None else d for v, d in zip(m.groups(), DEFAULT_SPEC, strict=True)]
    if min(values) < 1 or values[3] < 2:
        raise UserError(f"--data {spec!r}: sizes must be positive and there must be at least 2 classes")
    return tuple(values)  # type: ignore[return-value]


def load_synthetic(spec: str, seed: int = 0) -> DataSource:
    c, h, w, classes, n = parse_synthetic(spec)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return DataSource(
        name=f"synthetic:{c}x{h}x{w}:{classes}:{n}",
        classes=[f"class_{i}" for i in range(classes)],
        splits={"train": ImageArray(images, labels)},
    )
