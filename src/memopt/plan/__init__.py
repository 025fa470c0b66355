"""Allocation: a static activation plan (one arena, offsets computed ahead), its executor, pools.

    from memopt.plan import plan_model
    p = plan_model("minilm", batch=1, seq=128)       # capture -> lifetimes -> arena
    p.arena_bytes, p.lower_bound_bytes, p.naive_bytes
    ex = p.executor()                                # one preallocated arena, out= kernels
    hidden, pooled = ex.run(**p.inputs)              # steady state: zero allocations
    write_plan_png(p, "plan.png")                    # tensors as rectangles: lifetime x offset

See capture.py (what exports and what not), lifetimes.py (the rules), arena.py (the strategies),
executor.py (how steps avoid allocating) and pool.py (training-loop buffers, CUDA preallocation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.atomic import save_figure
from memopt.core.errors import MemoptError
from memopt.plan.alloc import AllocationReport, count_allocations
from memopt.plan.arena import STRATEGIES, ArenaPlan, plan_arena
from memopt.plan.capture import capture, example_inputs
from memopt.plan.executor import ArenaExecutor
from memopt.plan.lifetimes import ALIGNMENT, Lifetimes, TensorLife, lifetimes
from memopt.plan.pool import BufferPool, CudaPreallocation, preallocate_cuda
from memopt.plan.verify import verify_plan

__all__ = [
    "ALIGNMENT",
    "STRATEGIES",
    "AllocationReport",
    "ArenaExecutor",
    "ArenaPlan",
    "BufferPool",
    "GGUF_NOTE",
    "CudaPreallocation",
    "Lifetimes",
    "ModelPlan",
    "TensorLife",
    "capture",
    "count_allocations",
    "example_inputs",
    "lifetimes",
    "load_planned",
    "plan_arena",
    "plan_model",
    "preallocate_cuda",
    "verify_plan",
    "write_plan_png",
]


@dataclass
class ModelPlan:
    """A model's static activation plan for one input shape."""

    name: str
    program: torch.export.ExportedProgram
    lifetimes: Lifetimes
    arena: ArenaPlan
    inputs: dict[str, torch.Tensor]  # the example inputs it was planned with (shapes are fixed)
    capture_seconds: float
    plan_seconds: float
    note: str | None = None  # what was planned when it is not the model as given (a GGUF)

    @property
    def arena_bytes(self) -> int:
        return self.arena.arena_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return self.arena.lower_bound_bytes

    @property
    def naive_bytes(self) -> int:
        return self.arena.naive_bytes

    def executor(self) -> ArenaExecutor:
        """An :class:`ArenaExecutor` over this plan (allocates the arena: ``arena_bytes``)."""
        return ArenaExecutor(self.program, self.arena, self.lifetimes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the keys of ``memopt plan --json``. Sizes in bytes."""
        shapes = {k: list(v.shape) for k, v in self.inputs.items() if isinstance(v, torch.Tensor)}
        return {
            "model": self.name,
            "inputs": shapes,
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "naive_bytes": self.naive_bytes,
            "arena_over_lower_bound": round(self.arena.ratio_to_lower_bound, 4),
            "naive_over_arena": round(self.naive_bytes / self.arena_bytes, 2)
            if self.arena_bytes
            else None,
            "strategy": self.arena.strategy,
            "strategies_tried": dict(self.arena.tried),
            "tensors": len(self.arena.tensors),
            "steps": self.arena.n_steps,
            "folded_constants": len(self.lifetimes.constants),
            "alignment_bytes": ALIGNMENT,
            "capture_seconds": round(self.capture_seconds, 3),
            "plan_seconds": round(self.plan_seconds, 3),
            **({"note": self.note} if self.note else {}),
        }


GGUF_NOTE = (
    "planned with the GGUF's quantized weights dequantized to float32: captured, each block's "
    "dequantization would be folded into a float32 constant (the float weights again)"
)


def load_planned(model: str | Path, progress: Any = None) -> Any:
    """``model`` loaded as :func:`plan_model` plans it: with float weights. A GGUF file's
    quantized blocks are dequantized to float32 (:data:`GGUF_NOTE` says why; the plan's ``note``
    says so); other sources load as they are stored."""
    from memopt.models import load_model

    return load_model(model, progress=progress, dequantize=True)


def plan_model(
    model: str | Path | nn.Module | Any,
    *,
    batch: int = 1,
    seq: int = 128,
    inputs: dict[str, torch.Tensor] | None = None,
) -> ModelPlan:
    """Capture ``model`` and plan its activations in one arena.

    ``model``: a bundled name or path (loaded with :func:`load_planned`: a GGUF file dequantized
    to float32), a ``LoadedModel``, or an ``nn.Module`` with ``inputs`` (its forward's keyword
    tensors). Transformers models are planned for ``input_ids`` of shape (batch, seq), no attention
    mask. Raises :class:`MemoptError` (naming the op) when the model cannot be captured.
    """
    if isinstance(model, (str, Path)):
        model = load_planned(model)
    if isinstance(model, nn.Module):
        if inputs is None:
            raise MemoptError("plan_model(nn.Module) needs inputs= (its forward's keyword tensors)")
        from memopt.models import LoadedModel

        model = LoadedModel.from_module(model, inputs)
    feed = dict(inputs) if inputs is not None else example_inputs(model, batch, seq)
    t0 = time.perf_counter()
    program = capture(model, feed)
    t1 = time.perf_counter()
    lives = lifetimes(program.graph, varying=set(program.graph_signature.user_inputs))
    arena = plan_arena(lives.tensors, lives.n_steps)
    t2 = time.perf_counter()
    source = getattr(model, "source", None)
    note = GGUF_NOTE if source is not None and source.kind == "gguf" and _all_float(model) else None
    return ModelPlan(
        getattr(model, "name", "model"), program, lives, arena, feed, t1 - t0, t2 - t1, note
    )


def _all_float(loaded: Any) -> bool:
    """Whether a loaded model holds no quantized weight (a GGUF loaded dequantized)."""
    from memopt.weights import QuantizedWeight

    return not any(isinstance(m, QuantizedWeight) for m in loaded.model.modules())


def write_plan_png(plan: ModelPlan | ArenaPlan, path: str | Path, title: str | None = None) -> Path:
    """Draw the plan: each tensor a rectangle, x = its lifetime (steps), y = its bytes in the arena.

    Written to a temporary file beside ``path`` and renamed, so no half-written PNG is left.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    arena = plan.arena if isinstance(plan, ModelPlan) else plan
    name = plan.name if isinstance(plan, ModelPlan) else "plan"
    mib = 1 << 20
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    rects = [
        Rectangle((t.first, o / mib), t.last - t.first + 1, t.size / mib)
        for t, o in zip(arena.tensors, arena.offsets, strict=True)
    ]
    cmap = plt.get_cmap("tab20")
    colors = [cmap(i % 20) for i in range(len(rects))]
    ax.add_collection(PatchCollection(rects, facecolor=colors, edgecolor="black", linewidth=0.2))
    ax.axhline(arena.arena_bytes / mib, color="black", linewidth=1, label="arena")
    ax.axhline(
        arena.lower_bound_bytes / mib,
        color="red",
        linestyle="--",
        linewidth=1,
        label="lower bound (max live bytes)",
    )
    ax.set_xlim(0, max(arena.n_steps, 1))
    ax.set_ylim(0, max(arena.arena_bytes, 1) / mib * 1.08)
    ax.set_xlabel("step (op in execution order)")
    ax.set_ylabel("offset in arena (MiB)")
    ax.set_title(
        title
        or (
            f"{name}: arena {arena.arena_bytes / mib:.2f} MiB, lower bound "
            f"{arena.lower_bound_bytes / mib:.2f} MiB, naive {arena.naive_bytes / mib:.1f} MiB "
            f"({arena.strategy})"
        )
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, format="png")
