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
import sys
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.plan import plan_model, verify_plan


class CNN(nn.Module):
    """The brief's case-1 CNN on 8x8x1 digits: conv 32 3x3 ReLU -> maxpool 2 -> flatten -> fc 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(288, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def bench_one(
    label: str, model: Any, inputs: dict[str, torch.Tensor] | None, seq: int, repeat: int
) -> dict[str, Any]:
    p = plan_model(model, seq=seq, inputs=inputs)
    v = verify_plan(p, model, repeat=repeat)
    return {
        **p.to_dict(),
        "model": label,
        "constant_bytes": v["constant_bytes"],
        "eager_activation_peak_bytes": v["eager_activation_peak_bytes"],
        "eager_peak_over_arena": round(v["eager_activation_peak_bytes"] / p.arena_bytes, 2),
        "arena_allocations_per_step": v["steady_state_allocations"],
        "arena_allocation_bytes_per_step": v["steady_state_allocation_bytes"],
        "eager_allocations_per_step": v["eager_allocations"],
        "eager_ms": v["eager_ms"],
        "arena_ms": v["arena_ms"],
        "latency_arena_over_eager": v["latency_vs_eager"],
        "max_abs_diff": v["max_abs_diff"],
        "fallback_ops": v["fallback_ops"],
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
                loaded = load_model(name, dequantize=True)  # smollm2: float32, as `memopt plan`
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
