"""Whether ``torch.compile`` can compile for the CPU on this machine.

Inductor, ``torch.compile``'s default backend, writes C++ for CPU code and builds it with the system's
compiler (``g++``, or ``$CXX``). Without one the first compiled call fails deep inside inductor with a
traceback; checking first turns that into one line naming the flag.
"""

from __future__ import annotations

from .errors import UserError


def require_cpp_compiler(flag: str) -> None:
    """Raise :class:`UserError` naming ``flag`` if inductor finds no working C++ compiler."""
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
