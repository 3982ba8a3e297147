"""Dense connectivity (Huang et al. 2017, "Densely Connected Convolutional Networks").

Instead of adding a layer's output to its input, a dense layer *concatenates* it: layer ``l`` sees the
feature maps of every earlier layer of its block, ``x_l = H_l([x_0, ..., x_{l-1}])``, and adds
``growth_rate`` new channels. ``H_l`` is BN-ReLU-1x1 conv (the "B" bottleneck, to ``bn_size * k``
channels) then BN-ReLU-3x3 conv. Transition layers between blocks compress the channels (BN-ReLU-1x1
conv) and halve the resolution (2x2 average pool). Names are torchvision's (``denselayer1``, ``norm1``,
``conv1``, ...), so its checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv: ``growth_rate`` new feature maps."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)  # every earlier feature map of the block
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.drop(self.conv2(self.relu2(self.norm2(x))))


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the block outputs its input and every layer's maps, concatenated."""

    def __init__(
        self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN, ReLU, 1x1 conv to ``out_channels`` (compression), 2x2 average pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)
