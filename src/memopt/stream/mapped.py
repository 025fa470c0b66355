"""Memory-mapped safetensors: tensors that are views of the file's pages, and control of those pages.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets`` relative to the end of the header) and the tensors' bytes. :class:`MappedSafetensors`
maps each file once (``MAP_PRIVATE``: we never write, and a private mapping keeps torch from warning
about a read-only buffer) and hands out ``torch.frombuffer`` views: no byte is read until a kernel
touches it, and then the page cache's own pages are mapped in, never a second copy (measured in
``bench/stream.py`` and ``tests/stream/test_mapped.py``: the anonymous RSS does not grow).

Pages of a mapping can be given back with :func:`release` (``madvise(MADV_DONTNEED)``: the process's
RSS falls, the page cache keeps them, so a later touch is a minor fault, not a disk read) and brought
in ahead of use with :func:`populate` (``MADV_POPULATE_READ``, Linux ≥ 5.14: the page tables are
filled in one call, off the compute thread; elsewhere the pages are touched one by one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from memopt.errors import MemoptError

__all__ = [
    "MappedSafetensors",
    "PAGE",
    "Span",
    "drop_page_cache",
    "populate",
    "release",
    "span_of",
]

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux 5.14; EINVAL before, then we touch the pages instead

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _LIBC.madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # no libc madvise (not Linux): pages are simply kept
    _LIBC = None
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
# so maps pieces of its neighbours; left mapped, they added up (measured here: 40-60 kB a side, for
# the 25 streamed blocks of SmolLM2 at a 135 MB budget about 3 MB, peak 135.2 -> 132.5 MB over the
# baseline once release() widened its spans to this).
FOLIO = 2 << 20
# per live MappedSafetensors: its maps' [start, end)
_FILE_MAPPINGS: list[list[tuple[int, int]]] = []


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
    if _LIBC is None:
        return
    for s in spans:
        if s.nbytes > 0:
            addr, n = _pages(s, folios=True)
            _LIBC.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(n), _MADV_DONTNEED)


def populate(spans: list[Span]) -> None:
    """Map the pages of ``spans`` now (read fault-in ahead of use; reads from disk if not cached)."""
    global _POPULATE_OK
    for s in spans:
        if s.nbytes <= 0:
            continue
        if _LIBC is not None and _POPULATE_OK:
            addr, n = _pages(s)
            if _LIBC.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(n), _MADV_POPULATE_READ) == 0:
                continue
            _POPULATE_OK = False  # an older kernel: touch instead from now on
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


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Item:
    file: int  # index into MappedSafetensors._maps
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # file offsets of the tensor's bytes
    end: int


class MappedSafetensors:
    """The ``*.safetensors`` files of a folder (or one file), mapped; :meth:`get` is zero-copy.

    A :class:`~memopt.models.TensorSource`: ``names``, ``nbytes``, ``dtype``, ``shape``, ``get``;
    plus :meth:`span` (where a tensor's bytes live in memory) for :func:`release` / :func:`populate`.
    Names are in file order (which for memopt folders is execution order).
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise MemoptError(f"{name or path}: no .safetensors weights in the folder")
        self.files = files
        self._maps: list[mmap.mmap] = []
        self._items: dict[str, _Item] = {}
        # registered for release()'s folio widening while this object (which keeps the maps
        # open) lives; forgotten when it goes, before the maps can be unmapped and reused
        self._bounds: list[tuple[int, int]] = []
        _FILE_MAPPINGS.append(self._bounds)
        weakref.finalize(self, _FILE_MAPPINGS.remove, self._bounds)
        for i, file in enumerate(files):
            size = file.stat().st_size
            try:
                with open(file, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if n <= 0 or 8 + n > size:
                        raise ValueError("header runs past the end of the file")
                    header = json.loads(fh.read(n))
                    # ACCESS_COPY = MAP_PRIVATE: writable for torch, never written, never synced
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                raise MemoptError(f"{file}: corrupt safetensors file ({exc})") from None
            assert mm is not None
            self._maps.append(mm)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            self._bounds.append((base, base + size))
            entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
            entries.sort(key=lambda kv: kv[1]["data_offsets"][0])  # file order
            for key, info in entries:
                dtype = _DTYPES.get(info.get("dtype"))
                a, b = info["data_offsets"]
                shape = tuple(int(s) for s in info["shape"])
                if dtype is None:
                    raise MemoptError(f"{file}: tensor {key!r} has unsupported {info['dtype']}")
                if 8 + n + b > size:
                    raise MemoptError(
                        f"{file}: truncated safetensors file ({size} bytes, {key!r} ends at "
                        f"{8 + n + b})"
                    )
                numel = 1
                for s in shape:
                    numel *= s
                if numel * dtype.itemsize != b - a:
                    raise MemoptError(f"{file}: tensor {key!r}: shape and byte range disagree")
                self._items[key] = _Item(i, dtype, shape, 8 + n + a, 8 + n + b)

    def names(self) -> list[str]:
        return list(self._items)

    def _item(self, name: str) -> _Item:
        try:
            return self._items[name]
        except KeyError:
            raise MemoptError(f"no tensor {name!r} in {self.files[0].parent}") from None

    def dtype(self, name: str) -> torch.dtype:
        return self._item(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._item(name).shape

    def nbytes(self, name: str) -> int:
        it = self._item(name)
        return it.end - it.start

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A view of the mapped bytes (no copy); a cast to another ``dtype`` is a copy."""
        it = self._item(name)
        mm = self._maps[it.file]
        if it.end == it.start:
            t = torch.empty(it.shape, dtype=it.dtype)
        elif it.start % it.dtype.itemsize == 0:
            count = (it.end - it.start) // it.dtype.itemsize
            t = torch.frombuffer(mm, dtype=it.dtype, count=count, offset=it.start).view(it.shape)
        else:  # misaligned for its dtype (another writer's layout): view bytes, then copy
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=it.end - it.start, offset=it.start)
            t = raw.clone().view(it.dtype).view(it.shape)
        if dtype is not None and t.is_floating_point() and dtype != t.dtype:
            t = t.to(dtype)
        return t

    def read_rows(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of a tensor of 2 or more dimensions, copied by ``pread``: ``(*idx.shape, ...)``.

        A read copies from the page cache and maps nothing, where a lookup through the mapping
        maps at least the fault-around window around every row it touches, and leaves it mapped
        until released: SmolLM2 at a 135 MB budget, 16-token prompt, peaked at 145.6 MB over the
        baseline with the embedding a view of the mapping, 134.3 MB with its rows read this way.
        """
        it = self._item(name)
        if len(it.shape) < 2:
            raise MemoptError(f"{name!r}: rows of a {len(it.shape)}-D tensor")
        n_rows = it.shape[0]
        row_bytes = (it.end - it.start) // n_rows
        flat = idx.reshape(-1).tolist()
        if flat and not 0 <= min(flat) <= max(flat) < n_rows:
            raise IndexError(f"{name!r}: row index out of range (rows: {n_rows})")
        out = torch.empty((len(flat), *it.shape[1:]), dtype=it.dtype)  # (N, ...)
        base = out.data_ptr()
        self._pread(name, [(base + j * row_bytes, it.start + r * row_bytes, row_bytes)
                         for j, r in enumerate(flat)])  # fmt: skip
        return out.view(*idx.shape, *it.shape[1:])

    def read(self, name: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` (default: the whole tensor) copied by one ``pread`` into a new tensor.

        Nothing is mapped, so nothing is left to release (a copy out of the mapping faults the
        pages in, plus their fault-around neighbours, and must give them back). A SmolLM2 int4
        block (2 MB, 7 weights) reads in 0.38 ms warm, measured alone."""
        it = self._item(name)
        n_rows = it.shape[0] if it.shape else 1
        r1 = n_rows if r1 is None else r1
        if not 0 <= r0 <= r1 <= n_rows:
            raise IndexError(f"{name!r}: rows {r0}:{r1} out of range (rows: {n_rows})")
        row_bytes = (it.end - it.start) // n_rows if n_rows else 0
        out = torch.empty((r1 - r0, *it.shape[1:]) if it.shape else (), dtype=it.dtype)
        self._pread(name, [(out.data_ptr(), it.start + r0 * row_bytes, (r1 - r0) * row_bytes)])
        return out

    def _pread(self, name: str, jobs: list[tuple[int, int, int]]) -> None:
        """Read ``(address, file offset, length)`` jobs from tensor ``name``'s file."""
        it = self._item(name)
        jobs = [j for j in jobs if j[2]]
        if not jobs:
            return
        fd = os.open(self.files[it.file], os.O_RDONLY)
        try:
            for address, offset, length in jobs:
                dest = memoryview((ctypes.c_char * length).from_address(address))
                if os.preadv(fd, [dest], offset) != length:
                    raise MemoptError(f"{self.files[it.file]}: short read of {name!r}")
        finally:
            os.close(fd)

    def span(self, name: str) -> Span:
        """Where the tensor's bytes are mapped in this process."""
        it = self._item(name)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._maps[it.file]))
        return Span(base + it.start, base + it.end)

    def mapped_span(self, file: int = 0) -> Span:
        """The whole mapping of one file."""
        mm = self._maps[file]
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        return Span(base, base + len(mm))

    def release_all(self) -> None:
        """Unmap every page of every file from this process (RSS falls; the page cache keeps them)."""
        release([self.mapped_span(i) for i in range(len(self._maps))])
