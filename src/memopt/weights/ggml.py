"""GGUF's quantized blocks kept as they are: a weight kind that holds llama.cpp's bytes.

A GGUF tensor of a quantized GGML type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) is ``N`` rows of
``K / values_per_block`` blocks; each row is an independent run of bytes. :class:`GGMLWeight` keeps
those bytes, ``blocks (N, row_bytes) uint8`` (a view of the file's mapping where the rows are in
Hugging Face order, else a copy in that order), so a GGUF model held in memory is its file's size,
and every value it computes with is the one llama.cpp and ``gguf.quants.dequantize`` compute: rows
are dequantized by :func:`memopt.formats.gguf.dequantize`, tested bit for bit against gguf's.

The manifest format is ``ggml-<type>`` (``ggml-q4_1``); on disk a memopt folder stores ``blocks``
as they are, so saving a GGUF model keeps its bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.formats.gguf import QUANTIZED_TYPES, block_layout, dequantize
from memopt.formats.safetensors import dtype_name
from memopt.weights import kernels
from memopt.weights.quantized import Layout, QuantizedWeight

__all__ = ["FORMAT_PREFIX", "GGMLWeight", "ggml_format"]

FORMAT_PREFIX = "ggml-"


def ggml_format(ggml_type: str) -> str:
    """The manifest format of a GGML type: ``"Q4_1"`` -> ``"ggml-q4_1"``."""
    return FORMAT_PREFIX + ggml_type.lower()


def _type_of(fmt: str) -> str:
    ggml_type = fmt.removeprefix(FORMAT_PREFIX).upper()
    if ggml_type not in QUANTIZED_TYPES:
        raise MemoptError(f"unknown GGML weight format {fmt!r}")
    return ggml_type


class GGMLWeight(QuantizedWeight):
    """A 2-D weight ``(N, K)`` as GGML blocks: ``blocks (N, K / values * bytes) uint8``."""

    def __init__(self, blocks: torch.Tensor, ggml_type: str, shape: tuple[int, int]) -> None:
        n, k = (int(s) for s in shape)
        values, nbytes = block_layout(ggml_type)
        if ggml_type not in QUANTIZED_TYPES or k % values:
            raise MemoptError(f"GGML {ggml_type}: {k} inputs are not whole blocks of {values}")
        if tuple(blocks.shape) != (n, k // values * nbytes) or blocks.dtype != torch.uint8:
            raise MemoptError(
                f"GGML {ggml_type} blocks of a ({n}, {k}) weight must be uint8 "
                f"({n}, {k // values * nbytes}), got {blocks.dtype} {tuple(blocks.shape)}"
            )
        super().__init__((n, k), torch.float32)
        self.ggml_type = ggml_type
        self.register_buffer("blocks", blocks)

    @property
    def fmt(self) -> str:  # type: ignore[override]
        return ggml_format(self.ggml_type)

    @property
    def group_size(self) -> int:
        return block_layout(self.ggml_type)[0]

    # ---- values ----

    def dequantize_rows(self, n0: int, n1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = dequantize(self.blocks[n0:n1], self.ggml_type, (n1 - n0, self.shape[1]))
        return out if dtype in (None, torch.float32) else out.to(dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = idx.reshape(-1)
        out = dequantize(self.blocks[flat], self.ggml_type, (flat.numel(), self.shape[1]))
        out = out if dtype in (None, torch.float32) else out.to(dtype)
        return out.reshape(*idx.shape, self.shape[1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        lead = x.shape[:-1]
        y = kernels.gemv(self, x.reshape(-1, k))  # decode: the blocks read as they are
        if y is not None:
            return y.reshape(*lead, n)
        return kernels.ggml_linear(x, self.blocks, self.ggml_type, n, k, self.dequantize_rows)

    def extra_repr(self) -> str:
        return f"{self.ggml_type}, shape={self.shape}, nbytes={self.nbytes}"

    # ---- the disk form: the blocks as they are ----

    @classmethod
    def reads(cls, fmt: str) -> bool:
        return isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX)

    def spec(self) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "group_size": self.group_size,
        }

    @classmethod
    def disk_layout(cls, spec: dict[str, Any]) -> Layout:
        n, k = (int(s) for s in spec["shape"])
        values, nbytes = block_layout(_type_of(spec["format"]))
        if k % values:
            raise MemoptError(f"corrupt GGML weight spec: {k} inputs are not whole blocks")
        return {"blocks": (torch.uint8, (n, k // values * nbytes))}

    @classmethod
    def empty(cls, spec: dict[str, Any], device: str | torch.device = "meta") -> QuantizedWeight:
        ((dt, shape),) = cls.disk_layout(spec).values()
        n, k = (int(s) for s in spec["shape"])
        blocks = torch.empty(shape, dtype=dt, device=device)
        return cls(blocks, _type_of(spec["format"]), (n, k))
