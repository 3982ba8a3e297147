"""ResNet: one class for the ImageNet networks, the paper's CIFAR networks and their pre-activation
and plain variants.

- ImageNet (He et al. 2015, Table 1): 7x7 stem and max-pool, four stages of 64..512 ``planes``.
  Module names and shapes are torchvision's, so its checkpoints load with ``strict=True``.
- CIFAR (He et al. 2015, sec. 4.2): a 3x3 stem, three stages of 16/32/64 filters on 32/16/8 maps,
  ``n`` basic blocks each (6n+2 layers), option A shortcuts:

  ========  ===  ==========  =====  ==========
  model     n    parameters  paper  MACs 32x32
  ========  ===  ==========  =====  ==========
  resnet20    3     269,722  0.27M      40.6M
  resnet32    5     464,154  0.46M      68.9M
  resnet44    7     658,586  0.66M      97.2M
  resnet56    9     853,018  0.85M     125.5M
  resnet110  18   1,727,962  1.7M      252.9M
  resnet1202 200 19,421,274  19.4M      2.83G
  ========  ===  ==========  =====  ==========

- Pre-activation (He et al. 2016): the same layout with pre-activation blocks; the stem is a bare
  convolution and the network ends with its own BN and ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..blocks.conv import BasicBlock, Bottleneck
from ..blocks.preact import PreActBasicBlock, PreActBottleneck
from ..blocks.residual import ResidualBlock
from ..blocks.shortcuts import NormLayer, ShortcutOption
from .base import Classifier, FeatureInfo, init_norm, initialise, linear_or_identity
from .registry import register_model, register_plain_twin

Stem = Literal["imagenet", "cifar"]


class ResNet(Classifier):
    """A residual network: stem, stages of blocks, global average pool, fully connected classifier.

    Args:
        block: the block class (``BasicBlock``, ``Bottleneck`` or a pre-activation block).
        layers: blocks per stage.
        widths: ``planes`` per stage; a stage outputs ``planes * block.expansion`` channels.
        num_classes: classifier outputs.
        in_chans: input channels.
        stem: ``"imagenet"`` (7x7 stride-2 conv and 3x3 stride-2 max-pool, for 224x224 inputs) or
            ``"cifar"`` (3x3 stride-1 conv, for 32x32 inputs).
        stem_width: the stem's output channels (default ``widths[0]``).
        shortcut: the paper's option ``"A"``, ``"B"`` or ``"C"`` (see ``blocks.shortcuts``).
        plain: build the plain twin: the same network without shortcuts.
        groups, width_per_group: ResNeXt cardinality and Wide-ResNet width (bottlenecks only).
        stride_in_1x1: put a bottleneck's stride on its first 1x1 conv (the paper's v1).
        zero_init_residual: start every block as its shortcut (``zero_init_last``).
        norm_layer: normalisation factory, ``BatchNorm2d`` by default; ``"none"`` builds the network
            without normalisation (every norm an identity), for the studies of what BN changes.
        input_size: the ``(height, width)`` the network is meant for (224 or 32 by the stem); the
            network itself takes any size, this sets ``default_input_size`` for summaries and export.
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: Stem = "imagenet",
        stem_width: int | None = None,
        shortcut: ShortcutOption = "B",
        plain: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | Literal["batch", "none"] | None = None,
        input_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} must pair up")
        if any(n < 1 for n in layers):
            raise ValueError(f"every stage needs at least one block, got layers={list(layers)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        rng_state = torch.get_rng_state()  # initialise() rewinds to it (same draws as the plain twin)
        if norm_layer == "none":
            norm_layer = no_norm
        elif norm_layer in (None, "batch"):
            norm_layer = nn.BatchNorm2d
        elif not callable(norm_layer):
            raise ValueError(f"norm_layer must be a callable, 'batch' or 'none', got {norm_layer!r}")
        stem_width = stem_width or widths[0]
        self.preact = bool(getattr(block, "preact", False))
        self.plain = plain
        self.stem_type = stem
        side = 224 if stem == "imagenet" else 32
        self.input_size = (side, side) if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.set_sizes(num_classes, in_chans)

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        # A pre-activation network normalises inside its first block instead (He et al. 2016, fig. 5).
        self.bn1 = None if self.preact else norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        stride = 4 if stem == "imagenet" else 1
        channels = stem_width
        self.stage_names = []
        self.feature_info = []
        for i, (depth, planes) in enumerate(zip(layers, widths, strict=True)):
            stage_stride = 1 if i == 0 else 2
            name = f"layer{i + 1}"
            stage = make_stage(
                block,
                channels,
                planes,
                depth,
                stage_stride,
                shortcut=shortcut,
                plain=plain,
                groups=groups,
                base_width=width_per_group,
                stride_in_1x1=stride_in_1x1,
                norm_layer=norm_layer,
            )
            self.add_module(name, stage)
            channels = planes * block.expansion
            stride *= stage_stride
            self.stage_names.append(name)
            self.feature_info.append(FeatureInfo(name, channels, stride))

        self.norm = norm_layer(channels) if self.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = channels
        self.fc = linear_or_identity(channels, num_classes)

        initialise(self, _init_module, zero_init_residual, rng_state)

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.input_size)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        return self.maxpool(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for name in self.stage_names:
            x = self.run_stage(getattr(self, name), x)
        if self.norm is not None:
            x = self.relu(self.norm(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


def no_norm(channels: int) -> nn.Module:
    """A normalisation slot left empty (a named function, so models built with it pickle)."""
    return nn.Identity()


def make_stage(
    block: type[ResidualBlock],
    in_channels: int,
    planes: int,
    depth: int,
    stride: int,
    **block_kwargs: Any,
) -> nn.Sequential:
    """``depth`` blocks; the first takes ``in_channels`` and ``stride``, the rest keep the shape."""
    out_channels = planes * block.expansion
    blocks = [block(in_channels, planes, stride, **block_kwargs)]
    blocks += [block(out_channels, planes, 1, **block_kwargs) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


def _init_module(module: nn.Module) -> None:
    # torchvision's scheme: He et al. 2015 ("Delving Deep into Rectifiers") normal init in fan-out
    # mode for convolutions, PyTorch's default for the classifier.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.Linear):
        module.reset_parameters()
    else:
        init_norm(module)


def _build(block: type[ResidualBlock], layers: Sequence[int], defaults: dict, kwargs: dict) -> ResNet:
    return ResNet(block, layers, **{**defaults, **kwargs})


# ImageNet ResNets (He et al. 2015, Table 1), Wide ResNets (Zagoruyko & Komodakis 2016, bottleneck
# widths doubled) and ResNeXt (Xie et al. 2017): torchvision's definitions and parameter counts.


@register_model
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18, ImageNet, basic blocks [2, 2, 2, 2]; 11.7M parameters."""
    return _build(BasicBlock, [2, 2, 2, 2], {}, kwargs)


@register_model
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34, ImageNet, basic blocks [3, 4, 6, 3]; 21.8M parameters."""
    return _build(BasicBlock, [3, 4, 6, 3], {}, kwargs)


@register_model
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50, ImageNet, bottlenecks [3, 4, 6, 3]; 25.6M parameters."""
    return _build(Bottleneck, [3, 4, 6, 3], {}, kwargs)


@register_model
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101, ImageNet, bottlenecks [3, 4, 23, 3]; 44.5M parameters."""
    return _build(Bottleneck, [3, 4, 23, 3], {}, kwargs)


@register_model
def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152, ImageNet, bottlenecks [3, 8, 36, 3]; 60.2M parameters."""
    return _build(Bottleneck, [3, 8, 36, 3], {}, kwargs)


@register_model
def wide_resnet50_2(**kwargs: Any) -> ResNet:
    """Wide ResNet-50-2, ImageNet, bottlenecks twice as wide inside; 68.9M parameters."""
    return _build(Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}, kwargs)


@register_model
def wide_resnet101_2(**kwargs: Any) -> ResNet:
    """Wide ResNet-101-2, ImageNet, bottlenecks twice as wide inside; 126.9M parameters."""
    return _build(Bottleneck, [3, 4, 23, 3], {"width_per_group": 128}, kwargs)


@register_model
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d, ImageNet, 32 groups of width 4; 25.0M parameters."""
    return _build(Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}, kwargs)


@register_model
def resnext101_32x8d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d, ImageNet, 32 groups of width 8; 88.8M parameters."""
    return _build(Bottleneck, [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}, kwargs)


# CIFAR ResNets (He et al. 2015, sec. 4.2) and pre-activation ResNets (He et al. 2016, sec. 5).

CIFAR_WIDTHS = (16, 32, 64)
_CIFAR_DEFAULTS = {"stem": "cifar", "num_classes": 10, "shortcut": "A"}


def cifar_resnet(depth: int, **kwargs: Any) -> ResNet:
    """The paper's CIFAR ResNet of any depth 6n+2: ``n`` basic blocks per stage, option A."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n] * 3, CIFAR_WIDTHS, **{**_CIFAR_DEFAULTS, **kwargs})


def preact_cifar_resnet(depth: int, bottleneck: bool, **kwargs: Any) -> ResNet:
    """Pre-activation CIFAR ResNet: basic blocks (6n+2 layers) or bottlenecks (9n+2 layers).

    Projection shortcuts (option B, a bare 1x1 conv) where the shape changes, as in He et al. 2016.
    """
    per_block = 3 if bottleneck else 2
    if depth < 3 * per_block + 2 or (depth - 2) % (3 * per_block):
        form = "9n+2" if bottleneck else "6n+2"
        raise ValueError(f"a pre-activation CIFAR ResNet with these blocks has {form} layers, got {depth}")
    n = (depth - 2) // (3 * per_block)
    block = PreActBottleneck if bottleneck else PreActBasicBlock
    defaults = {**_CIFAR_DEFAULTS, "shortcut": "B"}
    return ResNet(block, [n] * 3, CIFAR_WIDTHS, **{**defaults, **kwargs})


@register_model
def resnet_cifar(depth: int = 20, **kwargs: Any) -> ResNet:
    """CIFAR ResNet of any depth 6n+2 (depth=14, 26, ...), option A; resnet20 by default."""
    return cifar_resnet(depth, **kwargs)


@register_model
def resnet20(**kwargs: Any) -> ResNet:
    """ResNet-20, CIFAR, 3 basic blocks per stage; 0.27M parameters."""
    return cifar_resnet(20, **kwargs)


@register_model
def resnet32(**kwargs: Any) -> ResNet:
    """ResNet-32, CIFAR, 5 basic blocks per stage; 0.46M parameters."""
    return cifar_resnet(32, **kwargs)


@register_model
def resnet44(**kwargs: Any) -> ResNet:
    """ResNet-44, CIFAR, 7 basic blocks per stage; 0.66M parameters."""
    return cifar_resnet(44, **kwargs)


@register_model
def resnet56(**kwargs: Any) -> ResNet:
    """ResNet-56, CIFAR, 9 basic blocks per stage; 0.85M parameters."""
    return cifar_resnet(56, **kwargs)


@register_model
def resnet110(**kwargs: Any) -> ResNet:
    """ResNet-110, CIFAR, 18 basic blocks per stage; 1.7M parameters."""
    return cifar_resnet(110, **kwargs)


@register_model
def resnet1202(**kwargs: Any) -> ResNet:
    """ResNet-1202, CIFAR, 200 basic blocks per stage; 19.4M parameters."""
    return cifar_resnet(1202, **kwargs)


@register_model
def preact_resnet110(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-110, CIFAR, 18 basic blocks per stage; 1.7M parameters."""
    return preact_cifar_resnet(110, bottleneck=False, **kwargs)


@register_model
def preact_resnet164(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-164, CIFAR, 18 bottlenecks per stage; 1.7M parameters."""
    return preact_cifar_resnet(164, bottleneck=True, **kwargs)


@register_model
def preact_resnet1001(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-1001, CIFAR, 111 bottlenecks per stage; 10.3M parameters (10.2M without BN)."""
    return preact_cifar_resnet(1001, bottleneck=True, **kwargs)


for _depth in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202):
    register_plain_twin(f"plain{_depth}", f"resnet{_depth}")
