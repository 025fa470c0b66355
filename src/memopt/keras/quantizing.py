"""Quantize a Keras model's weights to int8 or int4 on memopt's weight kinds and kernels.

``qmodel, report = quantize(model, "int8")``: every ``Dense``, ``EinsumDense`` (whose equation is
a matrix product, as attention's projections are), ``Embedding``, ``Conv1D`` /
``Conv2D``, ``LSTM`` and ``GRU`` (inside a ``Bidirectional`` too) becomes its memopt layer
(:mod:`memopt.keras.layers`) with the kernel as int8 (symmetric, one scale per output channel) or
int4 (groups along the inputs, scale and zero in bfloat16; a convolution's inputs zero-padded to a
multiple of 16 when they are not one); biases stay float. Every other layer
that holds weights is kept as it is and listed in the report with the reason, never silently. The
model is rebuilt (:mod:`memopt.keras.rebuild`), so nothing keeps the float kernels alive once the
original model is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.keras.backend import keras_module
from memopt.keras.casting import variable_bytes
from memopt.keras.layers import (
    QGRU,
    QLSTM,
    QConv,
    QDense,
    QEinsumDense,
    QEmbedding,
    einsum_split,
)
from memopt.keras.rebuild import Replacement, layers_of, rebuild
from memopt.weights import Int4Weight, Int8Weight, QuantizedWeight

keras = keras_module()

__all__ = ["LayerResult", "QuantizeReport", "quantize"]

MODES = ("int8", "int4")
INT4_GROUPS = (128, 64, 32, 16)  # the largest that divides the inputs, at most group_size


@dataclass
class LayerResult:
    name: str  # the layer's Keras path in the model
    kind: str  # its class
    action: str  # "int8", "int4" or "skipped"
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class QuantizeReport:
    mode: str
    bytes_before: int  # every variable of the model
    bytes_after: int
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def skipped(self) -> list[LayerResult]:
        return [r for r in self.layers if r.action == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weight(w: torch.Tensor, mode: str, group_size: int) -> QuantizedWeight:
    """``w (N, K)`` float as the mode's weight kind; MemoptError with the reason it cannot be."""
    w = w.detach().float().contiguous()
    if mode == "int8":
        return Int8Weight(w)  # per output channel: the fused kernel's form
    k = w.shape[1]
    groups = [g for g in INT4_GROUPS if g <= group_size and k % g == 0]
    if not groups:
        raise MemoptError(f"int4 needs the inputs ({k}) to be a multiple of 16")
    return Int4Weight(w, group_size=groups[0])


def _common(layer: Any) -> dict[str, Any]:
    return {"name": layer.name, "dtype": layer.dtype_policy, "trainable": layer.trainable}


def _dense(layer: Any, mode: str, g: int) -> Replacement:
    kernel = layer.kernel.value  # (K, N)
    qw = _weight(kernel.t(), mode, g)
    new = QDense(
        layer.units, layer.activation, layer.use_bias, specs={"kernel": qw.spec()}, **_common(layer)
    )
    floats = {"bias": layer.bias.value} if layer.use_bias else {}
    return Replacement(new, {"kernel": qw}, floats)


def _einsum(layer: Any, mode: str, g: int) -> Replacement:
    split = einsum_split(layer.equation)
    if split is None:
        raise MemoptError(f"equation {layer.equation!r} is not a matrix product")
    kernel = layer.kernel.value  # (*contracted, *out)
    c = split[1]
    k = math.prod(kernel.shape[:c])
    out = list(kernel.shape[c:])
    qw = _weight(kernel.reshape(k, -1).t(), mode, g)  # (prod(out), K)
    bias = getattr(layer, "bias", None)
    new = QEinsumDense(
        layer.equation,
        out,
        bias_shape=None if bias is None else list(bias.shape),
        activation=layer.activation,
        specs={"kernel": qw.spec()},
        **_common(layer),
    )
    floats = {"bias": bias.value} if bias is not None else {}
    return Replacement(new, {"kernel": qw}, floats)


def _embedding(layer: Any, mode: str, g: int) -> Replacement:
    if layer.mask_zero:
        raise MemoptError("mask_zero: memopt's layers take no mask")
    w = layer.embeddings.value  # (V, D)
    qw = Int8Weight(w.detach().float().t().contiguous()) if mode == "int8" else _weight(w, mode, g)
    new = QEmbedding(
        layer.input_dim, layer.output_dim, specs={"embeddings": qw.spec()}, **_common(layer)
    )
    return Replacement(new, {"embeddings": qw})


def _conv(layer: Any, mode: str, g: int) -> Replacement:
    kernel = layer.kernel.value  # (*kernel_size, cin, cout)
    cout = kernel.shape[-1]
    w = kernel.permute(kernel.dim() - 1, *range(kernel.dim() - 1)).reshape(cout, -1)
    inputs = None
    if mode == "int4" and w.shape[1] % 16:
        # the kernel is dequantized whole at each call, so zero columns cost only their codes:
        # a 3x3x3 kernel's 27 inputs stored as 32, the padding dropped after dequantizing
        inputs = w.shape[1]
        w = torch.nn.functional.pad(w, (0, -inputs % 16))
    qw = _weight(w, mode, g)  # (cout, prod(kernel_size) * cin [padded])
    new = QConv(
        layer.filters,
        layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
        activation=layer.activation,
        use_bias=layer.use_bias,
        inputs=inputs,
        specs={"kernel": qw.spec()},
        **_common(layer),
    )
    floats = {"bias": layer.bias.value} if layer.use_bias else {}
    return Replacement(new, {"kernel": qw}, floats)


def _recurrent(layer: Any, mode: str, g: int) -> Replacement:
    if layer.stateful:
        raise MemoptError("stateful recurrent layers are not supported")
    cell = layer.cell
    is_gru = isinstance(layer, keras.layers.GRU)
    if is_gru and not cell.reset_after:
        raise MemoptError("GRU with reset_after=False is not supported")
    stored = {
        "kernel": _weight(cell.kernel.value.t(), mode, g),  # (G*U, K)
        "recurrent_kernel": _weight(cell.recurrent_kernel.value.t(), mode, g),  # (G*U, U)
    }
    cls = QGRU if is_gru else QLSTM
    new = cls(
        layer.units if hasattr(layer, "units") else cell.units,
        activation=cell.activation,
        recurrent_activation=cell.recurrent_activation,
        use_bias=cell.use_bias,
        return_sequences=layer.return_sequences,
        return_state=layer.return_state,
        go_backwards=layer.go_backwards,
        specs={k: v.spec() for k, v in stored.items()},
        **_common(layer),
    )
    floats = {"bias": cell.bias.value} if cell.use_bias else {}
    return Replacement(new, stored, floats)


def _converter(layer: Any) -> Callable[[Any, str, int], Replacement] | None:
    L = keras.layers
    kind = type(layer)
    if kind is L.Dense:
        return _dense
    if kind is L.EinsumDense:
        return _einsum
    if kind is L.Embedding:
        return _embedding
    if kind in (L.Conv1D, L.Conv2D):
        return _conv
    if kind in (L.LSTM, L.GRU):
        return _recurrent
    return None


def quantize(model: Any, mode: str = "int8", *, group_size: int = 64) -> tuple[Any, QuantizeReport]:
    """``model`` rebuilt with its kernels in ``mode`` (int8 or int4); ``model`` is not changed."""
    if mode not in MODES:
        raise MemoptError(f"quantize mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not isinstance(model, keras.Model):
        raise MemoptError(
            f"memopt.keras.quantizing takes a keras.Model, not {type(model).__name__}"
        )
    if not model.built:
        raise MemoptError("build the model (keras.Input or one call) before quantizing it")
    plan: dict[str, Replacement] = {}
    results: list[LayerResult] = []
    wrappers = (keras.layers.Bidirectional, keras.Model)
    covered: set[int] = set()  # variables of a layer already listed (an LSTM's cell)
    for layer in layers_of(model):
        if not layer.weights or isinstance(layer, wrappers):
            continue  # holds nothing, or only through layers listed on their own
        if all(id(v) in covered for v in layer.weights):
            continue
        covered.update(id(v) for v in layer.weights)
        name = layer.path
        convert = _converter(layer)
        before = variable_bytes(layer.weights)
        if convert is None:
            reason = f"memopt.keras has no {mode} form for {type(layer).__name__}"
            results.append(LayerResult(name, type(layer).__name__, "skipped", reason, before))
            continue
        try:
            rep = convert(layer, mode, group_size)
        except MemoptError as exc:
            results.append(LayerResult(name, type(layer).__name__, "skipped", str(exc), before))
            continue
        plan[layer.name] = rep
        after = sum(qw.nbytes for qw in rep.stored.values())
        after += sum(t.numel() * t.element_size() for t in rep.floats.values())
        results.append(LayerResult(name, type(layer).__name__, mode, "", before, after))
    new = rebuild(model, plan)
    for r in results:
        if r.action == "skipped":
            r.bytes_after = r.bytes_before
    report = QuantizeReport(
        mode, variable_bytes(model.variables), variable_bytes(new.variables), results
    )
    return new, report
