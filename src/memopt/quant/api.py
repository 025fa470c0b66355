"""``quantize_``: the in-place verb, its report, and the handler of each config."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memopt.errors import MemoptError
from memopt.quant.config import (
    REGISTRY,
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    QuantConfig,
    register,
)
from memopt.quant.modules import (
    Int4Weight,
    Int8Weight,
    IntNWeight,
    QConv,
    QEmbedding,
    QLinear,
    QuantizedWeight,
)

__all__ = ["QuantReport", "model_bytes", "quantize_"]

FilterFn = Callable[[str, nn.Module], bool]


@dataclass
class QuantReport:
    """What ``quantize_`` did: modules touched, bytes before / after, modules per format."""

    config: dict[str, Any]
    bytes_before: int
    bytes_after: int
    modules: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # selected but left alone: why

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "modules": list(self.modules),
            "formats": dict(self.formats),
            "skipped": dict(self.skipped),
        }


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (ties, views)."""
    seen: dict[tuple[str, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def _match(name: str, patterns: list[str] | tuple[str, ...], fold: bool = False) -> bool:
    if fold:
        name = name.lower()
        return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    filter_fn: FilterFn | None = None,
    calib: torch.Tensor | None = None,
) -> QuantReport:
    """Quantize (or cast) ``model`` in place and report the measured bytes.

    Modules are selected by fnmatch patterns over fully qualified names (``include`` default: all;
    ``exclude`` wins) and ``filter_fn(name, module)``. Dispatch is on ``type(config)``.
    Calibrated int4 (``Int4WeightOnly(algo="gptq")``) takes ``calib``, token ids ``(N, T)``
    (``memopt.quant.calibrate.calibration_ids``); ``calibrate_`` also accepts a LoadedModel and
    makes them from its tokenizer.
    """
    if isinstance(config, Int4WeightOnly) and config.algo != "rtn":
        from memopt.quant.calibrate import calibrate_

        if calib is None:
            raise MemoptError(
                f"int4 algo {config.algo!r} needs calibration token ids: pass calib= (N, T) ids "
                "or call memopt.quant.calibrate.calibrate_(loaded_model, config)"
            )
        return calibrate_(
            model, config, calib, include=include, exclude=exclude, filter_fn=filter_fn
        )
    handler = REGISTRY.get(type(config))
    if handler is None:
        raise MemoptError(f"no quantization handler for {type(config).__name__}")
    if isinstance(include, str) or isinstance(exclude, str):
        raise MemoptError("include / exclude take a list of patterns, not a string")

    def select(name: str, module: nn.Module) -> bool:
        if include is not None and not _match(name, include):
            return False
        if exclude is not None and _match(name, exclude):
            return False
        return filter_fn is None or bool(filter_fn(name, module))

    report = QuantReport(config.to_dict(), model_bytes(model), 0)
    with torch.no_grad():
        handler(model, config, select, report)
    report.bytes_after = model_bytes(model)
    return report


# ---- weight formats: Linear, Embedding, Conv1d/2d, transformers' Conv1D ----


def _is_hf_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight (in, out), y = x @ W + b
    return (
        type(m).__name__ == "Conv1D"
        and hasattr(m, "nf")
        and isinstance(getattr(m, "weight", None), torch.Tensor)
    )


def _weight_2d(m: nn.Module) -> torch.Tensor | None:
    """The module's float weight as (N, K) rows x inputs, or None if the module is not covered."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        w = m.weight
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        w = m.weight.reshape(m.weight.shape[0], -1) if m.weight is not None else None
    elif _is_hf_conv1d(m):
        w = m.weight.t()
    else:
        return None
    if w is None or not w.is_floating_point() or w.device.type == "meta":
        return None
    return w


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _replace_weights(
    model: nn.Module,
    select: Callable[[str, nn.Module], bool],
    report: QuantReport,
    make: Callable[[torch.Tensor, nn.Module], QuantizedWeight | str],
    dynamic: bool = False,
) -> None:
    """Swap every selected covered module for its quantized twin, one module at a time.

    ``make(w2d, module)`` returns the quantized weight or a reason to skip. Modules sharing one
    weight Parameter (a tied lm_head) share one quantized weight; if a member of a tie group is not
    selected, the whole group is left in float (quantizing half would keep the float copy anyway).
    """
    covered: list[tuple[str, nn.Module]] = []
    owners: dict[int, list[str]] = {}
    key_of: dict[str, int] = {}  # ids taken while every weight is alive: never reused below
    for name, m in model.named_modules(remove_duplicate=False):
        if name and _weight_2d(m) is not None:
            covered.append((name, m))
            key_of[name] = id(m.weight)
            owners.setdefault(key_of[name], []).append(name)
    chosen = {name for name, m in covered if select(name, m)}
    done: dict[int, QuantizedWeight] = {}
    for name, m in covered:
        if name not in chosen:
            continue
        key = key_of[name]
        group = owners[key]
        if any(g not in chosen for g in group):
            report.skipped[name] = (
                f"weight tied to unselected {[g for g in group if g not in chosen]}"
            )
            continue
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            report.skipped[name] = "embedding with max_norm (renormalises its weight in place)"
            continue
        qw = done.get(key)
        if qw is None:
            made = make(_weight_2d(m), m)
            if isinstance(made, str):
                report.skipped[name] = made
                continue
            qw = done[key] = made
        if isinstance(m, nn.Embedding):
            new: nn.Module = QEmbedding(qw, m.padding_idx)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            new = QConv(m, qw)
        else:
            bias = getattr(m, "bias", None)
            new = QLinear(qw, bias, dynamic=dynamic and isinstance(qw, Int8Weight))
        _set_module(model, name, new)
        if not isinstance(new, QConv):  # QConv already dropped it; a tie partner may still hold it
            m.register_parameter("weight", None)  # release the float weight now, not at the end
        report.modules.append(name)
        fmt = qw.fmt + ("-dynamic" if getattr(new, "dynamic", False) else "")
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
    del done


def lookup_only_weights(model: nn.Module) -> set[int]:
    """ids of the weights that only embeddings read (no Linear / convolution shares them)."""
    emb, other = set(), set()
    for _, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            (emb if isinstance(m, nn.Embedding) else other).add(id(w))
    return emb - other


@register(Int8WeightOnly)
def _int8_weight_only(model, config: Int8WeightOnly, select, report) -> None:
    lookup = lookup_only_weights(model)

    def make(w: torch.Tensor, m: nn.Module) -> QuantizedWeight | str:
        g = config.group_for(w.shape[1], id(m.weight) in lookup)
        if g is not None and w.shape[1] % g:
            return f"group size {g} does not divide {w.shape[1]} inputs"
        return Int8Weight(w, g)

    _replace_weights(model, select, report, make)


@register(Int8Dynamic)
def _int8_dynamic(model, config: Int8Dynamic, select, report) -> None:
    _replace_weights(model, select, report, lambda w, m: Int8Weight(w), dynamic=True)


@register(Int4WeightOnly)
def _int4_weight_only(model, config: Int4WeightOnly, select, report) -> None:
    def make(w: torch.Tensor, m: nn.Module) -> QuantizedWeight | str:
        if w.shape[1] % config.group_size:
            return f"group size {config.group_size} does not divide {w.shape[1]} inputs"
        return Int4Weight(w, config.group_size, config.symmetric)

    _replace_weights(model, select, report, make)


@register(IntNWeightOnly)
def _intn_weight_only(model, config: IntNWeightOnly, select, report) -> None:
    def make(w: torch.Tensor, m: nn.Module) -> QuantizedWeight | str:
        if w.shape[1] % config.group_size:
            return f"group size {config.group_size} does not divide {w.shape[1]} inputs"
        return IntNWeight(w, config.bits, config.group_size, config.symmetric)

    _replace_weights(model, select, report, make)


# ---- Cast ----

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _cast_tree(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_cast_tree(v, dtype) for v in x)
    if isinstance(x, list):
        return [_cast_tree(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _cast_tree(v, dtype) for k, v in x.items()}
    return x


def _boundary_hooks(m: nn.Module, inner: torch.dtype, outer: torch.dtype) -> None:
    """Floating inputs enter ``m`` as ``inner``, its floating outputs leave as ``outer``."""
    for h in getattr(m, "_memopt_cast_hooks", ()):
        h.remove()

    def pre(mod, args, kwargs):
        return _cast_tree(args, inner), _cast_tree(kwargs, inner)

    def post(mod, args, kwargs, out):
        return _cast_tree(out, outer)

    m._memopt_cast_hooks = (  # type: ignore[attr-defined]
        m.register_forward_pre_hook(pre, with_kwargs=True),
        m.register_forward_hook(post, with_kwargs=True),
    )


@register(Cast)
def _cast(model: nn.Module, config: Cast, select, report) -> None:
    """Cast each selected module's own floating tensors; modules matching ``keep`` go to float32.

    ``p.data`` is replaced, not the Parameter, so tied parameters stay one object. Modules with
    tensors of their own get boundary casts (inputs to their dtype; kept modules' outputs back to
    the target dtype), so a float32 LayerNorm inside a float16 model runs. Quantized weights keep
    their own dtypes (their scales are part of the format).
    """
    target = _DTYPES[config.dtype]
    done: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantizedWeight) or not select(name, m):
            continue
        kept = bool(name) and (
            _match(name, config.keep, fold=True) or _match(type(m).__name__, config.keep, fold=True)
        )
        dtype = torch.float32 if kept else target
        own = [
            t
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if t.is_floating_point()
        ]
        if not own:
            continue
        for t in own:
            if id(t) not in done and t.dtype != dtype:
                t.data = t.data.to(dtype)
            done.add(id(t))
        _boundary_hooks(m, dtype, target)
        fmt = f"{config.dtype}" if not kept else "float32 (kept)"
        report.modules.append(name)
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
