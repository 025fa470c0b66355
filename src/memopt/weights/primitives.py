"""The quantization trio (choose_qparams / quantize / dequantize) and the bit packers.

One affine convention serves every width, per group of ``group_size`` consecutive input features
(the last dimension of a 2-D weight ``(N, K)``, output rows x input features)::

    w ~ (c - mid) * scale + offset          mid = 2 ** (bits - 1)

* ``bits <= 4``: ``c`` are unsigned codes in ``[0, 2**bits - 1]`` (uint8 before packing). Symmetric
  formats have ``offset = 0`` (stored as ``None``); asymmetric ones store ``offset``, the value
  decoded from the middle code. That float "offset at mid" is the convention of PyTorch's CPU int4
  kernel (``(c - 8) * scale + zero``), so our scales and offsets feed it without conversion.
* ``bits == 8``: signed int8 codes in ``[-127, 127]`` (``mid = 0``), symmetric only: that is what
  ``torch._weight_int8pack_mm`` and ``torch._int_mm`` take.

Packing (canonical form, the one written to disk): codes along K, low bits first in each byte.
int4: 2 per byte ``c[2i] | c[2i+1] << 4``; int2: 4 per byte; int3: 8 codes in 3 bytes (a 24-bit
little-endian word). ``pack_int4_nblock`` / ``unpack_int4_nblock`` give the CPU kernel's layout, which
interleaves rows instead (see memopt.weights.kernels).
"""

from __future__ import annotations

import torch

from memopt.core.errors import MemoptError

__all__ = [
    "choose_qparams",
    "dequantize",
    "pack",
    "pack_int4_nblock",
    "quantize",
    "sqnr",
    "unpack",
    "unpack_int4_nblock",
]


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(N, K) -> (N, K // G, G); a group of None means one group per row (per output channel)."""
    n, k = w.shape
    g = k if group_size is None else group_size
    if k % g:
        raise MemoptError(f"group size {g} does not divide the input dimension {k}")
    return w.reshape(n, k // g, g)


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset, None when symmetric) per group: each ``(N, K // G)`` in ``scale_dtype``.

    Scales and offsets are rounded to ``scale_dtype`` here, before any code is chosen, so that
    :func:`quantize` rounds against exactly the values that will be stored.
    """
    if w.dim() != 2:
        raise MemoptError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    wg = _grouped(w.detach().float(), group_size)  # (N, K/G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/G)
    tiny = torch.finfo(torch.float16).tiny  # a floor that survives float16 / bfloat16 storage
    if bits == 8:
        if not symmetric:
            raise MemoptError("int8 is symmetric only (the int8 kernels take no zero point)")
        scale = (torch.maximum(-lo, hi) / 127).clamp_min(tiny)
        return scale.to(scale_dtype), None
    qmax = 2**bits - 1
    mid = 2 ** (bits - 1)
    if symmetric:
        # codes -mid .. mid-1 around 0: the negative side has one more step than the positive one
        scale = torch.maximum(-lo / mid, hi / (mid - 1)).clamp_min(tiny)
        return scale.to(scale_dtype), None
    scale = ((hi - lo) / qmax).clamp_min(tiny).to(scale_dtype)
    offset = lo + mid * scale.float()  # the value decoded from the middle code
    if scale_dtype in (torch.bfloat16, torch.float16):
        offset = _gguf_exact_offset(offset, scale.float(), mid, scale_dtype)
    return scale, offset.to(scale_dtype)


def _gguf_exact_offset(
    offset: torch.Tensor, scale: torch.Tensor, mid: int, dtype: torch.dtype
) -> torch.Tensor:
    """``offset`` moved to the nearest value ``z`` that ``dtype`` holds and for which
    ``m = z - mid * scale`` is a float16: GGUF's Q4_1 stores ``m`` as a float16 (its value is
    ``c * d + m``, memopt's ``(c - mid) * scale + z``), so the weight exports to Q4_1 exactly.

    Why it exists: ``z`` and ``mid * scale`` are values of different sizes, and their difference
    often needs more significant bits than float16's 11 (measured on smollm2 int4 g32, bfloat16
    scales: 19 % of the blocks). ``z`` rounded to a multiple of ``q``, the larger of its own step in
    ``dtype`` and the float16 step of ``m``, fixes both wherever ``mid * scale`` is a multiple of
    that step (``|m|`` under 16 ``mid * scale`` for bfloat16, 2 for float16: the rest are reported
    by the export). The move is at most ``q / 2``: 0.0044 ``scale`` measured, far inside the
    ``scale / 2`` rounding of the codes.
    """
    z = offset.float()
    z_bits = 7 if dtype == torch.bfloat16 else 10  # explicit significand bits of dtype
    one = torch.ones_like(z)
    for _ in range(2):  # a second pass where rounding carried m or z across a power of two
        m = z - mid * scale
        # float16 step of m: 2^(e - 10), e the exponent of |m| (floored at float16's subnormals)
        m_exp = torch.frexp(m.abs().clamp_min(2.0**-14))[1] - 1
        z_exp = torch.frexp(z.abs().clamp_min(2.0**-126))[1] - 1
        q = torch.maximum(torch.ldexp(one, m_exp - 10), torch.ldexp(one, z_exp - z_bits))
        z = torch.round(z / q) * q
    return z


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    group_size: int | None = None,
) -> torch.Tensor:
    """Codes, unpacked, same shape as ``w``: int8 in [-127, 127] for 8 bits, else uint8 codes."""
    wg = _grouped(w.detach().float().contiguous(), group_size)  # (N, K/G, G)
    s = scale.float().unsqueeze(-1)  # (N, K/G, 1)
    if bits == 8:
        return torch.round(wg / s).clamp_(-127, 127).to(torch.int8).reshape(w.shape).contiguous()
    mid = 2 ** (bits - 1)
    if offset is not None:
        wg = wg - offset.float().unsqueeze(-1)
    c = torch.round(wg / s).add_(mid).clamp_(0, 2**bits - 1)
    return c.to(torch.uint8).reshape(w.shape).contiguous()


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float weight ``(N, K)`` from unpacked codes and their per-group scale / offset."""
    cg = _grouped(codes, group_size).float()  # (N, K/G, G)
    if bits != 8:
        cg = cg - 2 ** (bits - 1)
    w = cg * scale.float().unsqueeze(-1)
    if offset is not None:
        w = w + offset.float().unsqueeze(-1)
    return w.reshape(codes.shape).to(dtype)


# ---- packing (canonical: along K, low bits first) ----


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``(N, K)`` -> packed uint8 ``(N, K * bits // 8)``."""
    n, k = codes.shape
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if bits in (2, 4):
        per = 8 // bits
        if k % per:
            raise MemoptError(f"int{bits} packing needs K divisible by {per}, got {k}")
        c = c.reshape(n, k // per, per)  # (N, K/per, per)
        out = c[..., 0].clone()
        for i in range(1, per):
            out |= c[..., i] << (bits * i)
        return out  # (N, K/per) uint8
    if bits == 3:
        if k % 8:
            raise MemoptError(f"int3 packing needs K divisible by 8, got {k}")
        c = c.reshape(n, k // 8, 8).to(torch.int32)  # 8 codes -> one 24-bit word
        word = c[..., 0].clone()
        for i in range(1, 8):
            word |= c[..., i] << (3 * i)
        b = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], -1)  # (N, K/8, 3)
        return b.to(torch.uint8).reshape(n, 3 * k // 8)
    raise MemoptError(f"cannot pack {bits}-bit codes")


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: packed uint8 ``(N, K * bits // 8)`` -> uint8 codes ``(N, K)``."""
    n = packed.shape[0]
    if bits == 8:
        return packed
    if bits in (2, 4):
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(per)]
        return torch.stack(parts, -1).reshape(n, k)  # (N, K/per, per) -> (N, K)
    if bits == 3:
        b = packed.reshape(n, k // 8, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (N, K/8)
        parts = [(word >> (3 * i)) & 7 for i in range(8)]
        return torch.stack(parts, -1).to(torch.uint8).reshape(n, k)
    raise MemoptError(f"cannot unpack {bits}-bit codes")


def pack_int4_nblock(codes: torch.Tensor, block_n: int) -> torch.Tensor:
    """int4 codes ``(N, K)`` -> the row-interleaved layout of PyTorch's CPU int4 kernel.

    Rows go in blocks of ``block_n`` (64 on AVX-512, 32 on AVX2); in block ``b``, for each k, byte
    ``j < block_n / 2`` holds row ``b*block_n + j`` in its low nibble and row ``b*block_n + block_n/2
    + j`` in its high nibble. Same byte count as the canonical form: ``(N, K // 2)`` uint8.
    """
    n, k = codes.shape
    h = block_n // 2
    v = codes.to(torch.uint8).reshape(n // block_n, block_n, k).transpose(1, 2)  # (N/B, K, B)
    return (v[..., :h] | (v[..., h:] << 4)).contiguous().reshape(n, k // 2)


def unpack_int4_nblock(packed: torch.Tensor, block_n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_nblock` -> uint8 codes ``(N, K)``."""
    n = packed.shape[0]
    v = packed.reshape(n // block_n, k, block_n // 2)  # (N/B, K, B/2)
    c = torch.cat([v & 0xF, v >> 4], -1)  # (N/B, K, B)
    return c.transpose(1, 2).reshape(n, k)


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal to quantization noise ratio in dB: ``20 log10(|x| / |x - y|)``."""
    x, y = x.double(), y.double()
    noise = (x - y).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(x.norm() / noise))
