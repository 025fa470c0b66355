"""Calibrated int4: GPTQ, block by block over a transformer, into the same ``Int4Weight`` as RTN.

Why GPTQ (chosen by measurement: bench/calibrate.py compares the variants, the README's
quantization table has the result): at the same group size it keeps a causal LM's perplexity far
closer to float32's than round-to-nearest does, the variant below closer than the paper's plain
GPTQ, and closer still with the (tied) lm_head by GPTQ as well, the default; the price is a
quantization much slower than round-to-nearest. GPTQ (Frantar et al. 2022) quantizes one input
column at a time and pushes each column's rounding error onto the columns not yet quantized,
weighted by the inverse of the layer's input Hessian ``H = X^T X`` (X: the layer's calibration
inputs), so the layer's *output* on real activations is what gets preserved, not the weight. We
add two things the format allows:

* act-order (columns in decreasing ``H_jj``: the most excited inputs are quantized first, while
  there are still many columns left to absorb their error). Groups stay contiguous in the original
  column order (the kernel's format has one scale/zero per 64 consecutive inputs): a group's scale
  and zero are chosen when the first of its columns is reached, from the group's columns' current
  values (error feedback included, also the feedback still pending inside the lazy 128-column
  block);
* a per-group clipping search: the group's ``[min, max]`` range shrunk by up to 25 %, keeping per
  row the range whose rounding error, weighted by ``H_jj``, is smallest.

The result is plain int4 codes + bfloat16 scale/zero, packed by :func:`int4_weight_from_codes` into
the very buffers ``Int4Weight`` holds for RTN: same kernel, same bytes, nothing extra kept.

Sequential, as in the paper: a transformer block's calibration inputs are the outputs of the blocks
before it *already quantized*, and inside a block the sub-layers are quantized in execution order (a
"stage" is the set of Linears that read the same tensor, e.g. q/k/v or gate/up), each stage's
Hessian computed with every earlier stage already quantized. A stage's pass stops at its first
Linear (an exception raised from a hook), so the rest of the block is not computed for nothing.

Memory bound while calibrating (whole model, :func:`calibrate_`): the model itself, plus the block
inputs and outputs of the whole calibration set, ``N * T * hidden * 4`` bytes once each input is
dropped as its output is made (``consume=True``, the streamed path; twice that otherwise: N
sequences of T tokens), plus one chunk's activations inside one block (:data:`CALIB_BATCH`
sequences at a time), plus two (K, K) float32 matrices at a time per Linear being quantized (the
Hessian, then its Cholesky factors: ``4 * K * K`` bytes each, K the Linear's input width), plus
one float32 copy of that Linear's weight. The output projection's GPTQ reads its
weight 2048 rows at a time (:func:`gptq_rows`) and packs each chunk into the preallocated result.

A :class:`~memopt.quant.config.Mixed` config (a format per module) keeps that order for the mixed
model: each block's inputs come from the earlier blocks as the mix quantized them; inside a block,
the modules whose rule is not calibrated (round-to-nearest int4/int3/int2, int8) are quantized
first, since a format chosen without data does not depend on when it is applied but changes what
the modules after it see, then the Linears whose rule is ``Int4WeightOnly(algo="gptq")`` by GPTQ,
stage by stage, each with its rule's group size; modules whose rule keeps them float stay float.
Outside the blocks, the embedding is quantized at the end, as for a uniform config (block 0 is
calibrated on float embeddings), and the output projection gets GPTQ when the rule of its tie
group (its first module's) is calibrated.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memopt.core import heap
from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes, require_blocks, selector
from memopt.core.texts import mixed_calib_text
from memopt.quant.api import (
    QuantReport,
    count_format,
    covered_shape,
    covered_weight,
    first_of_tie,
    lookup_only_weights,
    replace_weights,
    swap_module,
    swap_plan,
)
from memopt.quant.config import Int4WeightOnly, IntNWeightOnly, Mixed, gptq_config, is_calibrated
from memopt.weights import kernels
from memopt.weights.modules import QConv, QLinear
from memopt.weights.primitives import choose_qparams, pack, pack_int4_nblock
from memopt.weights.quantized import Int4Weight, IntNWeight, QuantizedWeight

__all__ = [
    "CALIB_BATCH",
    "GPTQSettings",
    "Replay",
    "calibrate_",
    "calibration_ids",
    "capture_inputs",
    "gptq_head",
    "gptq_quantize",
    "gptq_rows",
    "gptq_weight",
    "int4_weight_from_codes",
    "output_error",
    "next_inputs",
    "output_projection",
    "quantize_block_",
    "stages",
]

ProgressFn = Callable[[int, int], None]  # (blocks done, blocks total)
Calibrated = Int4WeightOnly | IntNWeightOnly  # a calibrated format: int4, or int3 / int2

# Calibration sequences per forward. Each chunk's activations inside a block are the peak's
# transient part (they grow with the sequences per chunk, widest at the MLP), so 4 rather than 8
# halves that part of the streamed quantization's peak; the Hessians it accumulates are the same.
CALIB_BATCH = 4


@dataclass(frozen=True)
class GPTQSettings:
    """Knobs of the algorithm (the defaults are what bench/calibrate.py measured best)."""

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal: keeps H invertible
    block: int = 128  # lazy-update block: columns updated eagerly inside, by one matmul outside
    act_order: bool = True
    search: bool = True  # per-group clipping search
    shrink: float = 0.25  # the search tries ranges down to (1 - shrink) x the min..max range
    steps: int = 11  # candidates in that search
    # GPTQ for the output projection too (a tied embedding shares it): a lower perplexity than RTN
    # there, for a slower quantization (bench/calibrate.py)
    lm_head: bool = True
    # keep round-to-nearest's codes for a block's Linear where they give the smaller output error
    # on the calibration inputs (tr(dW H dW^T), GPTQ's own objective): then no Linear of a block
    # errs more than round to nearest on them, which the fit's costs (measured by RTN) assume.
    # Measured on SmolLM2 as shipped (bench/fit.py, uniform int4 g32, held-out perplexity): 14.791
    # with the rule, 14.741 without (0.3 %: it takes RTN for a few Linears)
    rtn_when_better: bool = True
    # Asymmetric calibration (GPTAQ-style; calibrate_ only, not the streamed path): each Linear's
    # target is the float model's output on the float model's own inputs, not its output on the
    # quantized model's inputs; see _asym_target
    asym: bool = False


DEFAULT_SETTINGS = GPTQSettings()


def _settings(config: Calibrated | Mixed, settings: GPTQSettings | None) -> GPTQSettings:
    if isinstance(config, Mixed):
        if not is_calibrated(config):
            raise MemoptError("calibration: this Mixed config has no calibrated (gptq) rule")
        return settings or DEFAULT_SETTINGS
    if not isinstance(config, (Int4WeightOnly, IntNWeightOnly)):
        raise MemoptError(
            "calibration takes an Int4WeightOnly, IntNWeightOnly or Mixed config, not "
            f"{type(config).__name__}"
        )
    if config.algo != "gptq":
        raise MemoptError(f"calibration: algo {config.algo!r} is not a calibrated algorithm")
    return settings or DEFAULT_SETTINGS


def single_weights(model: nn.Module, select: Callable[[str, nn.Module], bool]) -> set[str]:
    """The modules that ``quantize_`` would swap (:func:`memopt.quant.api.swap_plan`) whose weight
    no other module shares: those a Mixed config's block pass may quantize inside their block. A
    tie group waits for the end, where its first module's rule gives the group one format."""
    swaps = swap_plan(model, select, {})
    shared = Counter(key for _, _, key in swaps)
    return {name for name, _, key in swaps if shared[key] == 1}


# ---- calibration data ----


def calibration_ids(
    tokenizer: Any, text: str | None = None, n: int = 32, seq: int = 256
) -> torch.Tensor:
    """``(n, seq)`` int64 token ids: ``n`` windows of ``seq`` tokens spread evenly over ``text``
    (default :func:`~memopt.core.texts.mixed_calib_text`: documentation, code and release notes,
    none of it a held-out text). A text shorter than ``n * seq`` tokens gives overlapping
    windows; shorter than ``seq``, one window of all of it."""
    if n < 1 or seq < 2:
        raise MemoptError(f"calibration needs n >= 1 and seq >= 2, got n={n}, seq={seq}")
    text = mixed_calib_text() if text is None else text
    ids = torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long).reshape(-1)  # (L,)
    if ids.numel() < 2:
        raise MemoptError("the calibration text has fewer than 2 tokens")
    seq = min(seq, ids.numel())
    count = min(n, ids.numel() - seq + 1)
    starts = torch.linspace(0, ids.numel() - seq, count).round().long()  # (count,)
    return torch.stack([ids[s : s + seq] for s in starts.tolist()])  # (count, seq)


# ---- GPTQ on one weight ----


def _choose_group(
    x: torch.Tensor,
    weight: torch.Tensor,
    symmetric: bool,
    s: GPTQSettings,
    bits: int = 4,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset per row of one group ``x (N, G)``: ``scale_dtype`` values (bfloat16 for
    int4, float16 for int3 / int2: their formats'), as float32 ``(N,)``.

    Candidates are the min..max range shrunk towards its centre; each row keeps the one with the
    smallest ``sum_j weight_j (x_j - dq(x_j))^2``. choose_qparams makes the scale/offset of each
    candidate range, so the convention (and the bfloat16 rounding) is exactly RTN's.
    """
    n = x.shape[0]
    lo, hi = x.amin(1), x.amax(1)  # (N,)
    p = torch.linspace(1.0, 1.0 - s.shrink, s.steps) if s.search else torch.ones(1)  # (P,)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    if symmetric:  # symmetric ranges shrink towards 0, the only fixed point they have
        mid = torch.zeros_like(mid)
        half = torch.maximum(-lo, hi)
    ends = torch.stack([mid - p[:, None] * half, mid + p[:, None] * half], -1)  # (P, N, 2)
    scale, off = choose_qparams(ends.reshape(-1, 2), bits, 2, symmetric, scale_dtype)
    scale = scale.float().reshape(-1, n, 1)  # (P, N, 1)
    off = torch.zeros_like(scale) if off is None else off.float().reshape(-1, n, 1)
    if scale.shape[0] == 1:
        return scale[0, :, 0], off[0, :, 0]
    # One (P, N, G) temporary, updated in place (the expression form held four at once): codes,
    # then their squared, weighted rounding error
    mid = 2 ** (bits - 1)
    c = (x - off).div_(scale).round_().clamp_(-mid, mid - 1)  # (P, N, G)
    err = c.mul_(scale).add_(off).sub_(x).pow_(2).mul_(weight).sum(-1)  # (P, N)
    del c
    best = err.argmin(0)  # (N,)
    rows = torch.arange(n)
    return scale[best, rows, 0], off[best, rows, 0]


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    symmetric: bool = False,
    settings: GPTQSettings = DEFAULT_SETTINGS,
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one weight ``w (N, K)`` given ``h (K, K)`` = sum of x x^T over calibration inputs.

    Returns ``(codes (N, K) uint8 in [0, 2^bits - 1], scale (N, K/G), zero (N, K/G))`` in the
    convention ``w ~ (c - 2^(bits-1)) * scale + zero`` (zero = 0 when symmetric); scale and zero
    bfloat16 for int4 (its format's), float16 for int3 / int2.

    Runs on one thread: the per-column operations (a few thousand elements each) are too small to
    split, and OpenMP's fork/join on each of them costs more than the work (by orders of
    magnitude when another core is busy).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w, h, group_size, symmetric, settings, bits)
    finally:
        torch.set_num_threads(threads)


def gptq_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    config: Int4WeightOnly,
    settings: GPTQSettings = DEFAULT_SETTINGS,
    rows: int = 2048,
) -> Int4Weight:
    """GPTQ of ``w (N, K)`` into an :class:`Int4Weight`, ``rows`` output rows at a time."""
    return gptq_rows(lambda a, b: w[a:b], w.shape[0], h, config, settings, rows, w.dtype)


def gptq_rows(
    read: Callable[[int, int], torch.Tensor],
    n: int,
    h: torch.Tensor,
    config: Calibrated,
    settings: GPTQSettings = DEFAULT_SETTINGS,
    rows: int = 2048,
    dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """GPTQ of an ``(n, K)`` weight given by ``read(r0, r1)`` (its rows ``r0:r1``), ``rows`` at a time.

    Rows are independent in GPTQ (a column's rounding error is fed back along its own row only,
    and each row's group ranges are its own), so chunks give the result of the whole weight while
    the float32 working copies stay ``rows x K`` (instead of three copies of the whole ``n x K``
    weight), and the streamed path (memopt.quant.stream) reads each chunk from the source
    file: the float weight is never whole in memory. ``dtype``: the float weight's dtype.
    """
    k, g = h.shape[0], config.group_size
    if isinstance(config, IntNWeightOnly):
        return _gptq_rows_intn(read, n, h, config, settings, rows, dtype)
    block_n = kernels.int4_block_n(n)
    if block_n is not None and rows % block_n:
        rows = max(block_n, rows // block_n * block_n)
    # Each chunk's codes are packed into the final buffers as they come (rows are packed
    # independently, in row blocks that a chunk of a multiple of block_n rows holds whole): no
    # (N, K) codes tensor, no concatenation (two ``N * K``-byte tensors fewer at the peak)
    packed = torch.empty(n, k // 2, dtype=torch.uint8)  # (N, K/2)
    scale_zero = torch.empty(k // g, n, 2, dtype=torch.bfloat16)  # (K/G, N, 2)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        codes, scale, zero = gptq_quantize(read(a, b), h, g, config.symmetric, settings)
        packed[a:b] = pack(codes, 4) if block_n is None else pack_int4_nblock(codes, block_n)
        scale_zero[:, a:b, 0] = scale.t()
        scale_zero[:, a:b, 1] = zero.t()
        del codes, scale, zero
    return _int4_weight(packed, scale_zero, (n, k), g, config.symmetric, dtype, block_n)


def _gptq_rows_intn(
    read: Callable[[int, int], torch.Tensor],
    n: int,
    h: torch.Tensor,
    config: IntNWeightOnly,
    settings: GPTQSettings,
    rows: int,
    dtype: torch.dtype,
) -> IntNWeight:
    """:func:`gptq_rows` for int3 / int2: each chunk packed into the preallocated buffers."""
    k, g, bits = h.shape[0], config.group_size, config.bits
    packed = torch.empty(n, k * bits // 8, dtype=torch.uint8)  # (N, K * bits / 8)
    scale = torch.empty(n, k // g, dtype=torch.float16)
    zero = torch.empty(n, k // g, dtype=torch.float16)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        codes, sc, zr = gptq_quantize(read(a, b), h, g, config.symmetric, settings, bits)
        packed[a:b] = pack(codes, bits)
        scale[a:b], zero[a:b] = sc, zr
        del codes, sc, zr
    return _intn_weight(packed, scale, zero, (n, k), bits, g, config.symmetric, dtype)


def _gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    symmetric: bool,
    settings: GPTQSettings,
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    mid = 2 ** (bits - 1)
    scale_dtype = torch.bfloat16 if bits == 4 else torch.float16
    g = group_size
    if k % g:
        raise MemoptError(f"group size {g} does not divide the input dimension {k}")
    s = settings
    # Working copies, one (K, K) or (K, N) allocation each; ``h`` is shared by the Linears of a
    # stage and stays untouched. A (K, K) float32 is ``4 * K * K`` bytes (the widest input, e.g.
    # down_proj's, is the largest), and the chain H -> Cholesky -> inverse -> Cholesky holds two at
    # a time, not five: what bounds the streamed quantization's peak inside a block.
    h = h.detach().float()  # (K, K) float32 (float64 was much slower, same results)
    diag = h.diagonal().clone()  # (K,)
    dead = diag <= 0  # inputs never excited: any value is exact on the data, no feedback to give
    diag[dead] = 0.0
    perm = (
        torch.argsort(diag, descending=True, stable=True) if s.act_order else torch.arange(k)
    )  # (K,) position -> column
    H = h[perm[:, None], perm[None, :]]  # (K, K) in processing order, a new tensor
    H.diagonal()[dead[perm]] = 1.0
    dperm = diag[perm].float()  # (K,) weights of the clipping search, in processing order
    d0 = H.diagonal().clone()  # (K,) undamped diagonal
    mean = float(d0.mean())
    L = None
    damp = s.damp
    for _ in range(6):  # a singular H (few samples, duplicated inputs): more damping, try again
        H.diagonal().copy_(d0 + damp * mean)  # damped in place
        L, info = torch.linalg.cholesky_ex(H)  # (K, K) lower factor of H
        if int(info) == 0:
            break
        L = None
        damp *= 10
    del H, d0
    if L is None:
        raise MemoptError("GPTQ: the calibration Hessian is not positive definite")
    hinv = torch.cholesky_inverse(L)  # (K, K) H^-1
    del L
    U, info = torch.linalg.cholesky_ex(hinv, upper=True)  # (K, K) float32
    del hinv
    if int(info) != 0:
        raise MemoptError("GPTQ: the inverse calibration Hessian is not positive definite")
    # U: upper Cholesky factor of H^-1, the rows that carry each column's error forward
    # Transposed working copy: one input column is one contiguous row, so the per-column work
    # (read, round, rank-1 update of the rest of the block) touches contiguous memory.
    Wt = w.detach().float().t()[perm].contiguous()  # (K, N), rows in processing order

    ngroups = k // g
    pos_of = torch.empty(k, dtype=torch.long)  # column -> position
    pos_of[perm] = torch.arange(k)
    group_pos = pos_of.reshape(ngroups, g)  # (K/G, G) positions of each group's columns
    group_at = perm // g  # (K,) group of the column at each position
    chosen = torch.zeros(ngroups, dtype=torch.bool)
    scale = torch.empty(n, ngroups)  # (N, K/G) float32 holding bfloat16 values
    zero = torch.empty(n, ngroups)
    Q = torch.empty(k, n, dtype=torch.uint8)  # (K, N) codes, in processing order
    for i1 in range(0, k, s.block):
        i2 = min(i1 + s.block, k)
        W1 = Wt[i1:i2].clone()  # (B, N) eagerly updated
        E1 = torch.zeros(i2 - i1, n)  # (B, N) scaled errors, for the lazy update of the rest
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            gi = int(group_at[i1 + i])
            if not chosen[gi]:
                pos = group_pos[gi]  # (G,) all >= i1 + i: this is the group's first column
                cur = Wt[pos]  # (G, N) up to date for positions in earlier blocks
                inb = pos < i2
                cur[inb] = W1[pos[inb] - i1]
                out = ~inb
                if i and bool(out.any()):  # the pending feedback of this block's columns
                    cur[out] -= U[i1 : i1 + i][:, pos[out]].t() @ E1[:i]
                scale[:, gi], zero[:, gi] = _choose_group(
                    cur.t(), dperm[pos], symmetric, s, bits, scale_dtype
                )
                chosen[gi] = True
            sc, zr = scale[:, gi], zero[:, gi]  # (N,)
            x = W1[i]  # (N,)
            c = torch.round((x - zr) / sc).clamp_(-mid, mid - 1)
            Q[i1 + i] = (c + mid).to(torch.uint8)
            err = (x - (c * sc + zr)) / U1[i, i]  # (N,)
            # rank-1 error feedback; addmm_, not addr_ (which is far slower here)
            W1[i + 1 :].addmm_(U1[i, i + 1 :, None], err[None, :], alpha=-1.0)
            E1[i] = err
        Wt[i2:] -= U[i1:i2, i2:].t() @ E1  # (K - i2, B) @ (B, N): the lazy update
    Q = Q.t()  # (N, K)
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes, scale.to(scale_dtype), zero.to(scale_dtype)


def intn_weight_from_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    dtype: torch.dtype = torch.float32,
) -> IntNWeight:
    """An :class:`IntNWeight` (int3 / int2) holding given codes ``(N, K)`` and float16 scale and
    offset ``(N, K/G)``: the buffers round-to-nearest makes, other codes."""
    packed = pack(codes, bits)  # (N, K * bits / 8)
    return _intn_weight(packed, scale, zero, tuple(codes.shape), bits, group_size, symmetric, dtype)


def _intn_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    symmetric: bool,
    dtype: torch.dtype,
) -> IntNWeight:
    """An IntNWeight around ready buffers (``packed`` canonical, ``scale``/``zero`` (N, K/G))."""
    qw = IntNWeight.__new__(IntNWeight)
    QuantizedWeight.__init__(qw, shape, dtype)
    qw.bits, qw.group_size, qw.symmetric = bits, group_size, symmetric
    qw.fmt = f"int{bits}"
    qw.register_buffer("packed", packed)
    qw.register_buffer("scale", scale.to(torch.float16).contiguous())
    qw.register_buffer("offset", None if symmetric else zero.to(torch.float16).contiguous())
    return qw


def _weight_from_codes(
    c: Calibrated, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> QuantizedWeight:
    if isinstance(c, IntNWeightOnly):
        return intn_weight_from_codes(codes, scale, zero, c.bits, c.group_size, c.symmetric, dtype)
    return int4_weight_from_codes(codes, scale, zero, c.group_size, c.symmetric, dtype)


def _rtn_weight(c: Calibrated, w: torch.Tensor) -> QuantizedWeight:
    """``w`` in ``c``'s format by round to nearest (the same kind as GPTQ's result)."""
    if isinstance(c, IntNWeightOnly):
        return IntNWeight(w, c.bits, c.group_size, c.symmetric)
    return Int4Weight(w, c.group_size, c.symmetric)


def _bits(c: Calibrated) -> int:
    return c.bits if isinstance(c, IntNWeightOnly) else 4


def output_error(w: torch.Tensor, qw: QuantizedWeight, h: torch.Tensor) -> float:
    """``tr(dW H dW^T)``: the summed squared error that ``qw`` in place of ``w (N, K)`` makes in
    the Linear's outputs over the inputs whose ``h (K, K)`` = sum of x x^T."""
    d = qw.dequantize(torch.float32) - w.detach().float()  # (N, K)
    return float(((d @ h) * d).sum())


def int4_weight_from_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    symmetric: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Int4Weight:
    """An :class:`Int4Weight` holding given codes ``(N, K)`` and bfloat16 scale/zero ``(N, K/G)``.

    Exactly the buffers ``Int4Weight(w, ...)`` makes for RTN (the kernel's row-interleaved
    layout where it has one, ``scale_zero (K/G, N, 2)`` bfloat16): only the choice of codes differs.
    """
    n, k = codes.shape
    block_n = kernels.int4_block_n(n) if codes.device.type == "cpu" else None
    packed = pack(codes, 4) if block_n is None else pack_int4_nblock(codes, block_n)
    sz = torch.stack([scale.to(torch.bfloat16).t(), zero.to(torch.bfloat16).t()], -1)
    return _int4_weight(packed, sz.contiguous(), (n, k), group_size, symmetric, dtype, block_n)


def _int4_weight(
    packed: torch.Tensor,
    scale_zero: torch.Tensor,
    shape: tuple[int, int],
    group_size: int,
    symmetric: bool,
    dtype: torch.dtype,
    block_n: int | None,
) -> Int4Weight:
    """An Int4Weight around ready buffers: ``packed (N, K/2)`` uint8 (the kernel's layout when
    ``block_n``), ``scale_zero (K/G, N, 2)`` bfloat16."""
    qw = Int4Weight.__new__(Int4Weight)
    QuantizedWeight.__init__(qw, shape, dtype)
    qw.group_size, qw.symmetric, qw.block_n = group_size, symmetric, block_n
    qw.register_buffer("packed", packed)  # (N, K // 2) uint8
    qw.register_buffer("scale_zero", scale_zero)  # (K // G, N, 2) bfloat16
    return qw


# ---- one transformer block ----


class _Stop(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been captured."""


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def stages(block: nn.Module, first: tuple[tuple, dict], names: list[str]) -> list[list[str]]:
    """The Linears ``names`` grouped by the tensor they read, in the order they first run."""
    by_input: dict[int, list[str]] = {}
    order: list[int] = []
    keep: list[torch.Tensor] = []  # holds the inputs so that their ids stay unique

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            keep.append(x)
            if any(name in v for v in by_input.values()):
                return  # a Linear run twice: its stage is where it first ran
            if id(x) not in by_input:
                by_input[id(x)] = []
                order.append(id(x))
            by_input[id(x)].append(name)

        return pre

    handles = [block.get_submodule(nm).register_forward_pre_hook(hook(nm)) for nm in names]
    try:
        block(*first[0], **first[1])
    finally:
        for h in handles:
            h.remove()
    stages = [by_input[i] for i in order]
    unseen = [nm for nm in names if not any(nm in st for st in stages)]
    return stages + [[nm] for nm in unseen]  # never called: quantized last, without data


def _cross_hessian(
    block: nn.Module,
    linear: nn.Module,
    inputs: list[tuple[tuple, dict]],
    fblock: nn.Module,
    flinear: nn.Module,
    finputs: list[tuple[tuple, dict]],
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, C)``: ``H = Σ x_q x_qᵀ`` at ``linear``'s input in the block being quantized, and
    ``C = Σ x_f x_qᵀ`` with ``x_f`` the float block's input at ``flinear`` for the same tokens
    (the float model's own activations), both (K, K) float32."""
    H, C = torch.zeros(k, k), torch.zeros(k, k)
    got: list[torch.Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        got.append(args[0].detach().reshape(-1, k).float())  # (M, K)
        raise _Stop

    handles = [linear.register_forward_pre_hook(pre), flinear.register_forward_pre_hook(pre)]
    try:
        for (a, kw), (fa, fkw) in zip(inputs, finputs, strict=True):
            with contextlib.suppress(_Stop):
                block(*a, **kw)
            with contextlib.suppress(_Stop):
                fblock(*fa, **fkw)
            xq, xf = got
            got.clear()
            H.addmm_(xq.t(), xq)
            C.addmm_(xf.t(), xq)
    finally:
        for h in handles:
            h.remove()
    return H, C


def _asym_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight that, on the quantized model's inputs ``X_q``, best gives the float model's
    outputs ``X_f Wᵀ``: ``W · C · H⁻¹`` (least squares, ``C = X_fᵀ X_q``, ``H`` damped as
    GPTQ damps it). GPTQ of this target with ``H`` minimises ``‖X_f Wᵀ − X_q Qᵀ‖`` (GPTAQ's
    asymmetric calibration) instead of ``‖X_q Wᵀ − X_q Qᵀ‖``."""
    hd = h.clone()
    hd.diagonal().add_(damp * float(hd.diagonal().mean()) + 1e-8)
    L, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        return w
    wc = w.detach().float() @ c  # (N, K)
    return torch.cholesky_solve(wc.t(), L).t().to(w.dtype)  # (N, K): (W C) H^-1, H symmetric


def _hessian(
    block: nn.Module, linear: nn.Module, inputs: list[tuple[tuple, dict]], k: int
) -> torch.Tensor:
    """sum over every calibration token of x x^T at ``linear``'s input: (K, K) float32."""
    H = torch.zeros(k, k)  # (K, K) float32

    def pre(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, k).float()  # (M, K)
        H.addmm_(x.t(), x)
        raise _Stop

    handle = linear.register_forward_pre_hook(pre)
    try:
        for args, kwargs in inputs:
            with contextlib.suppress(_Stop):
                block(*args, **kwargs)
    finally:
        handle.remove()
    return H


def _uncalibrated_first(
    block: nn.Module,
    config: Mixed,
    full: Callable[[str], str],
    select: Callable[[str, nn.Module], bool] | None,
    on_linear: Callable[[str, Any], None] | None,
) -> None:
    """A Mixed config's block: every selected covered module whose rule is not calibrated gets its
    rule's format now, before the block's GPTQ stages (modules that its rule keeps float, or whose
    weight the rule cannot take, stay as they are; the model-level pass reports them)."""
    lookup = lookup_only_weights(block)
    for nm, m in list(block.named_modules()):
        if not nm or covered_shape(m) is None or (select is not None and not select(nm, m)):
            continue
        rule = config.config_for(full(nm))
        if rule is None or gptq_config(config, full(nm)) is not None:
            continue  # float, or GPTQ's (a non-Linear under a gptq rule: rounded at the end)
        w = covered_weight(m)
        plan = config.plan_module(full(nm), w.shape[0], w.shape[1], w.dtype, id(m.weight) in lookup)
        if isinstance(plan, str):
            continue
        qw = plan.make(w)
        if not isinstance(swap_module(block, nm, m, qw, plan.dynamic), QConv):
            m.register_parameter("weight", None)  # the float weight goes now (QConv dropped it)
        if on_linear is not None:
            on_linear(nm, qw)


@torch.no_grad()
def quantize_block_(
    block: nn.Module,
    inputs: list[tuple[tuple, dict]],
    config: Int4WeightOnly | Mixed,
    *,
    select: Callable[[str, nn.Module], bool] | None = None,
    on_linear: Callable[[str, QuantizedWeight | str], None] | None = None,
    settings: GPTQSettings | None = None,
    consume: bool = False,
    name: str = "",
    float_path: tuple[nn.Module, list[tuple[tuple, dict]]] | None = None,
) -> list[Any]:
    """Quantize every ``nn.Linear`` of one transformer block in place with calibrated int4.

    ``inputs``: the calibration inputs of the block, each the ``(args, kwargs)`` of one call of
    ``block.forward``. Sub-layers are quantized in execution order, each from the inputs it gets
    with the earlier ones already quantized. Returns the block's outputs, one per input, computed
    with the whole block quantized: the next block's inputs. ``select(name, module)`` (names
    relative to the block) leaves Linears out; ``on_linear(name, weight or reason skipped)`` is told
    of each one. ``settings`` overrides the algorithm's knobs (benchmarks compare variants).
    ``consume``: each input's hidden states are dropped from ``inputs`` once its output is made
    (``next_inputs`` still finds the other arguments there), so the inputs and outputs of the
    whole calibration set are not both held.

    A :class:`~memopt.quant.config.Mixed` config (``name``: the block's fully qualified name, which
    its patterns see): each Linear whose rule is calibrated int4 gets GPTQ with that rule's group
    size; every other selected covered module gets its own rule's format *first*, so that the GPTQ
    stages' Hessians and the block's outputs are those of the mixed model (a module quantized
    without data is the same whenever it is quantized; what it changes is what the modules after it
    see). ``on_linear`` is told of those too.

    ``float_path``: ``(float block, its float inputs)`` for ``settings.asym`` (the block's float
    copy and the inputs the float model gives it, chunk by chunk as ``inputs``).
    """
    settings = _settings(config, settings)
    if not inputs:
        raise MemoptError("quantize_block_: no calibration inputs")

    def full(nm: str) -> str:
        return f"{name}.{nm}" if name else nm

    if isinstance(config, Mixed):
        _uncalibrated_first(block, config, full, select, on_linear)
    rule: dict[str, Calibrated] = {}
    for nm, m in block.named_modules():
        if isinstance(m, nn.Linear) and (select is None or select(nm, m)):
            c = gptq_config(config, full(nm))
            if c is not None:
                rule[nm] = c
    todo = []
    for nm, c in rule.items():
        k = block.get_submodule(nm).in_features
        if k % c.group_size:
            if on_linear is not None:
                on_linear(nm, f"group size {c.group_size} does not divide {k} inputs")
        else:
            todo.append(nm)
    if todo:
        for stage in stages(block, inputs[0], todo):
            lin0 = block.get_submodule(stage[0])
            C = None
            if settings.asym and float_path is not None:
                fblock, finputs = float_path
                H, C = _cross_hessian(block, lin0, inputs, fblock, fblock.get_submodule(stage[0]),
                                      finputs, lin0.in_features)  # fmt: skip
            else:
                H = _hessian(block, lin0, inputs, lin0.in_features)  # shared by the stage
            for nm in stage:
                lin, c = block.get_submodule(nm), rule[nm]
                w = lin.weight if C is None else _asym_target(lin.weight, H, C, settings.damp)
                codes, scale, zero = gptq_quantize(
                    w, H, c.group_size, c.symmetric, settings, _bits(c)
                )
                qw = _weight_from_codes(c, codes, scale, zero, lin.weight.dtype)
                del codes
                if settings.rtn_when_better and C is None:
                    rtn = _rtn_weight(c, lin.weight.detach())
                    if output_error(lin.weight, rtn, H) < output_error(lin.weight, qw, H):
                        qw = rtn
                _set_child(block, nm, QLinear(qw, lin.bias))
                lin.register_parameter("weight", None)  # the float weight goes now
                if on_linear is not None:
                    on_linear(nm, qw)
            del H, C
            heap.trim()  # the stage's Hessian and GPTQ's copies: back to the system, not kept
    outputs = []
    for i in range(len(inputs)):
        args, kwargs = inputs[i]
        outputs.append(block(*args, **kwargs))
        if consume:
            inputs[i] = (
                ((None, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": None})
            )
        del args, kwargs
    return outputs


# ---- the whole model ----


def _first_hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


Embed = Callable[[torch.Tensor], torch.Tensor]  # (B, T) token ids -> (B, T, C) input embeddings


def _run(model: nn.Module, ids: torch.Tensor, embed: Embed | None) -> None:
    """One forward of ``model`` on ``ids (B, T)``; with ``embed``, on ``inputs_embeds=embed(ids)``
    (the streamed path: the model's embedding weight is not in memory)."""
    if embed is None:
        model(input_ids=ids, use_cache=False)
    else:
        model(inputs_embeds=embed(ids), use_cache=False)


def capture_inputs(
    model: nn.Module,
    block: nn.Module,
    ids: torch.Tensor,
    batch: int,
    embed: Embed | None = None,
) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of ``block`` for each chunk of ``batch`` sequences of ``ids``."""
    captured: list[tuple[tuple, dict]] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch):
            with contextlib.suppress(_Stop):
                _run(model, ids[i : i + batch], embed)
    finally:
        handle.remove()
    if len(captured) != math.ceil(ids.shape[0] / batch):
        raise MemoptError("calibration: the first block did not run once per calibration chunk")
    return captured


def next_inputs(
    inputs: list[tuple[tuple, dict]], outputs: Iterable[Any]
) -> list[tuple[tuple, dict]]:
    nxt = []
    for (args, kwargs), out in zip(inputs, outputs, strict=True):
        h = _first_hidden(out)
        if args:
            nxt.append(((h, *args[1:]), kwargs))
        else:
            nxt.append(((), {**kwargs, "hidden_states": h}))
    return nxt


class Replay(nn.Module):
    """Stands in for a block: the first returns the stored final hidden states, the rest pass on."""

    def __init__(self, stored: list[torch.Tensor] | None, as_tuple: bool) -> None:
        super().__init__()
        self.stored, self.as_tuple = stored, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        h = self.stored.pop(0) if self.stored is not None else hidden_states
        return (h,) if self.as_tuple else h


def _head_hessian(
    model: nn.Module,
    blocks: nn.ModuleList,
    head: nn.Linear,
    ids: torch.Tensor,
    batch: int,
    final: list[tuple[tuple, dict]],
    as_tuple: bool,
    embed: Embed | None = None,
) -> torch.Tensor:
    """(K, K) float32 sum of x x^T at the output projection's input, from the stored final
    hidden states (the blocks are swapped for replays, so none of them runs again: the first
    block's input is ignored, so ``embed`` may give any (B, T, C) tensor)."""
    k = head.in_features
    H = torch.zeros(k, k)  # (K, K) float32
    stored = [a[0] if a else kw["hidden_states"] for a, kw in final]

    def pre(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, k).float()  # (M, K)
        H.addmm_(x.t(), x)
        raise _Stop  # the (M, vocab) logits are not needed

    saved = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = Replay(stored if i == 0 else None, as_tuple)
    handle = head.register_forward_pre_hook(pre)
    try:
        for i in range(0, ids.shape[0], batch):
            with contextlib.suppress(_Stop):
                _run(model, ids[i : i + batch], embed)
    finally:
        handle.remove()
        for i, blk in enumerate(saved):
            blocks[i] = blk
    return H


def output_projection(model: nn.Module) -> nn.Module | None:
    """The model's output projection (lm_head; tied: it shares the embedding's weight)."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


@torch.no_grad()
def gptq_head(
    model: nn.Module,
    blocks: nn.ModuleList,
    ids: torch.Tensor,
    final: list[tuple[tuple, dict]],
    as_tuple: bool,
    config: Calibrated,
    batch: int = CALIB_BATCH,
    settings: GPTQSettings | None = None,
    *,
    embed: Embed | None = None,
    read: Callable[[int, int], torch.Tensor] | None = None,
) -> QuantizedWeight | None:
    """The output projection by GPTQ (a tied lm_head: also the embedding's weight), or None when
    ``settings.lm_head`` is off or the model has no Linear head whose width the group divides.

    Its Hessian comes from its real inputs: ``final``, the calibration inputs that the last block's
    outputs would be for a next block (``next_inputs``), through whatever sits between the blocks
    and the head (the final norm), replayed without recomputing a block. Used by :func:`calibrate_`
    and by the streamed path (memopt.quant.stream), which calls it with the blocks, the embedding
    and the head on meta: ``embed`` then stands in for the embedding (the replay ignores what it
    gives) and ``read(r0, r1)`` gives rows ``r0:r1`` of the head's float weight from the file.
    """
    settings = _settings(config, settings)
    head = output_projection(model)
    if not settings.lm_head or not isinstance(head, nn.Linear):
        return None
    if head.in_features % config.group_size:
        return None
    if read is None:
        if head.weight.is_meta:
            return None
        read = lambda a, b: head.weight[a:b]  # noqa: E731
    H = _head_hessian(model, blocks, head, ids, batch, final, as_tuple, embed)  # (K, K)
    return gptq_rows(read, head.out_features, H, config, settings, dtype=head.weight.dtype)


@torch.no_grad()
def calibrate_(
    model: Any,
    config: Int4WeightOnly | Mixed,
    calib_ids: torch.Tensor | None = None,
    *,
    tokenizer: Any = None,
    calib_text: str | None = None,
    n: int = 32,
    seq: int = 256,
    batch: int = CALIB_BATCH,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    progress: ProgressFn | None = None,
    settings: GPTQSettings | None = None,
) -> Any:
    """Quantize a causal LM in place with calibrated int4, block by block; returns a QuantReport.

    ``model``: an ``nn.Module`` or a :class:`~memopt.models.LoadedModel` (whose tokenizer then makes
    the calibration ids). ``calib_ids (N, T)``: token ids; default ``calibration_ids(tokenizer,
    calib_text, n, seq)``, the text defaulting to :func:`mixed_calib_text`. Linears inside the
    transformer blocks get GPTQ; every other covered module selected (the embedding and a tied
    lm_head) gets round-to-nearest int4, as ``algo="rtn"`` would.

    A :class:`~memopt.quant.config.Mixed` config: the Linears in the blocks whose rule is
    calibrated int4 get GPTQ with their rule's group size; the other modules of a block get their
    rule's format before its GPTQ stages (:func:`quantize_block_`), so each block calibrates on the
    mixed model's outputs; the output projection gets GPTQ when the rule of its tie group (its
    first module's: the embedding of a tied LM) is calibrated; the rest (the embedding, anything
    outside the blocks, a weight shared by several modules) gets its rule's format at the end, a
    calibrated rule's as round-to-nearest int4.
    """
    from memopt.models import LoadedModel

    settings = _settings(config, settings)
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer()
        model = model.model
    if calib_ids is None:
        if tokenizer is None:
            raise MemoptError("calibration needs token ids or a tokenizer to make them")
        calib_ids = calibration_ids(tokenizer, calib_text, n, seq)
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise MemoptError(f"calib_ids must be (N, T) token ids, got {tuple(calib_ids.shape)}")

    select = selector(include, exclude, filter_fn)
    report = QuantReport(config.to_dict(), model_bytes(model), 0)
    prefix, blocks = require_blocks(model, "calibration")
    if isinstance(config, Mixed):  # only modules with a weight of their own, inside a block
        single = single_weights(model, select)
        in_block: Callable[[str, nn.Module], bool] = lambda full, m: full in single  # noqa: E731
    else:
        in_block = select
    head = output_projection(model)
    head_name = next((nm for nm, m in model.named_modules() if m is head), None)
    # the rule of the head's tie group: its first module's (a tied LM: the embedding's)
    head_config = gptq_config(config, first_of_tie(model, head_name)) if head_name else None
    was_training = model.training
    model.eval()
    inputs = capture_inputs(model, blocks[0], calib_ids, batch)
    finputs = list(inputs) if settings.asym else None  # the float model's block inputs
    for b, block in enumerate(blocks):
        here = f"{prefix}.{b}"
        fblock = copy.deepcopy(block) if finputs is not None else None  # this block, float

        def on_linear(nm: str, qw: QuantizedWeight | str, here: str = here, block=block) -> None:
            if isinstance(qw, str):
                report.skipped[f"{here}.{nm}"] = qw
            else:
                report.modules.append(f"{here}.{nm}")
                count_format(report.formats, block.get_submodule(nm))

        outputs = quantize_block_(
            block,
            inputs,
            config,
            select=lambda nm, m, here=here: in_block(f"{here}.{nm}", m),
            on_linear=on_linear,
            settings=settings,
            consume=True,
            name=here,
            float_path=None if fblock is None else (fblock, finputs),
        )
        tuple_out = isinstance(outputs[0], (tuple, list))
        inputs = next_inputs(inputs, outputs)
        del outputs
        if fblock is not None:
            finputs = next_inputs(finputs, [fblock(*a, **kw) for a, kw in finputs])
            del fblock
        if progress is not None:
            progress(b + 1, len(blocks))

    head_q = None
    if head_config is not None and select(head_name, head):  # not excluded: worth calibrating
        head_q = gptq_head(
            model, blocks, calib_ids, inputs, tuple_out, head_config, batch, settings
        )
    del inputs

    # The rest (embedding, lm_head, anything outside the blocks): its rule's format, a calibrated
    # int4 rule's by round to nearest, as RTN does.
    lookup = lookup_only_weights(model)

    def make(w: torch.Tensor, m: nn.Module, name: str) -> Any:
        if head_q is not None and head is not None and w is head.weight:
            return head_q
        plan = config.plan_module(name, w.shape[0], w.shape[1], w.dtype, id(m.weight) in lookup)
        return plan if isinstance(plan, str) else (plan.make(w), plan.dynamic)

    replace_weights(model, select, report, make)
    model.train(was_training)
    report.bytes_after = model_bytes(model)
    return report
