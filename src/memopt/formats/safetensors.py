"""safetensors, the one reader and the one writer, with the one table of dtypes.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> ``dtype``,
``shape``, ``data_offsets`` relative to the end of the header; an optional ``__metadata__``) and the
tensors' bytes. :class:`SafetensorsReader` maps each file once (``MAP_PRIVATE``: we never write, and
a private mapping keeps torch from warning about a read-only buffer) and hands out tensors three
ways: :meth:`~SafetensorsReader.get`, a ``torch.frombuffer`` view (no byte is read until a kernel
touches it, and then the page cache's own pages are mapped in, never a second copy);
:meth:`~SafetensorsReader.read` and :meth:`~SafetensorsReader.read_rows`, copies made by ``pread``
that map nothing. :class:`SafetensorsWriter` writes a file whose tensors are known before their
data, so that a producer holds one tensor at a time.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memopt.core.errors import MemoptError, one_line
from memopt.core.modules import numel
from memopt.core.pages import Span, forget_file_mapping, register_file_mapping, release

__all__ = [
    "DTYPES",
    "SafetensorsReader",
    "SafetensorsWriter",
    "dtype_code",
    "dtype_name",
    "dtype_of",
    "read_header",
]

# safetensors' dtype codes -> torch dtypes (the ones memopt reads and writes)
DTYPES: dict[str, torch.dtype] = {
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
_CODES = {v: k for k, v in DTYPES.items()}


def dtype_code(dt: torch.dtype) -> str:
    """safetensors' code of a dtype (``torch.float32`` -> ``"F32"``)."""
    try:
        return _CODES[dt]
    except KeyError:
        raise MemoptError(f"safetensors: dtype {dt} cannot be stored") from None


def dtype_name(dt: torch.dtype) -> str:
    """The name memopt's manifests use for a dtype (``torch.float32`` -> ``"float32"``)."""
    return str(dt).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """The dtype of a manifest name (``"bfloat16"``); MemoptError for anything else."""
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or dt not in _CODES:
        raise MemoptError(f"unknown dtype {name!r} in the manifest")
    return dt


# every dtype code of the safetensors format, with its size: codes memopt cannot read are named as
# unsupported, anything else is a corrupt header
_ALL_CODES = {**{k: v.itemsize for k, v in DTYPES.items()}, "U16": 2, "U32": 4, "U64": 8,
              "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F6_E2M3": 1, "F6_E3M2": 1,
              "F4": 1, "C64": 8}  # fmt: skip
MAX_HEADER = 100 << 20  # the format's own bound on the header (safetensors refuses larger)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a key twice is an ambiguous header (which one is meant?)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"tensor {k!r} appears twice in the header")
        out[k] = v
    return out


def _count(v: Any) -> bool:
    """A JSON integer (not a boolean, not a float), at least 0."""
    return type(v) is int and v >= 0


def read_header(file: Path) -> tuple[int, dict[str, Any]]:
    """``(header length, header)`` of a safetensors file, every field checked.

    A truncated or corrupt file is refused here in one line naming the file, the tensor and the
    field, before any work is done: the header is one JSON object without a key twice;
    ``__metadata__`` maps strings to strings; each tensor has a known ``dtype``, a ``shape`` of
    integers >= 0 and ``data_offsets`` ``[begin, end]`` whose length is the shape's bytes; the
    tensors' byte ranges, in order, tile the data exactly from 0 to the end of the file (no
    overlap, no gap, nothing after). safetensors itself reports much of this only as an opaque
    error on first access to a tensor."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
            if n > MAX_HEADER:
                raise ValueError(f"header length {n} is over the format's {MAX_HEADER}")
            header = json.loads(fh.read(n), object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ranges = _check_entries(header)
    except RecursionError:
        raise MemoptError(f"{file}: corrupt safetensors file (JSON nested too deep)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MemoptError(f"{file}: corrupt safetensors file ({one_line(exc)})") from None
    data = size - 8 - n
    end = 0
    for a, b, key in sorted(ranges):
        if a != end:
            what = "overlaps the one before" if a < end else f"leaves bytes {end}..{a} unused"
            raise MemoptError(f"{file}: corrupt safetensors file (tensor {key!r}: data_offsets "
                              f"[{a}, {b}] {what})")  # fmt: skip
        end = b
    if end > data:
        raise MemoptError(
            f"{file}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})"
        )
    if end < data:
        raise MemoptError(f"{file}: corrupt safetensors file ({data - end} bytes after the last "
                          "tensor's data)")  # fmt: skip
    return n, header


def _check_entries(header: dict[str, Any]) -> list[tuple[int, int, str]]:
    """``(begin, end, name)`` of every tensor of a parsed header; ValueError naming the field."""
    ranges = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValueError("__metadata__ is not a map of strings to strings")
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {key!r}: its entry is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str) or code not in _ALL_CODES:
            raise ValueError(f"tensor {key!r}: dtype {code!r} is not a safetensors dtype")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ValueError(f"tensor {key!r}: shape {shape!r} is not a list of integers >= 0")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ValueError(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end]")
        if numel(tuple(shape)) * _ALL_CODES[code] != offsets[1] - offsets[0]:
            raise ValueError(
                f"tensor {key!r}: shape {shape} of {code} is not its {offsets[1] - offsets[0]} "
                "bytes (data_offsets)"
            )
        ranges.append((offsets[0], offsets[1], key))
    return ranges


@dataclass(frozen=True)
class _Item:
    file: int  # index into SafetensorsReader._maps
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # file offsets of the tensor's bytes
    end: int


class SafetensorsReader:
    """The ``*.safetensors`` files of a folder (or one file), mapped once.

    ``names``, ``dtype``, ``shape``, ``nbytes``; :meth:`get` (a zero-copy view), :meth:`read` and
    :meth:`read_rows` (copies by ``pread``, nothing mapped); :meth:`span` (where a tensor's bytes
    live in memory) for :func:`memopt.core.pages.release` / ``populate``. Names are in file order
    (which for memopt folders is execution order).
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
        register_file_mapping(self._bounds)
        weakref.finalize(self, forget_file_mapping, self._bounds)
        for i, file in enumerate(files):
            n, header = read_header(file)
            size = file.stat().st_size
            try:
                with open(file, "rb") as fh:
                    # ACCESS_COPY = MAP_PRIVATE: writable for torch, never written, never synced
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except (ValueError, OSError) as exc:
                raise MemoptError(f"{file}: cannot map the file ({one_line(exc)})") from None
            self._maps.append(mm)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            self._bounds.append((base, base + size))
            entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
            entries.sort(key=lambda kv: kv[1]["data_offsets"][0])  # file order
            for key, info in entries:
                dtype = DTYPES.get(info["dtype"])
                if dtype is None:
                    raise MemoptError(
                        f"{file}: tensor {key!r} has dtype {info['dtype']}, which memopt does not "
                        f"read (it reads {', '.join(DTYPES)})"
                    )
                a, b = info["data_offsets"]
                shape = tuple(int(s) for s in info["shape"])
                if numel(shape) * dtype.itemsize != b - a:
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
        until released.
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
        pages in, plus their fault-around neighbours, and must give them back)."""
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


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are known (name, dtype, shape) before their data.

    The header (with every offset) goes first, then each tensor's bytes as it is produced, in the
    planned order: a producer never has to hold more than the tensor it is writing. A tensor that
    can only be made later (streamed GPTQ of a tied embedding needs every block done first) is
    :meth:`reserve`-d in its turn and written when ready: the file keeps the planned order. The
    result is a standard safetensors file (8-byte little-endian header length, JSON header padded
    with spaces so that the data starts at a multiple of 64, contiguous data).
    """

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "memopt"}}
        offset = 0
        for name, dtype, shape in layout:
            if name in header:
                raise ValueError(f"tensor {name!r} planned twice")
            n = numel(shape) * dtype.itemsize
            header[name] = {
                "dtype": dtype_code(dtype),
                "shape": [int(s) for s in shape],
                "data_offsets": [offset, offset + n],
            }
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        # the data starts 64-byte aligned (the format asks for 8): a mapped tensor whose offset
        # and earlier sizes are multiples of 64 is then aligned for the packed int kernels, and a
        # loaded int8/int4 folder uses it in place instead of a copy
        text += b" " * (-(len(text) + 8) % 64)
        self.path = path
        self._layout = list(layout)
        self._next = 0
        self._reserved: dict[str, tuple[int, int]] = {}  # name -> (layout index, file offset)
        self._fh = open(path, "wb")  # noqa: SIM115 (closed by close(), after the last tensor)
        self._fh.write(len(text).to_bytes(8, "little"))
        self._fh.write(text)

    def reserve(self, name: str) -> None:
        """Skip the next planned tensor, ``name``, leaving its bytes to a later :meth:`write`."""
        if self._next >= len(self._layout) or self._layout[self._next][0] != name:
            raise ValueError(f"tensor {name!r} is not the next planned one")
        _, dtype, shape = self._layout[self._next]
        self._reserved[name] = (self._next, self._fh.tell())
        self._fh.seek(numel(shape) * dtype.itemsize, os.SEEK_CUR)
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Append ``tensor``, the next planned one with the planned dtype and shape (or a reserved
        one, written in its place); or a list of its row chunks (consecutive along dim 0), written
        one after the other without a concat."""
        if name in self._reserved:
            index, offset = self._reserved.pop(name)
            end = self._fh.tell()
            self._fh.seek(offset)
            try:
                self._write(index, name, tensor)
            finally:
                self._fh.seek(end)
            return
        if self._next >= len(self._layout):
            raise ValueError(f"tensor {name!r} was not planned")
        self._write(self._next, name, tensor)
        self._next += 1

    def _write(self, index: int, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        want, dtype, shape = self._layout[index]
        parts = tensor if isinstance(tensor, list) else [tensor]
        rows = sum(int(t.shape[0]) if t.dim() else 1 for t in parts)
        got = (rows, *parts[0].shape[1:]) if parts and parts[0].dim() else tuple(parts[0].shape)
        if name != want or any(t.dtype != dtype for t in parts) or tuple(got) != tuple(shape):
            raise ValueError(
                f"expected {want} {dtype} {tuple(shape)}, got {name} {parts[0].dtype} {got}"
            )
        for t in parts:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)  # raw bytes, no copy
            if flat.numel():
                self._fh.write(memoryview(flat.numpy()))

    def close(self) -> None:
        left = len(self._layout) - self._next + len(self._reserved)
        if left:
            self._fh.close()
            raise ValueError(f"{left} planned tensors were not written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()
