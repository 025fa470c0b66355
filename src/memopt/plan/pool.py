"""Pools and preallocation for training loops: the brief's "preallocate" and "memory pool".

- :class:`BufferPool`: tensors keyed by (shape, dtype, device), handed out and given back, so a loop
  that needs the same buffers every step creates them once. Host buffers are pinned when CUDA is
  present (page-locked memory makes ``.to("cuda", non_blocking=True)`` a real async DMA).
- :func:`fill_batch`: copy a batch into a pooled buffer with ``index_select(out=)``, no new tensor.
- :func:`preallocate_cpu_heap`: the CPU counterpart of reserving memory up front. glibc serves
  blocks above ``M_MMAP_THRESHOLD`` (128 KiB by default, adapting upwards) with a fresh ``mmap`` and
  returns them with ``munmap`` on free, so every step of a plain loop page-faults its activations
  in again. Raising the mmap and trim thresholds keeps freed memory in the heap, and touching
  ``nbytes`` once grows the heap up front. (Linux/glibc only; elsewhere it does nothing.)
- :func:`preallocate_cuda`: reserve GPU memory in PyTorch's caching allocator up front (one large
  allocation, then freed: the block stays reserved in the allocator's cache, not returned to the
  driver), optionally capping the process with ``torch.cuda.set_per_process_memory_fraction``. This is
  what TensorFlow's default GPU behaviour does and what the brief's ``set_memory_growth(True)`` turns
  off. Allocator settings go in the environment before CUDA initialises, e.g.
  ``PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512,garbage_collection_threshold:0.8`` (do not split
  blocks above 512 MiB, so the reserve is not fragmented by small tensors; reclaim cached blocks at
  80 % use) or ``expandable_segments:True`` (grow segments in place instead of adding new ones: less
  fragmentation for shapes that change; then a big reserve is less necessary).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from memopt.core.heap import preallocate_cpu_heap

__all__ = [
    "BufferPool",
    "CudaPreallocation",
    "PoolStats",
    "fill_batch",
    "preallocate_cpu_heap",
    "preallocate_cuda",
]

Key = tuple[tuple[int, ...], torch.dtype, str]


@dataclass
class PoolStats:
    created: int = 0  # tensors allocated by the pool
    reused: int = 0  # acquisitions served from the free list
    held_bytes: int = 0  # bytes of every tensor the pool owns (free or lent)


class BufferPool:
    """A pool of reusable tensors: ``acquire`` takes a free one of that shape or makes one.

    ``pin_memory=None`` pins CPU buffers when CUDA is available. Contents are not cleared between
    uses (the caller overwrites them, e.g. with ``copy_`` or an ``out=`` op).
    """

    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: dict[Key, list[torch.Tensor]] = defaultdict(list)
        self._lent: dict[int, Key] = {}
        self.stats = PoolStats()

    def acquire(
        self,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        key: Key = (tuple(shape), dtype, str(torch.device(device)))
        free = self._free[key]
        if free:
            t = free.pop()
            self.stats.reused += 1
        else:
            pin = self.pin_memory and torch.device(device).type == "cpu"
            t = torch.empty(key[0], dtype=dtype, device=device, pin_memory=pin)
            self.stats.created += 1
            self.stats.held_bytes += t.untyped_storage().nbytes()
        self._lent[id(t)] = key
        return t

    def release(self, t: torch.Tensor) -> None:
        key = self._lent.pop(id(t), None)
        if key is None:
            raise ValueError("release() of a tensor this pool did not lend (or released twice)")
        self._free[key].append(t)

    @contextmanager
    def borrow(
        self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> Iterator[torch.Tensor]:
        t = self.acquire(shape, dtype, device)
        try:
            yield t
        finally:
            self.release(t)

    def clear(self) -> None:
        """Drop the free tensors (lent ones stay the caller's)."""
        for tensors in self._free.values():
            for t in tensors:
                self.stats.held_bytes -= t.untyped_storage().nbytes()
        self._free.clear()


def fill_batch(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = source[index]`` without a new tensor (``index_select`` writes into ``out``).

    source (N, ...), index (B,) int64, out (B, ...) -> out. ``out`` may be a pooled pinned buffer.
    """
    return torch.index_select(source, 0, index, out=out)


@dataclass
class CudaPreallocation:
    device: int
    requested_bytes: int
    reserved_bytes: int  # torch.cuda.memory_reserved after the reserve
    fraction: float | None


def preallocate_cuda(
    nbytes: int | None = None, fraction: float | None = None, device: int = 0
) -> CudaPreallocation:
    """Reserve ``nbytes`` (default: 90 % of the free memory, or ``fraction`` of it) in the caching
    allocator up front; with ``fraction``, also cap this process at that share of the device.

    Raises RuntimeError without CUDA. Later allocations are carved from the reserved block until it
    is used up (set ``max_split_size_mb`` higher than your largest tensor to allow splitting).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("preallocate_cuda needs CUDA")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    free, total = torch.cuda.mem_get_info(device)
    if nbytes is None:
        nbytes = int((fraction * total if fraction is not None else free) * 0.9)
    block = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
    del block  # back to the allocator's cache, still reserved from the driver
    return CudaPreallocation(device, nbytes, torch.cuda.memory_reserved(device), fraction)
