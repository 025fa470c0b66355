"""Magnitude pruning of Keras layers that saves bytes: during ``fit``, then stored sparse.

    model.fit(x, y, epochs=10, callbacks=[PruneDuringFit(PolynomialDecay(0.0, 0.8, 0, 500))])
    small, report = strip(model)      # Dense / Conv kernels as memopt's sparse weights

tfmot's ``prune_low_magnitude`` wraps every layer with a float mask variable of the kernel's
shape (the weights twice while pruning) and ``strip_pruning`` leaves dense zeros (the saved model
is as large as the dense one). Here nothing is wrapped and no mask is kept: a pruned weight is a
weight that is exactly zero. At each update of the schedule (memopt's :class:`PolynomialDecay`,
Zhu & Gupta's, tfmot's default) every selected kernel keeps its largest ``1 - s(t)`` by magnitude
(:func:`memopt.prune.masks.layer_mask`; pruned weights are zero, so they stay pruned) and the
optimizer's per-weight state of those entries (Adam's moments) is zeroed; between updates a
gradient hook zeroes the gradient where the weight is zero. With a zero gradient and zero moments
Adam, SGD with momentum and RMSprop move a zero weight by exactly zero, so the zeros stay (the
tests check the sparsity after ``fit`` exactly). The hook's boolean comparison is one kernel's
temporary, never a second copy of the weights.

:func:`strip` rebuilds the model with every pruned kernel as a
:class:`~memopt.weights.SparseWeight` (a bitmask and the nonzero values, float or int8) in memopt's
Keras layers: bytes in memory and in the ``.keras`` file are the sparse ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.keras.backend import keras_module
from memopt.keras.casting import variable_bytes
from memopt.keras.layers import QConv, QDense, QEmbedding
from memopt.keras.rebuild import Replacement, layers_of, rebuild
from memopt.prune.gradual import PolynomialDecay
from memopt.prune.masks import layer_mask
from memopt.weights import SparseWeight

keras = keras_module()

__all__ = [
    "PolynomialDecay",
    "PruneDuringFit",
    "StripReport",
    "prunable_layers",
    "prune_magnitude",
    "sparsity_of",
    "strip",
]


def prunable_layers(model: Any) -> list[Any]:
    """The layers whose kernel is pruned: Dense, Conv1D / Conv2D, Embedding."""
    kinds = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Embedding)
    return [layer for layer in layers_of(model) if type(layer) in kinds and layer.built]


def _kernel(layer: Any) -> Any:
    return layer.embeddings if isinstance(layer, keras.layers.Embedding) else layer.kernel


def _optimizer_slots(model: Any, variable: Any) -> list[torch.Tensor]:
    """The optimizer's per-weight state of ``variable`` (Keras names it after the variable's path)."""
    opt = getattr(model, "optimizer", None)
    if opt is None or not opt.built:
        return []
    stem = variable.path.replace("/", "_")
    return [
        v.value
        for v in opt.variables
        if tuple(v.shape) == tuple(variable.shape) and v.name.startswith(stem)
    ]


@torch.no_grad()
def prune_magnitude(model: Any, sparsity: float, layers: list[Any] | None = None) -> float:
    """Zero the smallest ``sparsity`` of each prunable kernel by magnitude, in place (and the
    optimizer's state of those entries); returns the kernels' sparsity after it."""
    if not 0.0 <= sparsity < 1.0:
        raise MemoptError(f"sparsity must be in [0, 1), got {sparsity!r}")
    for layer in layers if layers is not None else prunable_layers(model):
        var = _kernel(layer)
        w = var.value
        keep = layer_mask(w.detach().abs().reshape(w.shape[0], -1), sparsity).view(w.shape)
        w.mul_(keep)  # in place: the variable's own tensor
        for slot in _optimizer_slots(model, var):
            slot.mul_(keep)
        del keep
    return sparsity_of(model, layers)["kernels"]


def sparsity_of(model: Any, layers: list[Any] | None = None) -> dict[str, float]:
    """Fraction of exact zeros in each prunable kernel, and over all of them (``kernels``)."""
    out: dict[str, float] = {}
    zeros = total = 0
    for layer in layers if layers is not None else prunable_layers(model):
        w = _kernel(layer).value
        z = int((w == 0).sum())
        out[layer.path] = z / w.numel()
        zeros += z
        total += w.numel()
    out["kernels"] = zeros / total if total else 0.0
    return out


class PruneDuringFit(keras.callbacks.Callback):
    """``model.fit`` callback: the schedule's sparsity at its update steps, zeros kept between
    (tfmot's ``UpdatePruningStep`` without its wrapper and masks). ``layers``: layer names to
    prune (default: every Dense, Conv1D/2D and Embedding)."""

    def __init__(self, schedule: PolynomialDecay, layers: list[str] | None = None) -> None:
        super().__init__()
        self.schedule = schedule
        self.names = layers
        self.step = 0
        self.sparsity = 0.0
        self._targets: list[Any] = []
        self._hooks: list[Any] = []

    def on_train_begin(self, logs: Any = None) -> None:
        targets = prunable_layers(self.model)
        if self.names is not None:
            missing = set(self.names) - {t.name for t in targets}
            if missing:
                raise MemoptError(f"no prunable layer named {sorted(missing)}")
            targets = [t for t in targets if t.name in self.names]
        if not targets:
            raise MemoptError("PruneDuringFit: the model has no Dense / Conv / Embedding layer")
        self._targets = targets
        for layer in targets:
            w = _kernel(layer).value
            # the gradient of a pruned (zero) weight is zero before any optimizer sees it
            self._hooks.append(w.register_hook(lambda g, w=w: g.masked_fill(w == 0, 0)))

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.schedule.should_update(self.step):
            self.sparsity = self.schedule(self.step)
            prune_magnitude(self.model, self.sparsity, self._targets)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.step == 0 or self.schedule.should_update(self.step):
            # the first step built the optimizer's state: zero its pruned entries too
            for layer in self._targets:
                var = _kernel(layer)
                for slot in _optimizer_slots(self.model, var):
                    slot.masked_fill_(var.value == 0, 0)
        self.step += 1

    def on_train_end(self, logs: Any = None) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@dataclass
class StripReport:
    bytes_before: int  # every variable of the model
    bytes_after: int
    sparsity: float  # of the stripped kernels together
    layers: dict[str, str] = field(default_factory=dict)  # path -> the stored format

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sparse(w: torch.Tensor, values: str) -> SparseWeight:
    return SparseWeight(w.detach().float().contiguous(), layout="auto", values=values)


def strip(model: Any, values: str = "float", min_sparsity: float = 0.1) -> tuple[Any, StripReport]:
    """``model`` rebuilt with every prunable kernel of at least ``min_sparsity`` zeros stored
    sparse (``values``: "float" or "int8" for the nonzero values); ``model`` is not changed."""
    if values not in ("float", "int8"):
        raise MemoptError(f"strip: values must be 'float' or 'int8', not {values!r}")
    plan: dict[str, Replacement] = {}
    formats: dict[str, str] = {}
    zeros = total = 0
    for layer in prunable_layers(model):
        w = _kernel(layer).value
        z = int((w == 0).sum())
        if z < min_sparsity * w.numel():
            continue
        zeros, total = zeros + z, total + w.numel()
        common = {"name": layer.name, "dtype": layer.dtype_policy, "trainable": False}
        if isinstance(layer, keras.layers.Embedding):
            if layer.mask_zero:
                continue
            qw = _sparse(w, values)  # (V, D): a lookup decodes the weight's rows
            new = QEmbedding(layer.input_dim, layer.output_dim, specs={"embeddings": qw.spec()},
                             **common)  # fmt: skip
            plan[layer.name] = Replacement(new, {"embeddings": qw})
        elif isinstance(layer, keras.layers.Dense):
            qw = _sparse(w.t(), values)  # (N, K)
            new = QDense(layer.units, layer.activation, layer.use_bias,
                         specs={"kernel": qw.spec()}, **common)  # fmt: skip
            floats = {"bias": layer.bias.value} if layer.use_bias else {}
            plan[layer.name] = Replacement(new, {"kernel": qw}, floats)
        else:
            cout = w.shape[-1]
            qw = _sparse(w.permute(w.dim() - 1, *range(w.dim() - 1)).reshape(cout, -1), values)
            new = QConv(layer.filters, layer.kernel_size, strides=layer.strides,
                        padding=layer.padding, data_format=layer.data_format,
                        dilation_rate=layer.dilation_rate, activation=layer.activation,
                        use_bias=layer.use_bias, specs={"kernel": qw.spec()}, **common)  # fmt: skip
            floats = {"bias": layer.bias.value} if layer.use_bias else {}
            plan[layer.name] = Replacement(new, {"kernel": qw}, floats)
        formats[layer.path] = qw.fmt
    if not plan:
        raise MemoptError(f"strip: no kernel has {min_sparsity:.0%} zeros or more (prune first)")
    new = rebuild(model, plan)
    report = StripReport(
        variable_bytes(model.variables),
        variable_bytes(new.variables),
        zeros / total,
        formats,
    )
    return new, report
