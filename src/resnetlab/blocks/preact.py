"""Pre-activation blocks (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Each layer is BN, ReLU, conv, and nothing follows the addition, so the shortcut path from any block
to any later one is a pure identity (eq. 4 of the paper); a network of these blocks ends with its own
BN and ReLU before pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from .conv import conv1x1, conv3x3
from .residual import ResidualBlock
from .shortcuts import NormLayer, PadShortcut, ShortcutOption, make_shortcut


class _PreActBlock(ResidualBlock):
    """Shortcut handling shared by the pre-activation blocks.

    A projection shortcut (options B and C) sees the pre-activated input, "before splitting into two
    paths" (He et al. 2016, appendix), and has no normalisation of its own: the next block's first BN
    normalises the sum. A parameter-free shortcut (option A) sees ``x`` itself, keeping the identity
    path clean.
    """

    def _make_shortcut(
        self, option: ShortcutOption, in_channels: int, out_channels: int, stride: int, plain: bool
    ) -> None:
        self.downsample = None if plain else make_shortcut(option, in_channels, out_channels, stride, None)

    def _shortcut_from(self, x: torch.Tensor, preact: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return x
        if isinstance(self.downsample, PadShortcut):
            return self.downsample(x)
        return self.downsample(preact)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self._shortcut_from(x, self.relu(self.bn1(x)))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self._branch(self.relu(self.bn1(x)))

    def _branch(self, preact: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.bn1(x))
        out = self._branch(preact)
        if not self.plain:
            out = out + self._shortcut_from(x, preact)
        return out


class PreActBasicBlock(_PreActBlock):
    """BN, ReLU, 3x3 conv, BN, ReLU, 3x3 conv; add the shortcut. Output width ``planes``."""

    expansion = 1
    preact = True

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: ShortcutOption = "B",
        plain: bool = False,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock supports only groups=1 and base_width=64")
        if stride_in_1x1:
            raise ValueError("PreActBasicBlock has no 1x1 convolution to put the stride on")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.plain = plain
        self.bn1 = norm_layer(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self._make_shortcut(shortcut, in_channels, planes, stride, plain)

    def _branch(self, preact: torch.Tensor) -> torch.Tensor:
        out = self.conv1(preact)
        return self.conv2(self.relu(self.bn2(out)))


class PreActBottleneck(_PreActBlock):
    """BN, ReLU, 1x1 conv; BN, ReLU, 3x3 conv; BN, ReLU, 1x1 conv (x4); add the shortcut."""

    expansion = 4
    preact = True

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: ShortcutOption = "B",
        plain: bool = False,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        out_channels = planes * self.expansion
        self.plain = plain
        self.bn1 = norm_layer(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_channels, width, stride if stride_in_1x1 else 1)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, 1 if stride_in_1x1 else stride, groups)
        self.bn3 = norm_layer(width)
        self.conv3 = conv1x1(width, out_channels)
        self._make_shortcut(shortcut, in_channels, out_channels, stride, plain)

    def _branch(self, preact: torch.Tensor) -> torch.Tensor:
        out = self.conv1(preact)
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.relu(self.bn3(out)))
