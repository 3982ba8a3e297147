"""The surface every resnetlab model shares, and the pieces of it that do not depend on the model.

Following timm: ``forward = forward_head(forward_features(x))``; ``reset_classifier(n)``;
``feature_info`` naming each stage's output with its channels and stride; ``forward_intermediates``;
``set_grad_checkpointing``. A model defines ``forward_stem``, ``forward_features``,
``forward_head``, ``stage_names`` and its classifier ``fc``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks.residual import NORM_TYPES, ResidualBlock


@dataclass(frozen=True)
class FeatureInfo:
    """One intermediate feature: the module that outputs it, its channels and its stride."""

    module: str
    channels: int
    stride: int


def linear_or_identity(features: int, num_classes: int) -> nn.Module:
    """The classifier layer: a linear map to ``num_classes`` outputs, or none for 0 (features out)."""
    return nn.Linear(features, num_classes) if num_classes else nn.Identity()


class Classifier(nn.Module):
    """Base class: shared forward, classifier reset, intermediates and gradient checkpointing."""

    num_classes: int
    num_features: int
    in_chans: int
    plain: bool
    feature_info: list[FeatureInfo]
    stage_names: list[str]
    fc: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks_per_segment: int | None = None

    def set_sizes(self, num_classes: int, in_chans: int) -> None:
        """Check and store the class count (0: no classifier, the head returns the pooled features, as
        after ``reset_classifier(0)``) and the input channels."""
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"need num_classes >= 0 and in_chans >= 1, got {num_classes} and {in_chans}")
        self.num_classes, self.in_chans = num_classes, in_chans

    @property
    def default_input_size(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the inputs the model was designed for."""
        raise NotImplementedError

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.fc = linear_or_identity(self.num_features, num_classes)

    def residual_blocks(self) -> list[ResidualBlock]:
        """Every residual block, in forward order."""
        return [m for m in self.modules() if isinstance(m, ResidualBlock)]

    def set_grad_checkpointing(self, enable: bool = True, blocks_per_segment: int | None = None) -> None:
        """Recompute activations in the backward pass instead of storing them.

        Each stage is cut into segments of ``blocks_per_segment`` blocks (default: the square root of
        the stage's length); only each segment's input is stored, and one segment's activations are
        rebuilt at a time, so memory grows with the square root of depth (Chen et al. 2016, "Training
        Deep Nets with Sublinear Memory Cost") at the cost of a second forward pass.
        """
        if blocks_per_segment is not None and blocks_per_segment < 1:
            raise ValueError(f"blocks_per_segment must be >= 1, got {blocks_per_segment}")
        self.grad_checkpointing = enable
        self.blocks_per_segment = blocks_per_segment

    def stages(self) -> list[tuple[str, list[nn.Module]]]:
        """The stages named in ``feature_info``, each as its list of modules in forward order."""
        return [(name, list(self.get_submodule(name))) for name in self.stage_names]

    def run_stage(self, stage: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """Run a stage's modules, with gradient checkpointing when it is on and the model trains."""
        blocks = list(stage)
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            for block in blocks:
                x = block(x)
            return x
        size = self.blocks_per_segment or max(1, round(math.sqrt(len(blocks))))
        for start in range(0, len(blocks), size):
            segment = nn.Sequential(*blocks[start : start + size])
            x = checkpoint(segment, x, use_reentrant=False, context_fn=_recompute_keeps_norm_stats(segment))
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None) -> list[torch.Tensor]:
        """The outputs of the stages named in ``feature_info``, in forward order: all of them, those at
        ``indices`` (negative ones count from the last stage), or the last ``n`` for an int (as timm)."""
        stages = self.stages()
        n = len(stages)
        if indices is None:
            wanted = set(range(n))
        elif isinstance(indices, int):
            if not 0 <= indices <= n:
                raise IndexError(f"cannot take the last {indices} of {n} stages")
            wanted = set(range(n - indices, n))
        else:
            for i in indices:
                if not -n <= i < n:
                    raise IndexError(f"feature index {i} out of range for {n} stages")
            wanted = {i % n for i in indices}
        if not wanted:
            return []
        out = []
        x = self.forward_stem(x)
        for i, (_, modules) in enumerate(stages):
            if i > max(wanted):
                break
            x = self.run_stage(modules, x)
            if i in wanted:
                out.append(x)
        return out


def _recompute_keeps_norm_stats(segment: nn.Module) -> Callable[[], tuple]:
    """Context for ``checkpoint``: the recomputation must not update batch-norm running statistics.

    Recomputing a segment in training mode runs its BN layers a second time on the same batch, which
    would apply the running-average update twice (momentum 0.1 becoming 0.19). Their buffers are
    saved before the recomputation and put back after it.
    """

    @contextlib.contextmanager
    def restore_stats() -> Iterator[None]:
        saved = [
            (buf, buf.clone())
            for m in segment.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            for buf in m.buffers(recurse=False)
        ]
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, value in saved:
                    buf.copy_(value)

    return lambda: (contextlib.nullcontext(), restore_stats())


def initialise(
    model: nn.Module,
    init_module: Callable[[nn.Module], None],
    zero_init_residual: bool,
    rng_state: torch.Tensor,
) -> None:
    """Initialise every module with ``init_module``, branches first and shortcuts last.

    A network and its plain twin (which lacks the shortcut projections) must draw the same random
    numbers for every module they share, so that with the same seed their common parameters are
    equal. So the random generator is first rewound to ``rng_state``, taken before the modules were
    built (discarding the draws of their constructors), and shortcut projections come last.
    """
    torch.set_rng_state(rng_state)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    shortcut = [m for b in blocks for s in b.shortcut_modules() for m in s.modules()]
    in_shortcut = {id(m) for m in shortcut}
    for module in [m for m in model.modules() if id(m) not in in_shortcut] + shortcut:
        init_module(module)
    if zero_init_residual:
        if getattr(model, "plain", False):
            raise ValueError(
                "zero_init_residual=True needs shortcuts: in a plain network every block would start by outputting zero"
            )
        # Only blocks with a shortcut: one without (a stride or width change in MobileNetV2 and
        # EfficientNet) would output zero whatever its input, and so would the whole network.
        for block in blocks:
            if block.has_shortcut:
                block.zero_init_last()


def init_norm(module: nn.Module) -> bool:
    """Unit scale and zero shift for a normalisation layer; returns whether ``module`` was one."""
    if isinstance(module, NORM_TYPES):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        return True
    return False
