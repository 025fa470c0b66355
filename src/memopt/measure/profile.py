"""Measure the memory of one real step on real weights, with the estimator's step and tracker.

A model given by name or path is loaded and run in a fresh child process
(:func:`memopt.core.rss.run_in_child`), so its peak RSS belongs to this step alone: the child
reports its peak RSS after the imports any step needs (:func:`memopt.core.rss.import_baseline`),
its RSS peak, and the tracker's result. An
in-memory :class:`~memopt.models.LoadedModel` runs in this process (it cannot be sent to a child
without copying it); its ``peak_rss_bytes`` is then this process's lifetime high-water mark
(``rss_scope="process"``), an upper bound on the step's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

# in the child's import baseline (run_in_child imports this module first): the tracker's module
# tracking imports torch.distributed and dynamo at its first use
import torch.distributed._tools.mod_tracker  # noqa: F401

import memopt.measure.tracker  # noqa: F401
from memopt.core.frontends import adapter_for
from memopt.core.rss import current_rss_bytes, import_baseline, peak_rss_bytes, run_in_child
from memopt.measure.estimate import MemoryReport, fsdp_shard, report_from_result, tracked_step
from memopt.models import LoadedModel, load_model, resolve
from memopt.step.step import StepSpec

__all__ = ["profile", "profile_loaded"]


def profile(
    model: str | Path | LoadedModel | Any,
    spec: StepSpec | None = None,
    *,
    child: bool = True,
    device: str = "cpu",
) -> MemoryReport:
    """Run one step of ``spec`` on the real ``model`` and measure it.

    ``child=True`` (the default, for names and paths) loads and runs in a fresh process and reports
    its peak and baseline RSS; ``child=False`` runs here. A :class:`LoadedModel` always runs here and
    is changed in place (cast to ``spec.dtype``; checkpointing turned on if asked; its gradients are
    dropped afterwards). On CUDA (``device="cuda"``) the report also carries the allocator's figures.
    ``spec.ranks > 1`` is not run distributed here: the single-process measurement is sharded with the
    estimator's formula (:func:`memopt.measure.estimate.fsdp_shard`). A Keras model (torch backend)
    is measured here by its front end (:mod:`memopt.keras.measure`), its weights left as they were.
    """
    spec = spec or StepSpec()
    adapter = adapter_for(model)
    if adapter is not None:
        return adapter.profile(model, spec)
    start = time.perf_counter()
    if isinstance(model, LoadedModel):
        report = profile_loaded(model, spec, device=device)
    elif child:
        resolve(model)  # a missing file or unknown name fails here, before a child starts
        out = run_in_child(_profile_in_child, str(model), spec.to_dict(), device)
        report = MemoryReport.from_dict(out["report"])
        report.peak_rss_bytes = int(out["peak_rss_bytes"])
        report.baseline_rss_bytes = int(out["work_baseline_rss_bytes"])
        report.rss_scope = "child"
    else:
        report = profile_loaded(load_model(model, **spec.load_kwargs()), spec, device=device)
    report.seconds = time.perf_counter() - start
    return report


def profile_loaded(loaded: LoadedModel, spec: StepSpec, device: str = "cpu") -> MemoryReport:
    """Measure one step on an in-memory model, in this process (``rss_scope="process"``)."""
    spec.check_model(loaded)
    baseline = current_rss_bytes()
    was_training = loaded.model.training
    try:
        result = tracked_step(loaded, spec, device=device)
    finally:
        for p in loaded.model.parameters():
            p.grad = None
        loaded.model.train(was_training)
    report = report_from_result(loaded, spec, result, kind="profile")
    if spec.ranks > 1:
        fsdp_shard(report, loaded.model, spec)
    report.peak_rss_bytes = peak_rss_bytes()
    report.baseline_rss_bytes = baseline
    report.rss_scope = "process"
    if device.startswith("cuda") and torch.cuda.is_available() and report.cuda is None:
        report.cuda = {
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
        }
    return report


def _profile_in_child(model: str, spec: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """The child's work: load, run the step, return the report as a dict (JSON-able)."""
    baseline = import_baseline()
    step = StepSpec(**spec)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded = load_model(model, **step.load_kwargs())
    report = profile_loaded(loaded, step, device=device)
    return {"report": report.to_dict(), "work_baseline_rss_bytes": baseline}
