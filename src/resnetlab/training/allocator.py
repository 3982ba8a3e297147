"""glibc's ``malloc`` told to keep freed activation buffers for reuse, for compiled CPU training.

By default glibc serves a block above its *mmap threshold* (128 KiB, raised on the fly up to 32 MiB)
with a fresh ``mmap`` and unmaps it when it is freed, so the next step's buffer of the same size
faults every page back in and the kernel zeroes it. The step that ``torch.compile`` generates for
the CPU allocates its buffers through ``malloc`` in a pattern that keeps hitting this: resnet20's
bfloat16 step at batch 128 took 9,400-13,400 minor page faults per step here, and 0 with the
threshold raised, which took it from about 1,280 to 1,500 images/s (``resnetlab train --compile``:
1,120 to 1,270). The eager step took a few hundred faults per step and ran at the same speed
either way. PyTorch's CPU tuning guide makes the same point with jemalloc or tcmalloc preloaded;
raising glibc's thresholds gets this without a second allocator.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap, and keep up to ``trim_threshold``
    bytes of free memory at its top instead of returning it to the system. Process-wide; returns
    whether glibc took it (False elsewhere: musl, macOS, Windows, where nothing changes).

    64 MiB holds every activation of the CIFAR nets up to batch 256 in float32; larger blocks (a
    224-pixel batch's activations) are still mapped and unmapped as before, so a process that
    trained on them does not keep them. With the mmap threshold alone at 64 MiB, resnet20's batch-256
    step still faulted 24,000 times per step: the heap's top, returned and grown again each step."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Setting either turns off glibc's dynamic adjustment of both, so both are set.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
