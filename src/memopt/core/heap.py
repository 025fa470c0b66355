"""The C heap under torch's CPU tensors (glibc): give freed memory back, bound what it keeps.

torch allocates CPU tensors with ``malloc``. glibc serves blocks above its mmap threshold with their
own mapping (returned to the system on ``free``) and the rest from its heap and arenas, whose freed
memory stays resident until ``malloc_trim``. Worse, each freed mapped block raises the threshold to
its size (up to 32 MB), so a loop over layers ends up serving its tensors from the heap and the
process's RSS only grows. The memory-bounded paths (streamed quantization, the streaming executor)
call :func:`trim` after each unit of work and :func:`bound_heap` once. The opposite policy,
:func:`preallocate_cpu_heap`, keeps every freed block for reuse (preallocation for a training
loop). Elsewhere than glibc every function here is a no-op.
"""

from __future__ import annotations

import gc

from memopt.core import libc

__all__ = ["bound_heap", "preallocate_cpu_heap", "trim", "trim_heap"]


def trim() -> None:
    """Give the heap's free memory back to the system (``malloc_trim(0)``): cheap, call it often."""
    libc.malloc_trim()


def trim_heap() -> None:
    """:func:`trim` after a garbage collection (frees what only reference cycles held)."""
    gc.collect()
    trim()


def bound_heap(threshold: int = 256 << 10) -> None:
    """Serve every allocation above ``threshold`` with its own mapping, returned on free.

    Fixes glibc's mmap threshold, which otherwise rises to the size of each freed mapped block (up
    to 32 MB) and leaves a streamed run's freed blocks resident. Process-wide: called only by paths
    that keep a memory bound (a budget set, a streamed quantization).
    """
    libc.mallopt(libc.M_MMAP_THRESHOLD, threshold)


def preallocate_cpu_heap(nbytes: int, mmap_threshold: int = 1 << 30) -> bool:
    """Keep freed memory in the process heap and grow the heap by ``nbytes`` now (glibc only).

    Returns True when applied. Blocks up to ``mmap_threshold`` then come from the heap, which is
    not trimmed, so a training loop's per-step tensors reuse memory already faulted in.
    """
    ok = libc.mallopt(libc.M_MMAP_THRESHOLD, mmap_threshold)
    ok &= libc.mallopt(libc.M_TRIM_THRESHOLD, 2**31 - 1)
    libc.reserve_heap(nbytes)
    return bool(ok)
