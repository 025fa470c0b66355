"""Predict the memory of one step without reading a weight: the real step, run on the meta device.

The architecture is built on the meta device from its config (:func:`memopt.models.build_meta`), and
the same step code that :mod:`memopt.measure.profile` runs on real weights
(:func:`memopt.step.step.run_step`) runs on it under the same
:class:`~memopt.measure.tracker.MemoryTracker`. Meta tensors have shapes, dtypes and storages of a
size, but no data, so every allocation the real step makes is made and counted, in the same order,
at no cost. An op whose output shape depends on tensor data (``.item()``, ``nonzero``, boolean
masks) cannot run this way; the estimate then fails naming the op.

Sharding (``ranks > 1``, FSDP2 ``fully_shard`` / ZeRO-3), the memory of one rank:

- every parameter is split on dim 0 into ``ranks`` equal chunks (padded), so a rank holds
  ``S = Σ ceil(d0 / N) · (numel / d0) · itemsize`` of the ``P`` parameter bytes; the parameters,
  gradients and optimizer state counted at the single-process peak are scaled by ``r = S / P``
  (≈ 1/N);
- the FSDP units are the blocks of the largest ``nn.ModuleList`` (``fully_shard`` on each layer)
  and the root (the rest: embeddings, final norm, head). ``G = rest + largest block`` unsharded
  parameter bytes are gathered during the forward and the backward (the root stays gathered
  through the forward; one block at a time);
- buffers and activations are not sharded (``batch`` is per rank).

The rank's peak is the maximum over the single-process timeline of the steady-state training step
(not only at the single-process peak: sharding the model states moves the peak), point by point:
``r · (params + grads + optimizer) + buffers + activations``, plus ``G`` in the forward and the
backward, plus ``min(G, gradients this backward has made)`` in the backward (unsharded gradients
before their reduce-scatter; a later micro-batch of gradient accumulation adds into gradients that
are already sharded); in the optimizer phase FSDP2 has resharded everything and the optimizer's
temporaries, being per parameter, are scaled by ``r`` too. AdamW8bit's lookup tables
(``LOOKUP_BYTES``) are counted as buffers (constant tables), so they are not scaled. Checked against real 2-rank FSDP2
runs (gloo, tiny Llama, tests/train/test_fsdp.py holds the tolerance): practically exact for
float32 AdamW, AdamW8bit and gradient accumulation; somewhat over with checkpointing (the
recomputation's gathered block is counted while FSDP2 has freed part of it) and somewhat under
for checkpointing + AdamW8bit + bf16 masters.
Inference keeps the single-process peak plus ``G``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError, flat
from memopt.core.frontends import adapter_for
from memopt.core.modules import find_blocks
from memopt.models import LoadedModel, build_meta
from memopt.step.step import StepSpec, meta_copy, prepare, run_step

__all__ = [
    "CATEGORIES",
    "MemoryReport",
    "TOP_MODULES",
    "estimate",
    "estimate_in_child",
    "fsdp_shard",
    "tracked_step",
]

CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations")
TOP_MODULES = 25  # modules kept in a report, by their peak


@dataclass
class MemoryReport:
    """Memory of one step: predicted (``kind="estimate"``) or measured (``kind="profile"``).

    ``peak_bytes`` and ``breakdown`` are live tensor bytes counted by the tracker (for a training step,
    at the peak of the steady-state second step). ``peak_rss_bytes`` / ``baseline_rss_bytes`` are the
    process's resident set (profile only): ``rss_scope`` says whose — ``"child"``, a fresh process
    that ran only this step (the baseline is its RSS after imports), or ``"process"``, this process's
    lifetime high-water mark (an in-memory model; an upper bound, not this step's own).
    """

    model: str
    spec: StepSpec
    param_count: int
    peak_bytes: int
    breakdown: dict[str, int]
    modules: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "estimate"
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    baseline_rss_bytes: int | None = None
    rss_scope: str | None = None
    cuda: dict[str, Any] | None = None
    sharding: dict[str, Any] | None = None

    @property
    def model_state_bytes(self) -> int:
        """Parameters, gradients and optimizer state at the peak."""
        b = self.breakdown
        return b["params"] + b["grads"] + b["optimizer"]

    def to_dict(self) -> dict[str, Any]:
        """The CLI's JSON: ``peak_bytes``, ``breakdown`` and (profile) ``peak_rss_bytes``, ``modules``."""
        out: dict[str, Any] = {
            "model": self.model,
            "kind": self.kind,
            "spec": self.spec.to_dict(),
            "param_count": self.param_count,
            "peak_bytes": int(self.peak_bytes),
            "breakdown": {k: int(self.breakdown.get(k, 0)) for k in CATEGORIES},
            "modules": self.modules,
            "timeline": self.timeline,
            "seconds": round(self.seconds, 3),
        }
        if self.kind == "profile" or self.peak_rss_bytes is not None:
            out["peak_rss_bytes"] = self.peak_rss_bytes
            out["baseline_rss_bytes"] = self.baseline_rss_bytes
            out["rss_scope"] = self.rss_scope
        if self.cuda is not None:
            out["cuda"] = self.cuda
        if self.sharding is not None:
            out["sharding"] = self.sharding
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryReport:
        return cls(
            model=data["model"],
            spec=StepSpec(**data["spec"]),
            param_count=data["param_count"],
            peak_bytes=data["peak_bytes"],
            breakdown=dict(data["breakdown"]),
            modules=list(data.get("modules", [])),
            timeline=list(data.get("timeline", [])),
            kind=data.get("kind", "estimate"),
            seconds=data.get("seconds", 0.0),
            peak_rss_bytes=data.get("peak_rss_bytes"),
            baseline_rss_bytes=data.get("baseline_rss_bytes"),
            rss_scope=data.get("rss_scope"),
            cuda=data.get("cuda"),
            sharding=data.get("sharding"),
        )


def estimate(model: str | Path | LoadedModel | Any, spec: StepSpec | None = None) -> MemoryReport:
    """Predict the memory of one step of ``spec`` on ``model``, reading no weights.

    ``model`` is a bundled name, a path, or a :class:`LoadedModel` (copied to the meta device without
    copying its data; the original is not changed). A GGUF file is built with its quantized blocks
    kept, or dequantized, as ``spec.dequantize`` says: the model that ``profile`` loads. Fails with :class:`MemoptError` for bad input or
    for an architecture with a data-dependent op. A Keras model (torch backend) is estimated by its
    front end (:mod:`memopt.keras.measure`): rebuilt from its config on the meta device.
    """
    spec = spec or StepSpec()
    adapter = adapter_for(model)
    if adapter is not None:
        return adapter.estimate(model, spec)
    start = time.perf_counter()
    if isinstance(model, LoadedModel):
        loaded = LoadedModel(
            meta_copy(model.model),
            model.task,
            model.name,
            model.config,
            model.source,
            example_inputs=model.example_inputs,
        )
        spec.check_model(loaded)
        result = tracked_step(loaded, spec, device="meta")
    else:
        loaded = build_meta(model, dequantize=spec.dequantize)
        spec.check_model(loaded)
        try:
            result = tracked_step(loaded, spec, device="meta")
        except RuntimeError as exc:  # a shape error of the forward pass: the file's sizes
            raise MemoptError(
                f"{loaded.name}: the model its config describes fails in its forward pass "
                f"({flat(exc)})"
            ) from None
    report = report_from_result(loaded, spec, result, kind="estimate")
    if spec.ranks > 1:
        fsdp_shard(report, loaded.model, spec)
    report.seconds = time.perf_counter() - start
    return report


def estimate_in_child(model: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run :func:`estimate` in a fresh process (for :func:`memopt.core.rss.run_in_child`).

    Returns ``{"report": ..., "work_baseline_rss_bytes": ...}``; with the child's
    ``peak_rss_bytes`` this shows what estimating costs in memory (it reads no weights).
    """
    from memopt.core.rss import import_baseline

    baseline = import_baseline()
    report = estimate(model, StepSpec(**(spec or {})))
    return {"report": report.to_dict(), "work_baseline_rss_bytes": baseline}


def tracked_step(
    loaded: LoadedModel, spec: StepSpec, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Prepare ``loaded`` for ``spec`` (in place), run the step under the tracker, return its result.

    The one place where estimate and profile meet: both call this, on meta or on real weights. The
    result is the tracker's ``TrackerResult.to_dict()`` (JSON-able, so it crosses a process boundary).
    """
    from memopt.measure.tracker import MemoryTracker

    prepare(loaded, spec)
    model = loaded.model
    if torch.device(device).type not in ("meta", "cpu"):
        model.to(device)
    with MemoryTracker(model) as tracker:
        run_step(loaded, spec, tracker, device=device)
    return tracker.result().to_dict()


def report_from_result(
    loaded: LoadedModel, spec: StepSpec, result: dict[str, Any], kind: str
) -> MemoryReport:
    """A :class:`MemoryReport` from a tracker result dict (top modules by their peak)."""
    modules = sorted(
        result.get("modules") or [],
        key=lambda m: max(
            m.get("forward_peak_bytes", 0) or 0, m.get("backward_peak_bytes", 0) or 0
        ),
        reverse=True,
    )[:TOP_MODULES]
    return MemoryReport(
        model=loaded.name,
        spec=spec,
        param_count=param_count(loaded.model),
        peak_bytes=int(result["peak_bytes"]),
        breakdown={k: int(result["breakdown"].get(k, 0)) for k in CATEGORIES},
        modules=modules,
        timeline=list(result.get("timeline") or []),
        kind=kind,
        cuda=result.get("cuda"),
    )


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# FSDP2 / ZeRO-3 sharding


def _shard_bytes(p: torch.Tensor, ranks: int) -> int:
    """Bytes of one rank's chunk of ``p`` under FSDP2 (dim-0 chunks, padded to equal size)."""
    if p.dim() == 0:
        return p.element_size()
    rows = p.shape[0]
    per_row = p.numel() // rows if rows else 0
    return math.ceil(rows / ranks) * per_row * p.element_size()


def fsdp_shard(report: MemoryReport, model: nn.Module, spec: StepSpec) -> None:
    """Turn a single-process report into the memory of one of ``spec.ranks`` FSDP2 ranks, in place.

    See the module docstring for the formula; ``report.sharding`` records its terms.
    """
    n = spec.ranks
    params = list(model.parameters())  # deduplicated: tied weights count once
    full = sum(p.numel() * p.element_size() for p in params)
    if full == 0:
        raise MemoptError("--ranks needs a model with parameters to shard")
    shard = sum(_shard_bytes(p, n) for p in params)
    ratio = shard / full
    found = find_blocks(model)
    block_ids: set[int] = set()
    largest_block = 0
    if found is not None:
        for block in found[1]:
            ps = list(block.parameters())
            block_ids.update(id(p) for p in ps)
            largest_block = max(largest_block, sum(p.numel() * p.element_size() for p in ps))
    rest = sum(p.numel() * p.element_size() for p in params if id(p) not in block_ids)
    gathered = rest + largest_block
    before = dict(report.breakdown)
    points = _steady_step(report.timeline) if spec.task == "train" else []
    if points:
        sharded: list[dict[str, int]] = []
        grads_at_backward = 0  # gradient bytes when the current backward began
        previous = ""
        for pt in points:
            if pt["phase"] == "backward" and previous != "backward":
                grads_at_backward = pt["bytes"]["grads"]
            previous = pt["phase"]
            sharded.append(_sharded_point(pt, ratio, gathered, grads_at_backward))
        after = max(sharded, key=lambda b: sum(v for k, v in b.items() if not k.startswith("_")))
        gathered_grads = after.pop("_gathered_grads")
    else:  # no timeline (inference, or a report without one): the single-process peak
        gathered_grads = 0
        after = dict(before)
        after["params"] = round(before["params"] * ratio) + gathered
        after["grads"] = round(before["grads"] * ratio)
        after["optimizer"] = round(before["optimizer"] * ratio)
    report.peak_bytes = report.peak_bytes - sum(before.values()) + sum(after.values())
    report.breakdown = after
    report.sharding = {
        "ranks": n,
        "strategy": "fsdp2",
        "shard_ratio": ratio,
        "param_bytes": full,
        "param_shard_bytes": shard,
        "gathered_param_bytes": gathered,
        "gathered_grad_bytes": gathered_grads,
        "root_param_bytes": rest,
        "largest_block_param_bytes": largest_block,
        "block_list": found[0] if found is not None else None,
        "unsharded_breakdown": before,
    }


def _steady_step(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline points of the measured (second) training step: from the first ``forward``
    that follows an ``optimizer`` phase; all points if there is no such boundary."""
    seen_optimizer = False
    for i, pt in enumerate(timeline):
        if pt["phase"] == "optimizer":
            seen_optimizer = True
        elif seen_optimizer and pt["phase"] == "forward":
            return [p for p in timeline[i:] if p.get("bytes")]
    return [p for p in timeline if p.get("bytes")]


def _sharded_point(
    pt: dict[str, Any], ratio: float, gathered: int, grads_at_backward: int
) -> dict[str, int]:
    """One rank's bytes at one point of the single-process timeline (see the module docstring)."""
    phase, b = pt["phase"], pt["bytes"]
    out = dict(b)
    for key in ("params", "grads", "optimizer"):
        out[key] = round(b[key] * ratio)
    grads = 0
    if phase == "optimizer":
        # FSDP2 has resharded everything after the backward; the optimizer's temporaries are
        # per parameter, so they shrink with the shards too
        out["activations"] = round(b["activations"] * ratio)
    elif phase in ("forward", "backward"):
        out["params"] += gathered  # the root and one block gathered
        if phase == "backward":
            # unsharded gradients before their reduce-scatter: only those this backward made
            # (a later micro-batch adds into gradients that are already sharded)
            grads = max(0, min(gathered, b["grads"] - grads_at_backward))
            out["grads"] += grads
    out["_gathered_grads"] = grads
    return out
