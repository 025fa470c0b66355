"""``quantize_``: the in-place verb, its report, and the handler of each config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import FilterFn, model_bytes, nothing_selected, selector, set_module
from memopt.quant.config import (
    REGISTRY,
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    Mixed,
    QuantConfig,
    is_calibrated,
    register,
)
from memopt.weights.cast import cast_modules_
from memopt.weights.modules import QConv, QEmbedding, QLinear
from memopt.weights.quantized import Int8Weight, QuantizedWeight

__all__ = [
    "COVERED",
    "QuantReport",
    "count_format",
    "covered_shape",
    "covered_weight",
    "first_of_tie",
    "is_hf_conv1d",
    "lookup_only_weights",
    "quantize_",
    "replace_weights",
    "swap_module",
    "swap_plan",
]

# What a weight maker gives replace_weights: the weight, (the weight, dynamic), or why not
Made = QuantizedWeight | tuple[QuantizedWeight, bool] | str

# What quantize_ looks for, as its error says when it finds none of them
COVERED = "nn.Linear, nn.Embedding, nn.Conv1d/Conv2d or transformers' Conv1D with a float weight"


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
    ``exclude`` wins) and ``filter_fn(name, module)``. Dispatch is on ``type(config)``; a
    :class:`~memopt.quant.config.Mixed` config gives each selected module its rule's format.
    Calibrated int4 (``Int4WeightOnly(algo="gptq")``, alone or as rules of a Mixed config) takes
    ``calib``, token ids ``(N, T)``
    (``memopt.quant.calibrate.calibration_ids``); ``calibrate_`` also accepts a LoadedModel and
    makes them from its tokenizer.
    """
    if is_calibrated(config):
        from memopt.quant.calibrate import calibrate_

        if calib is None:
            what = (
                "a Mixed config with calibrated int4 rules"
                if isinstance(config, Mixed)
                else f"int4 algo {config.algo!r}"  # type: ignore[attr-defined]
            )
            raise MemoptError(
                f"{what} needs calibration token ids: pass calib= (N, T) ids "
                "or call memopt.quant.calibrate.calibrate_(loaded_model, config)"
            )
        return calibrate_(
            model, config, calib, include=include, exclude=exclude, filter_fn=filter_fn
        )
    handler = REGISTRY.handler(config)
    if not isinstance(model, nn.Module):
        raise MemoptError(f"quantize_: expected an nn.Module, got {type(model).__name__}")
    select = selector(include, exclude, filter_fn)
    report = QuantReport(config.to_dict(), model_bytes(model), 0)
    with torch.no_grad():
        handler(model, config, select, report)
    report.bytes_after = model_bytes(model)
    if not report.modules:
        looked_for = "a module with floating tensors" if isinstance(config, Cast) else COVERED
        raise MemoptError(
            nothing_selected(
                "quantize_", model, config, looked_for, include, exclude, report.skipped
            )
        )
    return report


# ---- weight formats: Linear, Embedding, Conv1d/2d, transformers' Conv1D ----


def is_hf_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight (in, out), y = x @ W + b
    return (
        type(m).__name__ == "Conv1D"
        and hasattr(m, "nf")
        and isinstance(getattr(m, "weight", None), torch.Tensor)
    )


def covered_shape(m: nn.Module) -> tuple[tuple[int, int], bool] | None:
    """``((N, K), transposed)`` of a covered module's floating weight (meta too), else None:
    rows x inputs (a convolution's kernel flattened; transformers' Conv1D stores (in, out))."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        return None
    if isinstance(m, (nn.Linear, nn.Embedding)):
        return (w.shape[0], w.shape[1]), False
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return (w.shape[0], w[0].numel()), False
    if is_hf_conv1d(m):
        return (w.shape[1], w.shape[0]), True
    return None


def covered_weight(m: nn.Module) -> torch.Tensor | None:
    """The module's float weight as (N, K) rows x inputs, or None if the module is not covered
    (or its weight is on the meta device). A 2-D weight (Linear, Embedding) is the Parameter
    itself, not a view: callers recognise a tied weight by identity (calibrate_'s head)."""
    found = covered_shape(m)
    if found is None or m.weight.device.type == "meta":
        return None
    (n, k), transposed = found
    if transposed:
        return m.weight.t()
    return m.weight if m.weight.dim() == 2 else m.weight.reshape(n, k)


def swap_plan(
    model: nn.Module, select: Callable[[str, nn.Module], bool], skipped: dict[str, str]
) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, weight key)`` of the covered modules to swap, by quantize_'s rules:
    selected; a tie group (modules sharing one weight, a tied lm_head) all or nothing, since
    quantizing half would keep the float copy anyway; an embedding with ``max_norm`` (it
    renormalises its weight in place) never. Modules left alone are put in ``skipped`` with why.
    Modules of one key share one quantized weight."""
    covered: list[tuple[str, nn.Module]] = []
    owners: dict[int, list[str]] = {}
    key_of: dict[str, int] = {}  # ids taken while every weight is alive: never reused below
    for name, m in model.named_modules(remove_duplicate=False):
        if name and covered_shape(m) is not None:
            covered.append((name, m))
            key_of[name] = id(m.weight)
            owners.setdefault(key_of[name], []).append(name)
    chosen = {name for name, m in covered if select(name, m)}
    out = []
    for name, m in covered:
        if name not in chosen:
            continue
        group = owners[key_of[name]]
        if any(g not in chosen for g in group):
            skipped[name] = f"weight tied to unselected {[g for g in group if g not in chosen]}"
        elif isinstance(m, nn.Embedding) and m.max_norm is not None:
            skipped[name] = "embedding with max_norm (renormalises its weight in place)"
        elif isinstance(m, nn.Embedding) and type(m).forward is not nn.Embedding.forward:
            # OPT's learned positions: a subclass whose forward takes other arguments than ids
            skipped[name] = f"an embedding with a forward of its own ({type(m).__name__})"
        else:
            out.append((name, m, key_of[name]))
    return out


def swap_module(
    model: nn.Module, name: str, m: nn.Module, qw: QuantizedWeight, dynamic: bool = False
) -> nn.Module:
    """Put the quantized twin of ``m`` (a covered module) around ``qw`` in its place."""
    if isinstance(m, nn.Embedding):
        new: nn.Module = QEmbedding(qw, m.padding_idx)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        new = QConv(m, qw)
    else:
        new = QLinear(qw, getattr(m, "bias", None), dynamic=dynamic and isinstance(qw, Int8Weight))
    set_module(model, name, new)
    return new


def count_format(formats: dict[str, int], new: nn.Module) -> None:
    """Count one swapped module under its weight's format (``int8-dynamic`` for dynamic ones)."""
    fmt = new.qweight.fmt + ("-dynamic" if getattr(new, "dynamic", False) else "")
    formats[fmt] = formats.get(fmt, 0) + 1


def replace_weights(
    model: nn.Module,
    select: Callable[[str, nn.Module], bool],
    report: QuantReport,
    make: Callable[[torch.Tensor, nn.Module, str], Made],
    dynamic: bool = False,
) -> None:
    """Swap every module of :func:`swap_plan` for its quantized twin, one module at a time.

    ``make(w2d, module, name)`` returns the quantized weight, ``(weight, dynamic)`` (whether a
    Linear quantizes its activations too: per module, a Mixed config's rules may differ; else
    ``dynamic``), or a reason to skip. It is called once per weight, with the first module of a
    tie group (modules sharing the weight, in ``named_modules`` order): that module's name decides
    the format of the whole group, or that the whole group stays as it is."""
    done: dict[int, tuple[QuantizedWeight, bool] | str] = {}
    for name, m, key in swap_plan(model, select, report.skipped):
        made = done.get(key)
        if made is None:
            got = make(covered_weight(m), m, name)
            made = done[key] = got if isinstance(got, (str, tuple)) else (got, dynamic)
        if isinstance(made, str):  # the whole tie group stays as it is
            report.skipped[name] = made
            continue
        new = swap_module(model, name, m, *made)
        if not isinstance(new, QConv):  # QConv already dropped it; a tie partner may still hold it
            m.register_parameter("weight", None)  # release the float weight now, not at the end
        report.modules.append(name)
        count_format(report.formats, new)
    del done


def first_of_tie(model: nn.Module, name: str) -> str:
    """The first module (``named_modules`` order) holding the weight of module ``name``: the one
    whose rule decides a tie group's format (``name`` itself when its weight is not shared)."""
    w = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(w, torch.Tensor):
        return name
    for nm, m in model.named_modules(remove_duplicate=False):
        if nm and getattr(m, "weight", None) is w:
            return nm
    return name


def lookup_only_weights(model: nn.Module) -> set[int]:
    """ids of the weights that only embeddings read (no Linear / convolution shares them)."""
    emb, other = set(), set()
    for _, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            (emb if isinstance(m, nn.Embedding) else other).add(id(w))
    return emb - other


@register(Int8WeightOnly)
@register(Int8Dynamic)
@register(Int4WeightOnly)
@register(IntNWeightOnly)
@register(Mixed)
def _weight_only(model, config: QuantConfig, select, report) -> None:
    """Every config with a weight plan: each module's from
    :meth:`~memopt.quant.config.QuantConfig.plan_module` (a Mixed config: its rule's)."""
    lookup = lookup_only_weights(model)

    def make(w: torch.Tensor, m: nn.Module, name: str) -> Made:
        plan = config.plan_module(name, w.shape[0], w.shape[1], w.dtype, id(m.weight) in lookup)
        return plan if isinstance(plan, str) else (plan.make(w), plan.dynamic)

    replace_weights(model, select, report, make)


# ---- Cast ----


@register(Cast)
def _cast(model: nn.Module, config: Cast, select, report) -> None:
    """Each selected module's own floating tensors to ``config.dtype`` (``keep``: float32), with
    casts at module boundaries (memopt.weights.cast)."""
    for name, fmt in cast_modules_(model, config.dtype, config.keep, select).items():
        report.modules.append(name)
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
