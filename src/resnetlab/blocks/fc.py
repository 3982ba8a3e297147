"""The fully connected residual block, written as the ResNet tutorials write it."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .residual import ResidualBlock

FCNorm = Literal["batch", "layer", "none"] | None


def fc_norm(kind: FCNorm, width: int) -> nn.Module:
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise ValueError(f"norm must be 'batch', 'layer' or 'none', got {kind!r}")


class FCResidualBlock(ResidualBlock):
    """Two linear layers of equal width with an identity shortcut::

        z1 = W1 a + b1;  a1 = ReLU(z1);  z2 = W2 a1 + b2;  out = ReLU(z2 + a)

    With ``norm`` set, ``z1`` and ``z2`` are normalised before their activations. With ``W2 = 0,
    b2 = 0`` (and no norm) the block returns ``ReLU(a)``, which is ``a`` itself for ``a >= 0``, the
    output of any earlier ReLU.
    """

    def __init__(self, width: int, *, norm: FCNorm = None, plain: bool = False) -> None:
        super().__init__()
        self.plain = plain
        self.fc1 = nn.Linear(width, width)
        self.norm1 = fc_norm(norm, width)
        self.fc2 = nn.Linear(width, width)
        self.norm2 = fc_norm(norm, width)
        self.relu = nn.ReLU()

    def residual(self, a: torch.Tensor) -> torch.Tensor:
        z1 = self.norm1(self.fc1(a))
        a1 = self.relu(z1)
        return self.norm2(self.fc2(a1))  # z2

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z2 = self.residual(a)
        if not self.plain:
            z2 = z2 + a
        return self.relu(z2)

    def extra_repr(self) -> str:
        return "plain=True" if self.plain else ""
