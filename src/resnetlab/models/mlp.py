"""A residual multilayer perceptron built from the fully connected block, and its plain twin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..blocks.fc import FCNorm, FCResidualBlock, fc_norm
from .base import Classifier, FeatureInfo, init_norm, initialise, linear_or_identity
from .registry import register_model, register_plain_twin


class ResidualMLP(Classifier):
    """Flatten, ``stem`` (linear to ``width``, ReLU), ``depth // 2`` residual blocks, ``fc``.

    Args:
        depth: hidden layers inside the residual blocks, two per block (an even number >= 2).
        width: the width of every hidden layer.
        num_classes: classifier outputs.
        in_chans, input_size: the input's channels and ``(height, width)``; flattened on entry.
        norm: ``None``, ``"batch"`` or ``"layer"`` normalisation before each activation.
        plain: the plain twin (no shortcuts).
        zero_init_residual: start every block as the identity.

    Linear layers keep PyTorch's default initialisation, the one a tutorial's MLP gets.
    """

    def __init__(
        self,
        depth: int = 8,
        width: int = 64,
        *,
        num_classes: int = 10,
        in_chans: int = 1,
        input_size: Sequence[int] = (8, 8),
        norm: FCNorm = None,
        plain: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth < 2 or depth % 2:
            raise ValueError(f"depth counts hidden layers, two per block: an even number >= 2, got {depth}")
        if width < 1 or len(input_size) != 2:
            raise ValueError(f"need width >= 1 and input_size=(h, w), got {width} and {input_size}")
        rng_state = torch.get_rng_state()  # initialise() rewinds to it (same draws as the plain twin)
        self.plain = plain
        self.set_sizes(num_classes, in_chans)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.num_features = width

        self.flatten = nn.Flatten()
        self.stem = nn.Linear(in_chans * self.input_size[0] * self.input_size[1], width)
        self.stem_norm = fc_norm(norm, width)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(*[FCResidualBlock(width, norm=norm, plain=plain) for _ in range(depth // 2)])
        self.fc = linear_or_identity(width, num_classes)
        self.stage_names = ["blocks"]
        self.feature_info = [FeatureInfo("blocks", width, 1)]

        initialise(self, _init_module, zero_init_residual, rng_state)

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.input_size)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        # The stem flattens: a wrong image size would otherwise surface as a matrix shape mismatch.
        if tuple(x.shape[1:]) != (self.in_chans, *self.input_size):
            raise ValueError(
                f"expected inputs of shape (N, {self.in_chans}, {self.input_size[0]}, {self.input_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        return self.relu(self.stem_norm(self.stem(self.flatten(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        return self.run_stage(self.blocks, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.reset_parameters()
    else:
        init_norm(module)


@register_model
def residual_mlp(**kwargs: Any) -> ResidualMLP:
    """Residual MLP for 8x8 digits: 8 hidden layers (4 blocks) of width 64."""
    return ResidualMLP(**kwargs)


register_plain_twin("plain_mlp", "residual_mlp")
