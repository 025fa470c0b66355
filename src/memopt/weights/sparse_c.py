"""The C routines of memopt's sparse weights (bitmask + values), one copy for every library.

Two libraries compile this text: the sparse kernel that ``SparseWeight.linear`` calls
(memopt.weights._sparse_kernel) and memopt's decode engine (memopt.engine.source includes it), so
that the transformers forward and the engine multiply a pruned weight with the same code.

The weight (memopt.weights.sparse, bitmask layout): ``mask (ceil(N*K/8),) uint8``, element ``i``
of the row-major ``(N, K)`` weight is bit ``i % 8`` of byte ``i // 8``; the kept values in
row-major order: float32 ``(nnz,)``; int8 ``(P,)`` (P: nnz rounded up to 128) with one float32
scale per 128 consecutive values of the stream ``(P / 128,)`` (groups run across rows); or int4,
two codes a byte ``(P / 2,)`` (P: nnz rounded up to 64) with a bfloat16 scale and zero per 64;
and ``row_start (N + 1,) int64``, the stream index of each row's first value (``sp_row_starts``).

The product, per output row, 64 input columns at a time in four runs of 16 mask bits ``m``. With
AVX-512 (F, BW, VL) a run's ``popcount(m)`` values are loaded (int8 / int4 ones widened and
scaled as dequantize does: the lanes past a group's end take the next group's), expanded into the
16 lanes where ``m`` is set (``vexpandps``), multiplied by the 16 inputs of each of up to 8 input
rows and accumulated; the stream index moves on by ``popcount(m)`` (a weight with 8 values in
every run, 2:4, skips the counting). Without AVX-512 (the plain C build), the same walk over the
set bits (``ctz``), one value at a time. The values are dequantize's (memopt.weights.primitives):
only the order of the sums differs from a dense product of the dequantized weight. The engine's
int8 values on int8 activations (VNNI): ``sp_rows_i8_vnni``.
"""

from __future__ import annotations

__all__ = ["SPARSE_C"]

SPARSE_C = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SP_AVX512 1
#endif

/* value formats: float32; int8, a float32 scale per 128; float32 with exactly 8 values in every
   run of 16 columns (K % 16 == 0: 2:4, or any 8 of 16; sp_runs_of_8), so that a run's values
   are at a known offset and two runs take one 16-value load; int4, two codes a byte (low nibble
   first), value (code - 8) * scale + zero with a bfloat16 scale and zero per 64 values */
enum { SP_F32 = 0, SP_I8 = 1, SP_F32_R8 = 2, SP_I4 = 3 };

typedef struct {
    const uint8_t *mask;       /* N*K bits, least significant first */
    const void *values;        /* float32 (nnz,) | int8 (P,), P = nnz rounded up to 128 */
    const float *scale;        /* int8: (P / 128,) */
    const int64_t *row_start;  /* (N + 1,) */
    int64_t n, k;
    int32_t vfmt;
    const uint16_t *scale16, *zero16;  /* int4: bfloat16 (P / 64,) each, P = nnz rounded to 64 */
} sp_weight;

static inline float sp_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* 16 bits of the mask from bit position `bit`, never reading past byte nbytes - 1. */
static inline uint32_t sp_bits16(const uint8_t *mask, int64_t bit, int64_t nbytes) {
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

#ifdef SP_AVX512
/* int8 values idx .. idx + p - 1 of the stream (p <= 16) in lanes 0 .. p - 1, as float32
   code * scale of their group of 128 (a run crossing a group's end takes two scales); p = 0:
   zeros. total: the
   stream's length (P): whole 16-byte loads where they stay inside it. */
static inline __m512 sp_i8x16(const int8_t *v, const float *scale, int64_t idx, int p,
                              int64_t total) {
    if (!p) return _mm512_setzero_ps();  /* (idx may be the stream's end: no scale to read) */
    __m128i raw = idx + 16 <= total ? _mm_loadu_si128((const __m128i *)(v + idx))
                                    : _mm_maskz_loadu_epi8((__mmask16)((1u << p) - 1u), v + idx);
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
    const int64_t g = idx >> 7;
    const int off = (int)(idx & 127);
    __m512 s = _mm512_set1_ps(scale[g]);
    if (off + p > 128)  /* lanes from 128 - off on are the next group's */
        s = _mm512_mask_mov_ps(s, (__mmask16)(0xffffu << (128 - off)), _mm512_set1_ps(scale[g + 1]));
    return _mm512_mul_ps(f, s);
}

/* int4 codes idx .. idx + p - 1 of the stream (p <= 16) in lanes 0 .. p - 1 as float32
   (code - 8) * scale + zero of their group of 64 (a run crossing a group's end takes two); the
   stream's bytes: total / 2 (total: P, codes rounded up to 64). */
static inline __m512 sp_i4x16(const uint8_t *v, const uint16_t *sc, const uint16_t *zr,
                              int64_t idx, int p, int64_t total) {
    if (!p) return _mm512_setzero_ps();
    const int64_t b0 = idx >> 1, left = total / 2 - b0;  /* bytes from the first one */
    const __m128i b = left >= 16 ? _mm_loadu_si128((const __m128i *)(v + b0))
                                 : _mm_maskz_loadu_epi8((__mmask16)((1u << left) - 1u), v + b0);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
    const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  /* codes */
    const __m128i c = (idx & 1) ? _mm_alignr_epi8(c1, c0, 1) : c0;  /* from code idx on */
    const __m512 f = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)),
                                   _mm512_set1_ps(8.0f));
    const int64_t g = idx >> 6;
    const int off = (int)(idx & 63);
    __m512 s = _mm512_set1_ps(sp_bf16(sc[g])), z = _mm512_set1_ps(sp_bf16(zr[g]));
    if (off + p > 64) {  /* lanes from 64 - off on are the next group's */
        const __mmask16 nx = (__mmask16)(0xffffu << (64 - off));
        s = _mm512_mask_mov_ps(s, nx, _mm512_set1_ps(sp_bf16(sc[g + 1])));
        z = _mm512_mask_mov_ps(z, nx, _mm512_set1_ps(sp_bf16(zr[g + 1])));
    }
    return _mm512_add_ps(_mm512_mul_ps(f, s), z);
}
#endif

/* value idx of the stream of an int8 or int4 weight, as float32 (scalar paths) */
static inline float sp_qvalue(const sp_weight *w, int F, int64_t idx) {
    if (F == SP_I8) return (float)((const int8_t *)w->values)[idx] * w->scale[idx >> 7];
    const uint8_t byte = ((const uint8_t *)w->values)[idx >> 1];
    const int code = (idx & 1) ? byte >> 4 : byte & 0x0F;
    const float t = (float)(code - 8) * sp_bf16(w->scale16[idx >> 6]);  /* two roundings */
    return t + sp_bf16(w->zero16[idx >> 6]);
}

#ifdef SP_AVX512
/* a run's p values from stream index idx, in lanes 0 .. p - 1 (float32: a whole 16-value load,
   where the caller knows the stream has them) */
#define SP_VALS(F, idx, p) \
    ((F) == SP_F32 ? _mm512_loadu_ps(vf + (idx)) \
     : (F) == SP_I8 ? sp_i8x16(vq, w->scale, (idx), (p), total) \
     : sp_i4x16((const uint8_t *)w->values, w->scale16, w->zero16, (idx), (p), total))
#endif

/* Rows [r0, r1) of y (MB, N) = x (MB, K) @ W.T (+ bias), VF the value format (both constants
   where it is inlined: one loop per (MB, VF), accumulators in registers). */
static inline __attribute__((always_inline)) void sp_rows_t(
    const sp_weight *w, const float *x, float *y, const float *bias, int64_t r0, int64_t r1,
    const int MB, const int VF)
{
    const int64_t k = w->k, n = w->n, nbytes = (n * k + 7) / 8, nnz = w->row_start[n];
    const int64_t total = VF == SP_I8 ? (nnz + 127) / 128 * 128
                        : VF == SP_I4 ? (nnz + 63) / 64 * 64 : nnz;
    const int F = VF == SP_F32_R8 ? SP_F32 : VF;  /* the value format, runs of 8 or not */
    const float *vf = (const float *)w->values;
    const int8_t *vq = (const int8_t *)w->values;
    for (int64_t r = r0; r < r1; r++) {
        int64_t idx = w->row_start[r];  /* stream index of the row's next value */
        const int64_t bit = r * k;
#ifdef SP_AVX512
        /* UA accumulators an input row: one FMA chain per 16 columns would wait on the FMA's
           latency with few input rows; with 4 or more rows their chains interleave */
        const int UA = MB >= 4 ? 1 : MB == 1 ? 4 : 2;
        __m512 acc[8][4];
        for (int i = 0; i < MB; i++)
            for (int u = 0; u < UA; u++) acc[i][u] = _mm512_setzero_ps();
        int64_t c = 0;
        if ((bit & 15) == 0 && (F != SP_F32 || total - idx >= k)) {
            /* rows on a 16-bit boundary: the mask read 64 bits at a time, four runs of 16
               columns whose stream offsets are prefix sums of popcounts (independent loads);
               float values loaded 16 at a time (values to spare: a row reads at most k) */
            const uint8_t *mrow = w->mask + (bit >> 3);
            if (VF == SP_F32_R8) {
                /* 32 columns: 16 values, one load; the second run's 8 moved to lanes 0-7 */
                for (; c + 32 <= k; c += 32) {
                    uint32_t m32;
                    memcpy(&m32, mrow + (c >> 3), 4);
                    const __m512 v = _mm512_loadu_ps(vf + idx);
                    const __m512 lo = _mm512_maskz_expand_ps((__mmask16)m32, v);
                    const __m512 hi = _mm512_maskz_expand_ps((__mmask16)(m32 >> 16),
                                                             _mm512_shuffle_f32x4(v, v, 0xEE));
                    idx += 16;
                    for (int i = 0; i < MB; i++) {
                        acc[i][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + i * k + c), acc[i][0]);
                        acc[i][1 % UA] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + i * k + c + 16),
                                                         acc[i][1 % UA]);
                    }
                }
            }
            for (; c + 64 <= k; c += 64) {
                uint64_t m64;
                memcpy(&m64, mrow + (c >> 3), 8);
                if (F != SP_F32 && !m64) continue;
                for (int u = 0; u < 4; u++) {
                    const uint32_t mk = (uint32_t)(m64 >> (16 * u)) & 0xffffu;
                    const int p = __builtin_popcount(mk);
                    __m512 v = _mm512_maskz_expand_ps((__mmask16)mk, SP_VALS(F, idx, p));
                    idx += p;
                    for (int i = 0; i < MB; i++)
                        acc[i][u % UA] = _mm512_fmadd_ps(
                            v, _mm512_loadu_ps(x + i * k + c + 16 * u), acc[i][u % UA]);
                }
            }
            for (; c + 16 <= k; c += 16) {
                uint16_t mk;
                memcpy(&mk, mrow + (c >> 3), 2);
                const int p = __builtin_popcount(mk);
                __m512 v = _mm512_maskz_expand_ps((__mmask16)mk, SP_VALS(F, idx, p));
                idx += p;
                for (int i = 0; i < MB; i++)
                    acc[i][0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + i * k + c), acc[i][0]);
            }
        }
        for (; c < k; c += 16) {  /* rows off the boundary, the last columns of a row */
            uint32_t mk = sp_bits16(w->mask, bit + c, nbytes);
            __mmask16 xm = 0xffff;
            if (k - c < 16) {
                xm = (__mmask16)((1u << (k - c)) - 1u);
                mk &= xm;
            }
            if (!mk) continue;
            const int p = __builtin_popcount(mk);
            __m512 v = F == SP_F32 ? _mm512_maskz_expandloadu_ps((__mmask16)mk, vf + idx)
                                    : _mm512_maskz_expand_ps((__mmask16)mk, SP_VALS(F, idx, p));
            idx += p;
            for (int i = 0; i < MB; i++)
                acc[i][0] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(xm, x + i * k + c), acc[i][0]);
        }
        for (int i = 0; i < MB; i++) {
            for (int u = 1; u < UA; u++) acc[i][0] = _mm512_add_ps(acc[i][0], acc[i][u]);
            float s = _mm512_reduce_add_ps(acc[i][0]);
            y[i * n + r] = bias ? s + bias[r] : s;
        }
#else
        float acc[8];
        for (int i = 0; i < MB; i++) acc[i] = 0.0f;
        for (int64_t c = 0; c < k; c += 16) {
            uint32_t mk = sp_bits16(w->mask, bit + c, nbytes);
            if (k - c < 16) mk &= (1u << (k - c)) - 1u;
            while (mk) {
                const int j = __builtin_ctz(mk);
                const float v = F == SP_F32 ? vf[idx] : sp_qvalue(w, F, idx);
                idx++;
                for (int i = 0; i < MB; i++) acc[i] += v * x[i * k + c + j];
                mk &= mk - 1;
            }
        }
        for (int i = 0; i < MB; i++) y[i * n + r] = bias ? acc[i] + bias[r] : acc[i];
        (void)total;
#endif
    }
}

#define SP_CASE(M) case M: \
    if (w->vfmt == SP_I8) sp_rows_t(w, x, y, bias, r0, r1, M, SP_I8); \
    else if (w->vfmt == SP_I4) sp_rows_t(w, x, y, bias, r0, r1, M, SP_I4); \
    else if (w->vfmt == SP_F32_R8) sp_rows_t(w, x, y, bias, r0, r1, M, SP_F32_R8); \
    else sp_rows_t(w, x, y, bias, r0, r1, M, SP_F32); \
    break;

/* rows [r0, r1) for mb (1..8) input rows */
static void sp_rows(const sp_weight *w, const float *x, float *y, const float *bias, int64_t r0,
                    int64_t r1, int mb) {
    switch (mb) {
    SP_CASE(1) SP_CASE(2) SP_CASE(3) SP_CASE(4) SP_CASE(5) SP_CASE(6) SP_CASE(7)
    default: SP_CASE(8)
    }
}

/* y (M, N) = x (M, K) @ W.T (+ bias), x and y contiguous float32: chunks of 16 output rows
   (small enough to balance, large enough to amortise the schedule) over the threads, each chunk
   against 8 input rows at a time (the weight read once per 8 rows). */
static void sp_linear(const sp_weight *w, const float *x, float *y, const float *bias, int64_t m,
                      int threads) {
    const int64_t n = w->n, k = w->k, chunks = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t ch = 0; ch < chunks; ch++) {
        const int64_t r0 = ch * 16, r1 = r0 + 16 < n ? r0 + 16 : n;
        for (int64_t m0 = 0; m0 < m; m0 += 8)
            sp_rows(w, x + m0 * k, y + m0 * n, bias, r0, r1, (int)(m - m0 < 8 ? m - m0 : 8));
    }
}

#if defined(SP_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512VBMI2__) && defined(__BMI2__)
#include <immintrin.h>
#define SP_VNNI 1
/* corr (K / 4,) int32: 128 times the sum of each 4 activation codes (what codes + 128 add to a
   VNNI dot product of 4 columns: the correction of sp_rows_i8_vnni, once a product) */
static void sp_x_corr(const int8_t *xq, int64_t k, int32_t *corr) {
    for (int64_t j = 0; j < k / 4; j++)
        corr[j] = 128 * ((int32_t)xq[4 * j] + xq[4 * j + 1] + xq[4 * j + 2] + xq[4 * j + 3]);
}

/* Rows [r0, r1) of y = W x for int8 values and int8 activations (K % 32 == 0): xq (K,) int8 and
   dx (K / 32 + 1,) their scale per block of 32 inputs (llama.cpp's Q8_0 form; the engine's
   quantize_x; xq readable to K + 32), corr from sp_x_corr (readable to K / 4 + 8). Per 64
   columns, 64 mask bits: the row's next popcount codes expanded into the byte lanes where the
   mask is set (vpexpandb), plus 128 (u8: VNNI multiplies u8 by s8; an empty lane is 128), a VNNI
   dot product with the activations, less corr; each 32-lane half scaled by its block's dx times
   the codes' group scale. Codes past their group's end (a crossing every ~4 runs) are split off
   without a branch (pdep: the mask bits of the first codes; their dot product with the others'
   lanes at 128, so that the difference of the two is exactly the first codes') and take the
   next group's scale. Why: widening each code to float and multiplying it by its scale cost
   three times the instructions (smollm2 50 % + int8 values decoded at 0.50x int8 dense's speed);
   a branch at each crossing, 30 % more time; the correction by a second dot product (128 x the
   codes' sums), 2 of 4 dot products. */
/* One run of 64 columns (whole = 0: the last 32 of a row, K % 64 == 32) of sp_rows_i8_vnni. */
static inline __attribute__((always_inline)) void sp_i8_run(
    const sp_weight *w, const int8_t *vq, int64_t total, const uint8_t *mrow, const int8_t *xq,
    const float *dx, const int32_t *corr, int64_t c, int64_t *idx_p, __m512 *acc0, __m512 *acc1,
    const int whole)
{
    const __m512i c128 = _mm512_set1_epi8((char)0x80), z = _mm512_setzero_si512();
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    uint64_t m;
    if (whole) {
        memcpy(&m, mrow + (c >> 3), 8);
    } else {
        uint32_t h;
        memcpy(&h, mrow + (c >> 3), 4);
        m = h;
    }
    const int64_t idx = *idx_p;
    const int p = __builtin_popcountll(m);
    const int64_t g = idx < total ? idx >> 7 : total / 128 - 1;  /* at the end: a scale there is */
    /* the codes past group g's end: the mask bits after its first `fit` set bits (none, mostly) */
    const int fit = 128 - (int)(idx & 127);
    const uint64_t m1 = m & ~_pdep_u64(~0ull >> (64 - (fit < 64 ? fit : 64)), m);
    const int64_t g1 = g + (m1 != 0);  /* a scale that exists */
    const __m512i raw = idx + 64 <= total
        ? _mm512_loadu_si512((const void *)(vq + idx))
        : _mm512_maskz_loadu_epi8(p == 64 ? ~0ull : (1ull << p) - 1ull, vq + idx);
    const __m512i wu = _mm512_xor_si512(_mm512_maskz_expand_epi8(m, raw), c128);
    const __m512i wu1 = _mm512_mask_mov_epi8(c128, m1, wu);  /* group g + 1's codes */
    const __m512i xv = _mm512_loadu_si512((const void *)(xq + c));
    const __m512i a = _mm512_dpbusd_epi32(z, wu, xv), b = _mm512_dpbusd_epi32(z, wu1, xv);
    const __m512i d1 = _mm512_maskz_sub_epi32(
        whole ? 0xffff : 0x00ff, b, _mm512_loadu_si512((const void *)(corr + (c >> 2))));
    /* dx of the two blocks of 32 inputs: lanes 0-7, 8-15 */
    const __m512 dxv = _mm512_permutexvar_ps(
        halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(dx + (c >> 5))))));
    *acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, b)),
                            _mm512_mul_ps(dxv, _mm512_set1_ps(w->scale[g])), *acc0);
    *acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1),
                            _mm512_mul_ps(dxv, _mm512_set1_ps(w->scale[g1])), *acc1);
    *idx_p = idx + p;
}

static void sp_rows_i8_vnni(const sp_weight *w, const int8_t *xq, const float *dx,
                            const int32_t *corr, float *y, int64_t r0, int64_t r1) {
    const int64_t k = w->k, nnz = w->row_start[w->n], total = (nnz + 127) / 128 * 128;
    const int8_t *vq = (const int8_t *)w->values;
    if (total == 0) {  /* no values at all (nor scales) */
        for (int64_t r = r0; r < r1; r++) y[r] = 0.0f;
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        int64_t idx = w->row_start[r], c = 0;
        const uint8_t *mrow = w->mask + (r * k >> 3);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; c + 64 <= k; c += 64)
            sp_i8_run(w, vq, total, mrow, xq, dx, corr, c, &idx, &acc0, &acc1, 1);
        if (c < k) sp_i8_run(w, vq, total, mrow, xq, dx, corr, c, &idx, &acc0, &acc1, 0);
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
}
#endif

/* row r of W, dense, into out (K,): the values exactly as dequantize computes them (int4: the
   multiply and the add rounded apart, as torch does: no fused multiply-add) */
static __attribute__((optimize("fp-contract=off"))) void sp_dequant_row(const sp_weight *w,
                                                                       int64_t r, float *out) {
    const int64_t k = w->k, nbytes = (w->n * k + 7) / 8;
    int64_t idx = w->row_start[r];
    for (int64_t c = 0; c < k; c++) out[c] = 0.0f;
    for (int64_t c = 0; c < k; c += 16) {
        uint32_t mk = sp_bits16(w->mask, r * k + c, nbytes);
        if (k - c < 16) mk &= (1u << (k - c)) - 1u;
        while (mk) {
            const int j = __builtin_ctz(mk);
            float v;
            if (w->vfmt == SP_I8) {
                v = (float)((const int8_t *)w->values)[idx] * w->scale[idx >> 7];
            } else if (w->vfmt == SP_I4) {
                const uint8_t byte = ((const uint8_t *)w->values)[idx >> 1];
                const float t = (float)(((idx & 1) ? byte >> 4 : byte & 0x0F) - 8) *
                                sp_bf16(w->scale16[idx >> 6]);
                v = t + sp_bf16(w->zero16[idx >> 6]);
            } else {
                v = ((const float *)w->values)[idx];
            }
            out[c + j] = v;
            idx++;
            mk &= mk - 1;
        }
    }
}

/* 1 when K % 16 == 0 and every run of 16 mask bits holds exactly 8 (SP_F32_R8 applies) */
static int sp_runs_of_8(const uint8_t *mask, int64_t n, int64_t k) {
    if (k % 16) return 0;
    for (int64_t i = 0; i < n * k / 16; i++) {
        uint16_t h;
        memcpy(&h, mask + 2 * i, 2);
        if (__builtin_popcount(h) != 8) return 0;
    }
    return 1;
}

/* row_start (N + 1,): the stream index of each row's first value, from the mask's popcounts */
static void sp_row_starts(const uint8_t *mask, int64_t n, int64_t k, int64_t *row_start) {
    const int64_t nbytes = (n * k + 7) / 8;
    int64_t acc = 0;
    for (int64_t r = 0; r < n; r++) {
        row_start[r] = acc;
        for (int64_t c = 0; c < k; c += 16) {
            uint32_t mk = sp_bits16(mask, r * k + c, nbytes);
            if (k - c < 16) mk &= (1u << (k - c)) - 1u;
            acc += __builtin_popcount(mk);
        }
    }
    row_start[n] = acc;
}
"""
