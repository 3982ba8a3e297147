"""What this machine can run fast: a C++ compiler for ``torch.compile``, bfloat16 kernels.

Both decide between a fast path and one that fails or crawls, and neither shows until the first
step runs. Checking first turns a traceback deep inside inductor into one line naming the flag, and
a tenfold slowdown into a warning that says why.
"""

from __future__ import annotations

import warnings

import torch

from .errors import UserError


class SlowPathWarning(UserWarning):
    """The requested path runs far slower on this machine than the default would."""


def require_cpp_compiler(flag: str) -> None:
    """Raise :class:`UserError` naming ``flag`` if ``torch.compile`` cannot build CPU code here.

    Inductor, ``torch.compile``'s default backend, writes C++ for CPU code and builds it with the
    system's compiler (``g++``, or ``$CXX``).
    """
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # a PyTorch whose inductor is laid out otherwise: torch.compile reports it
        return
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise UserError(
            f"{flag}: torch.compile on the CPU builds C++ code and found no working compiler (g++, or the "
            f"one $CXX names); install one (e.g. apt install g++) or leave out {flag}"
        ) from None


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 convolutions run on native kernels on ``device``.

    On a CPU, oneDNN has bfloat16 kernels for AVX-512 (with or without its BF16 instructions) and
    AMX. With AVX2 alone there are none: every bfloat16 convolution falls back to a reference
    implementation, and resnet20's training step ran 10x slower than in float32 on such a machine
    (an AMD EPYC, benchmarks/train_throughput.py --amp bf16).
    """
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return True  # not oneDNN's to run: nothing known against it
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without the query
        return True


def warn_if_bfloat16_is_slow(what: str, device: torch.device) -> None:
    """A :class:`SlowPathWarning` naming ``what`` when ``device`` has no fast bfloat16 kernels."""
    if not fast_bfloat16(device):
        warnings.warn(
            f"{what}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bfloat16 kernels in oneDNN "
            "(they need AVX-512 or AMX), so bfloat16 convolutions fall back to slow reference code (resnet20's "
            "training step ran 10x slower than in float32 on such a CPU); float32 is the fast path here",
            SlowPathWarning,
            stacklevel=3,
        )
