"""Shared setup for tests/train."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The models here are tiny: each op is too small to split over threads, and on a shared 2-core
    # machine two intra-op threads per process oversubscribe the cores (the digits test took 41 s
    # instead of 2 s under load). Restored after each test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
