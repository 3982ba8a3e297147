"""The residual form shared by every block, and a wrapper that gives it to any branch module.

A residual block computes ``y = post_act(F(x) + shortcut(x))`` (He et al. 2015, eq. 1): the branch
``F`` learns the residual ``H(x) - x``, so ``F = 0`` makes the block its shortcut. Its *plain twin*
(``plain=True``) computes ``y = post_act(F(x))`` with the same branch modules, names and
initialisation; only the shortcut's own modules are absent. The twin is the control in every
experiment: it differs from the residual network by the missing additions and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class ResidualBlock(nn.Module):
    """Base class of every block: holds ``plain`` and the shortcut interface.

    Subclasses store their shortcut module (``None`` for the identity) and write ``forward`` in the
    paper's order, adding ``self.shortcut(x)`` unless ``self.plain``.
    """

    plain: bool
    preact: bool = False  # True for blocks that end at the addition (the network then ends in BN-ReLU)

    @property
    def has_shortcut(self) -> bool:
        """Whether the block adds a shortcut to its branch (never in a plain twin)."""
        return not self.plain

    def shortcut_modules(self) -> list[nn.Module]:
        """The modules that belong to the shortcut (empty for the identity and for plain blocks)."""
        module = getattr(self, "downsample", None)
        return [] if module is None else [module]

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        module = getattr(self, "downsample", None)
        return x if module is None else module(x)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The branch ``F(x)``: what the block adds to its shortcut."""
        raise NotImplementedError

    def post_activation(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the addition: a ReLU in the original blocks, nothing in pre-activation ones."""
        return x if self.preact else torch.relu(x)

    def zero_init_last(self) -> None:
        """Zero the branch's last normalisation weight (and shift) so the block is its shortcut.

        Goyal et al. 2017 ("Accurate, Large Minibatch SGD", sec. 5.1) found this helps large-batch
        training. A block without a shortcut (any block of a plain twin; in MobileNetV2 and EfficientNet
        also those that change the stride or the width) has nothing to fall back to: it would output
        ``post_act(0)`` whatever its input.
        """
        if not self.has_shortcut:
            raise ValueError(
                f"{type(self).__name__}: zero_init_last() on a block without a shortcut would zero its "
                "output (there is no shortcut to fall back to)"
            )
        zero_last_layer(self.branch_modules())

    def branch_modules(self) -> list[nn.Module]:
        """The branch's modules in forward order (excluding the shortcut)."""
        skip = {id(m) for s in self.shortcut_modules() for m in s.modules()}
        return [m for m in self.modules() if m is not self and id(m) not in skip]


def zero_last_layer(modules: list[nn.Module]) -> None:
    """Zero the weight (and shift) of the last normalisation layer in ``modules``.

    Without one, zero the weight and bias of the last layer that has a weight, which equally makes the
    branch output zero when nothing after it adds a constant.
    """
    norms = [m for m in modules if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None]
    if norms:
        # The shift too: zero at initialisation anyway, but in a trained block it would remain as F(x).
        nn.init.zeros_(norms[-1].weight)
        if norms[-1].bias is not None:
            nn.init.zeros_(norms[-1].bias)
        return
    weighted = [m for m in modules if isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not weighted:
        raise ValueError("the residual branch has no layer with a weight to zero")
    nn.init.zeros_(weighted[-1].weight)
    if getattr(weighted[-1], "bias", None) is not None:
        nn.init.zeros_(weighted[-1].bias)


class Residual(ResidualBlock):
    """``y = post_act(branch(x) + skip(x))`` for any ``branch`` module.

    Args:
        branch: computes the residual ``F(x)``; its output must have the shortcut's shape.
        skip: the shortcut module; ``None`` means the identity.
        post_act: applied after the addition (``None``: nothing, as in pre-activation blocks).
        plain: drop the shortcut term; ``skip`` is then not registered (its parameters are absent,
            as in the paper's plain networks).
    """

    def __init__(
        self,
        branch: nn.Module,
        skip: nn.Module | None = None,
        post_act: nn.Module | None = None,
        *,
        plain: bool = False,
    ) -> None:
        super().__init__()
        self.plain = plain
        self.branch = branch
        self.skip = None if plain else skip
        self.post_act = nn.Identity() if post_act is None else post_act

    def shortcut_modules(self) -> list[nn.Module]:
        return [] if self.skip is None else [self.skip]

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skip is None else self.skip(x)

    def branch_modules(self) -> list[nn.Module]:
        return list(self.branch.modules())

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x)

    def post_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if not self.plain:
            out = out + self.shortcut(x)
        return self.post_act(out)

    def extra_repr(self) -> str:
        return "plain=True" if self.plain else ""
