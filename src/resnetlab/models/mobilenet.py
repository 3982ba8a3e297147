"""MobileNetV2 (Sandler et al. 2018) with torchvision's layout, a CIFAR variant, and plain twins.

``features`` holds the stem (3x3 stride-2 conv), 17 inverted residual blocks and a 1x1 conv to 1280
channels; ``classifier`` is dropout and a linear layer. 3,504,872 parameters at 1000 classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..blocks.inverted import InvertedResidual, conv_norm_act, make_divisible
from .base import Classifier, FeatureInfo, init_norm, initialise, linear_or_identity
from .registry import register_model, register_plain_twin

# (expansion t, output channels c, blocks n, first stride s) per stage: Sandler et al. 2018, table 2.
IMAGENET_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# For 32x32 inputs the stem and the second stage keep the resolution (strides 1), so the last maps are
# 4x4 as the ImageNet model's are 7x7 (the usual CIFAR adaptation).
CIFAR_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(Classifier):
    """MobileNetV2.

    Args:
        num_classes, in_chans: classifier outputs and input channels.
        width_mult: multiplies every width (rounded to multiples of 8).
        setting: the (t, c, n, s) stage table; ``stem_stride`` the first convolution's stride.
        dropout: before the classifier.
        plain: the plain twin: no block adds its input.
        zero_init_residual: start every block that has a shortcut as the identity.
        input_size: the (height, width) the network is meant for.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        *,
        setting: list[tuple[int, int, int, int]] | None = None,
        stem_stride: int = 2,
        dropout: float = 0.2,
        plain: bool = False,
        zero_init_residual: bool = False,
        input_size: tuple[int, int] = (224, 224),
    ) -> None:
        super().__init__()
        rng_state = torch.get_rng_state()  # initialise() rewinds to it (same draws as the plain twin)
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        setting = setting or IMAGENET_SETTING
        self.plain = plain
        self.set_sizes(num_classes, in_chans)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        channels = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_norm_act(in_chans, channels, stride=stem_stride)]
        strides = [stem_stride]
        for t, c, n, s in setting:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t, plain=plain))
                channels = out
                strides.append(strides[-1] * (s if i == 0 else 1))
        layers.append(conv_norm_act(channels, self.num_features, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), linear_or_identity(self.num_features, num_classes))
        # A stage runs from one resolution change to the next (timm's feature stages for this net).
        last = len(layers) - 2
        starts = [1] + [i for i in range(2, last + 1) if layers[i].stride == 2]
        self._stage_bounds = list(zip(starts, [*starts[1:], last + 1], strict=True))
        self.stage_names = [f"stage{i + 1}" for i in range(len(starts))]
        self.feature_info = [
            FeatureInfo(f"features.{b - 1}", layers[b - 1].conv[-1].num_features, strides[b - 1])
            for _, b in self._stage_bounds
        ]
        initialise(self, _init_module, zero_init_residual, rng_state)

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.input_size)

    def stages(self) -> list[tuple[str, list[nn.Module]]]:
        blocks = list(self.features)
        return [(name, blocks[a:b]) for name, (a, b) in zip(self.stage_names, self._stage_bounds, strict=True)]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[0](x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for _, blocks in self.stages():
            x = self.run_stage(blocks, x)
        return self.features[-1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def reset_classifier(self, num_classes: int) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.classifier[-1] = linear_or_identity(self.num_features, num_classes)


def _init_module(module: nn.Module) -> None:
    # torchvision's MobileNetV2 initialisation.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0, 0.01)
        nn.init.zeros_(module.bias)
    else:
        init_norm(module)


@register_model
def mobilenet_v2(**kwargs: Any) -> MobileNetV2:
    """MobileNetV2, ImageNet, width 1.0; 3.5M parameters."""
    return MobileNetV2(**kwargs)


@register_model
def mobilenet_v2_cifar(**kwargs: Any) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs (stride-1 stem and second stage), 10 classes; 2.2M parameters."""
    defaults = {"setting": CIFAR_SETTING, "stem_stride": 1, "num_classes": 10, "input_size": (32, 32)}
    return MobileNetV2(**{**defaults, **kwargs})


register_plain_twin("plain_mobilenet_v2", "mobilenet_v2")
register_plain_twin("plain_mobilenet_v2_cifar", "mobilenet_v2_cifar")
