"""Hand large freed buffers back to the operating system.

glibc serves an allocation below its mmap threshold from its heaps, and raises that
threshold (up to 32 MB) each time a larger mapped block is freed; memory freed inside
a heap stays with the process. Batches of images are tens of MB, made by the read-ahead
thread and freed by the training loop, so under the moving threshold they pile up as
resident memory that is rarely reused. A fixed 1 MB threshold gives every large buffer
its own mapping, returned to the system when it is freed.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # malloc.h


def map_large_buffers(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
