"""The modules that run a :class:`~memopt.weights.quantized.QuantizedWeight` in place of a float
weight: Linear, Embedding, and Conv1d/Conv2d. None keeps a float copy of its weight.

Each knows its manifest entry (:meth:`manifest_entry`) and how to rebuild itself from it around an
empty weight (:meth:`from_manifest`); :data:`MODULE_KINDS` finds the class a manifest names.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.weights import kernels
from memopt.weights.quantized import Int8Weight, QuantizedWeight

__all__ = ["MODULE_KINDS", "QConv", "QEmbedding", "QLinear", "QModule"]


class QModule(nn.Module):
    """Base of the modules that hold a ``qweight``: their manifest entry and its inverse."""

    qweight: QuantizedWeight
    KIND: ClassVar[str] = "?"

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records of this module, beside ``class`` and ``weight``."""
        return {}

    @classmethod
    def from_manifest(cls, old: nn.Module, qw: QuantizedWeight, info: dict[str, Any]) -> QModule:
        """This module, around ``qw``, in place of ``old`` (the float module of the architecture)."""
        raise NotImplementedError


class QLinear(QModule):
    """``y = x @ W.T + b`` with W a :class:`QuantizedWeight`; ``dynamic=True`` quantizes the
    activations per token to int8 as well (int8 weights only)."""

    KIND = "QLinear"

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

    def manifest_entry(self) -> dict[str, Any]:
        return {"bias": self.bias is not None, "dynamic": bool(self.dynamic)}

    @classmethod
    def from_manifest(cls, old: nn.Module, qw: QuantizedWeight, info: dict[str, Any]) -> QModule:
        weight = getattr(old, "weight", None)
        if isinstance(old, nn.Embedding) or not isinstance(weight, torch.Tensor):
            raise MemoptError(f"is a {type(old).__name__} in the architecture, not a linear layer")
        if tuple(weight.shape) not in (tuple(qw.shape), tuple(qw.shape)[::-1]):
            raise MemoptError(
                f"weight {tuple(qw.shape)} does not fit the architecture's {tuple(weight.shape)}"
            )
        bias, dynamic = info.get("bias", False), info.get("dynamic", False)  # booleans: the schema
        if bias and getattr(old, "bias", None) is None:
            raise MemoptError("has a bias the architecture does not have")
        if dynamic and not isinstance(qw, Int8Weight):
            raise MemoptError("dynamic activations need an int8 weight")
        return cls(qw, old.bias if bias else None, dynamic=dynamic)


class QEmbedding(QModule):
    """Lookup that dequantizes only the gathered rows."""

    KIND = "QEmbedding"

    def __init__(self, qweight: QuantizedWeight, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.qweight = qweight
        self.padding_idx = padding_idx

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(idx)  # (*idx.shape, D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def manifest_entry(self) -> dict[str, Any]:
        return {"padding_idx": self.padding_idx}

    @classmethod
    def from_manifest(cls, old: nn.Module, qw: QuantizedWeight, info: dict[str, Any]) -> QModule:
        if not isinstance(old, nn.Embedding):
            raise MemoptError(f"is a {type(old).__name__} in the architecture, not an embedding")
        if tuple(old.weight.shape) != tuple(qw.shape):
            raise MemoptError(
                f"weight {tuple(qw.shape)} does not fit the architecture's "
                f"{tuple(old.weight.shape)}"
            )
        pad = info.get("padding_idx")
        if pad is not None and (type(pad) is not int or not -qw.shape[0] <= pad < qw.shape[0]):
            raise MemoptError(f"padding_idx {pad!r}: expected null or a row of the embedding")
        return cls(qw, pad)


class QConv(QModule):
    """Conv1d / Conv2d with a quantized kernel, flattened to ``(out, in / groups * prod(kernel))``.

    Dequantize-then-convolve: the float kernel exists only during the call (one layer's worth);
    no int8/int4 convolution kernel is used.
    """

    KIND = "QConv"

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, qweight: QuantizedWeight):
        super().__init__()
        self.weight_shape = tuple(conv.weight.shape)
        conv.register_parameter("weight", None)  # drop the float kernel; conv keeps its settings
        self.conv = conv
        self.qweight = qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.dequantize(x.dtype).reshape(self.weight_shape)
        return self.conv._conv_forward(x, w, self.conv.bias)

    def manifest_entry(self) -> dict[str, Any]:
        return {"weight_shape": list(self.weight_shape)}

    @classmethod
    def from_manifest(cls, old: nn.Module, qw: QuantizedWeight, info: dict[str, Any]) -> QModule:
        if not isinstance(old, (nn.Conv1d, nn.Conv2d)):
            raise MemoptError("is not a convolution in the architecture")
        return cls(old, qw)


MODULE_KINDS: dict[str, type[QModule]] = {c.KIND: c for c in (QLinear, QEmbedding, QConv)}
