"""Every call memopt makes into the C library, in one place: malloc's heap and page advice.

Each binding is ``None`` where the C library lacks it (not glibc, not Linux); callers then do
nothing, since every use here is an optimisation of memory, never needed for correctness.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

__all__ = [
    "MADV_DONTNEED",
    "MADV_POPULATE_READ",
    "M_MMAP_THRESHOLD",
    "M_TRIM_THRESHOLD",
    "die_with_parent",
    "madvise",
    "malloc_trim",
    "mallopt",
    "reserve_heap",
]

# mallopt parameter numbers (glibc's malloc.h) and madvise advice values (Linux's mman.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux 5.14; EINVAL before

try:
    _LIBC: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _fn(name: str, argtypes: list[Any] | None = None, restype: Any = ctypes.c_int) -> Any:
    fn = getattr(_LIBC, name, None)
    if fn is not None and argtypes is not None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


_TRIM = _fn("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _fn("mallopt", [ctypes.c_int, ctypes.c_int])
_MADVISE = _fn("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
_MALLOC = _fn("malloc", [ctypes.c_size_t], ctypes.c_void_p)
_FREE = _fn("free", [ctypes.c_void_p], None)
_PRCTL = _fn("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong])  # fmt: skip
PR_SET_PDEATHSIG = 1  # Linux's prctl.h


def die_with_parent(parent: int | None = None) -> bool:
    """Have the kernel SIGKILL this process when its parent ends, however it ends (SIGKILL
    included): a worker memopt started never outlives it. ``parent``: the pid the caller was
    started by; if it is already gone (it died before this call), exit now. False where there is
    no prctl (not Linux): the process then relies on its parent ending it."""
    import os
    import signal

    ok = _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    return ok


def malloc_trim() -> bool:
    """Give the heap's free memory back to the system; False where there is no malloc_trim."""
    return bool(_TRIM is not None and _TRIM(0))


def mallopt(param: int, value: int) -> bool:
    """Set one of malloc's parameters; False where it is not glibc (or glibc refused)."""
    return bool(_MALLOPT is not None and _MALLOPT(param, min(int(value), 2**31 - 1)))


def madvise(address: int, length: int, advice: int) -> bool:
    """``madvise(address, length, advice)``; True on success, False where it failed or is absent."""
    return _MADVISE is not None and _MADVISE(address, length, advice) == 0


def reserve_heap(nbytes: int) -> bool:
    """Grow malloc's heap by ``nbytes`` (allocate, touch every page, free): a warm heap."""
    if _MALLOC is None or _FREE is None or nbytes <= 0:
        return False
    p = _MALLOC(nbytes)
    if not p:
        return False
    ctypes.memset(p, 0, nbytes)
    _FREE(p)
    return True
