"""The C source of memopt's decode engine (compiled on first use by memopt.core.cbuild).

One call computes one token of a Llama-family decoder (Llama, Mistral, Qwen2: RMSNorm, rotary
attention with grouped KV heads, SiLU-gated MLP) from its weights as they are held in memory:
float32, float16 and bfloat16 (widened as they are read), GGUF blocks (Q4_0, Q4_1, Q8_0 fused into the dot products; Q5_0, Q5_1 and the K-quants
Q2_K..Q6_K dequantized a block at a time on the stack), memopt int8 (per channel or grouped) and memopt int4 (the
CPU kernel's row-interleaved layout) and memopt's pruned weights (bitmask + float32 or int8
values, read as stored by memopt.weights.sparse_c's routines). The whole token runs inside one OpenMP parallel region:
matrix-vector products split their rows over the threads, attention its heads, and the small
elementwise steps run on one thread between barriers. Why C: at batch 1 a small model's token is
hundreds of short operations, and the time between them (Python, dispatch, allocation) is as long
as their work; here there is none.

Matrix-vector products compute in float32 from the stored codes: the values multiplied are exactly
the dequantized weights (memopt.formats.gguf / memopt.weights), only the order of the sums differs
from a float matmul. Exceptions, by measurement: memopt int8, memopt int4 in the 64-row interleaved
layout and GGUF Q5_0 run on int8 activations (per block of 32, rounded exactly as llama.cpp's Q8_0 /
Q8_1 forms round them, so that a model and its GGUF export multiply the same numbers) with VNNI
integer dot products where the CPU has them: converting each 4-bit code to float cost more than
the whole token of llama.cpp's Q4_0 (which rounds its activations the same way), and int8's float
path was 0.91x llama.cpp's Q8_0 on a 1 B model; the activations' rounding is the error they add
(tests/engine states it as SQNR).
"""

from __future__ import annotations

from memopt.weights.sparse_c import SPARSE_C

__all__ = ["SOURCE"]

# memopt's sparse weights (bitmask + values) are multiplied by memopt.weights.sparse_c's routines,
# the same text the sparse kernel of SparseWeight.linear compiles
SOURCE = (
    SPARSE_C
    + r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MEMOPT_AVX512 1
#elif defined(__F16C__)
#include <immintrin.h>  /* _cvtsh_ss (a CPU with F16C and no AVX-512) */
#endif

/* GGML's type ids for GGUF blocks; memopt's own kinds from 100 */
enum { W_F32 = 0, W_F16 = 1, W_Q4_0 = 2, W_Q4_1 = 3, W_Q5_0 = 6, W_Q5_1 = 7, W_Q8_0 = 8, W_Q2_K = 10,
       W_Q3_K = 11, W_Q4_K = 12, W_Q5_K = 13, W_Q6_K = 14, W_BF16 = 30, W_I8 = 100, W_I4 = 101,
       W_SP_F32 = 102, W_SP_I8 = 103, W_SP_I4 = 104 };

typedef struct {
    int32_t kind;
    int32_t group;    /* int8: inputs per scale (0: per channel); int4: group size */
    int32_t block_n;  /* int4: rows per interleaved block (0: codes along K); sparse float32: 8
                         when every run of 16 columns holds 8 values (2:4) */
    int32_t pad;
    int64_t n, k;
    const void *data;   /* f32 (N, K) | GGML blocks (N, row_bytes) | int8 (N, K) | int4 packed |
                           sparse: the value stream, float32 (nnz,) or int8 (P,) */
    const void *scale;  /* int8: float (N, K / group) | int4: bf16 (K / G, N, 2) scale, zero |
                           sparse int8: float (P / 128,) */
    const float *bias;  /* (N,) or NULL */
    const uint8_t *mask;       /* sparse: N*K bits (memopt.weights.sparse's bitmask) */
    const int64_t *row_start;  /* sparse: (N + 1,) each row's first value in the stream */
    const void *zero;          /* sparse int4: bf16 (P / 64,) (scale: bf16 (P / 64,) too) */
} qmat;

static inline int is_sparse(const qmat *w) {
    return w->kind == W_SP_F32 || w->kind == W_SP_I8 || w->kind == W_SP_I4;
}

/* sparse int8 values on int8 activations (sp_rows_i8_vnni), where the CPU has VNNI and VBMI2 */
#ifdef SP_VNNI
#define SP_I8_VNNI(w, k) ((w)->kind == W_SP_I8 && (k) % 32 == 0)
#else
#define SP_I8_VNNI(w, k) 0
#endif

static inline sp_weight sp_of(const qmat *w) {
    sp_weight s = {w->mask, w->data, (const float *)w->scale, w->row_start, w->n, w->k,
                   w->kind == W_SP_I8 ? SP_I8 : w->kind == W_SP_I4 ? SP_I4
                   : w->block_n == 8 ? SP_F32_R8 : SP_F32,
                   (const uint16_t *)w->scale, (const uint16_t *)w->zero};
    return s;
}

typedef struct {
    qmat wq, wk, wv, wo, wg, wu, wd;
    const float *attn_norm, *ffn_norm;  /* (dim,) */
} layer_t;

typedef struct {
    int32_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, max_seq;
    float eps, attn_scale;
    const float *inv_freq;  /* (head_dim / 2,) rotary frequencies, scaling already applied */
    float rope_scale;       /* multiplies cos and sin (transformers' attention_scaling) */
    int32_t pad;
    const layer_t *layers;
    qmat embed;             /* rows are looked up */
    const float *final_norm;
    qmat head;
} model_t;

/* ---- helpers ---- */

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            man &= 0x3FF;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000 | (man << 13);
    else bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16; float f; memcpy(&f, &bits, 4); return f;
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

#ifdef MEMOPT_AVX512
static inline __m512 cvt_u8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
static inline __m512 cvt_i8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
#endif

/* ---- one row of each kind: dot(W[row], x) ---- */

static float dot_f32(const float *w, const float *x, int64_t k) {
    int64_t i = 0; float s = 0.f;
#ifdef MEMOPT_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= k; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; i < k; i++) s += w[i] * x[i];
    return s;
}

/* a float16 (bf = 0) or bfloat16 (bf = 1) row: each value widened to float32 exactly */
static float dot_h16(const uint16_t *w, const float *x, int64_t k, int bf) {
    int64_t i = 0; float s = 0.f;
#ifdef MEMOPT_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= k; i += 32) {
        __m256i h0 = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i h1 = _mm256_loadu_si256((const __m256i *)(w + i + 16));
        __m512 w0 = bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16))
                       : _mm512_cvtph_ps(h0);
        __m512 w1 = bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16))
                       : _mm512_cvtph_ps(h1);
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; i < k; i++) s += (bf ? bf16_to_f32(w[i]) : f16_to_f32(w[i])) * x[i];
    return s;
}

/* Q4_0 block (18 bytes): d f16 | 16 bytes; value (q - 8) * d. xs[b]: sum of x over block b. */
static float dot_q4_0(const uint8_t *row, const float *x, const float *xs, int64_t nb) {
    float tail = 0.f;
#ifdef MEMOPT_AVX512
    __m512 acc = _mm512_setzero_ps();
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 18;
        float d = f16_to_f32(rd16(blk));
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 2));
        __m512 t = _mm512_mul_ps(cvt_u8x16(_mm_and_si128(raw, m4)), _mm512_loadu_ps(x + b * 32));
        t = _mm512_fmadd_ps(cvt_u8x16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4)),
                            _mm512_loadu_ps(x + b * 32 + 16), t);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), t, acc);
        tail -= 8.f * d * xs[b];
    }
    return _mm512_reduce_add_ps(acc) + tail;
#else
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 18; float d = f16_to_f32(rd16(blk)), s = 0.f;
        for (int j = 0; j < 16; j++)
            s += (blk[2 + j] & 0x0F) * x[b * 32 + j] + (blk[2 + j] >> 4) * x[b * 32 + 16 + j];
        tail += d * (s - 8.f * xs[b]);
    }
    return tail;
#endif
}

/* Q4_1 block (20 bytes): d f16 | m f16 | 16 bytes; value q * d + m. */
static float dot_q4_1(const uint8_t *row, const float *x, const float *xs, int64_t nb) {
    float tail = 0.f;
#ifdef MEMOPT_AVX512
    __m512 acc = _mm512_setzero_ps();
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 20;
        float d = f16_to_f32(rd16(blk)), m = f16_to_f32(rd16(blk + 2));
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
        __m512 t = _mm512_mul_ps(cvt_u8x16(_mm_and_si128(raw, m4)), _mm512_loadu_ps(x + b * 32));
        t = _mm512_fmadd_ps(cvt_u8x16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4)),
                            _mm512_loadu_ps(x + b * 32 + 16), t);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), t, acc);
        tail += m * xs[b];
    }
    return _mm512_reduce_add_ps(acc) + tail;
#else
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 20;
        float d = f16_to_f32(rd16(blk)), m = f16_to_f32(rd16(blk + 2)), s = 0.f;
        for (int j = 0; j < 16; j++)
            s += (blk[4 + j] & 0x0F) * x[b * 32 + j] + (blk[4 + j] >> 4) * x[b * 32 + 16 + j];
        tail += d * s + m * xs[b];
    }
    return tail;
#endif
}

/* Q8_0 block (34 bytes): d f16 | 32 x int8; value q * d. */
static float dot_q8_0(const uint8_t *row, const float *x, int64_t nb) {
#ifdef MEMOPT_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 34;
        float d = f16_to_f32(rd16(blk));
        __m512 t = _mm512_mul_ps(cvt_i8x16(_mm_loadu_si128((const __m128i *)(blk + 2))),
                                 _mm512_loadu_ps(x + b * 32));
        t = _mm512_fmadd_ps(cvt_i8x16(_mm_loadu_si128((const __m128i *)(blk + 18))),
                            _mm512_loadu_ps(x + b * 32 + 16), t);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), t, acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float out = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 34; float d = f16_to_f32(rd16(blk)), s = 0.f;
        for (int j = 0; j < 32; j++) s += (float)(int8_t)blk[2 + j] * x[b * 32 + j];
        out += d * s;
    }
    return out;
#endif
}

/* memopt int8: q (K,) int8 of one row, scales (K / g,) float (g = K: one per channel). */
static float dot_i8(const int8_t *q, const float *scale, const float *x, int64_t k, int64_t g) {
    float out = 0.f;
    for (int64_t g0 = 0; g0 < k; g0 += g) {
        int64_t i = g0, end = g0 + g; float s = 0.f;
#ifdef MEMOPT_AVX512
        __m512 a = _mm512_setzero_ps();
        for (; i + 16 <= end; i += 16)
            a = _mm512_fmadd_ps(cvt_i8x16(_mm_loadu_si128((const __m128i *)(q + i))),
                                _mm512_loadu_ps(x + i), a);
        s = _mm512_reduce_add_ps(a);
#endif
        for (; i < end; i++) s += (float)q[i] * x[i];
        out += s * scale[g0 / g];
    }
    return out;
}

/* ---- blocks dequantized one at a time: Q5_0, Q5_1 (32 values) and the K-quants (256) ----
   Each deq_* writes one block's values exactly as memopt.formats.gguf (and gguf.quants) compute
   them: the scale products first, then one multiply (and one subtract) per value, each rounded
   to float32 (fp-contract off: a fused multiply-add would round once and differ in the last bit).
   The row's dot product then runs over the block's float32 values (dot_blocks). */

#define MEMOPT_EXACT __attribute__((optimize("fp-contract=off")))

/* Q5_0 (22 bytes): d f16 | qh u32 (bit j: 5th bit of value j) | 16 bytes; (q - 16) * d */
static MEMOPT_EXACT void deq_q5_0(const uint8_t *b, float *y) {
    float d = f16_to_f32(rd16(b)); uint32_t qh; memcpy(&qh, b + 2, 4);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((int)((b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16) * d;
        y[j + 16] = (float)((int)((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) * d;
    }
}

/* Q5_1 (24 bytes): d f16 | m f16 | qh u32 | 16 bytes; q * d + m */
static MEMOPT_EXACT void deq_q5_1(const uint8_t *b, float *y) {
    float d = f16_to_f32(rd16(b)), m = f16_to_f32(rd16(b + 2)); uint32_t qh; memcpy(&qh, b + 4, 4);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((b[8 + j] & 0x0F) | (((qh >> j) & 1) << 4)) * d + m;
        y[j + 16] = (float)((b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * d + m;
    }
}

/* Q2_K (84 bytes): 16 scale bytes (scale low nibble, min high) | 64 bytes of 2-bit codes | d f16 |
   dmin f16. Value i = h*128 + s*32 + l takes bits 2s of byte h*32 + l; sub-block i / 16;
   (d * scale) * q - dmin * min. */
static MEMOPT_EXACT void deq_q2_k(const uint8_t *b, float *y) {
    float d = f16_to_f32(rd16(b + 80)), dmin = f16_to_f32(rd16(b + 82)), dl[16], ml[16];
    for (int i = 0; i < 16; i++) { dl[i] = d * (float)(b[i] & 0x0F); ml[i] = dmin * (float)(b[i] >> 4); }
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) {
                int i = h * 128 + s * 32 + l;
                y[i] = dl[i / 16] * (float)((b[16 + h * 32 + l] >> (2 * s)) & 3) - ml[i / 16];
            }
}

/* Q3_K (110 bytes): hmask 32 | 64 bytes of 2-bit codes | 12 bytes of 6-bit scales | d f16.
   Low 2 bits as Q2_K; value i's third bit is bit i / 32 of hmask[i % 32], and a clear bit
   subtracts 4; scale j: low nibble of byte j % 8 (shifted by 4 for j >= 8), top 2 bits from
   byte 8 + j % 4 (shifted by 2 * (j / 4)), minus 32; (d * scale) * q. */
static MEMOPT_EXACT void deq_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
    float d = f16_to_f32(rd16(b + 108)), dl[16];
    for (int j = 0; j < 16; j++) {
        int lo = (sc[j % 8] >> (4 * (j / 8))) & 0x0F, hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        dl[j] = d * (float)((lo | (hi << 4)) - 32);
    }
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) {
                int i = h * 128 + s * 32 + l;
                int q = ((qs[h * 32 + l] >> (2 * s)) & 3) - (((hm[i % 32] >> (i / 32)) & 1) ? 0 : 4);
                y[i] = dl[i / 16] * (float)q;
            }
}

/* Q4_K / Q5_K's 8 (scale, min) pairs of 6 bits in 12 bytes (memopt.formats.gguf._k_scales) */
static void k_scale_min(const uint8_t *s, int *sc, int *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63; mn[j] = s[4 + j] & 63;
        sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
}

/* Q4_K (144 bytes): d f16 | dmin f16 | 12 scale bytes | 128 bytes of nibbles. Value
   c*64 + n*32 + l is nibble n of byte c*32 + l, sub-block c*2 + n; (d * sc) * q - dmin * mn. */
static MEMOPT_EXACT void deq_q4_k(const uint8_t *b, float *y) {
    float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
    int sc[8], mn[8];
    k_scale_min(b + 4, sc, mn);
    for (int c = 0; c < 4; c++)
        for (int n = 0; n < 2; n++) {
            float dl = d * (float)sc[c * 2 + n], ml = dmin * (float)mn[c * 2 + n];
            for (int l = 0; l < 32; l++)
                y[c * 64 + n * 32 + l] = dl * (float)((b[16 + c * 32 + l] >> (4 * n)) & 0x0F) - ml;
        }
}

/* Q5_K (176 bytes): as Q4_K with qh 32 bytes before the nibbles: value i's 5th bit is bit
   i / 32 of qh[i % 32]. */
static MEMOPT_EXACT void deq_q5_k(const uint8_t *b, float *y) {
    float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
    int sc[8], mn[8];
    k_scale_min(b + 4, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int c = 0; c < 4; c++)
        for (int n = 0; n < 2; n++) {
            float dl = d * (float)sc[c * 2 + n], ml = dmin * (float)mn[c * 2 + n];
            for (int l = 0; l < 32; l++) {
                int i = c * 64 + n * 32 + l;
                int q = ((qs[c * 32 + l] >> (4 * n)) & 0x0F) | (((qh[l] >> (i / 32)) & 1) << 4);
                y[i] = dl * (float)q - ml;
            }
        }
}

/* Q6_K (210 bytes): ql 128 | qh 64 | 16 int8 scales | d f16. Value h*128 + n*64 + j takes
   nibble n of ql[h*64 + j]; value h*128 + s*32 + l takes bits 2s of qh[h*32 + l] as its top two;
   (d * scale) * (q - 32). */
static MEMOPT_EXACT void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16_to_f32(rd16(b + 208)), dl[16];
    for (int j = 0; j < 16; j++) dl[j] = d * (float)sc[j];
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 128; j++) {
            int i = h * 128 + j, n = j / 64, s = j / 32, l = j % 32;
            int lo = (ql[h * 64 + j % 64] >> (4 * n)) & 0x0F, hi = (qh[h * 32 + l] >> (2 * s)) & 3;
            y[i] = dl[i / 16] * (float)((lo | (hi << 4)) - 32);
        }
}

typedef void (*deq_fn)(const uint8_t *, float *);

/* the block form of a kind dequantized a block at a time: values, bytes, function (0: not one) */
static int blocked(int kind, int *values, int *bytes, deq_fn *fn) {
    switch (kind) {
    case W_Q5_0: *values = 32; *bytes = 22; *fn = deq_q5_0; return 1;
    case W_Q5_1: *values = 32; *bytes = 24; *fn = deq_q5_1; return 1;
    case W_Q2_K: *values = 256; *bytes = 84; *fn = deq_q2_k; return 1;
    case W_Q3_K: *values = 256; *bytes = 110; *fn = deq_q3_k; return 1;
    case W_Q4_K: *values = 256; *bytes = 144; *fn = deq_q4_k; return 1;
    case W_Q5_K: *values = 256; *bytes = 176; *fn = deq_q5_k; return 1;
    case W_Q6_K: *values = 256; *bytes = 210; *fn = deq_q6_k; return 1;
    }
    return 0;
}

/* dot(W[row], x) of a blocked kind: each block dequantized to float32 on the stack, then FMAs */
static float dot_blocks(const uint8_t *row, const float *x, int64_t k, int bv, int bb, deq_fn fn) {
    float buf[256], s = 0.f;
#ifdef MEMOPT_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / bv; b++) {
        fn(row + b * bb, buf);
        const float *xb = x + b * bv;
        for (int i = 0; i < bv; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(buf + i), _mm512_loadu_ps(xb + i), acc);
    }
    s = _mm512_reduce_add_ps(acc);
#else
    for (int64_t b = 0; b < k / bv; b++) {
        fn(row + b * bb, buf);
        for (int i = 0; i < bv; i++) s += buf[i] * x[b * bv + i];
    }
#endif
    return s;
}

#ifdef MEMOPT_AVX512
/* Fused AVX-512 dot products of the common blocked kinds (a Q4_K_M file is Q4_K, Q6_K and, for
   rows that are not whole 256-value blocks, Q5_0 / Q8_0). As in dot_q4_0: the codes times x
   summed per scale, then one multiply by the scale; a per-block minimum or offset times the
   block's sum of x (xs, per 32 inputs). Measured on smollm2 Q4_K_M (llama.cpp's quantizer:
   Q5_0, Q8_0, Q4_K, Q6_K), 1 thread: 89 ms a token through dot_blocks (each block dequantized
   to the stack by scalar code), 16 ms fused (llama.cpp: 15-18 ms on the same file). */

static inline __m512 cvt_i32(__m512i v) { return _mm512_cvtepi32_ps(v); }

/* the 5th bits of 16 values: bit (shift + lane) of qh, at bit 4 (a mask register, one move) */
static inline __m512i bits5(uint32_t qh, int shift) {
    return _mm512_maskz_mov_epi32((__mmask16)(qh >> shift), _mm512_set1_epi32(16));
}

/* Q5_0 / Q5_1: sum over blocks of d * sum(q x) (+ m, or - 16 d, times the block's sum of x) */
static float dot_q5(const uint8_t *row, const float *x, const float *xs, int64_t nb, int q51) {
    const int64_t bb = q51 ? 24 : 22, off = q51 ? 4 : 2;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m512 acc = _mm512_setzero_ps();
    float tail = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        float d = f16_to_f32(rd16(blk));
        uint32_t qh; memcpy(&qh, blk + off, 4);
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + off + 4));
        __m512i lo = _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_and_si128(raw, m4)), bits5(qh, 0));
        __m512i hi = _mm512_or_si512(
            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4)), bits5(qh, 16));
        __m512 t = _mm512_mul_ps(cvt_i32(lo), _mm512_loadu_ps(x + b * 32));
        t = _mm512_fmadd_ps(cvt_i32(hi), _mm512_loadu_ps(x + b * 32 + 16), t);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), t, acc);
        tail += q51 ? f16_to_f32(rd16(blk + 2)) * xs[b] : -16.f * d * xs[b];
    }
    return _mm512_reduce_add_ps(acc) + tail;
}

/* Q4_K (q5 = 0) / Q5_K (q5 = 1): per 64 values, two sub-blocks of 32 (low, high nibbles) */
static float dot_q45_k(const uint8_t *row, const float *x, const float *xs, int64_t nb, int q5) {
    const int64_t bb = q5 ? 176 : 144;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m512i one = _mm512_set1_epi32(1);
    __m512 acc = _mm512_setzero_ps();
    float tail = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb, *qh = blk + 16, *qs = blk + (q5 ? 48 : 16);
        float d = f16_to_f32(rd16(blk)), dmin = f16_to_f32(rd16(blk + 2));
        int sc[8], mn[8];
        k_scale_min(blk + 4, sc, mn);
        const float *xb = x + b * 256;
        __m512i h0 = _mm512_setzero_si512(), h1 = h0;
        if (q5) {
            h0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qh));
            h1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16)));
        }
        for (int c = 0; c < 4; c++) {
            __m128i b0 = _mm_loadu_si128((const __m128i *)(qs + c * 32));
            __m128i b1 = _mm_loadu_si128((const __m128i *)(qs + c * 32 + 16));
            for (int n = 0; n < 2; n++) {
                __m128i s0 = n ? _mm_srli_epi16(b0, 4) : b0, s1 = n ? _mm_srli_epi16(b1, 4) : b1;
                __m512i q0 = _mm512_cvtepu8_epi32(_mm_and_si128(s0, m4));
                __m512i q1 = _mm512_cvtepu8_epi32(_mm_and_si128(s1, m4));
                if (q5) {
                    __m128i cnt = _mm_cvtsi32_si128(2 * c + n);
                    q0 = _mm512_or_si512(q0, _mm512_slli_epi32(
                        _mm512_and_si512(_mm512_srl_epi32(h0, cnt), one), 4));
                    q1 = _mm512_or_si512(q1, _mm512_slli_epi32(
                        _mm512_and_si512(_mm512_srl_epi32(h1, cnt), one), 4));
                }
                const float *xv = xb + c * 64 + n * 32;
                __m512 t = _mm512_mul_ps(cvt_i32(q0), _mm512_loadu_ps(xv));
                t = _mm512_fmadd_ps(cvt_i32(q1), _mm512_loadu_ps(xv + 16), t);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d * (float)sc[2 * c + n]), t, acc);
                tail -= dmin * (float)mn[2 * c + n] * xs[b * 8 + 2 * c + n];
            }
        }
    }
    return _mm512_reduce_add_ps(acc) + tail;
}

/* Q6_K: 16 values a scale, so one vector of 16 a scale */
static float dot_q6_k(const uint8_t *row, const float *x, int64_t nb) {
    const __m512i m4 = _mm512_set1_epi32(0x0F), m2 = _mm512_set1_epi32(3);
    const __m512i c32 = _mm512_set1_epi32(32);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 210, *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = f16_to_f32(rd16(blk + 208));
        const float *xb = x + b * 256;
        for (int h = 0; h < 2; h++)
            for (int j0 = 0; j0 < 128; j0 += 16) {
                int n = j0 / 64, s = j0 / 32;
                __m512i lo = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(ql + h * 64 + j0 % 64)));
                __m512i hi = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(qh + h * 32 + j0 % 32)));
                lo = _mm512_and_si512(_mm512_srl_epi32(lo, _mm_cvtsi32_si128(4 * n)), m4);
                hi = _mm512_and_si512(_mm512_srl_epi32(hi, _mm_cvtsi32_si128(2 * s)), m2);
                __m512i q = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), c32);
                __m512 t = _mm512_mul_ps(cvt_i32(q), _mm512_loadu_ps(xb + h * 128 + j0));
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d * (float)sc[(h * 128 + j0) / 16]), t, acc);
            }
    }
    return _mm512_reduce_add_ps(acc);
}
#endif

/* ---- matrix-vector products, rows split over the team of the enclosing parallel region ---- */

static void block_sums(const float *x, int64_t k, float *xs) {
    for (int64_t b = 0; b < k / 32; b++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) s += x[b * 32 + j];
        xs[b] = s;
    }
}

/* memopt int4, interleaved: packed (N / B, K, B / 2) bytes, byte i of (rb, k) holds row rb*B + i
   (low nibble) and row rb*B + i + B/2 (high nibble); value (c - 8) * scale + zero per group of
   G inputs; scale_zero (K / G, N, 2) bf16. Rows rb*B .. rb*B + B - 1 are computed together. */
static void rows_i4(const qmat *w, const float *x, float *y, int64_t rb) {
    const int64_t k = w->k, n = w->n, B = w->block_n, G = w->group, h = B / 2;
    const uint8_t *p = (const uint8_t *)w->data + rb * k * h;
    const uint16_t *sz = (const uint16_t *)w->scale;
    float acc[128], gacc[128];
    for (int64_t i = 0; i < B; i++) acc[i] = 0.f;
#ifdef MEMOPT_AVX512
    if (B == 64) {  /* the AVX-512 layout: 64 rows, four registers of accumulators per group */
        const __m128i m4 = _mm_set1_epi8(0x0F);
        __m512 r0 = _mm512_setzero_ps(), r1 = r0, r2 = r0, r3 = r0;
        for (int64_t g0 = 0; g0 < k; g0 += G) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            float sx = 0.f;
            for (int64_t kk = g0; kk < g0 + G; kk++) {
                const uint8_t *bytes = p + kk * 32;
                __m512 vx = _mm512_set1_ps(x[kk]);
                __m128i b0 = _mm_loadu_si128((const __m128i *)bytes);
                __m128i b1 = _mm_loadu_si128((const __m128i *)(bytes + 16));
                a0 = _mm512_fmadd_ps(cvt_u8x16(_mm_and_si128(b0, m4)), vx, a0);
                a1 = _mm512_fmadd_ps(cvt_u8x16(_mm_and_si128(b1, m4)), vx, a1);
                a2 = _mm512_fmadd_ps(cvt_u8x16(_mm_and_si128(_mm_srli_epi16(b0, 4), m4)), vx, a2);
                a3 = _mm512_fmadd_ps(cvt_u8x16(_mm_and_si128(_mm_srli_epi16(b1, 4), m4)), vx, a3);
                sx += x[kk];
            }
            /* scale and zero of the 64 rows: (s, z) bf16 pairs -> two float vectors per 16 rows */
            const uint16_t *gs = sz + ((g0 / G) * n + rb * 64) * 2;
            __m512 vsx = _mm512_set1_ps(sx), v8sx = _mm512_set1_ps(8.f * sx);
            __m512 *accs[4] = {&r0, &r1, &r2, &r3};
            __m512 ga[4] = {a0, a1, a2, a3};
            for (int q = 0; q < 4; q++) {
                __m512i pairs = _mm512_loadu_si512((const void *)(gs + q * 32));  /* 16 (s, z) */
                __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
                __m512 t = _mm512_mul_ps(s, _mm512_sub_ps(ga[q], v8sx));
                *accs[q] = _mm512_add_ps(*accs[q], _mm512_fmadd_ps(z, vsx, t));
            }
        }
        _mm512_storeu_ps(y + rb * 64, r0);
        _mm512_storeu_ps(y + rb * 64 + 16, r1);
        _mm512_storeu_ps(y + rb * 64 + 32, r2);
        _mm512_storeu_ps(y + rb * 64 + 48, r3);
        return;
    }
#endif
    for (int64_t g0 = 0; g0 < k; g0 += G) {
        float sx = 0.f;
        for (int64_t i = 0; i < B; i++) gacc[i] = 0.f;
        for (int64_t kk = g0; kk < g0 + G; kk++) {
            const uint8_t *bytes = p + kk * h;
            float xk = x[kk];
            sx += xk;
            for (int64_t i = 0; i < h; i++) {
                gacc[i] += (bytes[i] & 0x0F) * xk;
                gacc[h + i] += (bytes[i] >> 4) * xk;
            }
        }
        const uint16_t *gs = sz + (g0 / G) * n * 2;
        for (int64_t i = 0; i < B; i++) {
            int64_t r = rb * B + i;
            float s = bf16_to_f32(gs[r * 2]), z = bf16_to_f32(gs[r * 2 + 1]);
            acc[i] += s * (gacc[i] - 8.f * sx) + z * sx;
        }
    }
    for (int64_t i = 0; i < B; i++) y[rb * B + i] = acc[i];
}

/* memopt int4 along K (block_n 0): packed (N, K / 2), code 2j low nibble, 2j+1 high nibble. */
static float dot_i4k(const qmat *w, const float *x, int64_t r) {
    const int64_t k = w->k, n = w->n, G = w->group;
    const uint8_t *p = (const uint8_t *)w->data + r * (k / 2);
    const uint16_t *sz = (const uint16_t *)w->scale;
    float out = 0.f;
    for (int64_t g0 = 0; g0 < k; g0 += G) {
        float s = 0.f, sx = 0.f;
        for (int64_t kk = g0; kk < g0 + G; kk += 2) {
            uint8_t byte = p[kk / 2];
            s += (byte & 0x0F) * x[kk] + (byte >> 4) * x[kk + 1];
            sx += x[kk] + x[kk + 1];
        }
        const uint16_t *gs = sz + ((g0 / G) * n + r) * 2;
        out += bf16_to_f32(gs[0]) * (s - 8.f * sx) + bf16_to_f32(gs[1]) * sx;
    }
    return out;
}

#if defined(MEMOPT_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MEMOPT_VNNI 1
static inline float f16_round(float v) { return _cvtsh_ss(_cvtss_sh(v, 0)); }

/* x as int8 per block of 32, as llama.cpp's Q8_0 / Q8_1 forms of the activations round it, so
   that a model run here and its GGUF export run by llama.cpp multiply the same activations:
   xq = round(x * 127 / amax), dx = amax / 127 stored as a float16 value; qsum[b] = sum of the
   block's codes; xs[b] = float16(amax / 127 * qsum) (Q8_1's sum term). The offsets of int4 and
   Q5_0 then multiply the rounded activations' sums, as the codes do: each product is exactly
   W q(x), where an exact sum of x would mix two roundings of the same activations. */
static void quantize_x(const float *x, int64_t k, int8_t *xq, float *dx, float *xs, float *qsum) {
    for (int64_t b = 0; b < k / 32; b++) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t isum = 0;
        for (int j = 0; j < 32; j++) {
            int8_t c = (int8_t)lrintf(x[b * 32 + j] * inv);
            xq[b * 32 + j] = c;
            isum += c;
        }
        dx[b] = f16_round(d);
        qsum[b] = (float)isum;
        xs[b] = f16_round(d * (float)isum);
    }
}

/* memopt int4 in the 64-row interleaved layout with int8 activations: 4 K positions of a row
   gathered into one 32-bit lane (a byte transpose of 4 x 32 bytes), then VNNI dot products of
   codes (u8) and activations (s8), 4 a lane. Rows land in the lanes as
   [r0-3, r16-19], [r4-7, r20-23], [r8-11, r24-27], [r12-15, r28-31] (low nibbles; +32 high). */
static void rows_i4_vnni(const qmat *w, const float *xs, const int8_t *xq, const float *dx,
                         float *y, int64_t rb) {
    const int64_t k = w->k, n = w->n, G = w->group;
    const uint8_t *p = (const uint8_t *)w->data + rb * k * 32;
    const uint16_t *sz = (const uint16_t *)w->scale;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 out[8];
    for (int i = 0; i < 8; i++) out[i] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < k; g0 += G) {
        __m256 gf[8];  /* the group's sum of codes x activations, float */
        float sx = 0.f;
        for (int i = 0; i < 8; i++) gf[i] = _mm256_setzero_ps();
        for (int64_t b0 = g0; b0 < g0 + G; b0 += 32) {
            __m256i acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
            for (int64_t kk = b0; kk < b0 + 32; kk += 4) {
                const uint8_t *bytes = p + kk * 32;
                __m256i a0 = _mm256_loadu_si256((const __m256i *)bytes);
                __m256i a1 = _mm256_loadu_si256((const __m256i *)(bytes + 32));
                __m256i a2 = _mm256_loadu_si256((const __m256i *)(bytes + 64));
                __m256i a3 = _mm256_loadu_si256((const __m256i *)(bytes + 96));
                __m256i t0 = _mm256_unpacklo_epi8(a0, a1), t1 = _mm256_unpackhi_epi8(a0, a1);
                __m256i t2 = _mm256_unpacklo_epi8(a2, a3), t3 = _mm256_unpackhi_epi8(a2, a3);
                __m256i u[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2),
                                _mm256_unpacklo_epi16(t1, t3), _mm256_unpackhi_epi16(t1, t3)};
                int32_t x4;
                memcpy(&x4, xq + kk, 4);
                __m256i vx = _mm256_set1_epi32(x4);
                for (int i = 0; i < 4; i++) {
                    acc[i] = _mm256_dpbusd_epi32(acc[i], _mm256_and_si256(u[i], m4), vx);
                    acc[4 + i] = _mm256_dpbusd_epi32(
                        acc[4 + i], _mm256_and_si256(_mm256_srli_epi16(u[i], 4), m4), vx);
                }
            }
            __m256 d = _mm256_set1_ps(dx[b0 / 32]);
            for (int i = 0; i < 8; i++) gf[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), d, gf[i]);
            sx += xs[b0 / 32];
        }
        /* value (c - 8) * s + z: s * (sum c x - 8 sum x) + z sum x, per row */
        const uint16_t *gs = sz + ((g0 / G) * n + rb * 64) * 2;
        __m256 vsx = _mm256_set1_ps(sx), v8sx = _mm256_set1_ps(8.f * sx);
        for (int i = 0; i < 8; i++) {
            int row = (i & 3) * 4 + (i >> 2) * 32;  /* lanes 0-3: rows row..row+3; 4-7: +16 */
            __m256i pairs = _mm256_set_m128i(
                _mm_loadu_si128((const __m128i *)(gs + (row + 16) * 2)),
                _mm_loadu_si128((const __m128i *)(gs + row * 2)));
            __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
            __m256 z = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFFFF0000)));
            out[i] = _mm256_add_ps(out[i], _mm256_fmadd_ps(z, vsx,
                                   _mm256_mul_ps(s, _mm256_sub_ps(gf[i], v8sx))));
        }
    }
    for (int i = 0; i < 8; i++) {
        int row = (i & 3) * 4 + (i >> 2) * 32;
        float v[8];
        _mm256_storeu_ps(v, out[i]);
        for (int j = 0; j < 4; j++) {
            y[rb * 64 + row + j] = v[j];
            y[rb * 64 + row + 16 + j] = v[4 + j];
        }
    }
}

/* memopt int8 with int8 activations (xq, dx: per block of 32, as for int4 above): per block,
   |w| (u8) times x with w's sign (s8) in VNNI dot products, scaled by the block's dx and the
   row's group scale, one float sum a row. Measured on a 1.07 B Llama, per-channel int8, 1 thread:
   the float32 path (each code widened to float, 16 a multiply-add) decoded at 0.91x llama.cpp's
   Q8_0 while reading 6 % fewer bytes, so it was the arithmetic, not the memory. One sum's chain
   of multiply-adds (4 cycles each) then held a row to 32 bytes per 4 cycles: 15.5 GB/s on the
   1 B model's projections, 21.7 GB/s with four sums (llama.cpp's Q8_0: about 20). */
static inline float hsum8(__m256 acc) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static inline __m256 blk_i8_vnni(const int8_t *q, const int8_t *xq) {
    __m256i w = _mm256_loadu_si256((const __m256i *)q);
    __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w),
                                                  _mm256_sign_epi8(xv, w)));
}

static float dot_i8_vnni(const int8_t *q, const float *scale, const int8_t *xq, const float *dx,
                         int64_t k, int64_t g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t b0 = 0;
    if (g == k) {  /* one scale a row: applied once, at the end */
        for (; b0 + 128 <= k; b0 += 128) {
            const float *d = dx + b0 / 32;
            a0 = _mm256_fmadd_ps(blk_i8_vnni(q + b0, xq + b0), _mm256_set1_ps(d[0]), a0);
            a1 = _mm256_fmadd_ps(blk_i8_vnni(q + b0 + 32, xq + b0 + 32), _mm256_set1_ps(d[1]), a1);
            a2 = _mm256_fmadd_ps(blk_i8_vnni(q + b0 + 64, xq + b0 + 64), _mm256_set1_ps(d[2]), a2);
            a3 = _mm256_fmadd_ps(blk_i8_vnni(q + b0 + 96, xq + b0 + 96), _mm256_set1_ps(d[3]), a3);
        }
        for (; b0 < k; b0 += 32)
            a0 = _mm256_fmadd_ps(blk_i8_vnni(q + b0, xq + b0), _mm256_set1_ps(dx[b0 / 32]), a0);
        return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) * scale[0];
    }
    for (; b0 + 64 <= k; b0 += 64) {
        a0 = _mm256_fmadd_ps(blk_i8_vnni(q + b0, xq + b0),
                             _mm256_set1_ps(dx[b0 / 32] * scale[b0 / g]), a0);
        a1 = _mm256_fmadd_ps(blk_i8_vnni(q + b0 + 32, xq + b0 + 32),
                             _mm256_set1_ps(dx[b0 / 32 + 1] * scale[(b0 + 32) / g]), a1);
    }
    for (; b0 < k; b0 += 32)
        a0 = _mm256_fmadd_ps(blk_i8_vnni(q + b0, xq + b0),
                             _mm256_set1_ps(dx[b0 / 32] * scale[b0 / g]), a0);
    return hsum8(_mm256_add_ps(a0, a1));
}

/* GGUF Q5_0 on int8 activations, as llama.cpp computes it (its Q5_0 x Q8_0 dot product): per
   block, a VNNI dot product of the codes (0..31) and the activations' codes, times d x dx, less
   the offset of 16 times the block's exact sum of x. Measured on smollm2 Q4_K_M (58 % of its
   values Q5_0), 1 thread: 0.95x llama.cpp's speed with float32 activations, 1.07-1.13x with these.
   Q8_0 keeps float32 activations: already 1.3x llama.cpp, and then its greedy tokens are
   llama.cpp's (with int8 activations they part at a near tie). */
static float dot_q5_0_vnni(const uint8_t *row, const int8_t *xq, const float *dx,
                           const float *qsum, int64_t nb) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m256i c16 = _mm256_set1_epi8(16);
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 22;
        float d = f16_to_f32(rd16(blk));
        uint32_t qh; memcpy(&qh, blk + 2, 4);
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 6));
        __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4),
                                     _mm_and_si128(raw, m4));  /* values 0-15 | 16-31 */
        q = _mm256_or_si256(q, _mm256_maskz_mov_epi8((__mmask32)qh, c16));
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
        __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * dx[b]), acc);
        tail -= 16.f * d * dx[b] * qsum[b];
    }
    return hsum8(acc) + tail;
}
#endif

/* y = W x (+ bias). Call from inside a parallel region (all threads): rows are shared out. xs:
   scratch for the activations' forms, filled here by one thread: block sums (K / 32 + 1 floats;
   on int8 activations, Q8_1's sums of the rounded activations), their int8 scales and their
   codes' sums (K / 32 + 1 floats each), their int8 values (K bytes + 64), then sparse int8's
   correction (K / 4 int32 + 16). */
static void matvec(const qmat *w, const float *x, float *y, float *xs) {
    const int64_t n = w->n, k = w->k;
    float *dx = xs + k / 32 + 1, *qsum = dx + k / 32 + 1;
    int8_t *xq = (int8_t *)(qsum + k / 32 + 1);
#ifdef MEMOPT_VNNI
    const int vnni = (w->kind == W_I4 && w->block_n == 64 && w->group % 32 == 0) ||
                     (w->kind == W_I8 && k % 32 == 0 && w->group % 32 == 0) ||
                     w->kind == W_Q5_0 || SP_I8_VNNI(w, k);
#else
    const int vnni = 0;
#endif
    const int sums = w->kind == W_Q4_0 || w->kind == W_Q4_1 || w->kind == W_Q5_0 ||
                     w->kind == W_Q5_1 || w->kind == W_Q4_K || w->kind == W_Q5_K;
    if (sums || vnni) {
#pragma omp single
        {
#ifdef MEMOPT_VNNI
            if (vnni) quantize_x(x, k, xq, dx, xs, qsum);
            else
#endif
            block_sums(x, k, xs);
#ifdef SP_VNNI
            if (SP_I8_VNNI(w, k)) sp_x_corr(xq, k, (int32_t *)(xq + k + 64));
#endif
        }
    }
    switch (w->kind) {
    case W_F32: {
        const float *d = (const float *)w->data;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_f32(d + r * k, x, k);
        break;
    }
    case W_F16: case W_BF16: {
        const uint16_t *d = (const uint16_t *)w->data; const int bf = w->kind == W_BF16;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_h16(d + r * k, x, k, bf);
        break;
    }
    case W_Q4_0: {
        const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / 32 * 18;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_q4_0(d + r * rb, x, xs, k / 32);
        break;
    }
    case W_Q4_1: {
        const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / 32 * 20;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_q4_1(d + r * rb, x, xs, k / 32);
        break;
    }
    case W_Q8_0: {
        const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / 32 * 34;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_q8_0(d + r * rb, x, k / 32);
        break;
    }
    case W_I8: {
        const int8_t *q = (const int8_t *)w->data; const float *s = (const float *)w->scale;
        const int64_t g = w->group ? w->group : k;
#ifdef MEMOPT_VNNI
        if (vnni) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; r++)
                y[r] = dot_i8_vnni(q + r * k, s + r * (k / g), xq, dx, k, g);
            break;
        }
#endif
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_i8(q + r * k, s + r * (k / g), x, k, g);
        break;
    }
    case W_I4: {
#ifdef MEMOPT_VNNI
        if (vnni) {
#pragma omp for schedule(static)
            for (int64_t rb = 0; rb < n / 64; rb++) rows_i4_vnni(w, xs, xq, dx, y, rb);
            break;
        }
#endif
        if (w->block_n) {
#pragma omp for schedule(static)
            for (int64_t rb = 0; rb < n / w->block_n; rb++) rows_i4(w, x, y, rb);
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; r++) y[r] = dot_i4k(w, x, r);
        }
        break;
    }
#ifdef MEMOPT_AVX512
    case W_Q5_0: case W_Q5_1: {
        const int q51 = w->kind == W_Q5_1;
#ifdef MEMOPT_VNNI
        if (!q51) {
            const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / 32 * 22;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; r++) y[r] = dot_q5_0_vnni(d + r * rb, xq, dx, qsum, k / 32);
            break;
        }
#endif
        const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / 32 * (q51 ? 24 : 22);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_q5(d + r * rb, x, xs, k / 32, q51);
        break;
    }
    case W_Q4_K: case W_Q5_K: {
        const int q5 = w->kind == W_Q5_K;
        const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / 256 * (q5 ? 176 : 144);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_q45_k(d + r * rb, x, xs, k / 256, q5);
        break;
    }
    case W_Q6_K: {
        const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / 256 * 210;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_q6_k(d + r * rb, x, k / 256);
        break;
    }
#endif
    case W_SP_F32: case W_SP_I8: case W_SP_I4: {  /* chunks of 16 rows (a row's values start at row_start) */
        const sp_weight sw = sp_of(w);
        const int64_t chunks = (n + 15) / 16;
#if defined(MEMOPT_VNNI) && defined(SP_VNNI)
        if (vnni) {
#pragma omp for schedule(static)
            for (int64_t c = 0; c < chunks; c++)
                sp_rows_i8_vnni(&sw, xq, dx, (const int32_t *)(xq + k + 64), y, c * 16,
                                c * 16 + 16 < n ? c * 16 + 16 : n);
            break;
        }
#endif
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++)
            sp_rows(&sw, x, y, NULL, c * 16, c * 16 + 16 < n ? c * 16 + 16 : n, 1);
        break;
    }
    default: {  /* the other blocked kinds (Q2_K, Q3_K; all of them without AVX-512) */
        int bv, bb; deq_fn fn;
        if (!blocked(w->kind, &bv, &bb, &fn)) break;
        const uint8_t *d = (const uint8_t *)w->data; const int64_t rb = k / bv * bb;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] = dot_blocks(d + r * rb, x, k, bv, bb, fn);
        break;
    }
    }
    if (w->bias) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) y[r] += w->bias[r];
    }
}

/* one row of an embedding, dequantized into out (K,) */
static void embed_row(const qmat *w, int64_t r, float *out) {
    const int64_t k = w->k;
    switch (w->kind) {
    case W_F32: memcpy(out, (const float *)w->data + r * k, k * 4); break;
    case W_F16: case W_BF16: {
        const uint16_t *h = (const uint16_t *)w->data + r * k;
        for (int64_t i = 0; i < k; i++) out[i] = w->kind == W_BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
        break;
    }
    case W_Q8_0: {
        const uint8_t *row = (const uint8_t *)w->data + r * (k / 32 * 34);
        for (int64_t b = 0; b < k / 32; b++) {
            float d = f16_to_f32(rd16(row + b * 34));
            for (int j = 0; j < 32; j++) out[b * 32 + j] = (float)(int8_t)row[b * 34 + 2 + j] * d;
        }
        break;
    }
    case W_Q4_0: case W_Q4_1: {
        int q41 = w->kind == W_Q4_1; int64_t bb = q41 ? 20 : 18;
        const uint8_t *row = (const uint8_t *)w->data + r * (k / 32 * bb);
        for (int64_t b = 0; b < k / 32; b++) {
            const uint8_t *blk = row + b * bb;
            float d = f16_to_f32(rd16(blk)), m = q41 ? f16_to_f32(rd16(blk + 2)) : 0.f;
            const uint8_t *qs = blk + (q41 ? 4 : 2);
            for (int j = 0; j < 16; j++) {
                out[b * 32 + j] = q41 ? (qs[j] & 0x0F) * d + m : ((qs[j] & 0x0F) - 8) * d;
                out[b * 32 + 16 + j] = q41 ? (qs[j] >> 4) * d + m : ((qs[j] >> 4) - 8) * d;
            }
        }
        break;
    }
    case W_I8: {
        const int8_t *q = (const int8_t *)w->data + r * k; const int64_t g = w->group ? w->group : k;
        const float *s = (const float *)w->scale + r * (k / g);
        for (int64_t i = 0; i < k; i++) out[i] = (float)q[i] * s[i / g];
        break;
    }
    case W_I4: {  /* interleaved (rows_i4) or along K (dot_i4k) */
        const int64_t B = w->block_n, h = B / 2, i = B ? r % B : 0, G = w->group, n = w->n;
        const uint8_t *p = B ? (const uint8_t *)w->data + (r / B) * k * h + (i % h)
                             : (const uint8_t *)w->data + r * (k / 2);
        const uint16_t *sz = (const uint16_t *)w->scale;
        for (int64_t kk = 0; kk < k; kk++) {
            uint8_t byte = B ? p[kk * h] : p[kk / 2];
            int c = B ? (i >= h ? byte >> 4 : byte & 0x0F) : (kk & 1 ? byte >> 4 : byte & 0x0F);
            const uint16_t *gs = sz + ((kk / G) * n + r) * 2;
            out[kk] = (c - 8) * bf16_to_f32(gs[0]) + bf16_to_f32(gs[1]);
        }
        break;
    }
    case W_SP_F32: case W_SP_I8: case W_SP_I4: {
        const sp_weight sw = sp_of(w);
        sp_dequant_row(&sw, r, out);
        break;
    }
    default: {
        int bv, bb; deq_fn fn;
        if (!blocked(w->kind, &bv, &bb, &fn)) break;
        const uint8_t *row = (const uint8_t *)w->data + r * (k / bv * bb);
        for (int64_t b = 0; b < k / bv; b++) fn(row + b * bb, out + b * bv);
        break;
    }
    }
}

/* the activations' forms of matvec for K inputs: sums, int8 scales, int8 codes' sums, int8 values
   (+ padding), sparse int8's correction (+ padding) */
#define XS_FLOATS(K) (3 * ((K) / 32 + 1) + (K) / 2 + 32)

/* y (M, N) = x (M, K) @ W.T (+ bias) one row of x at a time, for a layer outside the engine's
   token (transformers' forward of a streamed model): the same matrix-vector products, no
   dequantized copy of W. xs: XS_FLOATS(K) floats of scratch. A sparse weight on float
   activations takes 8 rows of x at a time (its mask and values read once per 8 rows: an 8-token
   prefill reads them once). */
void memopt_linear(const qmat *w, const float *x, float *y, int64_t m, float *xs, int32_t threads) {
    if (is_sparse(w) && !SP_I8_VNNI(w, w->k)) {
        const sp_weight sw = sp_of(w);
        sp_linear(&sw, x, y, w->bias, m, threads);
        return;
    }
#pragma omp parallel num_threads(threads)
    for (int64_t i = 0; i < m; i++) matvec(w, x + i * w->k, y + i * w->n, xs);
}

int64_t memopt_xs_floats(int64_t k) { return XS_FLOATS(k); }

/* rows r0..r1 of a weight, dequantized into out (r1 - r0, K): the engine's own values (tests) */
void memopt_dequant_rows(const qmat *w, int64_t r0, int64_t r1, float *out) {
    for (int64_t r = r0; r < r1; r++) embed_row(w, r, out + (r - r0) * w->k);
}

static void rmsnorm(const float *x, const float *w, float *out, int64_t n, float eps) {
    double ss = 0.0;  /* float32 in transformers; a double sum only changes the last bits */
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* rotate-half rotary embedding (Hugging Face row order) of n_heads heads of head_dim */
static void rope(float *v, int n_heads, int head_dim, const float *cs, const float *sn) {
    int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *q = v + h * head_dim;
        for (int i = 0; i < half; i++) {
            float a = q[i], b = q[i + half];
            q[i] = a * cs[i] - b * sn[i];
            q[i + half] = b * cs[i] + a * sn[i];
        }
    }
}


/* Scratch (floats): x dim | xb dim | q n_heads*hd | k,v kvd | att n_heads*max_seq | hb, hb2
   hidden | xs XS_FLOATS(max(dim, hidden)) | cos, sin head_dim/2 | ab n_heads*hd | tmp */
int64_t memopt_scratch_floats(const model_t *m) {
    int64_t kvd = (int64_t)m->n_kv_heads * m->head_dim, qd = (int64_t)m->n_heads * m->head_dim;
    int64_t big = m->dim > m->hidden ? m->dim : m->hidden;
    return 2 * m->dim + qd + 2 * kvd + (int64_t)m->n_heads * m->max_seq + 2 * m->hidden +
           XS_FLOATS(big) + m->head_dim + qd + (qd > m->dim ? qd : m->dim);
}

/* dot of float32 q with int8 codes c (n values) */
static float dot_f32_i8(const float *q, const int8_t *c, int n) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += q[i] * (float)c[i];
    return s;
}

/* n_heads heads of head_dim floats -> int8 codes and one scale a head, as memopt's int8 KV cache
   (memopt.weights.kvcache) rounds them: scale = max(amax, 1e-12) / 127, code = round(x / scale) */
static void quantize_heads(const float *x, int n_heads, int head_dim, int8_t *c, float *scale) {
    for (int h = 0; h < n_heads; h++) {
        const float *xh = x + h * head_dim;
        float amax = 0.f;
        for (int i = 0; i < head_dim; i++) amax = fmaxf(amax, fabsf(xh[i]));
        float s = fmaxf(amax, 1e-12f) / 127.f;
        scale[h] = s;
        for (int i = 0; i < head_dim; i++) {
            float r = rintf(xh[i] / s);
            c[h * head_dim + i] = (int8_t)fminf(fmaxf(r, -127.f), 127.f);
        }
    }
}

/* One token at position pos: logits (vocab,) from the caches of positions < pos, which it
   extends with this token's K and V. kc, vc: (n_layers, max_seq, n_kv_heads * head_dim), float32;
   or, when ks is given, int8 codes with one float32 scale a position and head in ks, vs
   (n_layers, max_seq, n_kv_heads): the int8 KV cache, a quarter of the bytes. */
int memopt_forward(const model_t *m, int32_t token, int32_t pos, float *logits, void *kc,
                   void *vc, float *ks, float *vs, float *scratch, int32_t threads) {
    if (pos < 0 || pos >= m->max_seq || token < 0 || token >= m->vocab) return 1;
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads;
    const int64_t kvd = (int64_t)nkv * hd, qd = (int64_t)nh * hd;
    const int big = m->dim > m->hidden ? m->dim : m->hidden;
    float *x = scratch, *xb = x + dim, *q = xb + dim, *k = q + qd, *v = k + kvd;
    float *att = v + kvd, *hb = att + (int64_t)nh * m->max_seq, *hb2 = hb + m->hidden;
    float *xs = hb2 + m->hidden, *cs = xs + XS_FLOATS(big), *sn = cs + hd / 2, *ab = sn + hd / 2;
    float *tmp = ab + qd;
    const int group = nh / nkv;
    embed_row(&m->embed, token, x);
    for (int i = 0; i < hd / 2; i++) {
        float f = pos * m->inv_freq[i];
        cs[i] = cosf(f) * m->rope_scale; sn[i] = sinf(f) * m->rope_scale;
    }
    const int q8 = ks != NULL;
#pragma omp parallel num_threads(threads)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const layer_t *L = &m->layers[l];
            const int64_t layer = (int64_t)l * m->max_seq;
            float *kl = (float *)kc + layer * kvd, *vl = (float *)vc + layer * kvd;
            int8_t *kq = (int8_t *)kc + layer * kvd, *vq = (int8_t *)vc + layer * kvd;
            const float *ksl = q8 ? ks + layer * nkv : NULL, *vsl = q8 ? vs + layer * nkv : NULL;
            /* this position's K and V: straight into a float cache, else via k, v to be rounded */
            float *kp = q8 ? k : kl + (int64_t)pos * kvd, *vp = q8 ? v : vl + (int64_t)pos * kvd;
#pragma omp single
            rmsnorm(x, L->attn_norm, xb, dim, m->eps);
            matvec(&L->wq, xb, q, xs);
            matvec(&L->wk, xb, kp, xs);
            matvec(&L->wv, xb, vp, xs);
#pragma omp single
            {
                rope(q, nh, hd, cs, sn);
                rope(kp, nkv, hd, cs, sn);
                if (q8) {
                    quantize_heads(kp, nkv, hd, kq + (int64_t)pos * kvd, ks + (layer + pos) * nkv);
                    quantize_heads(vp, nkv, hd, vq + (int64_t)pos * kvd, vs + (layer + pos) * nkv);
                }
            }
#pragma omp for schedule(static)
            for (int h = 0; h < nh; h++) {
                const float *qh = q + h * hd;
                float *a = att + (int64_t)h * m->max_seq, mx = -INFINITY, sum = 0.f;
                const int kvh = h / group;
                for (int t = 0; t <= pos; t++) {
                    const int64_t at = (int64_t)t * kvd + kvh * hd;
                    float s = q8 ? dot_f32_i8(qh, kq + at, hd) * ksl[t * nkv + kvh]
                                 : dot_f32(qh, kl + at, hd);
                    s *= m->attn_scale;
                    a[t] = s; if (s > mx) mx = s;
                }
                for (int t = 0; t <= pos; t++) { a[t] = expf(a[t] - mx); sum += a[t]; }
                float *o = ab + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.f;
                for (int t = 0; t <= pos; t++) {
                    const int64_t at = (int64_t)t * kvd + kvh * hd;
                    float p = a[t] / sum;
                    if (q8) {
                        const int8_t *ct = vq + at; p *= vsl[t * nkv + kvh];
                        for (int i = 0; i < hd; i++) o[i] += p * (float)ct[i];
                    } else {
                        const float *vt = vl + at;
                        for (int i = 0; i < hd; i++) o[i] += p * vt[i];
                    }
                }
            }
            matvec(&L->wo, ab, tmp, xs);
#pragma omp single
            {
                for (int i = 0; i < dim; i++) x[i] += tmp[i];
                rmsnorm(x, L->ffn_norm, xb, dim, m->eps);
            }
            matvec(&L->wg, xb, hb, xs);
            matvec(&L->wu, xb, hb2, xs);
#pragma omp for schedule(static)
            for (int i = 0; i < m->hidden; i++) {
                float g = hb[i];
                hb[i] = g / (1.f + expf(-g)) * hb2[i];
            }
            matvec(&L->wd, hb, tmp, xs);
#pragma omp single
            for (int i = 0; i < dim; i++) x[i] += tmp[i];
        }
#pragma omp single
        rmsnorm(x, m->final_norm, xb, dim, m->eps);
        matvec(&m->head, xb, logits, xs);
    }
    return 0;
}
"""
)
