"""Activation checkpointing chosen to fit a memory budget (the mechanism: memopt.step.checkpoint).

:func:`choose_checkpointing` picks how many to checkpoint so that the
estimated peak of a training step fits a budget: it estimates the step with no block and with every
block checkpointed (two meta-device runs, no weights read), assumes the saving is the same for each
block (transformer blocks are identical), asks for ``k = ceil((peak_none − budget) / saving_per_block)``
blocks and verifies ``k`` with a third estimate, adding blocks until the estimate fits.

The first ``k`` blocks are the ones checkpointed: any ``k`` blocks save the same bytes at the peak
(the start of the backward, when every block's activations are alive), but the first blocks are
recomputed last in the backward, when the later blocks' activations are already freed, so their
recomputation adds the least to the memory of the moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.modules import find_blocks
from memopt.measure.estimate import estimate
from memopt.models import LoadedModel, build_meta
from memopt.step.step import StepSpec

__all__ = ["CheckpointChoice", "choose_checkpointing"]


@dataclass
class CheckpointChoice:
    """Which blocks to checkpoint for a budget, and the estimates that led there."""

    blocks: list[int]  # indices into the largest block list, the first k
    n_blocks: int
    budget_bytes: int
    peak_bytes: int  # estimated peak with ``blocks`` checkpointed (verified)
    peak_none_bytes: int  # estimated peak with no block checkpointed
    peak_all_bytes: int  # estimated peak with every block checkpointed
    estimates: int = 0  # how many estimates were run
    tried: list[dict[str, int]] = field(default_factory=list)  # (k, peak) of each verification

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "n_blocks": self.n_blocks,
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_none_bytes": self.peak_none_bytes,
            "peak_all_bytes": self.peak_all_bytes,
            "estimates": self.estimates,
            "tried": self.tried,
        }


def choose_checkpointing(
    model: str | Path | LoadedModel, spec: StepSpec, budget_bytes: int
) -> CheckpointChoice:
    """The fewest leading blocks to checkpoint so that ``estimate(model, spec)`` fits the budget.

    ``spec`` is a training step (its own checkpointing fields are ignored). Fails with
    :class:`MemoptError` when even checkpointing every block does not fit, naming that peak.
    """
    if spec.task != "train":
        raise MemoptError("choosing blocks to checkpoint needs a training step (task='train')")
    if budget_bytes <= 0:
        raise MemoptError(f"the memory budget must be positive, got {budget_bytes}")
    meta = model if isinstance(model, LoadedModel) else build_meta(model, dequantize=True)
    found = find_blocks(meta.model)
    if found is None:
        raise MemoptError(f"{meta.name}: no nn.ModuleList of blocks to checkpoint")
    n = len(found[1])

    def peak(k: int) -> int:
        s = replace(spec, checkpointing=k > 0, checkpoint_blocks=list(range(k)) if k else None)
        return estimate(model, s).peak_bytes

    none, every = peak(0), peak(n)
    count = 2
    tried: list[dict[str, int]] = []
    if none <= budget_bytes:
        return CheckpointChoice([], n, budget_bytes, none, none, every, count, tried)
    if every > budget_bytes:
        raise MemoptError(
            f"{meta.name}: even with every block checkpointed the step needs an estimated "
            f"{every:,} bytes, over the budget of {budget_bytes:,}"
        )
    per_block = max(1.0, (none - every) / n)  # saving per checkpointed block, bytes
    k = min(n, max(1, math.ceil((none - budget_bytes) / per_block)))
    while True:
        got = every if k == n else peak(k)
        count += k != n
        tried.append({"k": k, "peak_bytes": got})
        if got <= budget_bytes or k == n:
            break
        k += 1  # the interpolation was optimistic: one more block, verified again
    return CheckpointChoice(list(range(k)), n, budget_bytes, got, none, every, count, tried)
