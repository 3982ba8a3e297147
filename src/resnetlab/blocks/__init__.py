"""Residual blocks and their shortcuts; every block takes ``plain=`` for its plain twin."""

from .conv import BasicBlock, Bottleneck
from .fc import FCResidualBlock
from .preact import PreActBasicBlock, PreActBottleneck
from .residual import Residual, ResidualBlock
from .shortcuts import PadShortcut, make_shortcut, projection

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "FCResidualBlock",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "Residual",
    "ResidualBlock",
    "make_shortcut",
    "projection",
]
