"""A sparse matrix product that reads the bitmask form directly: C, built on first use.

Why by hand: a pruned weight stored as ``bitmask + float values`` (memopt.weights.sparse) takes
``1/8 + 4 * density`` bytes an element, 2.125 at 50 % against dense float32's 4 (int8 values:
0.64). A batch-1 product (decode) streams the weight once through memory, so reading the
compressed form directly can beat the dense matmul. torch has no kernel for this form (its CSR
matmul needs int64 indices resident, more bytes than the dense weight); reconstructing the dense
weight at each call (the fallback) costs several matmuls.

The routines are memopt.weights.sparse_c's (the decode engine compiles the same text): per output
row and 16 input columns, the row's next ``popcount`` values expanded into the lanes where the
mask is set (AVX-512 ``vexpandps``; a plain bit walk without it), against up to 8 input rows at a
time. Each output row needs the index of its first value in the stream, ``row_start (N + 1,)
int64`` (8 bytes a row: 12 KiB for a 1536-row layer; computed once from the mask, kept beside the
weight). Rows are split over OpenMP threads.

Sums are float32 in a different order from the dense matmul's (16 lanes, then a tree): the result
agrees with ``x @ W.T`` of the dequantized weight to float32 rounding
(tests/weights/test_sparse_kernel.py states the SQNR).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from memopt.core.cbuild import LazyLibrary
from memopt.weights.sparse_c import SPARSE_C

__all__ = ["MAX_ROWS", "available", "bitmask_linear", "row_starts", "runs_of_8"]

# Input rows up to which the kernel beats reconstruct + dense matmul (bench/sparse_kernel.py: the
# kernel reads the weight once per 8 input rows; the dense matmul, once for all of them).
MAX_ROWS = 16

# the exported entry points over the shared routines (memopt.weights.sparse_c)
_SOURCE = (
    SPARSE_C
    + r"""
/* y (M, N) = x (M, K) @ W.T (+ bias); vfmt: 0 float32 values, 1 int8 values + float32 scales,
   2 float32 values 8 in every run of 16 columns, 3 int4 values + bfloat16 scales and zeros */
void sparse_bitmask_linear(const uint8_t *mask, const void *vals, const void *scale,
                           const void *zero, const int64_t *row_start, int32_t vfmt,
                           const float *x, float *y, const float *bias, int64_t m, int64_t n,
                           int64_t k, int threads)
{
    sp_weight w = {mask, vals, vfmt == SP_I8 ? (const float *)scale : NULL, row_start, n, k, vfmt,
                   vfmt == SP_I4 ? (const uint16_t *)scale : NULL, (const uint16_t *)zero};
    sp_linear(&w, x, y, bias, m, threads);
}

int sparse_runs_of_8(const uint8_t *mask, int64_t n, int64_t k)
{
    return sp_runs_of_8(mask, n, k);
}

void sparse_row_starts(const uint8_t *mask, int64_t n, int64_t k, int64_t *row_start)
{
    sp_row_starts(mask, n, k, row_start);
}
"""
)

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
_VP, _I64 = ctypes.c_void_p, ctypes.c_int64
_LIB = LazyLibrary(
    "sparse",
    _SOURCE,
    _FLAGS,
    {
        "sparse_bitmask_linear": (
            [_VP] * 5 + [ctypes.c_int32] + [_VP] * 3 + [_I64] * 3 + [ctypes.c_int],
            None,
        ),
        "sparse_row_starts": ([_VP, _I64, _I64, _VP], None),
        "sparse_runs_of_8": ([_VP, _I64, _I64], ctypes.c_int),
    },
)


def _load() -> Any:
    return _LIB.get()


def available() -> bool:
    """True when the kernel is built (a C compiler with OpenMP; not ``MEMOPT_KERNELS=0``)."""
    return _load() is not None


def row_starts(mask: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``(N + 1,) int64``: where each row's values begin in the value stream (CPU mask)."""
    out = torch.empty(n + 1, dtype=torch.int64)
    _load().sparse_row_starts(mask.data_ptr(), n, k, out.data_ptr())
    return out


def runs_of_8(mask: torch.Tensor, n: int, k: int) -> bool:
    """True when K % 16 == 0 and every run of 16 mask bits holds exactly 8 (2:4 does): the
    kernel's faster form for float32 values (a run's values at a known offset)."""
    return bool(_load().sparse_runs_of_8(mask.data_ptr(), n, k))


def bitmask_linear(
    mask: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    x: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    runs8: bool = False,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K) float32 @ W.T -> (M, N)`` for W ``(N, K)`` stored as ``mask`` + ``values``
    (row-major stream: float32; int8 with ``scale``, one float32 per 128 values of the stream;
    int4 codes two a byte with ``scale`` and ``zero``, bfloat16 per 64: memopt.weights.sparse's
    forms), ``starts`` from :func:`row_starts`; ``runs8``: float32 values, :func:`runs_of_8`
    true. CPU tensors only."""
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.contiguous().float()
    if (values.dtype != torch.float32) != (scale is not None) or (zero is not None) != (
        values.dtype == torch.uint8
    ):
        raise ValueError("int8 values need their scales, int4 their scales and zeros, float32 none")
    vfmt = 3 if zero is not None else 1 if scale is not None else 2 if runs8 else 0
    _load().sparse_bitmask_linear(
        mask.data_ptr(), values.data_ptr(), None if scale is None else scale.data_ptr(),
        None if zero is None else zero.data_ptr(), starts.data_ptr(), vfmt, x.data_ptr(),
        y.data_ptr(),
        None if b is None else b.data_ptr(), m, n, k, max(1, torch.get_num_threads()),
    )  # fmt: skip
    return y
