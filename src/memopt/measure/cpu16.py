"""Whether float16 is a fast dtype on this CPU, measured, and the one-line note that says it is not.

A CPU computes float16 natively only with AVX512-FP16 or AMX-FP16; without them PyTorch widens
float16 to float32 around every product, and float16 runs slower than float32 (the demo measured
2.9x float32's latency for smollm2 here), while bfloat16 has kernels of its own (AVX512-BF16)
and keeps the same 2 bytes a weight. So a user who asks for float16 on such a CPU is told so, with
this machine's own timings, and pointed at bfloat16.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["float16_note", "float16_timings"]

_NATIVE = ("avx512_fp16", "amx_fp16")  # /proc/cpuinfo flags of float16 arithmetic


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def float16_timings(rows: int = 16, width: int = 1024, rounds: int = 3) -> dict[str, float]:
    """Seconds of one ``(rows, width) @ (width, width)`` linear layer in float32, float16 and
    bfloat16 on one thread (threads that wait for a busy core at every call measure the machine's
    load, not the dtype), each the best of ``rounds`` alternated rounds of 10 calls (~50 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(rows, width, rounds)
    finally:
        torch.set_num_threads(threads)


def _timed(rows: int, width: int, rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, width, generator=gen), torch.randn(width, width, generator=gen)
    cases = {d: (x.to(d), w.to(d)) for d in (torch.float32, torch.float16, torch.bfloat16)}
    best = dict.fromkeys(cases, float("inf"))
    with torch.no_grad():
        for xd, wd in cases.values():
            F.linear(xd, wd)  # first calls: one-time costs out of the timing
        for _ in range(rounds):
            for dtype, (xd, wd) in cases.items():
                for _ in range(10):
                    start = time.perf_counter()
                    F.linear(xd, wd)
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    return {str(d).removeprefix("torch."): s for d, s in best.items()}


@functools.cache
def float16_note() -> str | None:
    """One line for a user who asked for float16 on this CPU, or None where float16 is not slow
    here (native float16 arithmetic, or measured within 1.2x of float32 and of bfloat16)."""
    flags = _cpu_flags()
    if any(f in flags for f in _NATIVE):
        return None
    t = float16_timings()
    r16, rbf = t["float16"] / t["float32"], t["bfloat16"] / t["float32"]
    if r16 <= 1.2 or r16 <= 1.2 * rbf:
        return None
    return (
        f"float16 is slow on this CPU (no AVX512-FP16 or AMX-FP16): a linear layer measured "
        f"{r16:.2f}x float32's time, bfloat16 {rbf:.2f}x; bfloat16 keeps 2 bytes a weight and "
        "runs faster here"
    )
