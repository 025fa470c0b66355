"""The C heap under torch's CPU tensors (glibc): give freed memory back, bound what it keeps.

torch allocates CPU tensors with ``malloc``. glibc serves blocks above its mmap threshold with their
own mapping (returned to the system on ``free``) and the rest from its heap and arenas, whose freed
memory stays resident until ``malloc_trim``. Worse, each freed mapped block raises the threshold to
its size (up to 32 MB), so a loop over layers ends up serving its tensors from the heap and the
process's RSS only grows. The memory-bounded paths (streamed quantization, the streaming executor)
call :func:`trim` after each unit of work and :func:`bound_heap` once. Elsewhere than glibc every
function here is a no-op.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Any

__all__ = ["bound_heap", "trim", "trim_heap"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h

try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")
    _TRIM: Any = _LIBC.malloc_trim
    _MALLOPT: Any = _LIBC.mallopt
except (OSError, AttributeError):  # not glibc
    _TRIM = _MALLOPT = None


def trim() -> None:
    """Give the heap's free memory back to the system (``malloc_trim(0)``): cheap, call it often."""
    if _TRIM is not None:
        _TRIM(0)


def trim_heap() -> None:
    """:func:`trim` after a garbage collection (frees what only reference cycles held)."""
    gc.collect()
    trim()


def bound_heap(threshold: int = 256 << 10) -> None:
    """Serve every allocation above ``threshold`` with its own mapping, returned on free.

    Fixes glibc's mmap threshold (which otherwise rises to the size of each freed mapped block, up
    to 32 MB): a streamed GGUF run at a 135 MB budget peaked at 331 MB over the import baseline
    with the default, 161 MB with the threshold fixed. Process-wide: called only by paths that keep
    a memory bound (a budget set, a streamed quantization).
    """
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, threshold)
