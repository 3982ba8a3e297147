"""EfficientNet-B0 (Tan & Le 2019) with torchvision's layout, a CIFAR variant, and plain twins.

``features`` holds the stem (3x3 stride-2 conv, SiLU), seven stages of MBConv blocks and a 1x1 conv to
1280 channels; ``classifier`` is dropout and a linear layer. Stochastic depth on the residual branches
rises linearly from 0 to ``stochastic_depth_prob`` over the blocks. 5,288,548 parameters at 1000 classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..blocks.inverted import MBConv, conv_norm_act, make_divisible
from .base import Classifier, FeatureInfo, init_norm, initialise, linear_or_identity
from .registry import register_model, register_plain_twin

# (expansion, kernel, first stride, output channels, blocks) per stage: Tan & Le 2019, table 1.
B0_SETTING = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
# For 32x32 inputs: a stride-1 stem and second stage, so the last maps are 4x4 (not 1x1).
B0_CIFAR_SETTING = [(e, k, 1 if i == 1 else s, c, n) for i, (e, k, s, c, n) in enumerate(B0_SETTING)]


class EfficientNet(Classifier):
    """EfficientNet built from MBConv stages.

    Args:
        num_classes, in_chans: classifier outputs and input channels.
        width_mult, depth_mult: compound-scaling multipliers of widths and of blocks per stage.
        setting: the stage table; ``stem_stride`` the first convolution's stride.
        dropout: before the classifier.
        stochastic_depth_prob: drop probability of the last block's branch (0 for the first).
        plain: the plain twin: no block adds its input.
        zero_init_residual: start every block that has a shortcut as the identity.
        input_size: the (height, width) the network is meant for.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        *,
        setting: list[tuple[int, int, int, int, int]] | None = None,
        stem_stride: int = 2,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        plain: bool = False,
        zero_init_residual: bool = False,
        input_size: tuple[int, int] = (224, 224),
    ) -> None:
        super().__init__()
        rng_state = torch.get_rng_state()  # initialise() rewinds to it (same draws as the plain twin)
        if width_mult <= 0 or depth_mult <= 0:
            raise ValueError("width_mult and depth_mult must be positive")
        setting = setting or B0_SETTING
        self.plain = plain
        self.set_sizes(num_classes, in_chans)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        counts = [math.ceil(n * depth_mult) for *_, n in setting]
        total, index = sum(counts), 0
        channels = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [conv_norm_act(in_chans, channels, stride=stem_stride, activation=nn.SiLU)]
        stride = stem_stride
        self.stage_names, self.feature_info = [], []
        for (expand, kernel, first_stride, c, _), n in zip(setting, counts, strict=True):
            out = make_divisible(c * width_mult)
            blocks = []
            for i in range(n):
                # Huang et al. 2016's linear decay: shallow blocks are dropped least.
                drop = stochastic_depth_prob * index / total
                blocks.append(MBConv(channels, out, kernel, first_stride if i == 0 else 1, expand, drop, plain=plain))
                channels, index = out, index + 1
            stride *= first_stride
            layers.append(nn.Sequential(*blocks))
            self.stage_names.append(f"features.{len(layers) - 1}")
            self.feature_info.append(FeatureInfo(f"features.{len(layers) - 1}", channels, stride))
        self.num_features = 4 * channels  # 1280 for B0: the last stage's width times four
        layers.append(conv_norm_act(channels, self.num_features, kernel_size=1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout, inplace=True), linear_or_identity(self.num_features, num_classes)
        )
        initialise(self, _init_module, zero_init_residual, rng_state)

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.input_size)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[0](x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for _, blocks in self.stages():
            x = self.run_stage(blocks, x)
        return self.features[-1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)

    def reset_classifier(self, num_classes: int) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.classifier[-1] = linear_or_identity(self.num_features, num_classes)


def _init_module(module: nn.Module) -> None:
    # torchvision's EfficientNet initialisation.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        bound = 1.0 / math.sqrt(module.out_features)
        nn.init.uniform_(module.weight, -bound, bound)
        nn.init.zeros_(module.bias)
    else:
        init_norm(module)


@register_model
def efficientnet_b0(**kwargs: Any) -> EfficientNet:
    """EfficientNet-B0, ImageNet; 5.3M parameters."""
    return EfficientNet(**kwargs)


@register_model
def efficientnet_b0_cifar(**kwargs: Any) -> EfficientNet:
    """EfficientNet-B0 for 32x32 inputs (stride-1 stem and second stage), 10 classes; 4.0M parameters."""
    defaults = {"setting": B0_CIFAR_SETTING, "stem_stride": 1, "num_classes": 10, "input_size": (32, 32)}
    return EfficientNet(**{**defaults, **kwargs})


register_plain_twin("plain_efficientnet_b0", "efficientnet_b0")
register_plain_twin("plain_efficientnet_b0_cifar", "efficientnet_b0_cifar")
