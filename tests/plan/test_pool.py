"""Buffer pools: the same buffers come back, nothing new is allocated after warm-up."""

from __future__ import annotations

import pytest
import torch

from memopt.plan import BufferPool, count_allocations, preallocate_cuda
from memopt.plan.pool import fill_batch, preallocate_cpu_heap


def test_pool_returns_the_same_buffers() -> None:
    pool = BufferPool(pin_memory=False)
    a = pool.acquire((32, 1, 8, 8))
    b = pool.acquire((32,), torch.int64)
    ptrs = {a.data_ptr(), b.data_ptr()}
    pool.release(a)
    pool.release(b)
    for _ in range(5):
        a2 = pool.acquire((32, 1, 8, 8))
        b2 = pool.acquire((32,), torch.int64)
        assert {a2.data_ptr(), b2.data_ptr()} == ptrs
        pool.release(a2)
        pool.release(b2)
    assert pool.stats.created == 2 and pool.stats.reused == 10
    assert pool.stats.held_bytes == 32 * 64 * 4 + 32 * 8


def test_no_allocation_after_warm_up() -> None:
    pool = BufferPool(pin_memory=False)
    data, labels = torch.randn(100, 1, 8, 8), torch.randint(0, 10, (100,))
    idx = torch.arange(32)

    def step() -> None:
        with pool.borrow((32, 1, 8, 8)) as xb, pool.borrow((32,), torch.int64) as yb:
            fill_batch(data, idx, xb)
            fill_batch(labels, idx, yb)

    step()  # warm-up creates the two buffers
    assert count_allocations(step, repeat=3).count == 0
    with pool.borrow((32, 1, 8, 8)) as xb:
        fill_batch(data, idx, xb)
        assert torch.equal(xb, data[:32])


def test_release_of_foreign_tensor() -> None:
    with pytest.raises(ValueError):
        BufferPool(pin_memory=False).release(torch.empty(1))


def test_cpu_heap_preallocation() -> None:
    assert preallocate_cpu_heap(1 << 20) in (True, False)  # False off glibc


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_preallocation() -> None:
    info = preallocate_cuda(64 << 20)
    assert info.reserved_bytes >= 64 << 20
    assert torch.cuda.memory_allocated() < info.reserved_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_pool_on_cuda() -> None:
    assert BufferPool().acquire((4,)).is_pinned()
