"""int8 weight x float32 activations for a few input rows: C, built on first use.

Why by hand: at batch 1, torch's int8 weight-only kernel (``_weight_int8pack_mm``) is vectorised
for bfloat16 activations only, so each call converts the input, the scales and the output
(measured at 1 x 7200 by 10, the brief's CNN classifier: 13 us with the conversions, 7 us for the
float32 ``F.linear`` of the same shape, and about 8 us of it fixed cost whatever the shape). This
kernel reads the int8 codes as they are stored (``(N, K)`` row-major, one scale per row), widens
16 at a time to float32 (AVX-512: ``vpmovsxbd`` + ``vcvtdq2ps``), multiplies them with the float32
inputs in four independent accumulators (the fused multiply-add's latency hidden) and applies the
row's scale and the bias at the end: ``y[m, n] = scale[n] * sum_k x[m, k] q[n, k] + bias[n]``.
The activations stay float32 (no rounding to bfloat16), so the result is ``x @ (q * scale).T`` to
float32 rounding (a different order of the sums). Without AVX-512 the same loop in plain C, which
the compiler vectorises for the CPU it has. Rows split over OpenMP threads when the weight is
large enough to pay for them.

Used by memopt's Keras layers for calls of at most :data:`MAX_ROWS` input rows (a batch-1 call, an
LSTM's few steps); above that the weight is read once per input row here, where the dequantizing
kernels read it once for all of them.
"""

from __future__ import annotations

import ctypes

import torch

from memopt.core.cbuild import LazyLibrary

__all__ = ["MAX_ROWS", "available", "int8_gemv"]

MAX_ROWS = 8

_SOURCE = r"""
#include <stdint.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* sum_k x[k] * q[k] in float32 */
static inline float dot_i8(const float *x, const int8_t *q, int64_t k) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= k; i += 64) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(q + i))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(q + i + 16))));
        __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(q + i + 32))));
        __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(q + i + 48))));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= k; i += 16) {
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(q + i))));
        a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i), a0);
    }
    if (i < k) {  /* the last k % 16: masked loads, nothing read past the row */
        __mmask16 m = (__mmask16)((1u << (k - i)) - 1u);
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i)));
        a1 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + i), a1);
        i = k;
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; i < k; i++) s += x[i] * (float)q[i];
    return s;
}

/* y (M, N) = x (M, K) @ (q (N, K) * scale (N,)[:, None]).T + bias (N,) (bias may be NULL) */
void int8_gemv_f32(const int8_t *q, const float *scale, const float *bias, const float *x,
                   float *y, int64_t m, int64_t n, int64_t k, int threads) {
    int use = (n * k >= (int64_t)1 << 18) ? threads : 1;  /* 256 KiB of codes: threads pay */
    #pragma omp parallel for num_threads(use) schedule(static) if (use > 1)
    for (int64_t r = 0; r < n; r++) {
        const int8_t *row = q + r * k;
        float b = bias ? bias[r] : 0.0f;
        for (int64_t i = 0; i < m; i++)
            y[i * n + r] = dot_i8(x + i * k, row, k) * scale[r] + b;
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
_VP, _I64 = ctypes.c_void_p, ctypes.c_int64
_LIB = LazyLibrary(
    "int8_gemv", _SOURCE, _FLAGS, {"int8_gemv_f32": ([_VP] * 5 + [_I64] * 3 + [ctypes.c_int], None)}
)


def available() -> bool:
    """True when the kernel is built (a C compiler with OpenMP; not ``MEMOPT_KERNELS=0``)."""
    return _LIB.get() is not None


def int8_gemv(
    q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (M, K) float32 @ (q (N, K) int8 * scale (N,) float32).T + bias (N,)`` -> ``(M, N)``
    float32. CPU tensors (made contiguous here: no copy when they are, as stored); check
    :func:`available` first."""
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _LIB.get().int8_gemv_f32(
        q.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(),
        y.data_ptr(), m, n, k, torch.get_num_threads(),
    )  # fmt: skip
    return y
