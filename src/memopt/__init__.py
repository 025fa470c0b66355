"""memopt: measure, then shrink, the memory that neural networks need.

The public API, nothing else. Names are imported on first use (PEP 562) so that ``import memopt``
stays cheap and a child process can import a light submodule without torch.

    import memopt
    report = memopt.estimate("smollm2", memopt.StepSpec(task="train", batch=4, seq=512))
    loaded = memopt.load_model("minilm")
    memopt.quantize_(loaded.model, memopt.Int8WeightOnly())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from memopt.core.version import VERSION as __version__

_HOME = {
    # model sources
    "LoadedModel": "memopt.models",
    "build_meta": "memopt.models",
    "load_model": "memopt.models",
    "MemoptError": "memopt.core.errors",
    # measurement
    "MemoryTracker": "memopt.measure.tracker",
    "StepSpec": "memopt.step.step",
    "MemoryReport": "memopt.measure.estimate",
    "estimate": "memopt.measure.estimate",
    "profile": "memopt.measure.profile",
    # data types
    "quantize_": "memopt.quant",
    "Cast": "memopt.quant",
    "Int8WeightOnly": "memopt.quant",
    "Int8Dynamic": "memopt.quant",
    "Int4WeightOnly": "memopt.quant",
    "IntNWeightOnly": "memopt.quant",
    "quantize_model": "memopt.quant.stream",
    "Mixed": "memopt.quant",
    # a budget: everything composed
    "Budget": "memopt.compose.fit",
    "fit": "memopt.compose.fit",
    # structure
    "prune_": "memopt.prune",
    "Magnitude": "memopt.prune",
    "Wanda": "memopt.prune",
    "SparseGPT": "memopt.prune",
    "NM": "memopt.prune",
    "Structured": "memopt.prune",
    # allocation
    "plan_model": "memopt.plan",
    # save / load, generation
    "save": "memopt.models.saved",
    "load": "memopt.models.saved",
    "export": "memopt.models.export",
    "generate": "memopt.generate",
    # training
    "AdamW8bit": "memopt.train",
    # quality
    "perplexity": "memopt.evaluate",
    "embedding_cosine": "memopt.evaluate",
}

__all__ = [
    "NM",
    "Magnitude",
    "SparseGPT",
    "Structured",
    "Wanda",
    "prune_",
    "AdamW8bit",
    "Budget",
    "Cast",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8WeightOnly",
    "IntNWeightOnly",
    "LoadedModel",
    "MemoptError",
    "MemoryReport",
    "MemoryTracker",
    "Mixed",
    "StepSpec",
    "__version__",
    "build_meta",
    "embedding_cosine",
    "estimate",
    "export",
    "fit",
    "generate",
    "load",
    "load_model",
    "perplexity",
    "plan_model",
    "profile",
    "quantize_",
    "quantize_model",
    "save",
]

if TYPE_CHECKING:
    from memopt.compose.fit import Budget, fit
    from memopt.core.errors import MemoptError
    from memopt.evaluate import embedding_cosine, perplexity
    from memopt.generate import generate
    from memopt.measure.estimate import MemoryReport, estimate
    from memopt.measure.profile import profile
    from memopt.measure.tracker import MemoryTracker
    from memopt.models import LoadedModel, build_meta, load_model
    from memopt.models.export import export
    from memopt.models.saved import load, save
    from memopt.plan import plan_model
    from memopt.prune import NM, Magnitude, SparseGPT, Structured, Wanda, prune_
    from memopt.quant import (
        Cast,
        Int4WeightOnly,
        Int8Dynamic,
        Int8WeightOnly,
        IntNWeightOnly,
        Mixed,
        quantize_,
    )
    from memopt.quant.stream import quantize_model
    from memopt.step.step import StepSpec
    from memopt.train import AdamW8bit


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'memopt' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
