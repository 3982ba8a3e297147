"""The inference path: batch norm folded into the convolutions, channels_last, optionally compiled.

In eval mode a batch norm is an affine map per channel, so ``BN(conv(x))`` is one convolution with
rescaled weights and a bias: folding removes a pass over every activation. PyTorch's FX pass
``torch.fx.experimental.optimization.fuse`` does the folding on the traced graph.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

Mode = Literal["eager", "fold", "compile"]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BN that follows a convolution folded into it.

    The result is a ``torch.fx.GraphModule``: same outputs up to float rounding, fewer operations.
    """
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval(), inplace=True)


def prepare_inference(model: nn.Module, mode: Mode = "fold", channels_last: bool = True) -> nn.Module:
    """``model`` made ready for fast inference on this machine.

    ``eager``: as is, in eval mode; ``fold``: BN folded; ``compile``: folded and ``torch.compile``d (a
    one-off compilation of tens of seconds, then faster calls where the compiler fuses element-wise
    work). ``channels_last`` stores weights and activations in NHWC, which oneDNN's CPU and cuDNN's GPU
    convolutions prefer.
    """
    if mode not in ("eager", "fold", "compile"):
        raise ValueError(f"mode must be eager, fold or compile, got {mode!r}")
    out = copy.deepcopy(model).eval() if mode == "eager" else fold_batchnorm(model)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    if mode == "compile":
        # Inductor's freezing treats the weights as constants: it folds them into the graph and prepacks
        # them for oneDNN's convolutions (the CPU inference recipe of PyTorch's inductor docs). On this
        # machine it took resnet50 at batch 1 from about 60 to 42-44 ms (benchmarks/suite.py).
        out = _FreezingCompiled(out)
    return out


class _FreezingCompiled(nn.Module):
    """``torch.compile(model)`` whose compilations run with inductor's ``freezing`` on.

    Compilation happens at the first call of each new input shape, so the setting must be in force
    there, not at ``torch.compile``; patching it per call leaves the process's global config alone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model)  # holds ``model`` as ``_orig_mod``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)
