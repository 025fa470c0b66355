"""Counting allocations: every call into PyTorch's CPU allocator, not only the tensors we can see.

A dispatch-mode counter sees the storages that ops *return*; it misses memory a kernel allocates and
frees inside itself (an ``out=`` overload generated as "compute functionally, then copy" allocates a
full-size temporary that no Python code ever sees). PyTorch's profiler with ``profile_memory=True``
records an event for every allocation made through c10's allocator, with its byte count, so that is
what we count. Each allocation is attributed to the outermost aten op running when it happened (the
op our code called), which is how :attr:`AllocationReport.by_op` names the culprits.

Not seen by either: memory that a library allocates behind PyTorch's allocator (oneDNN scratchpads,
OpenMP thread stacks). Those do not show up as tensor bytes anywhere in PyTorch.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.profiler import ProfilerActivity, profile

__all__ = ["AllocationReport", "count_allocations"]


@dataclass
class AllocationReport:
    count: int  # allocator calls with a positive size
    bytes: int  # their total size
    by_op: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (count, bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "bytes": self.bytes,
            "by_op": {k: list(v) for k, v in self.by_op.items()},
        }


def count_allocations(fn: Callable[[], Any], repeat: int = 1) -> AllocationReport:
    """Run ``fn`` ``repeat`` times under the profiler; allocations per run (totals divided)."""
    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        for _ in range(repeat):
            fn()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    ops = []  # (start, end, name) of aten ops, to find the outermost op around an allocation
    allocs = []
    for e in events:
        if e.name() == "[memory]":
            if e.nbytes() > 0:
                allocs.append((e.start_ns(), e.nbytes()))
        elif e.name().startswith("aten::"):
            ops.append((e.start_ns(), e.end_ns(), e.name()))
    ops.sort()
    # keep outermost ops only: an op starting inside the previous outermost one is nested
    outer: list[tuple[int, int, str]] = []
    for start, end, name in ops:
        if outer and start < outer[-1][1]:
            continue
        outer.append((start, end, name))
    starts = [o[0] for o in outer]
    by_op: dict[str, list[int]] = {}
    for t, nbytes in allocs:
        i = bisect.bisect_right(starts, t) - 1
        name = outer[i][2] if i >= 0 and t <= outer[i][1] else "(outside ops)"
        entry = by_op.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    total_n = sum(v[0] for v in by_op.values())
    total_b = sum(v[1] for v in by_op.values())
    return AllocationReport(
        total_n // repeat,
        total_b // repeat,
        {k: (v[0] // repeat, v[1] // repeat) for k, v in sorted(by_op.items())},
    )


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto (the profiler's C++ side) prints start/stop lines straight to file descriptor 2,
    whatever KINETO_LOG_LEVEL says; the command line keeps stderr for its own messages, so fd 2
    points at /dev/null while the profiler runs. Python-level errors still propagate as exceptions.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real fd (e.g. captured by pytest)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
