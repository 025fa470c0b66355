"""Check a plan against eager PyTorch: same outputs, zero allocations, activation peak, latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memopt.plan.alloc import count_allocations

__all__ = ["interleaved", "verify_plan"]


def interleaved(fa: Callable[[], Any], fb: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median seconds of fa and fb, run alternately so that machine load hits both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def _outputs(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if hasattr(x, "to_tuple"):
        x = x.to_tuple()
    return [t for t in x if isinstance(t, torch.Tensor)]


def verify_plan(plan: Any, model: Any, repeat: int = 10) -> dict[str, Any]:
    """Run ``plan``'s executor and eager ``model`` (a LoadedModel or nn.Module) on the plan's inputs.

    Returns ``max_abs_diff`` (over all outputs), ``steady_state_allocations`` and
    ``eager_allocations`` (allocator calls per step, counted by the profiler after a warm-up),
    ``eager_activation_peak_bytes`` (memopt's tracker on one eager forward), and latency as the
    ratio ``latency_vs_eager`` of interleaved medians (an absolute time is not a result on a shared
    machine).
    """
    from memopt.measure.tracker import MemoryTracker

    module: nn.Module = model.model if hasattr(model, "task") else model
    extra = {"use_cache": False} if getattr(model, "task", None) == "causal-lm" else {}
    feed = plan.inputs
    ex = plan.executor()

    def eager() -> Any:
        with torch.no_grad():
            return module(**feed, **extra)

    def arena() -> Any:
        return ex.run(**feed)

    ref = _outputs(eager())
    got = _outputs(arena())
    diff = max(((g - r).abs().max().item() for g, r in zip(got, ref, strict=False)), default=0.0)
    arena()  # steady state: the first run may set up lazily
    arena_allocs = count_allocations(arena, repeat=3)
    eager_allocs = count_allocations(eager, repeat=3)
    with torch.no_grad(), MemoryTracker(module, per_module=False, timeline=False) as tracker:
        eager()
    t_eager, t_arena = interleaved(eager, arena, repeat)
    return {
        "max_abs_diff": diff,
        "steady_state_allocations": arena_allocs.count,
        "steady_state_allocation_bytes": arena_allocs.bytes,
        "eager_allocations": eager_allocs.count,
        "eager_activation_peak_bytes": int(tracker.peak_breakdown()["activations"]),
        "constant_bytes": ex.constant_bytes,
        "fallback_ops": ex.fallback_ops,
        "eager_ms": round(t_eager * 1e3, 3),
        "arena_ms": round(t_arena * 1e3, 3),
        "latency_vs_eager": round(t_arena / t_eager, 3),
    }
