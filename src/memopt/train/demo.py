"""The training row of ``memopt demo``: plain float32 AdamW against every memory option, measured.

A few seconds on SmolLM2: both trainers start from copies of one loaded model, run the same
``steps`` batches of token windows alternately (plain, optimized, plain, ...), so that load from
other processes falls on both alike, and report

- ``peak_bytes``: live tensor bytes at the peak of step 2 (:class:`~memopt.measure.tracker.
  MemoryTracker`; steady state: the optimizer state exists from step 1);
- ``step_s``: the fastest untracked step after the first (wall clock), and ``step_cpu_s``: the
  process CPU time of that step (all threads), steadier than wall time on a shared machine;
- ``loss``: the training loss of the last step (same batches for both).

The optimized option set is activation checkpointing + AdamW8bit + bfloat16 weights with float32
master weights. On this CPU (no native bfloat16) the optimized step is slower; the row says by
how much rather than hiding it.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from typing import Any

import torch

from memopt.measure.step import StepSpec
from memopt.models import LoadedModel

__all__ = ["OPTIMIZED", "demo_row"]

# The option set the demo compares against plain float32 AdamW.
OPTIMIZED: dict[str, Any] = dict(
    checkpointing=True, optimizer="adamw8bit", dtype="bfloat16", master_weights=True
)


def _batches(loaded: LoadedModel, n: int, batch: int, seq: int) -> list[torch.Tensor]:
    """``n`` (batch, seq) id tensors: pydoc_data.topics text when the model has a tokenizer."""
    from memopt.errors import MemoptError

    try:
        tok = loaded.tokenizer()  # cached on the LoadedModel once the demo has used it
    except (MemoptError, OSError, ValueError):
        tok = None
    vocab = int(loaded.vocab_size or 0)
    if tok is not None:
        import pydoc_data.topics

        text = "\n".join(list(pydoc_data.topics.topics.values())[:40])
        ids = tok(text, return_tensors="pt")["input_ids"][0]  # (n_tokens,)
        if ids.numel() >= n * batch * seq:
            return list(ids[: n * batch * seq].view(n, batch, seq))
    gen = torch.Generator().manual_seed(0)  # no tokenizer: fixed random ids
    return [torch.randint(0, max(vocab, 2), (batch, seq), generator=gen) for _ in range(n)]


def demo_row(
    model: str | Path | LoadedModel = "smollm2",
    *,
    batch: int = 1,
    seq: int = 128,
    steps: int = 3,
    lr: float = 1e-4,
) -> dict[str, Any]:
    """Measured training comparison for the demo table (see the module docstring).

    ``model``: a name or folder (loaded once here) or an already loaded causal LM (copied, not
    changed). Returns ``{"batch", "seq", "steps", "options", "plain": {...}, "optimized": {...},
    "peak_ratio", "time_ratio", "loss_rel_diff"}``; each side has ``peak_bytes``, ``step_s`` and
    ``loss``. ``steps`` ≥ 3 (warm-up, tracked step, timed steps).
    """
    from memopt.errors import MemoptError
    from memopt.measure.tracker import MemoryTracker
    from memopt.models import load_model
    from memopt.train.trainer import Trainer

    if steps < 3:
        raise MemoptError(f"the demo training row needs at least 3 steps, got {steps}")
    base = model if isinstance(model, LoadedModel) else load_model(model)
    if base.task != "causal-lm":
        raise MemoptError(f"{base.name}: the training row needs a causal language model")
    options = {"plain": {}, "optimized": OPTIMIZED}
    trainers = {}
    for side, opts in options.items():
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)  # the caller's model is not touched
        spec = StepSpec(task="train", batch=batch, seq=seq, **opts)
        trainers[side] = Trainer(loaded, spec, lr=lr)
        loaded.model.train()
    batches = _batches(base, steps, batch, seq)
    out: dict[str, Any] = {"batch": batch, "seq": seq, "steps": steps, "options": OPTIMIZED}
    times: dict[str, list[tuple[float, float]]] = {side: [] for side in options}  # (wall, cpu)
    peaks: dict[str, int] = {}
    losses: dict[str, float] = {}
    for i, ids in enumerate(batches):
        for side, trainer in trainers.items():
            gc.collect()
            micro = [{"input_ids": ids}]
            if i == 1:  # tracked: the optimizer state exists since step 0
                tracker = MemoryTracker(trainer.loaded.model, per_module=False, timeline=False)
                trainer.attach(tracker)
                with tracker:
                    losses[side] = float(trainer.step(micro))
                peaks[side] = tracker.peak_bytes
                continue
            t, c = time.perf_counter(), time.process_time()
            losses[side] = float(trainer.step(micro))
            if i >= 2:
                times[side].append((time.perf_counter() - t, time.process_time() - c))
    for side in options:
        wall, cpu = min(times[side])  # the least disturbed step
        out[side] = {
            "peak_bytes": peaks[side],
            "step_s": wall,
            "step_cpu_s": cpu,
            "loss": losses[side],
        }
    p, o = out["plain"], out["optimized"]
    out["peak_ratio"] = o["peak_bytes"] / p["peak_bytes"]
    out["time_ratio"] = o["step_s"] / p["step_s"]
    out["loss_rel_diff"] = (o["loss"] - p["loss"]) / p["loss"]
    return out
