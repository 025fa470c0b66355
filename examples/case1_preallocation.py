"""Case 1 of the brief: an image CNN trained with preallocated, pooled memory vs a plain loop.

The brief's model (Keras): Conv2D(32, 3x3, ReLU) -> MaxPooling(2x2) -> Flatten -> Dense(10, softmax),
Adam, sparse categorical cross-entropy, 10 epochs, on 32x32x3 images. Here the data are
scikit-learn's digits (1,797 real 8x8 grey images), so the input is 8x8x1: conv -> (32, 6, 6),
pool -> (32, 3, 3), flatten -> 288, linear -> 10 (softmax folded into the cross-entropy loss).

Two loops, each in a fresh child process (so peak RSS is the loop's own):

- plain: new batch tensors every step (``x[idx]``), gradients freed and re-created every step
  (``zero_grad()`` sets them to None), Adam's default multi-tensor path, glibc's default malloc
  (tensors above its mmap threshold are mmap'ed and unmapped again on every step).
- preallocated: the heap reserved and kept up front (``preallocate_cpu_heap``, the CPU counterpart of
  TensorFlow's up-front GPU reservation; ``preallocate_cuda`` on a GPU), batch buffers from a
  :class:`BufferPool` filled in place (``index_select(out=)``, pinned when CUDA exists), gradients
  kept and zeroed in place (``zero_grad(set_to_none=False)``), fused Adam (no per-step temporaries).

Printed: allocator calls per step (every c10 CPU allocation, counted by the profiler), page faults
per step, peak RSS, median step time, and test accuracy (same seed, same batches: same model).
Run: ``python examples/case1_preallocation.py`` (about 20 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

EPOCHS = 10
BATCH = 32


class CaseOneCNN(nn.Module):
    """Conv2d(1->32, 3x3) ReLU -> MaxPool 2x2 -> Flatten -> Linear(288 -> 10). x (B, 1, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3)  # (B, 32, 6, 6)
        self.pool = nn.MaxPool2d(2)  # (B, 32, 3, 3)
        self.fc = nn.Linear(32 * 3 * 3, 10)  # (B, 10) logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


def run(variant: str) -> dict[str, float]:
    from memopt.plan.alloc import count_allocations
    from memopt.plan.pool import BufferPool, fill_batch, preallocate_cpu_heap

    torch.set_num_threads(1)  # 2 shared cores: one thread each keeps the comparison fair
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    xtr, ytr, xte, yte = load_digits()
    torch.manual_seed(0)
    model = CaseOneCNN()
    loss_fn = nn.CrossEntropyLoss()
    pre = variant == "preallocated"
    if pre:
        preallocate_cpu_heap(16 << 20)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        pool = BufferPool()
        xb = pool.acquire((BATCH, 1, 8, 8))
        yb = pool.acquire((BATCH,), torch.int64)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    n = (len(ytr) // BATCH) * BATCH  # full batches only: every step has the same shapes

    def step(idx: torch.Tensor) -> None:
        if pre:
            fill_batch(xtr, idx, xb)
            fill_batch(ytr, idx, yb)
            x, y = xb, yb
            opt.zero_grad(set_to_none=False)
        else:
            x, y = xtr[idx], ytr[idx]
            opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    times: list[float] = []
    allocs = faults = counted = 0
    for epoch in range(EPOCHS):
        order = torch.randperm(len(ytr), generator=gen)[:n].view(-1, BATCH)
        for i, idx in enumerate(order):
            if epoch == 1 and i < 5:  # steady state: count five steps of the second epoch
                allocs += count_allocations(lambda idx=idx: step(idx)).count
                counted += 1
                continue
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(idx)
            times.append(time.perf_counter() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "allocations_per_step": allocs / counted,
        "page_faults_per_step": faults / len(times),
        "peak_rss_bytes": peak,
        "peak_rss_over_start_bytes": peak - base_rss,
        "step_ms": statistics.median(times) * 1e3,
        "test_accuracy": acc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["plain", "preallocated"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.variant:  # child process
        print(json.dumps(run(args.variant)))
        return
    results = {}
    for variant in ("plain", "preallocated"):
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", variant],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Case 1: CNN on sklearn digits (8x8x1), Adam, {EPOCHS} epochs, batch {BATCH}"
    )
    table.add_column("loop")
    for col in ("allocs/step", "page faults/step", "peak RSS", "step (ms)", "test acc"):
        table.add_column(col, justify="right")
    for variant, r in results.items():
        table.add_row(
            variant,
            f"{r['allocations_per_step']:.1f}",
            f"{r['page_faults_per_step']:.1f}",
            f"{r['peak_rss_bytes'] / 2**20:.1f} MiB",
            f"{r['step_ms']:.3f}",
            f"{r['test_accuracy']:.3f}",
        )
    Console().print(table)
    ratio = results["preallocated"]["step_ms"] / results["plain"]["step_ms"]
    print(f"step time preallocated / plain: {ratio:.2f}x (medians; shared machine, noisy)")


if __name__ == "__main__":
    main()
