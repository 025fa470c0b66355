"""Matmul kernels for quantized weights on CPU, chosen by measurement on the machine that runs them.

Why several kernels and a chooser: the fastest path depends on the CPU's instruction set and the
batch, not only on the format; bench/matmul_kernels.py prints the timings of every candidate.

int8 weight-only at batch 1 (decode): ``torch._weight_int8pack_mm`` is only vectorised for
reduced-precision activations (with float32 ones it is slower than a float32 ``F.linear``), so we
round the activations to bfloat16 (relative error 2^-9 per element, far below int8's own weight
error) and the per-channel scale is fused. Over many rows that kernel loses to a blocked int8 ->
bfloat16 dequantize (exact: |q| <= 127 fits bf16's significand) + bf16 matmul, scale applied to
the output. On a CPU without native bf16 (AVX2 only) the ratios differ, which is why
:func:`autotune` times the candidates once per (kernel family, shape, batch bucket, dtype,
threads) and keeps the fastest. All candidates of a family compute the same function up to bf16
rounding of the activations; ``Int8Dynamic`` (per-token int8 activations through
``torch._int_mm``) is a separate config because it changes the numerics.

int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` takes bfloat16 activations (float32 and
float16 ones take a slow path), scales and zeros as one bfloat16 ``(K/G, N, 2)`` tensor
and the weight in its own row-interleaved layout (:func:`int4_block_n`). We keep the weight in that
layout only (one copy, ``N * K / 2`` bytes); the canonical layout for disk is a cheap reshuffle.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from memopt.weights.primitives import pack_int4_nblock

__all__ = [
    "INT4_KERNELS",
    "INT8_KERNELS",
    "autotune",
    "chosen_kernels",
    "default_kernels",
    "dequant_linear",
    "ggml_linear",
    "int4_block_n",
    "int8_dynamic_linear",
    "int8_linear",
    "int4_linear",
    "row_block",
    "set_untimed",
]

Kernel = Callable[..., torch.Tensor]

# (family, N, K, batch bucket, dtype, threads) -> name of the fastest candidate
_CHOSEN: dict[tuple, str] = {}
# MEMOPT_KERNEL=name forces a candidate wherever it exists (benchmarks and tests use it)
_FORCED_ENV = "MEMOPT_KERNEL"
# Untimed (set under a streaming memory budget): a shape's first call takes the family's default
# instead of timing every candidate. Timing costs memory, not only time: a bfloat16 matmul
# candidate initializes oneDNN, RSS at its first call that is never given back and that no streaming
# plan counts, enough to push a small model's run over its budget; and timing the candidates of a
# large vocabulary's output head takes a large share of a short run.
_UNTIMED = False


def row_block(n: int, k: int, multiple: int = 64, temp_bytes: int = 1 << 20) -> int:
    """Rows dequantized at a time: a float32 temporary of about ``temp_bytes`` (fits in L2)."""
    rows = max(multiple, (temp_bytes // (4 * k)) // multiple * multiple)
    return min(n, rows)


def _bucket(m: int) -> int:
    return 1 if m == 1 else 1 << (m - 1).bit_length()  # 1, 2, 4, 8, 16, ...


def set_untimed(on: bool) -> bool:
    """Turn untimed choice on or off (see ``_UNTIMED``); returns the previous setting."""
    global _UNTIMED
    before, _UNTIMED = _UNTIMED, on
    return before


@contextlib.contextmanager
def default_kernels() -> Iterator[None]:
    """Inside, every shape runs its family's default kernel, whatever was chosen before (by
    timing, which may pick another valid kernel that rounds differently): reproducible outputs."""
    before, saved = set_untimed(True), dict(_CHOSEN)
    _CHOSEN.clear()
    try:
        yield
    finally:
        _CHOSEN.clear()
        _CHOSEN.update(saved)
        set_untimed(before)


def autotune(
    key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], default: str | None = None
) -> torch.Tensor:
    """Run the fastest candidate for ``key``; the first call times each (warm-up, median of 5).

    A candidate that raises (an unsupported shape or dtype) is dropped. Untimed
    (:func:`set_untimed`), the first call runs ``default`` (else the candidates in order) and keeps
    the first that runs.
    """
    forced = os.environ.get(_FORCED_ENV)
    if forced in candidates:
        return candidates[forced]()
    name = _CHOSEN.get(key)
    if name in candidates:
        return candidates[name]()
    if len(candidates) == 1:
        ((name, fn),) = candidates.items()
        _CHOSEN[key] = name
        return fn()
    errors: list[str] = []
    if _UNTIMED:
        order = sorted(candidates, key=lambda c: c != default)  # the default first
        for cand in order:
            try:
                result = candidates[cand]()
            except (RuntimeError, NotImplementedError) as e:
                errors.append(f"{cand}: {e}")
                continue
            _CHOSEN[key] = cand
            return result
        raise RuntimeError(f"no kernel ran for {key}: {'; '.join(errors)}")
    results: dict[str, torch.Tensor] = {}
    for cand, fn in candidates.items():  # warm-up, and drop candidates that cannot run
        try:
            results[cand] = fn()
        except (RuntimeError, NotImplementedError) as e:
            errors.append(f"{cand}: {e}")
    if not results:
        raise RuntimeError(f"no kernel ran for {key}: {'; '.join(errors)}")
    times: dict[str, list[float]] = {c: [] for c in results}
    for _ in range(5):  # rounds interleave the candidates: a burst of load hits them all alike
        for cand in results:
            t0 = time.perf_counter()
            candidates[cand]()
            times[cand].append(time.perf_counter() - t0)
    best = min(times, key=lambda c: statistics.median(times[c]))
    result = results[best]
    _CHOSEN[key] = best
    return result


def chosen_kernels() -> dict[str, str]:
    """What :func:`autotune` picked so far, for reports: ``"family N K batch dtype threads" -> name``."""
    return {" ".join(map(str, k)): v for k, v in _CHOSEN.items()}


def _key(family: str, x: torch.Tensor, n: int, k: int) -> tuple:
    return (
        family,
        n,
        k,
        _bucket(x.shape[0]),
        str(x.dtype).removeprefix("torch."),
        torch.get_num_threads(),
    )


# ---- blocked dequantize + matmul: works for every format, bounded temporary ----


def dequant_linear(
    x: torch.Tensor,
    dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor],
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    multiple: int = 64,
) -> torch.Tensor:
    """``x @ W.T`` with W dequantized ``row_block`` rows at a time: never a full float weight.

    ``dequant_rows(n0, n1, dtype)`` returns rows ``n0:n1`` of W, ``(n1 - n0, K)``.
    """
    xd = x.to(dtype)  # (M, K)
    step = row_block(n, k, multiple)
    if torch.is_grad_enabled() and xd.requires_grad:  # out= refuses autograd: concatenate instead
        blocks = [xd @ dequant_rows(a, min(n, a + step), dtype).t() for a in range(0, n, step)]
        return torch.cat(blocks, 1).to(x.dtype)
    out = torch.empty(x.shape[0], n, dtype=dtype, device=x.device)  # (M, N)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        torch.mm(xd, dequant_rows(n0, n1, dtype).t(), out=out[:, n0:n1])
    return out.to(x.dtype)


# ---- int8, symmetric per output channel: q (N, K) int8, scale (N,) float32 ----


def _int8pack_bf16(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # ATen's fused int8 weight-only kernel, vectorised for bf16 activations only (see module doc)
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scale.to(torch.bfloat16)).to(x.dtype)


def _int8pack_fp32(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.float(), q, scale.float()).to(x.dtype)


def _int8_dequant(dtype: torch.dtype) -> Kernel:
    def run(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # int8 -> dtype is exact (|q| <= 127 fits bf16's 8-bit significand); the per-channel scale
        # is applied to the (M, N) output in float32, not to the weight
        n, k = q.shape
        y = dequant_linear(x, lambda a, b, dt: q[a:b].to(dt), n, k, dtype)
        return (y.float() * scale.float()).to(x.dtype)

    return run


INT8_KERNELS: dict[str, Kernel] = {
    "int8pack_bf16": _int8pack_bf16,
    "int8_dequant_bf16": _int8_dequant(torch.bfloat16),
    "int8_dequant_fp32": _int8_dequant(torch.float32),
}
_EXACT_INT8 = "int8_dequant_fp32"  # float32 activations: the only one for more than one row
# measured, never chosen: kept for the benchmark table
SLOW_KERNELS: dict[str, Kernel] = {"int8pack_fp32": _int8pack_fp32}


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (M, K) @ (q * scale[:, None]).T`` -> ``(M, N)``, int8 weight-only, fastest path here."""
    n, k = q.shape
    if x.device.type != "cpu":
        return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])
    key = _key("int8", x, n, k)
    name = _CHOSEN.get(key)
    if name is not None and _FORCED_ENV not in os.environ:  # the decode path: no closures
        return INT8_KERNELS[name](x, q, scale)
    # bfloat16 activations only for one row at a time (decode): over many rows (prefill, an
    # encoder's tokens) their rounding compounds through the layers (an encoder's embedding cosine
    # drops visibly), and which kernel the timing picks must not change the model's quality
    kernels = INT8_KERNELS if x.shape[0] == 1 else {_EXACT_INT8: INT8_KERNELS[_EXACT_INT8]}
    cands = {name: (lambda f=f: f(x, q, scale)) for name, f in kernels.items()}
    return autotune(key, cands, default="int8pack_bf16")  # the decode winner with native bf16


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations, int8 x int8 -> int32 (``torch._int_mm``), rescale.

    ``y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] q[n, k]``.
    """
    xf = x.float()
    sx = (xf.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (M, 1)
    xq = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)  # (M, K)
    try:
        acc = torch._int_mm(xq, q.t())  # (M, N) int32; q.t() is a free view, (K, N)
    except RuntimeError:
        # a shape the kernel refuses: the same integer sums in float64 (exact)
        acc = xq.double() @ q.double().t()
    return (acc.float() * sx * scale.float()).to(x.dtype)


# ---- int4, PyTorch's CPU kernel ----

_BLOCK_N: dict[int, int | None] = {}


def int4_block_n(n: int) -> int | None:
    """Row-block size of the CPU int4 kernel's layout for N rows (64 with AVX-512, 32 with AVX2).

    Found by packing a probe with ``_convert_weight_to_int4pack_for_cpu`` and comparing with our own
    packer; None when the kernel is missing or its layout for this N is not one we can write.
    """
    if n in _BLOCK_N:
        return _BLOCK_N[n]
    found = None
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is not None and n % 16 == 0:
        probe = torch.randint(
            0, 16, (n, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
        )
        try:
            ref = op(probe, 1)  # (N, 32) uint8
        except RuntimeError:
            ref = None
        if ref is not None:
            for b in (64, 32, 16):
                if n % b == 0 and torch.equal(pack_int4_nblock(probe, b), ref):
                    found = b
                    break
    _BLOCK_N[n] = found
    return found


def _int4_aten(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, sz)
    return y.to(x.dtype)


INT4_KERNELS: dict[str, Kernel] = {"int4_aten_bf16": _int4_aten}


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    group: int,
    sz: torch.Tensor,
    dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor],
    block_n: int | None,
) -> torch.Tensor:
    """int4 weight-only ``x (M, K) @ W.T``: ATen's kernel when the layout is its own, else blocked."""
    n, k = packed.shape[0], packed.shape[1] * 2
    key = _key("int4", x, n, k)
    fast = block_n is not None and x.device.type == "cpu" and _FORCED_ENV not in os.environ
    if fast and _CHOSEN.get(key) == "int4_aten_bf16":
        return _int4_aten(x, packed, group, sz)  # the decode path: no closures, no timing
    mult = block_n or 64
    cands: dict[str, Callable[[], torch.Tensor]] = {
        "int4_dequant_fp32": lambda: dequant_linear(x, dequant_rows, n, k, torch.float32, mult),
        # large batches: bf16 weights blocks (AMX / AVX-512 BF16 matmul where the CPU has it)
        "int4_dequant_bf16": lambda: dequant_linear(x, dequant_rows, n, k, torch.bfloat16, mult),
    }
    if block_n is not None and x.device.type == "cpu":
        cands["int4_aten_bf16"] = lambda: _int4_aten(x, packed, group, sz)
    return autotune(key, cands, default="int4_aten_bf16")


# ---- GGML blocks (GGUF's Q8_0, Q4_0, Q4_1, ...): (N, row_bytes) uint8 ----


def ggml_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    ggml_type: str,
    n: int,
    k: int,
    dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor],
) -> torch.Tensor:
    """``x (M, K) @ W.T`` for a weight held as GGML blocks: blocked dequantize + float32 matmul
    (the dequantized rows are exactly llama.cpp's values)."""
    return dequant_linear(x, dequant_rows, n, k, torch.float32, multiple=1)
