"""A fused CPU kernel for one AdamW8bit update: C, built on first use with the system C compiler.

Why: the eager update runs ~30 full passes over the parameter (dequantize, AdamW, block absmax,
normalise, nearest-code lookup, for two states), ~4× the passes of ``torch.optim.AdamW``, and
each pass streams the whole parameter through memory. This kernel makes one pass per block of
``block_size`` elements: it reads the parameter, the gradient and the two uint8 codes, keeps the
block's new float32 moments in a small stack buffer (L1-resident), and writes the parameter and
the codes back: 2 × 4 + 2 bytes read and 4 + 2 written per element (float32), fewer than AdamW's
own 16 read / 12 written. The math is the eager path's, element for element; the nearest-code
lookup uses the same 2^17-entry tables (:class:`memopt.step.adamw8bit._Lookup`), so codes are
exactly the nearest map values.

The source is compiled once per machine (memopt.core.cbuild) and loaded with :mod:`ctypes`. When
no compiler works, :func:`load` returns None and AdamW8bit keeps its eager path (set
``MEMOPT_KERNELS=0`` to force that). ctypes releases the GIL during a call, so the blocks of a
large parameter are split over ``torch.get_num_threads()`` Python threads.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from memopt.core.cbuild import compile_library, kernels_enabled

__all__ = ["DTYPE_CODES", "load", "run"]

# Parameter / gradient storage types the kernel reads and writes (everything else: eager path).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const float *qmap;     /* (256,) map values */
    const uint8_t *code;   /* (2^17,) code of each bucket's lowest value */
    const float *thresh;   /* (2^17,) threshold inside the bucket, else +inf */
    int64_t offset;        /* added to the signed 17-bit key: tables start at key -2^16 */
} lookup_t;

static inline float load_f(const void *base, int64_t i, int dtype) {
    if (dtype == 0) return ((const float *)base)[i];
    uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16; /* bfloat16: top half of a float */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store_f(void *base, int64_t i, int dtype, float f) {
    if (dtype == 0) { ((float *)base)[i] = f; return; }
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { ((uint16_t *)base)[i] = (uint16_t)((u >> 16) | 0x40); return; }
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch's float -> bfloat16 */
    ((uint16_t *)base)[i] = (uint16_t)(u >> 16);
}

static inline uint8_t nearest(float x, const lookup_t *t) {
    int32_t bits;
    memcpy(&bits, &x, 4);
    int64_t key = (int64_t)(bits >> 15) + t->offset; /* arithmetic shift, as the eager path */
    return (uint8_t)(t->code[key] + (x > t->thresh[key]));
}

/* Blocks [b0, b1) of one parameter of n elements. */
void adamw8bit_blocks(
    void *p, int p_dtype, const void *g, int g_dtype,
    uint8_t *m_code, float *m_absmax, uint8_t *v_code, float *v_absmax,
    int64_t n, int64_t block, int64_t b0, int64_t b1,
    const float *qs, const uint8_t *cs, const float *ts,
    const float *qu, const uint8_t *cu, const float *tu,
    float beta1_c, float beta2, float beta2_c, float decay, float neg_step_size,
    float bc2_sqrt, float eps, float tiny, float *scratch /* (2 * block,) */)
{
    lookup_t ls = {qs, cs, ts, 65536}, lu = {qu, cu, tu, 65536};
    float *mb = scratch, *vb = scratch + block;
    for (int64_t b = b0; b < b1; b++) {
        int64_t s = b * block, len = n - s < block ? n - s : block;
        float am_old = m_absmax[b], av_old = v_absmax[b], am = 0.0f, av = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            int64_t j = s + i;
            float gj = load_f(g, j, g_dtype);
            float m = qs[m_code[j]] * am_old, v = qu[v_code[j]] * av_old;
            m = m + beta1_c * (gj - m);              /* lerp towards g by 1 - beta1 */
            v = v * beta2 + beta2_c * gj * gj;
            float denom = sqrtf(v) / bc2_sqrt + eps;
            float pj = load_f(p, j, p_dtype) * decay; /* decoupled weight decay */
            store_f(p, j, p_dtype, pj + neg_step_size * (m / denom));
            mb[i] = m;
            vb[i] = v;
            float a = fabsf(m);
            am = a > am ? a : am;
            av = v > av ? v : av;
        }
        m_absmax[b] = am;
        v_absmax[b] = av;
        float dm = am > tiny ? am : tiny, dv = av > tiny ? av : tiny;
        for (int64_t i = 0; i < len; i++) {
            m_code[s + i] = nearest(mb[i] / dm, &ls);
            v_code[s + i] = nearest(vb[i] / dv, &lu);
        }
    }
}
"""

# -ffp-contract=off: no fused multiply-adds, each operation rounds as the eager ops do
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_pool: ThreadPoolExecutor | None = None


def _build() -> ctypes.CDLL | None:
    lib = compile_library("adamw8bit", _SOURCE, _FLAGS, ["-lm"])
    if lib is None:
        return None
    fn = lib.adamw8bit_blocks
    vp, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    fn.argtypes = [vp, i32, vp, i32, vp, vp, vp, vp, i64, i64, i64, i64]
    fn.argtypes += [vp] * 6 + [f32] * 8 + [vp]
    fn.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (no compiler, a failed build, ``MEMOPT_KERNELS=0``)."""
    global _lib
    if not kernels_enabled():
        return None
    with _lock:
        if _lib is False:
            _lib = _build()
        return _lib or None


def run(
    lib: ctypes.CDLL,
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict[str, torch.Tensor],
    tables: tuple[torch.Tensor, ...],
    block: int,
    hyper: tuple[float, ...],
) -> None:
    """Update contiguous CPU ``p`` (n,) from ``g`` (n,) and its 8-bit ``state`` in place.

    ``tables``: signed (qmap, code, thresh) then unsigned ones; ``hyper``: (1 - beta1, beta2,
    1 - beta2, 1 - lr * wd, -step_size, sqrt(1 - beta2^t), eps).
    """
    global _pool
    n = p.numel()
    n_blocks = -(-n // block)
    ptrs = [state[k].data_ptr() for k in ("exp_avg_code", "exp_avg_absmax")]
    ptrs += [state[k].data_ptr() for k in ("exp_avg_sq_code", "exp_avg_sq_absmax")]
    table_ptrs = [t.data_ptr() for t in tables]
    tiny = torch.finfo(torch.float32).tiny

    def part(b0: int, b1: int) -> None:
        # (2, block) float32: one block's new m and v; a ctypes buffer, so no tensor (nothing
        # for a memory tracker to see: the kernel's only temporary is these 8 × block bytes)
        scratch = (ctypes.c_float * (2 * block))()
        lib.adamw8bit_blocks(
            p.data_ptr(), DTYPE_CODES[p.dtype], g.data_ptr(), DTYPE_CODES[g.dtype],
            *ptrs, n, block, b0, b1, *table_ptrs, *hyper, tiny, ctypes.addressof(scratch),
        )  # fmt: skip

    threads = max(1, torch.get_num_threads())
    if threads == 1 or n_blocks < 64 * threads:  # small parameters: not worth a thread hop
        part(0, n_blocks)
        return
    if _pool is None or _pool._max_workers != threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memopt-adamw8bit")
    step = -(-n_blocks // threads)
    futures = [_pool.submit(part, b, min(b + step, n_blocks)) for b in range(0, n_blocks, step)]
    for f in futures:
        f.result()
