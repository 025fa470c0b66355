"""Pages of file mappings: where a tensor's bytes live, giving them back, bringing them in.

Pages of a mapping can be given back with :func:`release` (``madvise(MADV_DONTNEED)``: the process's
RSS falls, the page cache keeps them, so a later touch is a minor fault, not a disk read) and brought
in ahead of use with :func:`populate` (``MADV_POPULATE_READ``, Linux >= 5.14: the page tables are
filled in one call, off the compute thread; elsewhere the pages are touched one by one).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from memopt.core import libc

__all__ = [
    "FOLIO",
    "PAGE",
    "Span",
    "drop_page_cache",
    "file_mappings",
    "forget_file_mapping",
    "populate",
    "register_file_mapping",
    "release",
    "release_copied",
    "span_of",
]

PAGE = mmap.PAGESIZE
_POPULATE_OK = True  # cleared the first time the kernel refuses MADV_POPULATE_READ


@dataclass(frozen=True)
class Span:
    """A byte range ``[start, end)`` of this process's address space that a mapping backs."""

    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def span_of(t: torch.Tensor) -> Span:
    """The address range of a contiguous tensor's bytes."""
    start = t.data_ptr()
    return Span(start, start + t.numel() * t.element_size())


# What a fault maps beyond the page touched: the fault-around window (64 kB by default) and, for a
# large page-cache folio, the whole folio (at most a PMD: 2 MB with 4 kB pages). Populating a span
# so maps pieces of its neighbours; left mapped, they add up over a streamed run, so release()
# widens a span inside one of our file mappings to whole folios.
FOLIO = 2 << 20
_FILE_MAPPINGS: list[list[tuple[int, int]]] = []  # per live reader: its maps' [start, end)


def register_file_mapping(bounds: list[tuple[int, int]]) -> None:
    """Let :func:`release` widen spans inside these ``[start, end)`` file mappings to whole folios.

    The caller keeps ``bounds`` (and appends to it) while its mappings live, and calls
    :func:`forget_file_mapping` before they are unmapped."""
    _FILE_MAPPINGS.append(bounds)


def forget_file_mapping(bounds: list[tuple[int, int]]) -> None:
    _FILE_MAPPINGS.remove(bounds)


def _pages(span: Span, folios: bool = False) -> tuple[int, int]:
    """The whole pages covering ``span``; with ``folios``, the whole folios inside a file mapping
    of ours (outward: what a neighbour shares is dropped too, which is harmless on a clean file
    mapping: a later touch maps it again; never past the mapping, whose neighbours may be
    anonymous memory, which MADV_DONTNEED would zero)."""
    a = span.start - span.start % PAGE
    b = span.end + (-span.end % PAGE)
    for lo, hi in (m for group in _FILE_MAPPINGS for m in group) if folios else ():
        if lo <= span.start and span.end <= hi:
            a = max(lo, span.start - span.start % FOLIO)
            b = min(hi, span.end + (-span.end % FOLIO))
            break
    return a, b - a


def release(spans: list[Span]) -> None:
    """Unmap the pages of ``spans`` from this process (MADV_DONTNEED); only for file mappings.

    On a private file mapping that was never written, the next touch maps the page cache's page
    again: the data is unchanged, only RSS falls. (On anonymous memory it would zero the data.)
    """
    for s in spans:
        if s.nbytes > 0:
            addr, n = _pages(s, folios=True)
            libc.madvise(addr, n, libc.MADV_DONTNEED)


def release_copied(sources: list[torch.Tensor], copies: list[torch.Tensor]) -> None:
    """Give back the pages of ``sources`` that lie in one of our file mappings once their bytes
    were copied into ``copies`` (a weight converted on load: its file pages would otherwise stay
    in RSS beside the converted copy). A source that ``copies`` still views (no copy was made),
    or that is not in a file mapping we registered (anonymous memory: MADV_DONTNEED would zero
    it), is left alone."""
    kept = {c.untyped_storage().data_ptr() for c in copies}
    spans = []
    for t in sources:
        if t.untyped_storage().data_ptr() in kept:
            continue
        s = span_of(t)
        if any(lo <= s.start and s.end <= hi for group in _FILE_MAPPINGS for lo, hi in group):
            spans.append(s)
    release(spans)


def populate(spans: list[Span]) -> None:
    """Map the pages of ``spans`` now (read fault-in ahead of use; reads from disk if not cached)."""
    global _POPULATE_OK
    for s in spans:
        if s.nbytes <= 0:
            continue
        if _POPULATE_OK:
            addr, n = _pages(s)
            if libc.madvise(addr, n, libc.MADV_POPULATE_READ):
                continue
            _POPULATE_OK = False  # an older kernel (or no madvise): touch instead from now on
        # one byte a page is enough to fault each page in
        view = (ctypes.c_ubyte * s.nbytes).from_address(s.start)
        _ = bytes(memoryview(view)[::PAGE])


def drop_page_cache(path: str | Path) -> bool:
    """Ask the kernel to drop a file's clean pages from the page cache (``POSIX_FADV_DONTNEED``).

    Returns True when the call succeeded; pages still mapped by some process stay cached.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def file_mappings(path: str | Path) -> list[Span]:
    """Where ``path`` is mapped in this process (Linux ``/proc/self/maps``; empty elsewhere)."""
    real = str(Path(path).resolve())
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = parts[0].split("-")
                    out.append(Span(int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out
