"""Sparse weight storage that turns zeros into saved bytes, optionally with quantized values.

A pruned weight ``(N, K)`` is stored as *where* (a layout) plus *what* (the nonzero values, in
row-major order):

layouts
    ``bitmask``  one bit per element, ``mask (ceil(N*K/8),) uint8``, element ``i`` is bit ``i % 8``
                 (least significant first) of byte ``i // 8``. ``N*K/8`` bytes whatever the density.
    ``csr``      per nonzero its column, ``cols (nnz,) int16`` (int32 when K > 32768), and per row
                 its count, ``counts (N,) int32``. ``2*nnz + 4*N`` bytes: smaller than the bitmask
                 below about 6 % density (K/16 nonzeros a row).
values
    ``float``    ``values (nnz,)`` in the weight's own dtype.
    ``int8``     symmetric, one float32 scale per group of 128 consecutive values of the stream
                 (groups run across rows: every group is full, whatever a row's count), the stream
                 zero-padded to a multiple of 128: ``values (P,) int8``, ``scale (P/128,) float32``.
    ``int4``     asymmetric, groups of 64: ``values (P/2,) uint8`` (two codes a byte, low nibble
                 first), ``scale``, ``zero`` ``(P/64,) bfloat16``.

At 50 % unstructured sparsity a float32 weight takes ``1/8 + 2 = 2.125`` bytes an element instead of
4 (0.53x); int8 values ``0.125 + 0.5 * 1.03 = 0.64`` bytes (0.62x of dense int8); int4 values
``0.125 + 0.5 * 0.5625 = 0.41`` bytes (0.72x of dense int4 at group 64).

Inference with few input rows (decode, batch <= 16; bitmask layout, any values) runs
memopt's sparse kernel (memopt.weights._sparse_kernel; memopt's decode engine runs the same C):
it reads the mask and the values as stored, 2.125 bytes an element at 50 % against dense
float32's 4, so a decode step, which streams every weight once, runs faster than the dense one
(bench/sparse_kernel.py). Other calls reconstruct the dense
weight of one layer at a time into a scratch buffer shared by all sparse layers (so RAM holds the
sparse forms plus one layer's dense weight) and run the ordinary float matmul (reconstruction is
``np.unpackbits`` + ``np.flatnonzero`` + ``scatter_``), amortised over the tokens of a long
input. torch's CSR matmul needs its int64 column and row indices resident: at 50 % its ``8 + 4``
bytes a nonzero come to more than the dense float32 weight, so it cannot be the form that is kept.

Its disk form (manifest entry, tensors, empty twin, fill) is :class:`SparseWeight`'s own, like every
weight kind's (memopt.weights.quantized).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memopt.core.errors import MemoptError
from memopt.formats.safetensors import dtype_name, dtype_of
from memopt.weights import _sparse_kernel
from memopt.weights.primitives import choose_qparams, dequantize, pack, quantize, unpack
from memopt.weights.quantized import QuantizedWeight

__all__ = [
    "LAYOUTS",
    "VALUE_FORMATS",
    "SparseWeight",
    "choose_layout",
    "dense_nbytes",
    "is_sparse_format",
    "sparse_nbytes",
]

LAYOUTS = ("bitmask", "csr")
VALUE_FORMATS = ("float", "int8", "int4")
INT8_GROUP = 128
INT4_GROUP = 64
FORMAT_PREFIX = "sparse-"

_SCRATCH: dict[tuple[torch.dtype, str], torch.Tensor] = {}  # one dense buffer per dtype/device


def _pad(n: int, g: int) -> int:
    return -(-n // g) * g


def _col_dtype(k: int) -> torch.dtype:
    return torch.int16 if k <= 32768 else torch.int32


def values_nbytes(nnz: int, values: str, itemsize: int = 4) -> int:
    """Exact bytes of ``nnz`` stored values in format ``values``."""
    if values == "float":
        return nnz * itemsize
    if values == "int8":
        p = _pad(nnz, INT8_GROUP)
        return p + (p // INT8_GROUP) * 4
    if values == "int4":
        p = _pad(nnz, INT4_GROUP)
        return p // 2 + (p // INT4_GROUP) * 4
    raise MemoptError(f"unknown sparse value format {values!r} (one of {', '.join(VALUE_FORMATS)})")


def index_nbytes(n: int, k: int, nnz: int, layout: str) -> int:
    """Exact bytes of the positions of ``nnz`` nonzeros of an ``(n, k)`` weight in ``layout``."""
    if layout == "bitmask":
        return -(-n * k // 8)
    if layout == "csr":
        return nnz * _col_dtype(k).itemsize + n * 4
    raise MemoptError(f"unknown sparse layout {layout!r} (one of {', '.join(LAYOUTS)})")


def sparse_nbytes(n: int, k: int, nnz: int, layout: str, values: str, itemsize: int = 4) -> int:
    """Exact bytes of a :class:`SparseWeight` (its buffers; also what it writes to disk)."""
    return index_nbytes(n, k, nnz, layout) + values_nbytes(nnz, values, itemsize)


def dense_nbytes(n: int, k: int, values: str, itemsize: int = 4) -> int:
    """Bytes of the same weight stored dense in the same value format (memopt.quant's forms:
    int8 per-channel scale, int4 group 64 with bfloat16 scale and zero)."""
    if values == "float":
        return n * k * itemsize
    if values == "int8":
        return n * k + n * 4
    return n * k // 2 + n * (k // INT4_GROUP) * 4


def choose_layout(n: int, k: int, nnz: int) -> str:
    """The layout with fewer bytes for this many nonzeros (ties: bitmask, the faster to decode)."""
    return min(LAYOUTS, key=lambda lay: (index_nbytes(n, k, nnz, lay), lay != "bitmask"))


def _encode_values(v: torch.Tensor, values: str) -> dict[str, torch.Tensor]:
    """The value stream ``(nnz,)`` in its stored form."""
    if values == "float":
        return {"values": v.contiguous()}
    g = INT8_GROUP if values == "int8" else INT4_GROUP
    p = _pad(v.numel(), g)
    vp = torch.zeros(p, dtype=torch.float32)
    vp[: v.numel()] = v.float()
    vg = vp.view(p // g, g)  # (P/G, G): one "row" per group, per-row qparams = per group
    if values == "int8":
        scale, _ = choose_qparams(vg, 8, None)  # (P/G, 1) float32
        codes = quantize(vg, scale, None, 8, None)  # (P/G, G) int8
        return {"values": codes.reshape(-1), "scale": scale.reshape(-1)}
    scale, zero = choose_qparams(vg, 4, None, symmetric=False, scale_dtype=torch.bfloat16)
    codes = quantize(vg, scale, zero, 4, None)  # (P/G, G) uint8 in [0, 15]
    packed = pack(codes.reshape(1, -1), 4).reshape(-1)  # (P/2,)
    assert zero is not None
    return {"values": packed, "scale": scale.reshape(-1), "zero": zero.reshape(-1)}


class SparseWeight(QuantizedWeight):
    """A pruned 2-D weight ``(N, K)``: positions in ``layout``, nonzero values in ``values`` format.

    Built from a weight whose pruned entries are exactly zero. Used by memopt.quant's ``QLinear``,
    ``QConv`` and ``QEmbedding`` like any quantized weight. ``nbytes`` is exact (the buffers).
    """

    def __init__(self, w: torch.Tensor, layout: str = "auto", values: str = "float") -> None:
        if w.dim() != 2:
            raise MemoptError(f"SparseWeight: expected a 2-D weight, got {tuple(w.shape)}")
        if values not in VALUE_FORMATS:
            raise MemoptError(f"unknown sparse value format {values!r}")
        super().__init__(tuple(w.shape), w.dtype)
        n, k = self.shape
        w = w.detach()
        mask = w != 0  # (N, K) bool
        self.nnz = int(mask.sum())
        self.layout = choose_layout(n, k, self.nnz) if layout == "auto" else layout
        if self.layout not in LAYOUTS:
            raise MemoptError(f"unknown sparse layout {layout!r}")
        self.values_fmt = values
        if self.layout == "bitmask":
            flat = mask.reshape(-1).cpu().numpy()
            bits = np.packbits(flat, bitorder="little")  # (ceil(N*K/8),) uint8
            self.register_buffer("mask", torch.from_numpy(bits).to(w.device))
        else:
            cols = mask.nonzero()[:, 1]  # row-major order, like the values
            self.register_buffer("cols", cols.to(_col_dtype(k)))
            self.register_buffer("counts", mask.sum(1).to(torch.int32))  # (N,)
        for name, t in _encode_values(w[mask], values).items():  # w[mask]: row-major (nnz,)
            self.register_buffer(name, t)

    @property
    def fmt(self) -> str:  # type: ignore[override]
        return f"{FORMAT_PREFIX}{self.layout}-{self.values_fmt}"

    # ---- the disk form ----

    @classmethod
    def reads(cls, fmt: str) -> bool:
        return is_sparse_format(fmt)

    def spec(self) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "layout": self.layout,
            "values": self.values_fmt,
            "nnz": self.nnz,
            "group_size": {"int8": INT8_GROUP, "int4": INT4_GROUP}.get(self.values_fmt),
        }

    @classmethod
    def disk_layout(cls, spec: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return _disk_layout(spec)

    @classmethod
    def empty(cls, spec: dict[str, Any], device: str | torch.device = "meta") -> SparseWeight:
        if torch.device(device).type == "meta":
            # A meta model is being built (memopt estimate): forget the meta scratch buffers of an
            # earlier estimate, so this one counts the buffer a fresh process allocates (they hold
            # no memory).
            for key in [k for k in _SCRATCH if k[1] == "meta"]:
                del _SCRATCH[key]
        qw = cls.__new__(cls)  # not __init__: it encodes a dense weight
        QuantizedWeight.__init__(qw, (int(spec["shape"][0]), int(spec["shape"][1])),
                                 dtype_of(spec.get("dtype", "float32")))  # fmt: skip
        qw.nnz = int(spec["nnz"])
        qw.layout, qw.values_fmt = spec["layout"], spec["values"]
        for s, (dt, sh) in _disk_layout(spec).items():
            qw.register_buffer(s, torch.empty(sh, dtype=dt, device=device))
        return qw

    def fill(self, tensors: dict[str, torch.Tensor], *, keep_layout: bool = False) -> None:
        """The read tensors, checked against this weight's entry's dtypes and shapes."""
        for s, (dt, sh) in _disk_layout(self.spec()).items():
            t = tensors.get(s)
            if t is None or t.dtype != dt or tuple(t.shape) != tuple(sh):
                got = None if t is None else (t.dtype, tuple(t.shape))
                raise MemoptError(f"sparse weight tensor {s!r}: expected {dt} {sh}, got {got}")
            self._buffers[s] = t
        self._row_start = None  # a new mask: the kernel's row index is rebuilt on first use
        self._runs8 = None

    @property
    def sparsity(self) -> float:
        n, k = self.shape
        return 1.0 - self.nnz / (n * k) if n * k else 0.0

    # ---- decoding ----

    def positions(self) -> torch.Tensor:
        """Flat indices ``(nnz,) int64`` of the nonzeros in the ``(N*K,)`` dense weight, ascending."""
        n, k = self.shape
        if self._device().type == "meta":
            # memopt estimate runs the step on meta: the positions are data, but their count is
            # the stored nnz (manifest), so the shapes (and bytes) are known without reading them.
            return torch.empty(self.nnz, dtype=torch.long, device="meta")
        if self.layout == "bitmask":
            if self.mask.device.type == "cpu":
                # numpy's unpack + flatnonzero: much faster than torch's nonzero on a bool
                bits = np.unpackbits(self.mask.numpy(), count=n * k, bitorder="little")
                return torch.from_numpy(np.flatnonzero(bits.view(bool)))
            shifts = torch.arange(8, device=self.mask.device, dtype=torch.uint8)
            m = ((self.mask.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: n * k]
            return m.nonzero().squeeze(1)
        rows = torch.repeat_interleave(
            torch.arange(n, device=self.cols.device), self.counts.long()
        )  # (nnz,)
        return rows * k + self.cols.long()

    def values_float(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The nonzero values ``(nnz,)`` decoded to ``dtype`` (default: the original dtype)."""
        dtype = dtype or self.dtype
        if self.values_fmt == "float":
            return self.values.to(dtype)
        if self.values_fmt == "int8":
            g = INT8_GROUP
            codes = self.values.view(-1, g)
            v = dequantize(codes, self.scale.view(-1, 1), None, 8, None, dtype)
        else:
            g = INT4_GROUP
            codes = unpack(self.values.view(1, -1), 4, self.values.numel() * 2).view(-1, g)
            v = dequantize(codes, self.scale.view(-1, 1), self.zero.view(-1, 1), 4, None, dtype)
        return v.reshape(-1)[: self.nnz]

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the dense weight into ``out`` (``N*K`` elements, any dtype) and return it as
        ``(N, K)``: zero fill, then scatter the values to their positions."""
        n, k = self.shape
        flat = out.reshape(-1)[: n * k]
        flat.zero_()
        flat.scatter_(0, self.positions().to(flat.device), self.values_float(out.dtype))
        return flat.view(n, k)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new dense ``(N, K)`` tensor (the caller owns it)."""
        n, k = self.shape
        buf = torch.empty(n * k, dtype=dtype or self.dtype, device=self._device())
        return self.dequantize_into(buf)

    def dequantize_rows(self, n0: int, n1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Rows are not separately addressable in the bitmask layout: decode all, keep a slice.
        return self.dequantize(dtype)[n0:n1]

    def rows(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dequantize(dtype)[idx]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T -> (M, N)``: few rows of float32 input (decode, short prefill) by the
        sparse kernel straight from the bitmask and values (memopt.weights._sparse_kernel);
        otherwise from the weight reconstructed into the shared buffer."""
        n, k = self.shape
        if self._kernel_ok(x):
            scale = None if self.values_fmt == "float" else self.scale
            zero = self.zero if self.values_fmt == "int4" else None
            return _sparse_kernel.bitmask_linear(
                self.mask, self.values, self.row_starts(), x, n, scale=scale,
                runs8=scale is None and self.runs_of_8(), zero=zero,
            )  # fmt: skip
        dtype = x.dtype if x.is_floating_point() else self.dtype
        if torch.is_grad_enabled() and x.requires_grad:
            w = self.dequantize(dtype)  # autograd keeps W for backward: it must not be reused
        else:
            w = self.dequantize_into(_scratch(n * k, dtype, x.device))
        return torch.nn.functional.linear(x, w)

    def _device(self) -> torch.device:
        return self.values.device

    def runs_of_8(self) -> bool:
        """True when every run of 16 columns keeps exactly 8 values (2:4 does; bitmask layout,
        K % 16 == 0): the kernels then find a run's values without counting. Kept once known."""
        if self._runs8 is None:
            n, k = self.shape
            self._runs8 = (
                self.layout == "bitmask"
                and _sparse_kernel.available()
                and _sparse_kernel.runs_of_8(self.mask, n, k)
            )
        return self._runs8

    def row_starts(self) -> torch.Tensor:
        """``(N + 1,) int64``: where each row's values begin in the value stream (bitmask layout,
        CPU): built from the mask on first use and kept (the kernels' row index)."""
        if self._row_start is None:
            n, k = self.shape
            if _sparse_kernel.available():
                self._row_start = _sparse_kernel.row_starts(self.mask, n, k)
            else:  # no compiler: the same counts from numpy's unpacked bits
                bits = np.unpackbits(self.mask.numpy(), count=n * k, bitorder="little")
                counts = torch.from_numpy(bits.reshape(n, k).sum(1, dtype=np.int64))
                self._row_start = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            if int(self._row_start[-1]) != self.nnz:  # the kernels would read past the values
                got, self._row_start = int(self._row_start[-1]), None
                raise MemoptError(
                    f"corrupt sparse weight: its mask sets {got} elements, its entry says {self.nnz}"
                )
        return self._row_start

    # Where each row's values begin in the stream, ``(N + 1,) int64``: built from the mask at the
    # first kernel call, kept beside the weight (8 bytes a row, 0.3-0.6 % of a 50 % float32
    # layer's bytes; not a buffer: it is not saved, and ``nbytes`` is the stored form's).
    _row_start: torch.Tensor | None = None
    _runs8: bool | None = None  # runs_of_8(), once known

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        """The sparse kernel computes this call: bitmask layout, float32, int8 or int4 values and
        float32 input on the CPU, at most ``MAX_ROWS`` input rows, no gradient wanted."""
        return (
            self.layout == "bitmask"
            and self.values_fmt in VALUE_FORMATS
            and self.dtype == torch.float32
            and x.dtype == torch.float32
            and x.dim() == 2
            and x.shape[0] <= _sparse_kernel.MAX_ROWS
            and x.device.type == "cpu"
            and self.values.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and _sparse_kernel.available()
        )

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={self.shape}, nnz={self.nnz}, nbytes={self.nbytes}"


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of at least ``numel`` elements, shared by every sparse layer of this dtype/device:
    the largest layer's dense weight is allocated once and reused (no allocation per call)."""
    key = (dtype, str(device))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def scratch_nbytes() -> int:
    """Bytes held by the shared reconstruction buffers (count them when measuring RAM)."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.values())


# --------------------------------------------------------------------------------------------------
# The disk form is the RAM form (no CPU-dependent layout), so fill is an assignment.


def is_sparse_format(fmt: str) -> bool:
    """True for the formats this module owns (``sparse-<layout>-<values>``)."""
    return isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX)


def _disk_layout(spec: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of the tensors a sparse weight with this spec writes, in order."""
    n, k = (int(s) for s in spec["shape"])
    nnz = int(spec["nnz"])
    layout, values = spec.get("layout"), spec.get("values")
    if layout not in LAYOUTS or values not in VALUE_FORMATS or not 0 <= nnz <= n * k:
        raise MemoptError(f"corrupt sparse weight spec (layout {layout!r}, values {values!r})")
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    if layout == "bitmask":
        out["mask"] = (torch.uint8, (-(-n * k // 8),))
    else:
        out["cols"] = (_col_dtype(k), (nnz,))
        out["counts"] = (torch.int32, (n,))
    if values == "float":
        out["values"] = (dtype_of(spec.get("dtype", "float32")), (nnz,))
    elif values == "int8":
        p = _pad(nnz, INT8_GROUP)
        out["values"] = (torch.int8, (p,))
        out["scale"] = (torch.float32, (p // INT8_GROUP,))
    else:
        p = _pad(nnz, INT4_GROUP)
        out["values"] = (torch.uint8, (p // 2,))
        out["scale"] = (torch.bfloat16, (p // INT4_GROUP,))
        out["zero"] = (torch.bfloat16, (p // INT4_GROUP,))
    return out
