"""Inverted residuals: MobileNetV2's block (Sandler et al. 2018) and EfficientNet's MBConv (Tan & Le
2019), which adds squeeze-and-excitation (Hu et al. 2018) and stochastic depth (Huang et al. 2016).

The residual branch expands the channels with a 1x1 convolution, filters each channel with a
depthwise 3x3 (or 5x5), and projects back with a *linear* 1x1 (no activation: Sandler et al. sec. 3.2
show that a ReLU there destroys information in the narrow layer). The shortcut exists only where the
block keeps the shape (stride 1, same width); nothing follows the addition. Attribute names are
torchvision's (``conv``; ``block``, ``stochastic_depth``), so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .residual import ResidualBlock

Activation = Callable[[], nn.Module]


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    activation: Activation | None = nn.ReLU6,
) -> nn.Sequential:
    """Convolution (no bias), batch norm and an optional activation, as indices 0, 1, 2."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width to a multiple of ``divisor``, never more than 10% below ``value`` (the rule of
    the MobileNet reference code, which keeps widths friendly to hardware)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(ResidualBlock):
    """MobileNetV2's block: 1x1 expansion (unless ``expand_ratio == 1``), 3x3 depthwise, linear 1x1
    projection, each with BN; ReLU6 after the first two; the input is added where shapes agree."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, *, plain: bool = False
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.plain = plain
        self.stride = stride
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_norm_act(in_channels, hidden, kernel_size=1))
        layers += [
            conv_norm_act(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    @property
    def has_shortcut(self) -> bool:
        return self.use_res_connect and not self.plain

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def post_activation(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.has_shortcut:
            out = out + x
        return out


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): pool, squeeze (1x1 conv), SiLU, excite (1x1 conv), sigmoid,
    and scale the input's channels by the result."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (Huang et al. 2016): in training, each sample's branch
    is dropped with probability ``p`` and kept ones are scaled by ``1 / (1 - p)``; in eval, identity."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"drop probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1 - self.p).div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MBConv(ResidualBlock):
    """EfficientNet's block: 1x1 expansion, k x k depthwise, squeeze-and-excitation (squeezing to a
    quarter of the block's *input* width), linear 1x1 projection; SiLU activations; stochastic depth
    on the branch where the input is added."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_path: float = 0.0,
        *,
        plain: bool = False,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.plain = plain
        self.use_res_connect = stride == 1 and in_channels == out_channels
        hidden = make_divisible(in_channels * expand_ratio)
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers.append(conv_norm_act(in_channels, hidden, kernel_size=1, activation=nn.SiLU))
        layers += [
            conv_norm_act(hidden, hidden, kernel_size, stride, groups=hidden, activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, in_channels // 4)),
            conv_norm_act(hidden, out_channels, kernel_size=1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = DropPath(drop_path)

    @property
    def has_shortcut(self) -> bool:
        return self.use_res_connect and not self.plain

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def post_activation(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.has_shortcut:
            out = self.stochastic_depth(out) + x
        return out
