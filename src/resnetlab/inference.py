"""The inference path: batch norm folded into the convolutions, channels_last, optionally compiled.

In eval mode a batch norm is an affine map per channel, so ``BN(conv(x))`` is one convolution with
rescaled weights and a bias: folding removes a pass over every activation. PyTorch's FX pass
``torch.fx.experimental.optimization.fuse`` does the folding on the traced graph.

Two compilers go further on a CPU: inductor (``compile``) and oneDNN Graph (``onednn``), which fuses
each convolution with its bias, residual add and ReLU, with activations in the layout oneDNN picks
between them. benchmarks/suite.py measures both against onnxruntime.
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch
from torch import nn

from .capabilities import require_cpp_compiler, warn_if_bfloat16_is_slow

Mode = Literal["eager", "fold", "compile", "onednn"]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BN that follows a convolution folded into it.

    The result is a ``torch.fx.GraphModule``: same outputs up to float rounding, fewer operations.
    """
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval(), inplace=True)


def prepare_inference(
    model: nn.Module, mode: Mode = "fold", channels_last: bool = True, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """``model`` made ready for fast inference on this machine.

    ``eager``: as is, in eval mode; ``fold``: BN folded; ``compile``: folded and ``torch.compile``d (a
    one-off compilation of tens of seconds, then faster calls where the compiler fuses element-wise
    work); ``onednn`` (CPU): traced, frozen and run with oneDNN Graph fusion, the fastest path here at
    batch 1. ``channels_last`` stores weights and activations in NHWC, which oneDNN's CPU and cuDNN's
    GPU convolutions prefer. The compiled paths compile at the first call of each input shape and
    compute without gradients.

    ``dtype=torch.bfloat16`` (or ``float16`` on a GPU) computes in that precision: the weights are
    converted (after folding, which is done in float32), the input is cast to it and the output back
    to the input's dtype, so the call looks the same. On a CPU with AMX, oneDNN runs the bfloat16
    convolutions on the matrix tiles: resnet50 at batch 1 took 6.2 ms through ``onednn`` against 26.0 ms
    in float32 here (benchmarks/suite.py). The outputs differ from float32's by bfloat16's rounding
    (8 significant bits; for resnet50 the largest output difference was 0.4-0.5% of the largest output).
    """
    if mode not in get_args(Mode):
        raise ValueError(f"mode must be one of {', '.join(get_args(Mode))}, got {mode!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype!r}")
    # TorchScript's freezing folds the batch norms itself (and oneDNN Graph wants the convolution + BN
    # pattern whole), so the onednn path takes the model unfolded.
    out = fold_batchnorm(model) if mode in ("fold", "compile") else copy.deepcopy(model).eval()
    on_cpu = all(t.device.type == "cpu" for t in out.parameters())
    if dtype == torch.bfloat16 and on_cpu:
        warn_if_bfloat16_is_slow("dtype=torch.bfloat16", torch.device("cpu"))
    if dtype != torch.float32:
        out = CastTo(out.to(dtype), dtype).eval()
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    if mode == "compile":
        if on_cpu:
            require_cpp_compiler('mode="compile"')
        # Inductor's freezing treats the weights as constants: it folds them into the graph and prepacks
        # them for oneDNN's convolutions (the CPU inference recipe of PyTorch's inductor docs). On this
        # machine it took resnet50 at batch 1 from about 60 to 42-44 ms (benchmarks/suite.py).
        out = _FreezingCompiled(out)
    elif mode == "onednn":
        out = _OneDNNGraph(out)
    return out


class CastTo(nn.Module):
    """``model`` run in ``dtype``: the input is cast to it and the output back to the input's dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).to(x.dtype)


class _FreezingCompiled(nn.Module):
    """``torch.compile(model)`` whose compilations run with inductor's ``freezing`` on.

    Compilation happens at the first call of each new input shape, so the setting must be in force
    there, not at ``torch.compile``; patching it per call leaves the process's global config alone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model)  # holds ``model`` as ``_orig_mod``

    # Without gradients: inductor freezes only a graph compiled with gradients off (and would keep an
    # autograd graph, and compile a second time for calls made under ``no_grad``).
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


class _OneDNNGraph(nn.Module):
    """``model`` traced with TorchScript at the first call, frozen, and run with oneDNN Graph fusion.

    oneDNN Graph (``torch.jit.enable_onednn_fusion``, PyTorch's CPU inference fuser for TorchScript)
    replaces the frozen graph's convolution + BN + add + ReLU chains by fused oneDNN partitions, inside
    which oneDNN picks the activations' layout (NHWC throughout for resnet50 in float32 on the Intel
    machine, by ``ONEDNN_VERBOSE``). The fusion is done by TorchScript's profiling
    executor during the first calls of each input shape, so the global switch is turned on for the
    calls (and restored after) rather than at construction. On 2 cores of an AMD EPYC it took resnet50
    at batch 1 from 76 ms (frozen TorchScript without it) to 42-45 ms, level with onnxruntime; on 2
    cores of an Intel Xeon with AMX, 26.0 ms against onnxruntime's 25.3 (benchmarks/suite.py).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._traced: list[torch.jit.ScriptModule] = []  # a list keeps it out of state_dict and .to()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(True)
        try:
            if not self._traced:
                self._traced.append(torch.jit.freeze(torch.jit.trace(self.model, x)))
            return self._traced[0](x)
        finally:
            torch.jit.enable_onednn_fusion(enabled)
