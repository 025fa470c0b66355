"""AdamW with its two moment estimates stored in 8 bits, quantized block-wise with a dynamic map.

After Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization"; the code is written from
the paper's description. AdamW keeps two float32 states per parameter (8 bytes/param); here each is a
uint8 code per element plus one float32 absmax per block of ``block_size`` elements, so
``2 + 8 / block_size`` bytes/param (2.03 at block 256).

The map is the paper's *dynamic* code: after the sign bit, a run of ``e`` zero bits sets the decade
(values in ``(10^-(e+1), 10^-e]``), a one bit ends the run, and the remaining bits are a linear
fraction within that decade. Large values get many fraction bits, small ones few, so the relative
precision is kept over seven decades instead of the two that a linear int8 map keeps. The second
moment is never negative and uses the unsigned variant (the sign bit becomes one more fraction bit).

Two backends compute the same update. The fused C kernel (:mod:`memopt.step._kernel`, built on
first use) makes one pass per block and allocates no tensor, and steps faster than
``torch.optim.AdamW`` (bench/optim8bit.py; the README's 8-bit AdamW table). The eager torch path (no
compiler, float16 or non-contiguous parameters, ``backend="torch"``) works on the flattened
parameter in chunks of ``chunk_size`` elements (whole blocks), so its float32 temporaries stay
bounded whatever the layer size; see :meth:`AdamW8bit.step`. The two agree to float rounding
(a code at a threshold may round the other way): tests/train/test_adamw8bit.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from memopt.step import _kernel

__all__ = [
    "BACKENDS",
    "LOOKUP_BYTES",
    "OPTIMIZER_KINDS",
    "AdamW8bit",
    "adamw_state_bytes",
    "dequantize_blockwise",
    "dynamic_map",
    "quantize_blockwise",
]

# How AdamW8bit computes its update (see AdamW8bit's docstring).
BACKENDS = ("auto", "kernel", "torch")

# The optimizers whose state bytes adamw_state_bytes predicts.
OPTIMIZER_KINDS = ("adamw", "adamw8bit", "sgd", "sgd-momentum")

# Bytes of the two nearest-code lookup tables an AdamW8bit holds per device: per map, 256 float32
# values, 2^17 uint8 codes and 2^17 float32 thresholds.
LOOKUP_BYTES = 2 * (256 * 4 + (1 << 17) * (1 + 4))

# Smallest positive normal float32: the divisor for an all-zero block (0 / TINY = 0, no NaN).
_TINY = torch.finfo(torch.float32).tiny


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 values of the 8-bit dynamic map, sorted ascending, float32, in ``[-1, 1]`` or ``[0, 1]``.

    Bit layout ``[sign] 0…0 1 f…f``: with ``b`` bits after the sign (7 signed, 8 unsigned) and ``e``
    leading zeros (``0 <= e < b``), the ``b - 1 - e`` fraction bits split the decade
    ``(0.1, 1] * 10^-e`` into ``2^(b-1-e)`` equal steps; each code is the *right* end of its step, so
    1.0 is exact (the absmax element of every block round-trips) and the grid within a decade has no
    gap at its edges. All-zero is 0. Unsigned: 255 positive values (down to 1e-7) and 0. Signed:
    127 values per sign (down to 1e-6), 0, and one spare pattern ("-0") which holds +1e-7.
    """
    bits = 7 if signed else 8  # bits after the sign bit
    pos: list[torch.Tensor] = []
    for e in range(bits):
        n = 2 ** (bits - 1 - e)  # fraction codes in decade e
        frac = 0.1 + 0.9 * torch.arange(1, n + 1, dtype=torch.float64) / n  # (n,) in (0.1, 1]
        pos.append(frac * 10.0**-e)
    p = torch.cat(pos)  # (2^bits - 1,)
    zero = torch.zeros(1, dtype=torch.float64)
    if signed:
        values = torch.cat([-p, zero, p, torch.tensor([1e-7], dtype=torch.float64)])
    else:
        values = torch.cat([zero, p])
    values = values.sort().values.to(torch.float32)
    assert values.numel() == 256
    return values


def _midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """(255,) decision thresholds: bucketize(x, mids) is the index of the map value nearest to x."""
    return (qmap[1:] + qmap[:-1]) * 0.5


class _Lookup(NamedTuple):
    """Nearest-code lookup for one map, equal to ``bucketize(x, midpoints(qmap))`` for every finite x.

    bucketize on 255 thresholds is a binary search per element, slow on a CPU.
    Instead, the top 17 bits of a float32 (sign, exponent, 8 mantissa bits) select one of 2^17
    buckets of width <= 2^-8 relative, narrower than the map's spacing (>= 0.9 / 2^7 relative),
    so a bucket holds at most one threshold: code = code of the bucket's lowest value, plus one
    above that threshold. Both tables are built with bucketize, and the construction asserts the
    one-threshold property, so the result is exactly bucketize's, in a few gathers and a compare.
    """

    qmap: torch.Tensor  # (256,) float32 sorted
    code: torch.Tensor  # (2^17,) uint8: bucketize of each bucket's lowest value
    thresh: torch.Tensor  # (2^17,) float32: the threshold inside the bucket, else +inf

    @classmethod
    def build(cls, qmap: torch.Tensor) -> _Lookup:
        mids = _midpoints(qmap)
        key = torch.arange(-(1 << 16), 1 << 16, dtype=torch.int32)  # == float bits >> 15
        a = (key << 15).view(torch.float32)  # bucket ends: low mantissa bits all 0 ...
        b = ((key << 15) | 0x7FFF).view(torch.float32)  # ... and all 1 (order flips for x < 0)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        c_lo, c_hi = torch.bucketize(lo, mids), torch.bucketize(hi, mids)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        assert bool(((c_hi - c_lo)[finite] <= 1).all()), "map too fine for 8 mantissa bits"
        inf = torch.tensor(float("inf"))
        thresh = torch.where(c_hi > c_lo, mids[c_lo.clamp(max=mids.numel() - 1)], inf)
        return cls(qmap, c_lo.to(torch.uint8), thresh)

    def to(self, device: torch.device | str) -> _Lookup:
        return _Lookup(*(t.to(device) for t in self))

    def codes_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (L,) uint8 = index of the map value nearest to float32 x (L,)."""
        # Arithmetic shift keeps the sign: keys of negatives are < 0, so shift all by 2^16.
        key = torch.bitwise_right_shift(x.view(torch.int32), 15).add_(1 << 16)  # (L,) int32
        torch.index_select(self.code, 0, key, out=out)
        above = x > self.thresh.index_select(0, key)  # (L,) bool
        out.add_(above.view(torch.uint8))  # adds 0 or 1; a uint8 view adds faster than bool


def _quantize_into(
    x: torch.Tensor, lookup: _Lookup, block: int, codes: torch.Tensor, absmax: torch.Tensor
) -> None:
    """Quantize flat float32 ``x`` (L,) into ``codes`` (L,) uint8 and ``absmax`` (ceil(L/block),).

    ``x`` is overwritten (normalised in place) to avoid one more L-sized temporary. Only the last
    block may be partial; it is handled on its own instead of padding a copy.
    """
    n = x.numel()
    full = n // block * block
    if full:
        blocks = x[:full].view(-1, block)  # (n_blocks, block)
        # (n_blocks,): max(amax, -amin) needs no |x| temporary; faster than aminmax here.
        amax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_())
        absmax[: full // block] = amax
        blocks.div_(amax.clamp_min(_TINY)[:, None])  # into [-1, 1]; the absmax element is 1.0
    if full < n:
        tail = x[full:]  # (n - full,) the partial last block
        amax_t = tail.abs().amax()
        absmax[-1] = amax_t
        tail.div_(amax_t.clamp_min(_TINY))
    lookup.codes_into(x, codes)


def _dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int
) -> torch.Tensor:
    """(L,) uint8 codes + (ceil(L/block),) absmax → (L,) float32."""
    x = qmap.index_select(0, codes.int())  # (L,); uint8 would index as a mask, so cast
    n = x.numel()
    full = n // block * block
    if full:
        x[:full].view(-1, block).mul_(absmax[: full // block, None])  # (n_blocks, block)
    if full < n:
        x[full:].mul_(absmax[-1])
    return x


def quantize_blockwise(
    x: torch.Tensor, qmap: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize any tensor to ``(codes, absmax)``: codes (numel,) uint8 indices into ``qmap``,
    absmax (ceil(numel / block_size),) float32, blocks taken over the flattened tensor."""
    flat = x.detach().reshape(-1).to(torch.float32, copy=True)  # (n,) overwritten below
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-flat.numel() // block_size), dtype=torch.float32, device=x.device)
    lookup = _Lookup.build(qmap.detach().to("cpu", torch.float32)).to(x.device)  # built per call
    _quantize_into(flat, lookup, block_size, codes, absmax)
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    block_size: int = 256,
    shape: torch.Size | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: float32, reshaped to ``shape`` if given."""
    x = _dequantize(codes.reshape(-1), absmax, qmap.to(codes.device), block_size)
    return x.view(shape) if shape is not None else x


class _Maps(NamedTuple):
    signed: _Lookup  # first moment
    unsigned: _Lookup  # second moment (never negative)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with 8-bit block-wise quantized moment estimates.

    Same arguments and update rule as :class:`torch.optim.AdamW` (``amsgrad`` is not supported).
    Parameters with at least ``min_8bit_size`` elements keep ``exp_avg`` / ``exp_avg_sq`` as uint8
    codes (``*_code``, shape (numel,)) with one float32 absmax per ``block_size`` elements
    (``*_absmax``, shape (ceil(numel / block_size),)); smaller ones (norms, biases) keep float32
    states like AdamW, where 8 bits would save little and cost precision. ``step`` is a float32
    scalar on the CPU, as in torch's AdamW. The update itself is computed in float32 for float32,
    bfloat16 and float16 parameters, from the freshly updated (not yet re-quantized) moments.
    ``backend``: "auto" (the C kernel for contiguous float32/bfloat16 CPU parameters when it
    builds, else eager torch), "kernel" (an error if it cannot be built) or "torch".
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        chunk_size: int = 1 << 20,
        backend: str = "auto",
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if amsgrad:
            raise ValueError("AdamW8bit does not support amsgrad")
        if block_size < 1 or min_8bit_size < 0:
            raise ValueError(f"invalid block_size {block_size} or min_8bit_size {min_8bit_size}")
        if chunk_size < 1:
            raise ValueError(f"invalid chunk_size: {chunk_size}")
        if backend not in BACKENDS:
            raise ValueError(f"invalid backend {backend!r}; expected one of {BACKENDS}")
        # "kernel": the fused C kernel (memopt.step._kernel), an error if it cannot be built;
        # "torch": eager torch ops in chunks; "auto": the kernel where it applies, else torch.
        self._kernel = None if backend == "torch" else _kernel.load()
        if backend == "kernel" and self._kernel is None:
            raise RuntimeError("the AdamW8bit C kernel could not be built (no C compiler?)")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
        )
        super().__init__(params, defaults)
        self.chunk_size = chunk_size
        self._maps: dict[torch.device, _Maps] = {}
        # Build the lookup tables now for every device that will need them, so that they exist
        # (and a memory tracker can be told about them: lookup_tensors()) before the first step.
        for group in self.param_groups:
            for p in group["params"]:
                local = p.to_local() if type(p).__name__ == "DTensor" else p
                if local.numel() >= group["min_8bit_size"]:
                    self._maps_on(local.device)

    def lookup_tensors(self) -> list[torch.Tensor]:
        """The nearest-code lookup tables (2 maps × (256 + 2¹⁷ × 5) bytes ≈ 1.3 MB per device):
        memory the optimizer holds outside ``state``."""
        return [t for maps in self._maps.values() for lookup in maps for t in lookup]

    def _maps_on(self, device: torch.device) -> _Maps:
        if device not in self._maps:
            # Built on the CPU (bucketize, an assert), then moved: ~1.3 MB per device, shared.
            signed, unsigned = _Lookup.build(dynamic_map(True)), _Lookup.build(dynamic_map(False))
            self._maps[device] = _Maps(signed.to(device), unsigned.to(device))
        return self._maps[device]

    @staticmethod
    def _init_state(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        n = p.numel()
        state["step"] = torch.tensor(0.0, dtype=torch.float32)  # CPU, like torch's AdamW
        if n >= group["min_8bit_size"]:
            n_blocks = -(-n // group["block_size"])
            for key in ("exp_avg", "exp_avg_sq"):
                # code 0 is not value 0 in a sorted map; an all-zero absmax makes every code 0.0
                state[f"{key}_code"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                state[f"{key}_absmax"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step.

        The C kernel allocates no tensor (one block's m and v, 8 × ``block_size`` bytes, in a
        ctypes buffer). Eager path: peak temporaries, per chunk of L = ``chunk_size`` elements (1M by default, whole blocks):
        for 16-bit parameters, m and v (dequantized), the denominator and float32 copies of the
        gradient and parameter slices, 5 × 4 × L bytes (20 MiB at L = 1M); for float32 ones,
        whose slices are views, the quantize phase dominates: m, v, an int32 key, a float32
        threshold gather and a bool mask, 17 × L bytes (17 MiB). Both measured by the storage
        tracker in tests/train/test_adamw8bit.py; independent of the layer size. A
        non-contiguous parameter is updated through one contiguous copy.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if type(p).__name__ == "DTensor":
                    # FSDP2 shards: the update is elementwise, so each rank updates its own local
                    # shard (a view of the parameter's storage) with plain tensors; the state is
                    # local too (one rank's blocks).
                    local = p.to_local()
                    local.grad = p.grad.to_local()
                    if not state:
                        self._init_state(local, state, group)
                    self._update(local, state, group)
                    local.grad = None
                    continue
                if not state:
                    self._init_state(p, state, group)
                self._update(p, state, group)
        return loss

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        block = group["block_size"]
        state["step"] += 1
        t = float(state["step"])  # a CPU scalar even for meta parameters
        # The same float formulas as torch.optim.AdamW's single-tensor path.
        step_size = lr / (1.0 - beta1**t)
        bc2_sqrt = math.sqrt(1.0 - beta2**t)

        eight_bit = "exp_avg_code" in state
        maps = self._maps_on(p.device) if eight_bit else None
        if eight_bit and self._kernel_applies(p):
            if p.device.type == "meta":
                return  # an estimate: the kernel allocates no tensor, so nothing to count
            assert maps is not None
            tables = (*maps.signed, *maps.unsigned)  # (qmap, code, thresh) × 2
            hyper = (1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * wd, -step_size, bc2_sqrt, eps)
            _kernel.run(self._kernel, p, p.grad, state, tables, block, hyper)
            return
        n = p.numel()
        chunk = max(block, self.chunk_size // block * block)  # whole blocks per chunk
        contiguous = p.is_contiguous()
        p_flat = p.view(-1) if contiguous else p.contiguous().view(-1)  # (n,)
        g_flat = p.grad.reshape(-1)  # (n,) logical order, same as p_flat
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            g = g_flat[s:e].float()  # (L,) a view for float32 grads: read only
            if eight_bit:
                b0, b1 = s // block, -(-e // block)  # blocks covered by [s, e)
                m = _dequantize(
                    state["exp_avg_code"][s:e],
                    state["exp_avg_absmax"][b0:b1],
                    maps.signed.qmap,
                    block,
                )
                v = _dequantize(
                    state["exp_avg_sq_code"][s:e],
                    state["exp_avg_sq_absmax"][b0:b1],
                    maps.unsigned.qmap,
                    block,
                )
            else:
                m = state["exp_avg"].view(-1)[s:e]  # (L,) views: updated in place
                v = state["exp_avg_sq"].view(-1)[s:e]
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = v.sqrt().div_(bc2_sqrt).add_(eps)  # (L,) in place: one temporary
            pc = p_flat[s:e]
            p32 = pc if pc.dtype == torch.float32 else pc.float()  # update math in float32
            p32.mul_(1.0 - lr * wd)  # decoupled weight decay, never enters m or v
            p32.addcdiv_(m, denom, value=-step_size)
            if p32 is not pc:
                pc.copy_(p32)
            del denom, p32, g
            if eight_bit:
                _quantize_into(
                    m,
                    maps.signed,
                    block,
                    state["exp_avg_code"][s:e],
                    state["exp_avg_absmax"][b0:b1],
                )
                _quantize_into(
                    v,
                    maps.unsigned,
                    block,
                    state["exp_avg_sq_code"][s:e],
                    state["exp_avg_sq_absmax"][b0:b1],
                )
        if not contiguous:
            p.copy_(p_flat.view(p.shape))

    def _kernel_applies(self, p: torch.Tensor) -> bool:
        """Whether the fused kernel updates ``p``: a contiguous float32/bfloat16 CPU (or meta, for
        estimates) parameter with a contiguous gradient of such a dtype, and a built kernel."""
        g = p.grad
        return (
            self._kernel is not None
            and p.device.type in ("cpu", "meta")
            and p.dtype in _kernel.DTYPE_CODES
            and g is not None
            and g.dtype in _kernel.DTYPE_CODES
            and p.is_contiguous()
            and g.is_contiguous()
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, then the saved state tensors restored with their own dtypes (copied).

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
        parameter's dtype, which would round the float32 absmax and small-tensor moments of a
        bfloat16 parameter to bfloat16; and it keeps the caller's tensors, so two optimizers
        loaded from one dict would update the same storage. Copies avoid both.
        """
        saved = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            if pid in saved:
                self.state[p] = {
                    k: v.to(device=p.device if k != "step" else v.device, copy=True)
                    if torch.is_tensor(v)
                    else v
                    for k, v in saved[pid].items()
                }

    def state_bytes(self) -> int:
        """Bytes of all state tensors (codes, absmax, float32 moments, step); meta tensors count."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )


def adamw_state_bytes(
    params: Iterable[torch.Tensor],
    kind: str,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> int:
    """Predicted optimizer-state bytes once every parameter that requires grad has stepped.

    ``kind``: "adamw" (torch.optim.AdamW: two states in the parameter's dtype + a float32 step),
    "adamw8bit" (:class:`AdamW8bit` with the given ``block_size`` / ``min_8bit_size``), "sgd"
    (torch.optim.SGD without momentum: no state), "sgd-momentum" (one buffer in the parameter's
    dtype). Exact for these implementations; works on meta tensors.
    """
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {OPTIMIZER_KINDS}")
    total = 0
    for p in params:
        if not p.requires_grad:
            continue
        n, size = p.numel(), p.element_size()
        if kind == "adamw":
            total += 2 * n * size + 4
        elif kind == "adamw8bit":
            if n >= min_8bit_size:
                total += 2 * (n + 4 * -(-n // block_size)) + 4  # 2 × (codes + float32 absmax)
            else:
                total += 2 * 4 * n + 4  # float32 moments
        elif kind == "sgd-momentum":
            total += n * size
    return total
