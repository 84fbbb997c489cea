"""Handing freed memory back to the operating system, for runs whose point is a bounded peak (streaming).

glibc serves large allocations from its heap once it has seen large blocks freed (its mmap threshold
rises to the largest block freed, up to 32 MB), and a heap fragments: streaming a model layer by layer
then ratchets resident memory up by several MB a layer although nothing is kept (measured in
tests/test_streaming.py). Pinning the threshold makes every block of 256 KiB or more its own mapping,
returned the moment it is freed, and `malloc_trim` returns what the heap freed between layers. Elsewhere
(other C libraries, macOS, Windows) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 256 << 10


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 (only glibc has both)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def map_large_blocks() -> bool:
    """Serve every allocation of 256 KiB or more from its own mapping (process-wide, for the rest of the
    run); whether the C library took it."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed() -> None:
    """Return the heap's free pages to the operating system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
