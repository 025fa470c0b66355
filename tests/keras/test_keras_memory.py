"""set_memory_growth: TensorFlow's switch on PyTorch's allocators (CPU here; CUDA where present)."""

from __future__ import annotations

import pytest
import torch

import memopt.keras  # noqa: F401
from memopt.core.errors import MemoptError
from memopt.keras import set_memory_growth
from memopt.keras.memory import parse_device


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("GPU:0", "cuda:0"),
        ("/physical_device:GPU:1", "cuda:1"),
        ("cuda", "cuda:0"),
        ("cuda:2", "cuda:2"),
        ("CPU", "cpu"),
        ("/device:CPU:0", "cpu"),
        (torch.device("cpu"), "cpu"),
    ],
)
def test_device_names(name: object, want: str) -> None:
    assert parse_device(name) == want


def test_cpu_growth_and_preallocation(monkeypatch: pytest.MonkeyPatch) -> None:
    grow = set_memory_growth("CPU", True)
    assert grow.growth and grow.reserved_bytes == 0
    with pytest.raises(MemoptError, match="memory_limit"):
        set_memory_growth("CPU", False)
    # the heap reservation itself (memopt.plan.pool.preallocate_cpu_heap, tested with the pools)
    # changes malloc's settings for the whole process: recorded here, not applied to pytest's
    calls: list[int] = []
    monkeypatch.setattr(
        "memopt.keras.memory.preallocate_cpu_heap", lambda n: calls.append(n) or True
    )
    pre = set_memory_growth("CPU", False, memory_limit=8 << 20)
    assert calls == [8 << 20]
    assert not pre.growth and pre.reserved_bytes == 8 << 20


def test_bad_input() -> None:
    with pytest.raises(MemoptError, match="unknown device"):
        set_memory_growth("TPU:0", True)
    with pytest.raises(MemoptError, match="True or False"):
        set_memory_growth("CPU", "yes")  # type: ignore[arg-type]
    with pytest.raises(MemoptError, match="positive"):
        set_memory_growth("CPU", False, memory_limit=-1)
    if not torch.cuda.is_available():
        with pytest.raises(MemoptError, match="no CUDA device"):
            set_memory_growth("GPU:0", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_preallocated_pool() -> None:
    limit = 256 << 20
    pre = set_memory_growth("GPU:0", False, memory_limit=limit)
    assert pre.reserved_bytes >= int(0.9 * limit)
    assert torch.cuda.memory_reserved(0) >= int(0.9 * limit)
    grow = set_memory_growth("GPU:0", True)  # CUDA has started: the cache is emptied
    assert grow.growth and torch.cuda.memory_reserved(0) < int(0.9 * limit)
