"""Residual blocks and their shortcuts; every block takes ``plain=`` for its plain twin."""

from .conv import BasicBlock, Bottleneck
from .dense import DenseBlock, DenseLayer, Transition
from .fc import FCResidualBlock
from .inverted import DropPath, InvertedResidual, MBConv, SqueezeExcitation
from .preact import PreActBasicBlock, PreActBottleneck
from .residual import Residual, ResidualBlock
from .shortcuts import PadShortcut, make_shortcut, projection

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DenseBlock",
    "DenseLayer",
    "DropPath",
    "FCResidualBlock",
    "InvertedResidual",
    "MBConv",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "Residual",
    "ResidualBlock",
    "SqueezeExcitation",
    "Transition",
    "make_shortcut",
    "projection",
]
