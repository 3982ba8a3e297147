"""Shortcut connections, named by the options of He et al. 2015 ("Deep Residual Learning", sec. 4.1).

- **A**: identity; where the shape changes, a parameter-free subsample plus zero-padding of the new
  channels (:class:`PadShortcut`).
- **B**: identity; where the shape changes, a projection (1x1 convolution, then normalisation).
- **C**: a projection on every block.

:func:`make_shortcut` returns ``None`` for the identity, so a block's ``downsample`` attribute is
``None`` exactly when its shortcut is ``x`` itself (torchvision's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ShortcutOption = Literal["A", "B", "C"]
SHORTCUT_OPTIONS: tuple[str, ...] = ("A", "B", "C")
NormLayer = Callable[[int], nn.Module]


class PadShortcut(nn.Module):
    """Option A where the shape changes: take every ``stride``-th pixel, then zero-pad the channels.

    The new channels are split between both ends (as in the widely used CIFAR reimplementation
    ``akamaster/pytorch_resnet_cifar10``, so its checkpoints give the same outputs). The module has no
    parameters and, unlike a lambda, pickles and shows itself in ``print(model)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option A pads channels and cannot shrink them ({in_channels} -> {out_channels}); "
                "use shortcut='B' or 'C'"
            )
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            front = extra // 2
            x = F.pad(x, (0, 0, 0, 0, front, extra - front))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def projection(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer | None) -> nn.Sequential:
    """A 1x1 convolution (no bias), followed by ``norm_layer`` unless it is ``None``.

    The modules sit at indices 0 and 1 so the keys are torchvision's ``downsample.0`` / ``.1``.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    return nn.Sequential(*layers)


def make_shortcut(
    option: ShortcutOption,
    in_channels: int,
    out_channels: int,
    stride: int,
    norm_layer: NormLayer | None,
) -> nn.Module | None:
    """The shortcut module for a block, or ``None`` when it is the identity.

    ``norm_layer=None`` gives projections without normalisation, as pre-activation blocks use them
    (the next block's first BN normalises the sum).
    """
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut must be one of {SHORTCUT_OPTIONS}, got {option!r}")
    same_shape = stride == 1 and in_channels == out_channels
    if option == "C":
        return projection(in_channels, out_channels, stride, norm_layer)
    if same_shape:
        return None
    if option == "A":
        return PadShortcut(in_channels, out_channels, stride)
    return projection(in_channels, out_channels, stride, norm_layer)
