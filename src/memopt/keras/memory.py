"""``set_memory_growth(device, enable)``: TensorFlow's switch, on PyTorch's allocators.

TensorFlow maps (nearly) all of a GPU's memory when it starts, and
``tf.config.experimental.set_memory_growth(gpu, True)`` makes it start small and grow instead.
Keras 3 on its torch backend allocates through PyTorch, whose CUDA caching allocator always grows
(it asks the driver for blocks as tensors need them and keeps freed ones cached). The same two
behaviours, mapped:

- ``enable=True`` (growth): the caching allocator as it is; before CUDA starts, expandable
  segments are asked for (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: a segment grows in
  place instead of a new one per size, less fragmentation as shapes change); after, the cache is
  emptied (``torch.cuda.empty_cache()``) so that growth starts from what is in use.
- ``enable=False`` (a preallocated pool, TensorFlow's default): 90 % of ``memory_limit`` bytes
  (default: of the free memory, TensorFlow's habit) reserved now in the caching allocator
  (:func:`memopt.plan.pool.preallocate_cuda`: one block allocated and freed, kept cached), and
  with ``memory_limit`` the process capped at that share of the device, as TensorFlow's
  ``memory_limit`` does.

On the CPU there is no device memory to map: ``enable=False`` reserves ``memory_limit`` bytes of
the process heap up front and keeps freed blocks there
(:func:`memopt.plan.pool.preallocate_cpu_heap`; ``memory_limit`` is required: there is no "all of
it" worth taking); ``enable=True`` is the C library's default and changes nothing.

Devices are named as TensorFlow or PyTorch name them: ``"GPU:0"``, ``"/physical_device:GPU:1"``,
``"cuda"``, ``"cuda:1"``, ``"CPU"``, a ``torch.device``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.plan.pool import preallocate_cpu_heap, preallocate_cuda

__all__ = ["MemoryGrowth", "parse_device", "set_memory_growth"]


@dataclass
class MemoryGrowth:
    device: str  # "cpu" or "cuda:N"
    growth: bool
    reserved_bytes: int  # reserved up front (0 with growth)
    note: str


def parse_device(device: Any) -> str:
    """``"cpu"`` or ``"cuda:N"`` from a TensorFlow or PyTorch device name."""
    if isinstance(device, torch.device):
        return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    name = str(getattr(device, "name", device)).strip().lower()
    m = re.fullmatch(r"(?:/?physical_device:)?(?:/device:)?(cpu|gpu|cuda)(?::(\d+))?", name)
    if m is None:
        raise MemoptError(f'unknown device {device!r}: name a GPU ("GPU:0", "cuda:0") or the CPU')
    return "cpu" if m.group(1) == "cpu" else f"cuda:{int(m.group(2) or 0)}"


def set_memory_growth(
    device: Any, enable: bool, *, memory_limit: int | None = None
) -> MemoryGrowth:
    """Growth (``enable=True``) or a preallocated pool (``False``) for ``device``; see the
    module docstring for what each means on CUDA and on the CPU."""
    if not isinstance(enable, bool):
        raise MemoptError(
            f"set_memory_growth(device, enable): enable is True or False, not {enable!r}"
        )
    if memory_limit is not None and (isinstance(memory_limit, bool) or memory_limit <= 0):
        raise MemoptError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
    dev = parse_device(device)
    if dev == "cpu":
        if enable:
            return MemoryGrowth(dev, True, 0, "the C library's default: nothing to change")
        if memory_limit is None:
            raise MemoptError("on the CPU, preallocation needs memory_limit (bytes to reserve)")
        applied = preallocate_cpu_heap(memory_limit)
        note = "heap reserved, freed blocks kept" if applied else "not glibc: nothing reserved"
        return MemoryGrowth(dev, False, memory_limit if applied else 0, note)
    if not torch.cuda.is_available():
        raise MemoptError(f"{device!r}: no CUDA device here")
    index = int(dev.split(":")[1])
    if index >= torch.cuda.device_count():
        raise MemoptError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if enable:
        if not torch.cuda.is_initialized():
            conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
            if "expandable_segments" not in conf:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
                    p for p in (conf, "expandable_segments:True") if p
                )
            note = "expandable segments (set before CUDA started)"
        else:
            torch.cuda.empty_cache()
            note = "CUDA already started: cache emptied, growth from what is in use"
        return MemoryGrowth(dev, True, 0, note)
    fraction = None
    if memory_limit is not None:
        total = torch.cuda.get_device_properties(index).total_memory
        fraction = min(1.0, memory_limit / total)
    # with a cap, 90 % of it reserved: the cap itself leaves no room for the allocator's rounding
    want = None if memory_limit is None else int(0.9 * memory_limit)
    pre = preallocate_cuda(want, fraction=fraction, device=index)
    return MemoryGrowth(dev, False, int(pre.reserved_bytes), f"reserved {pre.requested_bytes} B")
