"""Quantized weights: each stored weight kind as one class that knows its disk form.

A quantized weight is a small ``nn.Module`` holding integer and scale tensors as buffers, not a tensor
subclass. Why: buffers move with ``.to()``, appear in ``state_dict()`` (save / load needs nothing
special), are counted by anything that walks ``model.buffers()``, and a tied weight is simply the
same submodule registered under two parents (``named_buffers()`` yields it once), with no
``__torch_dispatch__`` to maintain. The modules that use a weight (:class:`QLinear`,
:class:`QEmbedding`, :class:`QConv`) keep no float copy of it: they dequantize blocks of rows, the
gathered rows, or (convolutions) the whole kernel for the duration of one call
(memopt.weights.modules).

Each kind knows its format name (the manifest's ``format``), the tensors it writes (``disk_layout``
from its manifest entry, ``disk_tensors`` from itself), how to build itself empty from its entry
(``empty``) and how to take the read tensors (``fill``). Kinds register themselves by subclassing
:class:`QuantizedWeight`; :func:`kind_of` finds the kind of a format, so save / load and streaming
never test for a class.

Disk forms: int8 ``qdata (N, K) int8`` + ``scale (N, K/G) float32``; int4 ``packed (N, K/2) uint8``
+ ``scale``, ``zero`` ``(N, K/G) bfloat16``, the packed codes in the layout the weight had in RAM:
the CPU kernel's row-interleaved one (``block_n`` rows per block, recorded in the entry) where the
saving machine has that kernel, else along K (two codes a byte, low nibble first; ``block_n`` null or
absent). Why not always along K: converting on every load costs a repack of every code; a machine
whose kernel wants the recorded layout loads the bytes as they are, and only another layout
converts. int2/int3 ``packed (N, K*bits/8) uint8`` + ``scale`` (+ ``offset``) ``(N, K/G) float16``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.pages import release_copied
from memopt.formats.safetensors import dtype_name, dtype_of
from memopt.weights import kernels
from memopt.weights.primitives import (
    choose_qparams,
    dequantize,
    pack,
    pack_int4_nblock,
    quantize,
    unpack,
    unpack_int4_nblock,
)

__all__ = [
    "Int4Weight",
    "Int8Weight",
    "IntNWeight",
    "QuantizedWeight",
    "disk_layout",
    "disk_tensors",
    "empty_weight",
    "fill_weight",
    "int4_relayout",
    "kind_of",
    "weight_spec",
]

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # suffix -> (dtype, shape), write order


class QuantizedWeight(nn.Module):
    """A 2-D weight ``(N, K)`` (output rows x input features) stored as integers + scales."""

    fmt: str = "?"
    KINDS: ClassVar[list[type[QuantizedWeight]]] = []  # every kind, registered by subclassing

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        QuantizedWeight.KINDS.append(cls)

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype  # the float dtype it was quantized from; what dequantize returns

    # ---- the disk form (manifest entry + tensors), one method each, overridden per kind ----

    @classmethod
    def reads(cls, fmt: str) -> bool:
        """Whether this kind stores the manifest format ``fmt``."""
        return fmt == cls.fmt

    def spec(self) -> dict[str, Any]:
        """The manifest entry, without ``tensors`` (:func:`weight_spec` adds them)."""
        return {"format": self.fmt, "shape": list(self.shape), "dtype": dtype_name(self.dtype),
                "group_size": getattr(self, "group_size", None)}  # fmt: skip

    @classmethod
    def disk_layout(cls, spec: dict[str, Any]) -> Layout:
        raise NotImplementedError

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to write, by suffix, in :meth:`disk_layout` order."""
        return {s: getattr(self, s) for s in self.disk_layout(self.spec())}

    @classmethod
    def empty(cls, spec: dict[str, Any], device: str | torch.device = "meta") -> QuantizedWeight:
        """A weight with the entry's attributes and uninitialised buffers (not ``__init__``: that
        quantizes a float weight, which a loader does not have)."""
        qw = cls.__new__(cls)
        QuantizedWeight.__init__(qw, (int(spec["shape"][0]), int(spec["shape"][1])),
                                 dtype_of(spec.get("dtype", "float32")))  # fmt: skip
        qw.group_size = spec.get("group_size")
        for s, (dt, sh) in cls.disk_layout(spec).items():
            qw.register_buffer(s, torch.empty(sh, dtype=dt, device=device))
        return qw

    def fill(self, tensors: dict[str, torch.Tensor], *, keep_layout: bool = False) -> None:
        """Take the disk form ``tensors`` (as read from the file) as this weight's buffers."""
        for name, t in tensors.items():
            self._buffers[name] = _aligned(t)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: the sum of this weight's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize_rows(self, n0: int, n1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole float weight ``(N, K)``: a temporary, for tests and convolutions."""
        return self.dequantize_rows(0, self.shape[0], dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized rows ``idx`` (any shape of indices -> ``(*idx.shape, K)``); only those rows."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T -> (M, N)``."""
        n, k = self.shape
        return kernels.dequant_linear(x, self.dequantize_rows, n, k)

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={self.shape}, nbytes={self.nbytes}"


class Int8Weight(QuantizedWeight):
    """Symmetric int8: ``qdata (N, K) int8``, ``scale (N, K // G) float32`` (G = K: per channel)."""

    fmt = "int8"

    def __init__(self, w: torch.Tensor, group_size: int | None = None) -> None:
        super().__init__(tuple(w.shape), w.dtype)
        self.group_size = group_size
        # Scales rounded to bfloat16 values before the codes are chosen: the fused kernel
        # (int8pack_bf16) multiplies by the bfloat16 scale, and codes rounded against the float32
        # scale would then carry up to 127 x 2^-9 of a step of extra error on the largest weights.
        # Rounded first, every kernel computes with exactly the scale the codes were chosen for.
        scale, _ = choose_qparams(w, 8, group_size, scale_dtype=torch.bfloat16)
        scale = scale.float()  # stored as float32 (the disk format), holding bfloat16 values
        self.register_buffer("qdata", quantize(w, scale, None, 8, group_size))  # (N, K) int8
        self.register_buffer("scale", scale)  # (N, K // G) float32

    def _rows(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return dequantize(q, s, None, 8, self.group_size, dtype or self.dtype)

    def dequantize_rows(self, n0: int, n1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._rows(self.qdata[n0:n1], self.scale[n0:n1], dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = idx.reshape(-1)
        out = self._rows(self.qdata[flat], self.scale[flat], dtype)  # (L, K)
        return out.reshape(*idx.shape, self.shape[1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return kernels.int8_linear(x, self.qdata, self.scale[:, 0])
        return super().linear(x)

    @classmethod
    def disk_layout(cls, spec: dict[str, Any]) -> Layout:
        n, k = (int(s) for s in spec["shape"])
        g = spec.get("group_size")
        return {"qdata": (torch.int8, (n, k)), "scale": (torch.float32, (n, k // g if g else 1))}


class Int4Weight(QuantizedWeight):
    """int4, group-wise, ``w = (c - 8) * scale + zero`` (zero = 0 when symmetric).

    ``packed (N, K // 2) uint8`` in the CPU kernel's row-interleaved layout when it has one for N
    (``block_n`` rows per block), else the canonical layout (along K, ``block_n = None``).
    ``scale_zero (K // G, N, 2) bfloat16``: the kernel's own operand, kept as the only copy of the
    scales (bfloat16 because the kernel computes in the activations' dtype, bfloat16).
    """

    fmt = "int4"

    def __init__(self, w: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> None:
        super().__init__(tuple(w.shape), w.dtype)
        self.group_size, self.symmetric = group_size, symmetric
        n, _ = w.shape
        scale, zero = choose_qparams(w, 4, group_size, symmetric, torch.bfloat16)
        codes = quantize(w, scale, zero, 4, group_size)  # (N, K) uint8 in [0, 15]
        if zero is None:
            zero = torch.zeros_like(scale)
        self.block_n = kernels.int4_block_n(n) if w.device.type == "cpu" else None
        packed = pack(codes, 4) if self.block_n is None else pack_int4_nblock(codes, self.block_n)
        del codes
        self.register_buffer("packed", packed)  # (N, K // 2) uint8
        sz = torch.stack([scale.t(), zero.t()], -1).contiguous()  # (K // G, N, 2) bfloat16
        self.register_buffer("scale_zero", sz)

    def codes_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Unpacked codes of rows ``n0:n1`` ((n1 - n0, K) uint8); n0, n1 multiples of block_n."""
        k = self.shape[1]
        if self.block_n is None:
            return unpack(self.packed[n0:n1], 4, k)
        return unpack_int4_nblock(self.packed[n0:n1], self.block_n, k)

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed along K (N, K // 2) uint8, scale (N, K // G), zero (N, K // G)): the disk form."""
        return (
            pack(self.codes_rows(0, self.shape[0]), 4),
            self.scale_zero[..., 0].t(),
            self.scale_zero[..., 1].t(),
        )

    def _deq(
        self, codes: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype | None
    ) -> torch.Tensor:
        # sz: (K // G, L, 2) for the L rows of codes
        return dequantize(
            codes, sz[..., 0].t(), sz[..., 1].t(), 4, self.group_size, dtype or self.dtype
        )

    def dequantize_rows(self, n0: int, n1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._deq(self.codes_rows(n0, n1), self.scale_zero[:, n0:n1], dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = idx.reshape(-1)
        k = self.shape[1]
        if self.block_n is None:
            codes = unpack(self.packed[flat], 4, k)
        else:
            b, h = self.block_n, self.block_n // 2
            v = self.packed.view(-1, k, h)  # (N / B, K, B / 2)
            j = flat % b
            byte = v[flat // b, :, j % h]  # (L, K): the byte holding each row's nibble
            codes = torch.where((j >= h)[:, None], byte >> 4, byte & 0xF)
        out = self._deq(codes, self.scale_zero[:, flat], dtype)
        return out.reshape(*idx.shape, k)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int4_linear(
            x, self.packed, self.group_size, self.scale_zero, self.dequantize_rows, self.block_n
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, block_n={self.block_n}"

    def spec(self) -> dict[str, Any]:
        # block_n: the layout of "packed" on disk (None: along K)
        return {**super().spec(), "symmetric": bool(self.symmetric), "block_n": self.block_n}

    @classmethod
    def disk_layout(cls, spec: dict[str, Any]) -> Layout:
        n, k = (int(s) for s in spec["shape"])
        g = int(spec["group_size"])
        return {
            "packed": (torch.uint8, (n, k // 2)),
            "scale": (torch.bfloat16, (n, k // g)),
            "zero": (torch.bfloat16, (n, k // g)),
        }

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        sz = self.scale_zero  # (K/G, N, 2); packed as it is in RAM (spec records block_n)
        return {
            "packed": self.packed,
            "scale": sz[..., 0].t().contiguous(),
            "zero": sz[..., 1].t().contiguous(),
        }

    @classmethod
    def empty(cls, spec: dict[str, Any], device: str | torch.device = "meta") -> QuantizedWeight:
        qw = cls.__new__(cls)
        QuantizedWeight.__init__(qw, (int(spec["shape"][0]), int(spec["shape"][1])),
                                 dtype_of(spec.get("dtype", "float32")))  # fmt: skip
        qw.group_size = int(spec["group_size"])
        qw.symmetric = bool(spec.get("symmetric"))
        qw.block_n = spec.get("block_n")  # the disk layout; fill() sets the RAM one
        n, k = qw.shape
        if "block_n" not in spec:  # null (along K) and the kernel's blocks look alike on disk
            raise MemoptError("int4 weight without block_n: its packed layout is unknown")
        b, g = qw.block_n, qw.group_size
        if b is not None and (type(b) is not int or b < 2 or b % 2 or n % b):
            raise MemoptError(f"int4 block_n {b!r}: expected null or an even divisor of {n} rows")
        if k % 2 or k % g:
            raise MemoptError(f"int4 weight of {k} columns in groups of {g}: not whole groups")
        qw.register_buffer("packed", torch.empty((n, k // 2), dtype=torch.uint8, device=device))
        sz = torch.empty((k // qw.group_size, n, 2), dtype=torch.bfloat16, device=device)
        qw.register_buffer("scale_zero", sz)
        return qw

    def fill(self, tensors: dict[str, torch.Tensor], *, keep_layout: bool = False) -> None:
        """Converted to this CPU's kernel layout, or left in the disk's with ``keep_layout`` (for
        a weight that is only looked up by rows)."""
        n, _ = self.shape
        packed = tensors["packed"]
        cpu = packed.device.type == "cpu"
        want = self.block_n if keep_layout else kernels.int4_block_n(n) if cpu else None
        packed = int4_relayout(packed, self.shape[1], self.block_n, want)  # block_n: disk's
        self.block_n = want
        self._buffers["packed"] = _aligned(packed.contiguous())
        sz = torch.stack([tensors["scale"].t(), tensors["zero"].t()], -1)  # (K/G, N, 2)
        self._buffers["scale_zero"] = _aligned(sz.contiguous())
        # the file's pages of what was converted (scale and zero always, the codes when their
        # layout changed) leave RSS: measured, they were a third of an int4 model's bytes again
        release_copied(list(tensors.values()), [self._buffers["packed"]])


class IntNWeight(QuantizedWeight):
    """2- or 3-bit, group-wise: ``packed (N, K * bits // 8) uint8`` (canonical, along K),
    ``scale`` and ``offset`` ``(N, K // G) float16`` (offset None when symmetric)."""

    def __init__(self, w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> None:
        super().__init__(tuple(w.shape), w.dtype)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.fmt = f"int{bits}"
        scale, offset = choose_qparams(w, bits, group_size, symmetric, torch.float16)
        self.register_buffer("packed", pack(quantize(w, scale, offset, bits, group_size), bits))
        self.register_buffer("scale", scale)  # (N, K // G) float16
        self.register_buffer("offset", offset)  # (N, K // G) float16, or None

    def _deq(self, packed, scale, offset, dtype):
        codes = unpack(packed, self.bits, self.shape[1])
        return dequantize(codes, scale, offset, self.bits, self.group_size, dtype or self.dtype)

    def dequantize_rows(self, n0: int, n1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        off = None if self.offset is None else self.offset[n0:n1]
        return self._deq(self.packed[n0:n1], self.scale[n0:n1], off, dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = idx.reshape(-1)
        off = None if self.offset is None else self.offset[flat]
        out = self._deq(self.packed[flat], self.scale[flat], off, dtype)
        return out.reshape(*idx.shape, self.shape[1])

    @classmethod
    def reads(cls, fmt: str) -> bool:
        return fmt in ("int2", "int3")

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "symmetric": bool(self.symmetric), "bits": int(self.bits)}

    @classmethod
    def disk_layout(cls, spec: dict[str, Any]) -> Layout:
        n, k = (int(s) for s in spec["shape"])
        g = int(spec["group_size"])
        bits = int(spec.get("bits") or spec["format"][3:])
        out = {"packed": (torch.uint8, (n, k * bits // 8)), "scale": (torch.float16, (n, k // g))}
        if not spec.get("symmetric"):
            out["offset"] = (torch.float16, (n, k // g))
        return out

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "scale": self.scale}
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    @classmethod
    def empty(cls, spec: dict[str, Any], device: str | torch.device = "meta") -> QuantizedWeight:
        qw = super().empty(spec, device)
        qw.bits = int(spec.get("bits") or spec["format"][3:])
        qw.symmetric = bool(spec.get("symmetric"))
        qw.fmt = spec["format"]
        if "offset" not in qw._buffers:
            qw.register_buffer("offset", None)
        return qw


# --------------------------------------------------------------------------------------------------
# The registry: a format's kind, and the disk form of any weight


def kind_of(fmt: Any) -> type[QuantizedWeight]:
    """The weight class that stores manifest format ``fmt``; MemoptError for an unknown one."""
    for kind in QuantizedWeight.KINDS:
        if isinstance(fmt, str) and kind.reads(fmt):
            return kind
    raise MemoptError(f"unknown quantized weight format {fmt!r} in the manifest")


def weight_spec(qw: QuantizedWeight) -> dict[str, Any]:
    """What the manifest records of a quantized weight: enough to rebuild it empty."""
    spec = qw.spec()
    spec["tensors"] = {
        k: {"dtype": dtype_name(dt), "shape": list(s)}
        for k, (dt, s) in type(qw).disk_layout(spec).items()
    }
    return spec


def disk_layout(spec: dict[str, Any]) -> Layout:
    """suffix -> (dtype, shape) of the tensors a weight with this manifest entry writes, in order."""
    return kind_of(spec.get("format")).disk_layout(spec)


def disk_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors a weight writes, by suffix (int4 packed as it is in RAM)."""
    return qw.disk_tensors()


def empty_weight(spec: dict[str, Any], device: str | torch.device = "meta") -> QuantizedWeight:
    """A weight of the entry's kind with uninitialised buffers."""
    return kind_of(spec.get("format")).empty(spec, device)


def fill_weight(
    qw: QuantizedWeight, tensors: dict[str, torch.Tensor], *, keep_layout: bool = False
) -> None:
    """Put the disk form ``tensors`` into ``qw``."""
    qw.fill(tensors, keep_layout=keep_layout)


def int4_relayout(packed: torch.Tensor, k: int, have: int | None, want: int | None) -> torch.Tensor:
    """int4 ``packed (N, K/2)`` from layout ``have`` to ``want`` (a row block size of the CPU
    kernel's interleaved layout, or None: along K). The same tensor when they agree."""
    if have == want:
        return packed
    # Both layouts are local to blocks of rows, so rows convert in chunks into one output: the
    # codes of a whole large weight (an embedding's: 28 MB of uint8 for SmolLM2's, beside its
    # 14 MB packed) would otherwise be the load's peak, kept by the allocator afterwards.
    n = packed.shape[0]
    out = torch.empty_like(packed)  # (N, K/2)
    for r in range(0, n, RELAYOUT_ROWS):
        part = packed[r : r + RELAYOUT_ROWS]
        codes = unpack(part, 4, k) if have is None else unpack_int4_nblock(part, have, k)
        out[r : r + RELAYOUT_ROWS] = (
            pack(codes, 4) if want is None else pack_int4_nblock(codes, want)
        )
    return out


RELAYOUT_ROWS = 4096  # a multiple of every row block size (16 to 128)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when its data is not 64-byte aligned.

    A tensor read from a file may be a view of its mapping at an offset aligned only to what the
    format promises; PyTorch's packed int8/int4 CPU kernels use aligned vector loads and crash on
    such a view (a segmentation fault, seen with ``_weight_int8pack_mm`` on AVX-512). A copy comes
    from PyTorch's allocator, which aligns to 64 bytes. Quantized tensors are small: cheap.
    """
    return t if t.device.type != "cpu" or t.data_ptr() % 64 == 0 else t.clone()
