"""A sparse matrix product that reads the bitmask form directly: C, built on first use.

Why by hand: a pruned weight stored as ``bitmask + float values`` (memopt.weights.sparse) takes
``1/8 + 4 * density`` bytes an element, 2.125 at 50 % against dense float32's 4. A batch-1 product
(decode) streams the weight once through memory, so reading the compressed form directly can beat
the dense matmul. torch has no kernel for this form (its CSR matmul needs int64 indices resident,
more bytes than the dense weight); reconstructing the dense weight at each call (the fallback)
costs several matmuls.

The kernel, per output row ``r`` and per 16 input columns: 16 mask bits ``m``; with AVX-512 the
row's next ``popcount(m)`` values are expanded into the 16 lanes where ``m`` is set
(``vexpandps``), multiplied by the 16 inputs of each of up to 8 input rows and accumulated; the
value pointer moves on by ``popcount(m)``. Without AVX-512, the same walk over the set bits
(``ctz``), one value at a time. Each output row needs the index of its first value in the stream,
``row_start (N + 1,) int64`` (8 bytes a row: 12 KiB for a 1536-row layer; computed once from the
mask, kept beside the weight, counted in its ``nbytes``). Rows are split over OpenMP threads.

Sums are float32 in a different order from the dense matmul's (16 lanes, then a tree): the result
agrees with ``x @ W.T`` to float32 rounding (tests/weights/test_sparse_kernel.py states the SQNR).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from memopt.core.cbuild import LazyLibrary

__all__ = ["MAX_ROWS", "available", "bitmask_linear", "row_starts"]

# Input rows up to which the kernel beats reconstruct + dense matmul (bench/sparse_kernel.py: the
# kernel reads the weight once per 8 input rows; the dense matmul, once for all of them).
MAX_ROWS = 16

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* 16 bits of the mask from bit position `bit` (least significant first), never reading past
   byte nbytes - 1. */
static inline uint32_t bits16(const uint8_t *mask, int64_t bit, int64_t nbytes) {
    int64_t b = bit >> 3;
    int s = (int)(bit & 7);
    uint32_t w = 0;
    if (s == 0 && b + 2 <= nbytes) {
        uint16_t h;
        memcpy(&h, mask + b, 2);
        return h;
    }
    for (int i = 0; i < 3 && b + i < nbytes; i++) w |= (uint32_t)mask[b + i] << (8 * i);
    return (w >> s) & 0xffffu;
}

/* Rows [r0, r1) of y (M, N) = x (M, K) @ W.T for MB input rows starting at x, y. */
static inline __attribute__((always_inline)) void rows_mb(
    const uint8_t *mask, int64_t nbytes, const float *vals, const int64_t *row_start,
    const float *x, float *y, int64_t k, int64_t n, const float *bias,
    int64_t r0, int64_t r1, const int MB)
{
    const float *vals_end = vals + row_start[n];
    for (int64_t r = r0; r < r1; r++) {
        const float *vp = vals + row_start[r];
        int64_t bit = r * k;
#ifdef __AVX512F__
        __m512 acc[8];
        for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();
        int64_t c = 0;
        if ((bit & 15) == 0 && vals_end - vp >= k) {
            /* aligned rows, values to spare: whole 16-value loads, expanded in registers */
            const uint16_t *mw = (const uint16_t *)(mask + (bit >> 3));
            for (; c + 16 <= k; c += 16) {
                uint32_t mk = mw[c >> 4];
                __m512 w = _mm512_maskz_expand_ps((__mmask16)mk, _mm512_loadu_ps(vp));
                vp += __builtin_popcount(mk);
                for (int i = 0; i < MB; i++)
                    acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * k + c), acc[i]);
            }
        }
        for (; c < k; c += 16) {
            uint32_t mk = bits16(mask, bit + c, nbytes);
            __mmask16 xm = 0xffff;
            if (k - c < 16) {
                xm = (__mmask16)((1u << (k - c)) - 1u);
                mk &= xm;
            }
            if (!mk) continue;
            __m512 w = _mm512_maskz_expandloadu_ps((__mmask16)mk, vp);
            vp += __builtin_popcount(mk);
            for (int i = 0; i < MB; i++)
                acc[i] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(xm, x + i * k + c), acc[i]);
        }
        for (int i = 0; i < MB; i++) {
            float s = _mm512_reduce_add_ps(acc[i]);
            y[i * n + r] = bias ? s + bias[r] : s;
        }
#else
        float acc[8];
        for (int i = 0; i < MB; i++) acc[i] = 0.0f;
        for (int64_t c = 0; c < k; c += 16) {
            uint32_t mk = bits16(mask, bit + c, nbytes);
            if (k - c < 16) mk &= (1u << (k - c)) - 1u;
            while (mk) {
                int j = __builtin_ctz(mk);
                float v = *vp++;
                for (int i = 0; i < MB; i++) acc[i] += v * x[i * k + c + j];
                mk &= mk - 1;
            }
        }
        for (int i = 0; i < MB; i++) y[i * n + r] = bias ? acc[i] + bias[r] : acc[i];
#endif
    }
}

static void rows_any(const uint8_t *mask, int64_t nbytes, const float *vals,
                     const int64_t *row_start, const float *x, float *y, int64_t k, int64_t n,
                     const float *bias, int64_t r0, int64_t r1, int mb)
{
    switch (mb) {
    case 1: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 1); break;
    case 2: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 2); break;
    case 3: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 3); break;
    case 4: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 4); break;
    case 5: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 5); break;
    case 6: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 6); break;
    case 7: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 7); break;
    default: rows_mb(mask, nbytes, vals, row_start, x, y, k, n, bias, r0, r1, 8); break;
    }
}

/* y (M, N) = x (M, K) @ W.T (+ bias), W (N, K) given by its bitmask (N*K bits) and its values in
   row-major order; row_start (N + 1,). x and y contiguous float32. */
void sparse_bitmask_f32(const uint8_t *mask, const float *vals, const int64_t *row_start,
                        const float *x, float *y, const float *bias,
                        int64_t m, int64_t n, int64_t k, int threads)
{
    int64_t nbytes = (n * k + 7) / 8;
    /* chunks of 16 rows: small enough to balance, large enough to amortise the schedule */
    int64_t chunks = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int64_t r0 = ch * 16, r1 = r0 + 16 < n ? r0 + 16 : n;
        for (int64_t m0 = 0; m0 < m; m0 += 8) {
            int mb = (int)(m - m0 < 8 ? m - m0 : 8);
            rows_any(mask, nbytes, vals, row_start, x + m0 * k, y + m0 * n, k, n, bias, r0, r1, mb);
        }
    }
}

/* row_start (N + 1,): the index of each row's first value, from the mask's popcounts. */
void sparse_row_starts(const uint8_t *mask, int64_t n, int64_t k, int64_t *row_start)
{
    int64_t nbytes = (n * k + 7) / 8, acc = 0;
    for (int64_t r = 0; r < n; r++) {
        row_start[r] = acc;
        int64_t bit = r * k;
        for (int64_t c = 0; c < k; c += 16) {
            uint32_t mk = bits16(mask, bit + c, nbytes);
            if (k - c < 16) mk &= (1u << (k - c)) - 1u;
            acc += __builtin_popcount(mk);
        }
    }
    row_start[n] = acc;
}
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
_VP, _I64 = ctypes.c_void_p, ctypes.c_int64
_LIB = LazyLibrary(
    "sparse",
    _SOURCE,
    _FLAGS,
    {
        "sparse_bitmask_f32": ([_VP] * 6 + [_I64] * 3 + [ctypes.c_int], None),
        "sparse_row_starts": ([_VP, _I64, _I64, _VP], None),
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


def bitmask_linear(
    mask: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    x: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K) float32 @ W.T -> (M, N)`` for W ``(N, K)`` stored as ``mask`` + ``values``
    (float32, row-major stream), ``starts`` from :func:`row_starts`. CPU tensors only."""
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.contiguous().float()
    _load().sparse_bitmask_f32(
        mask.data_ptr(), values.data_ptr(), starts.data_ptr(), x.data_ptr(), y.data_ptr(),
        None if b is None else b.data_ptr(), m, n, k, max(1, torch.get_num_threads()),
    )  # fmt: skip
    return y
