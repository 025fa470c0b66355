"""``prune_``: the in-place verb, its report, calibration, and the unstructured handlers.

    report = prune_(model, Wanda(0.5), calib=ids)      # zeros chosen, then stored sparse
    report.bytes_before, report.bytes_after, report.sparsity

Unstructured and N:M pruning first zero weights (a keep-mask applied to the dense tensor), then, with
``compact=True`` (the default), replace each pruned weight by a :class:`SparseWeight` when that takes
fewer bytes than the dense form, so the saving is real in RAM and on disk. ``values="int8"|"int4"``
quantizes the kept values as well (prune, then quantize), and stores the weights that pruning
leaves dense because they are shared (a tied embedding and lm_head) as int8. ``compact=False``
leaves masked dense
weights, for fine-tuning; :func:`compact_` converts them later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import (
    FilterFn,
    Select,
    find_blocks,
    model_bytes,
    nothing_selected,
    selector,
    set_module,
)
from memopt.models import LoadedModel
from memopt.prune.config import (
    NM,
    REGISTRY,
    Magnitude,
    PruneConfig,
    SparseGPT,
    Structured,
    Wanda,
    register,
)
from memopt.prune.masks import global_masks, layer_mask, nm_mask, row_mask
from memopt.weights.modules import QConv, QLinear
from memopt.weights.quantized import Int4Weight, Int8Weight, QuantizedWeight
from memopt.weights.sparse import (
    VALUE_FORMATS,
    SparseWeight,
    choose_layout,
    dense_nbytes,
    sparse_nbytes,
)

__all__ = [
    "PruneReport",
    "calibration_ids",
    "compact_",
    "input_norms",
    "prunable",
    "prune_",
    "run_calibration",
    "sparsity_of",
]


@dataclass
class PruneReport:
    """What ``prune_`` did: modules touched, achieved sparsity, bytes before / after."""

    config: dict[str, Any]
    bytes_before: int
    bytes_after: int = 0
    sparsity: float = 0.0  # zeros / elements over the pruned weights (structured: removed / before)
    params_before: int = 0  # elements of the weights pruned
    params_after: int = 0  # of those, nonzero (structured: elements left)
    modules: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    changed_config: dict[str, Any] = field(default_factory=dict)  # structured: new config values

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "sparsity": self.sparsity,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "modules": list(self.modules),
            "formats": dict(self.formats),
            "skipped": dict(self.skipped),
            "changed_config": dict(self.changed_config),
        }


def _w2d(m: nn.Module) -> torch.Tensor:
    """The weight seen as (N, K): rows = outputs, K = inputs (conv: in/groups * kernel)."""
    return m.weight.reshape(m.weight.shape[0], -1)


def prunable(
    model: nn.Module, select: Select, report: PruneReport | None = None
) -> list[tuple[str, nn.Module]]:
    """Selected Linear / Conv1d / Conv2d modules with a float weight of their own.

    A weight shared with another module (a tied lm_head and embedding) is skipped: zeroing it would
    prune the other module too, and its sparse form could not replace both.
    """
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)
    out = []
    for name, m in model.named_modules():
        if not name or not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.is_meta:
            continue
        if not select(name, m):
            continue
        others = [o for o in owners.get(id(w), []) if o != name]
        if others:
            if report is not None:
                report.skipped[name] = f"weight tied to {others[0]}"
            continue
        out.append((name, m))
    return out


def sparsity_of(model: nn.Module, names: Iterable[str] | None = None) -> float:
    """Zeros / elements over the float weights of the named modules (default: every prunable one),
    sparse weights counted from their stored count of nonzeros."""
    zeros = total = 0
    wanted = None if names is None else set(names)
    for name, m in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        qw = getattr(m, "qweight", None)
        if isinstance(qw, SparseWeight):
            n, k = qw.shape
            zeros += n * k - qw.nnz
            total += n * k
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight is not None:
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------------------------------
# Calibration: per input feature, the L2 norm of the activations over the calibration tokens


def calibration_ids(loaded: LoadedModel, n: int = 64, seq: int = 256) -> torch.Tensor:
    """``(n, seq)`` token ids from the mixed calibration text (memopt.core.texts.mixed_calib_text:
    docs, code, release notes; never a held-out text memopt.evaluate scores); see
    memopt.quant.calibrate."""
    from memopt.quant.calibrate import calibration_ids as ids_from_text

    return ids_from_text(loaded.tokenizer(), n=n, seq=seq)


def run_calibration(model: nn.Module, calib: Any, batch_size: int = 4) -> None:
    """Run ``model`` over ``calib`` without gradients: token ids ``(N, T)`` (int; a transformers
    model), an input tensor (float), a dict of keyword inputs, or an iterable of such batches."""
    is_hf = hasattr(model, "config") and hasattr(model.config, "to_dict")
    with torch.no_grad():
        if isinstance(calib, dict):
            model(**calib)
        elif isinstance(calib, torch.Tensor):
            for i in range(0, calib.shape[0], batch_size):
                chunk = calib[i : i + batch_size]
                if not calib.is_floating_point() and is_hf:
                    kw = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
                    model(input_ids=chunk, **kw)
                else:
                    model(chunk)
        elif isinstance(calib, Iterable):
            for b in calib:
                run_calibration(model, b, batch_size)
        else:
            raise MemoptError(f"calibration data of type {type(calib).__name__} is not supported")


def input_norms(
    model: nn.Module, modules: list[tuple[str, nn.Module]], calib: Any
) -> dict[str, torch.Tensor]:
    """name -> ``‖X_j‖₂`` ``(K,)`` float32 for each module, from one pass over ``calib``.

    Linear: over all tokens of the input ``(..., K)``. Conv: per input channel over batch and
    positions, repeated over the kernel taps so it lines up with the flattened ``(N, C*kh*kw)``
    weight (an approximation of the unfolded input's column norms: every tap sees the same channel).
    """
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str, m: nn.Module) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if isinstance(m, nn.Linear):
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)  # (K,)
            else:
                dims = [d for d in range(x.dim()) if d != 1]
                sq = x.pow(2).sum(dims)  # (C,)
                taps = m.weight[0, 0].numel()
                sq = sq.repeat_interleave(taps)  # (C * kh * kw,)
            sums[name] = sums[name] + sq if name in sums else sq

        return pre

    for name, m in modules:
        handles.append(m.register_forward_pre_hook(hook(name, m)))
    try:
        run_calibration(model, calib)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in modules if n not in sums]
    if missing:
        raise MemoptError(f"calibration never ran through {missing[0]} (is it used in forward?)")
    return {n: s.sqrt() for n, s in sums.items()}


# --------------------------------------------------------------------------------------------------
# The verb


def prune_(
    model: nn.Module | LoadedModel,
    config: PruneConfig,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    filter_fn: FilterFn | None = None,
    calib: Any = None,
    compact: bool = True,
    values: str = "float",
) -> PruneReport:
    """Prune ``model`` in place; returns a :class:`PruneReport` of measured bytes and sparsity.

    Modules are selected by fnmatch patterns over fully qualified names (``include`` default: all;
    ``exclude`` wins) and ``filter_fn(name, module)``. Activation-aware configs (``Wanda``,
    ``NM(score="wanda")``, and ``Structured`` when given) use ``calib``: token ids ``(N, T)``, an
    input tensor, a dict of inputs or an iterable of batches; passing a LoadedModel without
    ``calib`` calibrates on 64 x 256 tokens of the mixed calibration text (:func:`calibration_ids`; more
    sequences than quantization's default, because SparseGPT's perplexity still improves there).
    """
    if not isinstance(config, PruneConfig):
        raise MemoptError(f"not a pruning config: {config!r}")
    handler = REGISTRY.handler(config)
    if values not in VALUE_FORMATS:
        raise MemoptError(f"values must be one of {', '.join(VALUE_FORMATS)}, got {values!r}")
    loaded = model if isinstance(model, LoadedModel) else None
    module = loaded.model if loaded is not None else model
    if not isinstance(module, nn.Module):
        raise MemoptError(
            f"prune_: expected an nn.Module or LoadedModel, got {type(model).__name__}"
        )
    select = selector(include, exclude, filter_fn)
    report = PruneReport(config.to_dict(), model_bytes(module))
    targets = prunable(module, select, report)
    if not targets:
        looked_for = "nn.Linear, nn.Conv1d or nn.Conv2d with a float weight of its own"
        raise MemoptError(
            nothing_selected("prune_", module, config, looked_for, include, exclude, report.skipped)
        )
    if isinstance(config, NM):  # refuse before any calibration work
        _check_nm(config, targets)
    if calib is None and loaded is not None and config.needs_calibration:
        calib = calibration_ids(loaded)
    if calib is None and config.needs_calibration:
        raise MemoptError(
            f"{type(config).__name__} is activation-aware: pass calib= (token ids (N, T) or inputs)"
        )
    with torch.no_grad():
        handler(module, config, targets, calib, report)
    if compact and not isinstance(config, Structured):
        compact_(module, values=values, names=report.modules, report=report)
        if values != "float":
            _quantize_tied_(module, report)
    if loaded is not None and report.changed_config and loaded.config is not None:
        for k, v in report.changed_config.items():
            setattr(loaded.config, k, v)
    report.bytes_after = model_bytes(module)
    return report


def _quantize_tied_(module: nn.Module, report: PruneReport) -> None:
    """With int8 / int4 values: the weights pruning left dense because another module shares
    them (a tied embedding and lm_head) as int8, per channel, one weight for both (memopt.quant's
    ``Int8WeightOnly``, as ``memopt quantize --method int8`` stores them: +0.16 % perplexity on
    smollm2's dense model). Why: left float32, smollm2's tied embedding (113 MB) is 0.62x of the
    whole 50 % + int8 model's bytes, and decode reads it whole at every token (the head). int8
    rather than int4 for int4 values too: a round-to-nearest int4 head costs more quality than
    the kept int4 values do."""
    prefix = "weight tied to "
    names = {n for n, why in report.skipped.items() if why.startswith(prefix)}
    names |= {why[len(prefix) :] for n, why in report.skipped.items() if n in names}
    if not names:
        return
    from memopt.quant import Int8WeightOnly, quantize_

    done = quantize_(module, Int8WeightOnly(), include=sorted(names))
    for fmt, count in done.formats.items():
        report.formats[fmt] = report.formats.get(fmt, 0) + count


def _apply(targets, masks, report: PruneReport) -> None:
    zeros = total = 0
    for (name, m), keep in zip(targets, masks, strict=True):
        w = m.weight
        w.mul_(keep.view(w.shape).to(w.dtype))
        total += keep.numel()
        zeros += int((w == 0).sum())  # also counts weights that were zero already
        report.modules.append(name)
    report.params_before += total
    report.params_after += total - zeros
    report.sparsity = zeros / total if total else 0.0


@register(Magnitude)
def _magnitude(model, config: Magnitude, targets, calib, report) -> None:
    scores = [_w2d(m).abs() for _, m in targets]
    if config.scope == "global":
        masks = global_masks(scores, config.sparsity)
    else:
        masks = [layer_mask(s, config.sparsity) for s in scores]
    _apply(targets, masks, report)


def _finish(targets, report: PruneReport) -> None:
    """Record the achieved sparsity of targets whose weights were already zeroed in place."""
    total = sum(m.weight.numel() for _, m in targets)
    zeros = sum(int((m.weight == 0).sum()) for _, m in targets)
    report.modules.extend(n for n, _ in targets)
    report.params_before += total
    report.params_after += total - zeros
    report.sparsity = zeros / total if total else 0.0


def _blockwise(model, targets, calib) -> bool:
    """Calibrate block by block: token ids for a model with a list of transformer blocks."""
    if not isinstance(calib, torch.Tensor) or calib.is_floating_point() or calib.dim() != 2:
        return False
    found = find_blocks(model)
    if found is None:
        return False
    prefix = found[0]
    return any(n.startswith(prefix + ".") for n, _ in targets)


def _calibrated(model, config, targets, calib, report, method: str) -> None:
    """Wanda / SparseGPT / N:M with either: block by block inside transformer blocks (each block
    from the already-pruned blocks' outputs), one pass of input norms (Wanda's score) elsewhere."""
    done: set[str] = set()
    if _blockwise(model, targets, calib):
        from memopt.prune.calibrated import sequential_prune

        done = sequential_prune(model, config, targets, calib, report, method=method)
    rest = [(n, m) for n, m in targets if n not in done]
    if rest:
        norms = input_norms(model, rest, calib)
        for name, m in rest:
            score = _w2d(m).abs() * norms[name][None, :]
            keep = (
                nm_mask(score, config.n, config.m)
                if isinstance(config, NM)
                else row_mask(score, config.sparsity)
            )
            m.weight.mul_(keep.view(m.weight.shape).to(m.weight.dtype))
    _finish(targets, report)


@register(Wanda)
def _wanda(model, config: Wanda, targets, calib, report) -> None:
    _calibrated(model, config, targets, calib, report, "wanda")


@register(SparseGPT)
def _sparsegpt(model, config: SparseGPT, targets, calib, report) -> None:
    _calibrated(model, config, targets, calib, report, "sparsegpt")


def _check_nm(config: NM, targets) -> None:
    for name, m in targets:
        k = _w2d(m).shape[1]
        if k % config.m:
            raise MemoptError(
                f"N:M {config.n}:{config.m}: M={config.m} does not divide the {k} inputs of {name}"
            )


@register(NM)
def _nm(model, config: NM, targets, calib, report) -> None:
    _check_nm(config, targets)
    if config.score == "magnitude":
        _apply(targets, [nm_mask(_w2d(m).abs(), config.n, config.m) for _, m in targets], report)
    else:
        _calibrated(model, config, targets, calib, report, config.score)


@register(Structured)
def _structured(model, config: Structured, targets, calib, report) -> None:
    from memopt.prune.structured import structured_prune

    structured_prune(model, config, targets, calib, report)


# --------------------------------------------------------------------------------------------------
# Compaction: masked dense weights -> sparse (or dense quantized) storage


def compact_(
    model: nn.Module,
    *,
    values: str = "float",
    names: Iterable[str] | None = None,
    layout: str = "auto",
    report: PruneReport | None = None,
) -> PruneReport:
    """Store each pruned weight in the smallest form: sparse when its zeros pay for the index,
    else dense (quantized to ``values`` when that is int8/int4, like memopt.quant would).

    ``names`` limits it to those modules (default: every Linear/Conv whose weight is its own).
    Zeros are the mask: a weight that is exactly 0.0 counts as pruned.
    """
    if values not in VALUE_FORMATS:
        raise MemoptError(f"values must be one of {', '.join(VALUE_FORMATS)}, got {values!r}")
    own = report is None
    if report is None:
        report = PruneReport({"type": "compact", "values": values}, model_bytes(model))
    wanted = None if names is None else set(names)
    targets = prunable(model, lambda n, m: wanted is None or n in wanted, report)
    with torch.no_grad():
        for name, m in targets:
            w = _w2d(m).detach()
            n, k = w.shape
            nnz = int((w != 0).sum())
            item = w.element_size()
            lay = choose_layout(n, k, nnz) if layout == "auto" else layout
            sparse = sparse_nbytes(n, k, nnz, lay, values, item)
            if sparse < dense_nbytes(n, k, values, item):
                qw: QuantizedWeight | None = SparseWeight(w, lay, values)
            elif values == "int8":
                qw = Int8Weight(w)
            elif values == "int4" and k % 64 == 0:
                qw = Int4Weight(w, 64)
            else:
                qw = None  # dense float is already the smallest form
            if qw is None:
                report.formats["dense"] = report.formats.get("dense", 0) + 1
                continue
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                new: nn.Module = QConv(m, qw)
            else:
                new = QLinear(qw, m.bias)
                m.register_parameter("weight", None)  # release the dense weight now
            set_module(model, name, new)
            report.formats[qw.fmt] = report.formats.get(qw.fmt, 0) + 1
    if own:
        report.modules = [n for n, _ in targets]
        report.bytes_after = model_bytes(model)
    return report
