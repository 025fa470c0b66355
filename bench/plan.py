"""Benchmark the static activation planner: arena vs lower bound vs naive, vs eager PyTorch.

For each model and shape: plan it (torch.export -> lifetimes -> arena), run the arena executor and
eager PyTorch on the same inputs, and report

- arena / lower bound (1.00 = optimal for these tensors; target <= 1.05),
- naive / arena (every intermediate its own buffer, no reuse, over the arena),
- eager's measured activation peak / arena (memopt's MemoryTracker on one eager forward),
- allocator calls per steady-state step (profiler, every c10 CPU allocation), arena and eager,
- latency arena / eager (interleaved runs, medians; the machine is shared, so read ratios only),
- max |arena - eager| over the outputs.

Run: ``python bench/plan.py [--json] [--models minilm,smollm2,cnn] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memopt.errors import MemoptError
from memopt.plan import count_allocations, plan_model


class CNN(nn.Module):
    """The brief's case-1 CNN on 8x8x1 digits: conv 32 3x3 ReLU -> maxpool 2 -> flatten -> fc 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(288, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


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


def eager_activation_peak(model: nn.Module, fn: Callable[[], Any]) -> int | None:
    try:
        from memopt.measure.tracker import MemoryTracker
    except ImportError:
        return None
    with torch.no_grad(), MemoryTracker(model, per_module=False, timeline=False) as t:
        fn()
    return int(t.peak_breakdown()["activations"])


def _outputs(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if hasattr(x, "to_tuple"):
        x = x.to_tuple()
    return [t for t in x if isinstance(t, torch.Tensor)]


def bench_one(
    label: str, model: Any, inputs: dict[str, torch.Tensor] | None, seq: int, repeat: int
) -> dict[str, Any]:
    p = plan_model(model, seq=seq, inputs=inputs)
    module = model.model if hasattr(model, "model") and hasattr(model, "task") else model
    feed = p.inputs
    extra = {"use_cache": False} if getattr(model, "task", None) == "causal-lm" else {}
    ex = p.executor()

    def eager() -> Any:
        with torch.no_grad():
            return module(**feed, **extra)

    def arena() -> Any:
        return ex.run(**feed)

    ref = _outputs(eager())
    got = _outputs(arena())
    diff = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=False))
    arena()
    arena_allocs = count_allocations(arena, repeat=3)
    eager_allocs = count_allocations(eager, repeat=3)
    peak = eager_activation_peak(module, eager)
    t_eager, t_arena = interleaved(eager, arena, repeat)
    return {
        **p.to_dict(),
        "model": label,
        "constant_bytes": ex.constant_bytes,
        "eager_activation_peak_bytes": peak,
        "eager_peak_over_arena": round(peak / p.arena_bytes, 2) if peak else None,
        "arena_allocations_per_step": arena_allocs.count,
        "arena_allocation_bytes_per_step": arena_allocs.bytes,
        "eager_allocations_per_step": eager_allocs.count,
        "eager_ms": round(t_eager * 1e3, 3),
        "arena_ms": round(t_arena * 1e3, 3),
        "latency_arena_over_eager": round(t_arena / t_eager, 3),
        "max_abs_diff": diff,
        "fallback_ops": ex.fallback_ops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="static activation plan benchmark")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models", default="minilm,smollm2,cnn")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    wanted = args.models.split(",")
    from memopt.models import load_model

    for name in wanted:
        try:
            if name == "cnn":
                cnn = CNN().eval()
                x = torch.randn(64, 1, 8, 8)
                rows.append(bench_one("cnn b64", cnn, {"x": x}, 0, args.repeat))
            elif name in ("minilm", "smollm2"):
                loaded = load_model(name)
                for seq in (128,) if name == "minilm" else (128, 512):
                    rows.append(bench_one(f"{name} s{seq}", loaded, None, seq, args.repeat))
                del loaded
            else:
                skipped[name] = "unknown benchmark model"
        except MemoptError as exc:
            skipped[name] = str(exc)
            print(f"skipped {name}: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps({"rows": rows, "skipped": skipped}))
        return
    from rich.console import Console
    from rich.table import Table

    def mib(b: int | None) -> str:
        return "-" if b is None else f"{b / 2**20:.2f}"

    table = Table(title="memopt.plan: one arena per model (fp32, batch 1 unless noted)")
    for col in (
        "model",
        "arena MiB",
        "lower bd MiB",
        "arena/lower",
        "naive/arena",
        "eager act. peak/arena",
        "allocs/step arena (eager)",
        "latency arena/eager",
        "max |diff|",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            mib(r["arena_bytes"]),
            mib(r["lower_bound_bytes"]),
            f"{r['arena_over_lower_bound']:.3f}",
            f"{r['naive_over_arena']:.1f}x",
            "-" if r["eager_peak_over_arena"] is None else f"{r['eager_peak_over_arena']:.2f}x",
            f"{r['arena_allocations_per_step']} ({r['eager_allocations_per_step']})",
            f"{r['latency_arena_over_eager']:.2f}x",
            f"{r['max_abs_diff']:.1e}",
        )
    Console(width=170).print(table)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


if __name__ == "__main__":
    main()
