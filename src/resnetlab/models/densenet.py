"""DenseNet (Huang et al. 2017): DenseNet-121 with torchvision's layout and the CIFAR DenseNet-BC.

A DenseNet has no additive shortcut to remove: its dense connections are concatenations that fix
every layer's input width, so it has no plain twin (``plain=True`` is refused).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..blocks.dense import DenseBlock, Transition
from .base import Classifier, FeatureInfo, init_norm, initialise, linear_or_identity
from .registry import register_model


class DenseNet(Classifier):
    """DenseNet-BC: dense blocks of bottleneck layers joined by compressing transitions.

    Args:
        growth_rate: k, the feature maps each layer adds.
        block_config: layers per dense block.
        num_init_features: the stem's output channels.
        bn_size: the bottleneck's width, in multiples of k.
        compression: the fraction of channels a transition keeps (theta; 0.5 for "-BC").
        drop_rate: dropout after each layer.
        stem: ``"imagenet"`` (7x7 stride-2 conv and max-pool) or ``"cifar"`` (one 3x3 conv).
        num_classes, in_chans, input_size: as for every model.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        *,
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_chans: int = 3,
        plain: bool = False,
        zero_init_residual: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if plain:
            raise ValueError("DenseNet has no shortcut to remove: its connections are concatenations (no plain twin)")
        if zero_init_residual:
            raise ValueError("DenseNet has no residual branches to zero")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        rng_state = torch.get_rng_state()
        self.plain = False
        self.set_sizes(num_classes, in_chans)
        side = 224 if stem == "imagenet" else 32
        self.input_size = (side, side) if input_size is None else (int(input_size[0]), int(input_size[1]))
        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
            ]
            stride = 4
        elif stem == "cifar":
            # Huang et al. 2017, sec. 3: one 3x3 convolution with 2k output channels before the first block.
            layers = [("conv0", nn.Conv2d(in_chans, num_init_features, 3, padding=1, bias=False))]
            stride = 1
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.stem_names = [name for name, _ in layers]
        channels = num_init_features
        self.stage_names, self.feature_info = [], []
        for i, n in enumerate(block_config):
            block = DenseBlock(n, channels, growth_rate, bn_size, drop_rate)
            layers.append((f"denseblock{i + 1}", block))
            channels = block.out_channels
            self.feature_info.append(FeatureInfo(f"features.denseblock{i + 1}", channels, stride))
            self.stage_names.append(f"features.denseblock{i + 1}")
            if i != len(block_config) - 1:
                out = int(channels * compression)
                layers.append((f"transition{i + 1}", Transition(channels, out)))
                channels, stride = out, stride * 2
        # Huang et al. end with BN; torchvision applies the ReLU in forward (the BN is "norm5").
        layers.append(("norm5", nn.BatchNorm2d(channels)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.num_features = channels
        self.classifier = linear_or_identity(channels, num_classes)
        initialise(self, _init_module, False, rng_state)

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.input_size)

    def stages(self) -> list[tuple[str, list[nn.Module]]]:
        """Each dense block, preceded by the transition that leads into it."""
        children = dict(self.features.named_children())
        out = []
        for i, name in enumerate(self.stage_names):
            modules = [children[f"transition{i}"]] if i else []
            out.append((name, [*modules, children[f"denseblock{i + 1}"]]))
        return out

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stem_names:
            x = getattr(self.features, name)(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for _, modules in self.stages():
            x = self.run_stage(modules, x)
        return torch.relu(self.features.norm5(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def reset_classifier(self, num_classes: int) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.classifier = linear_or_identity(self.num_features, num_classes)


def _init_module(module: nn.Module) -> None:
    # torchvision's DenseNet initialisation (He normal in fan-in mode).
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight)
    elif isinstance(module, nn.Linear):
        module.reset_parameters()
        nn.init.zeros_(module.bias)
    else:
        init_norm(module)


@register_model
def densenet121(**kwargs: Any) -> DenseNet:
    """DenseNet-121, ImageNet, k=32, blocks (6, 12, 24, 16); 8.0M parameters."""
    return DenseNet(**kwargs)


@register_model
def densenet_bc_100(**kwargs: Any) -> DenseNet:
    """DenseNet-BC (L=100, k=12), CIFAR: three blocks of 16 bottleneck layers; 0.8M parameters."""
    defaults = {
        "growth_rate": 12,
        "block_config": (16, 16, 16),
        "num_init_features": 24,
        "stem": "cifar",
        "num_classes": 10,
    }
    return DenseNet(**{**defaults, **kwargs})
