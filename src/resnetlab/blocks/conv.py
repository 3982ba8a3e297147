"""The convolutional blocks of He et al. 2015: ``BasicBlock`` (two 3x3) and ``Bottleneck`` (1x1, 3x3, 1x1).

Attribute names are torchvision's (``conv1..3``, ``bn1..3``, ``downsample``) because they are the
checkpoint keys: a torchvision ``state_dict`` loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .residual import ResidualBlock
from .shortcuts import NormLayer, ShortcutOption, make_shortcut


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(ResidualBlock):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, add the shortcut, ReLU. Output width ``planes``."""

    expansion = 1

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
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        if stride_in_1x1:
            raise ValueError("BasicBlock has no 1x1 convolution to put the stride on")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.plain = plain
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = None if plain else make_shortcut(shortcut, in_channels, planes, stride, norm_layer)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if not self.plain:
            out = out + self.shortcut(x)
        return self.relu(out)


class Bottleneck(ResidualBlock):
    """1x1 conv (reduce), 3x3 conv, 1x1 conv (expand x4), each with BN; add, ReLU.

    The stride sits on the 3x3 convolution by default, torchvision's "ResNet v1.5", which is about
    0.5% more accurate on ImageNet than the paper's stride on the first 1x1 (NVIDIA's
    DeepLearningExamples); ``stride_in_1x1=True`` gives the paper's v1. ``groups`` and
    ``base_width`` give ResNeXt (Xie et al. 2017) and Wide ResNet (Zagoruyko & Komodakis 2016).
    """

    expansion = 4

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
        self.conv1 = conv1x1(in_channels, width, stride if stride_in_1x1 else 1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, 1 if stride_in_1x1 else stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None if plain else make_shortcut(shortcut, in_channels, out_channels, stride, norm_layer)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if not self.plain:
            out = out + self.shortcut(x)
        return self.relu(out)
