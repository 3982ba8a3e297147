"""scikit-learn's bundled 8x8 handwritten digits (1,797 images of 10 classes): real data, no download."""

from __future__ import annotations

import torch

from .types import DataSource, ImageArray


def load_digits() -> DataSource:
    """The UCI optical-recognition digits as uint8 images of shape (1, 8, 8).

    The original pixel values are counts 0..16 of a 4x4 block; they are scaled to 0..255 (x 255/16,
    rounded) so every data set enters the network as uint8 images.
    """
    from sklearn.datasets import load_digits as sk_load_digits  # imported here: slow to import

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images).mul(255 / 16).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target).long()
    return DataSource(
        name="digits",
        classes=[str(c) for c in bunch.target_names.tolist()],
        splits={"train": ImageArray(images.unsqueeze(1).contiguous(), labels)},
    )
