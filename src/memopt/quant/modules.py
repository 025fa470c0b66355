"""Quantized weights and the modules that use them.

A quantized weight is a small ``nn.Module`` holding integer and scale tensors as buffers, not a tensor
subclass. Why: buffers move with ``.to()``, appear in ``state_dict()`` (save / load needs nothing
special), are counted by anything that walks ``model.buffers()``, and a tied weight is simply the
same submodule registered under two parents (``named_buffers()`` yields it once), with no
``__torch_dispatch__`` to maintain. The modules that use a weight (:class:`QLinear`,
:class:`QEmbedding`, :class:`QConv`) keep no float copy of it: they dequantize blocks of rows, the
gathered rows, or (convolutions) the whole kernel for the duration of one call.
"""

from __future__ import annotations

import torch
from torch import nn

from memopt.quant import kernels
from memopt.quant.primitives import (
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
    "QConv",
    "QEmbedding",
    "QLinear",
    "QuantizedWeight",
]


class QuantizedWeight(nn.Module):
    """A 2-D weight ``(N, K)`` (output rows x input features) stored as integers + scales."""

    fmt: str = "?"

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype  # the float dtype it was quantized from; what dequantize returns

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


class QLinear(nn.Module):
    """``y = x @ W.T + b`` with W a :class:`QuantizedWeight`; ``dynamic=True`` quantizes the
    activations per token to int8 as well (int8 weights only)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, dynamic: bool = False):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.dynamic = dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.dynamic:
            q: Int8Weight = self.qweight  # type: ignore[assignment]
            y = kernels.int8_dynamic_linear(x2, q.qdata, q.scale[:, 0])
        else:
            y = self.qweight.linear(x2)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dynamic={self.dynamic}"
        )


class QEmbedding(nn.Module):
    """Lookup that dequantizes only the gathered rows."""

    def __init__(self, qweight: QuantizedWeight, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.qweight = qweight
        self.padding_idx = padding_idx

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(idx)  # (*idx.shape, D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class QConv(nn.Module):
    """Conv1d / Conv2d with a quantized kernel, flattened to ``(out, in / groups * prod(kernel))``.

    Dequantize-then-convolve: the float kernel exists only during the call (one layer's worth);
    no int8/int4 convolution kernel is used.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, qweight: QuantizedWeight):
        super().__init__()
        self.weight_shape = tuple(conv.weight.shape)
        conv.register_parameter("weight", None)  # drop the float kernel; conv keeps its settings
        self.conv = conv
        self.qweight = qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.dequantize(x.dtype).reshape(self.weight_shape)
        return self.conv._conv_forward(x, w, self.conv.bias)
