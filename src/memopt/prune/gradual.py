"""Gradual magnitude pruning while training (what ``tfmot.sparsity.keras.prune_low_magnitude`` does),
ending in weights that are really smaller.

    pruner = prune_low_magnitude(model, PolynomialDecay(0.0, 0.8, begin_step=0, end_step=300))
    for batch in data:
        loss.backward(); opt.step(); pruner.step()
    report = pruner.strip()          # masks removed, weights stored sparse: bytes go down

Sparsity follows the polynomial decay of Zhu & Gupta (2017):
``s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** power`` for t in [t_0, t_1], updated
every ``frequency`` steps (and at t_1). At each update every selected weight keeps its largest
``1 - s(t)`` by magnitude (weights already pruned are zero, so they stay pruned). Between updates a
gradient hook zeroes the gradient of pruned weights, and ``step()`` re-applies the mask after the
optimizer, because momentum and weight decay move a weight even when its gradient is zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes, selector
from memopt.prune.api import PruneReport, _w2d, compact_, prunable
from memopt.prune.masks import global_masks, layer_mask

__all__ = ["GradualPruner", "PolynomialDecay", "prune_low_magnitude"]


@dataclass(frozen=True)
class PolynomialDecay:
    """Sparsity from ``initial_sparsity`` at ``begin_step`` to ``final_sparsity`` at ``end_step``."""

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    begin_step: int = 0
    end_step: int = 1000
    power: float = 3.0
    frequency: int = 100

    def __post_init__(self) -> None:
        for name in ("initial_sparsity", "final_sparsity"):
            s = getattr(self, name)
            if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0):
                raise MemoptError(f"PolynomialDecay: {name} must be in [0, 1), got {s!r}")
        if not (0 <= self.begin_step < self.end_step):
            raise MemoptError(
                f"PolynomialDecay: need 0 <= begin_step < end_step, got "
                f"{self.begin_step}, {self.end_step}"
            )
        if not (isinstance(self.frequency, int) and self.frequency >= 1):
            raise MemoptError(f"PolynomialDecay: frequency must be >= 1, got {self.frequency!r}")
        if self.power <= 0:
            raise MemoptError(f"PolynomialDecay: power must be > 0, got {self.power!r}")

    def __call__(self, step: int) -> float:
        """The target sparsity at ``step`` (constant before begin and after end)."""
        t = min(max(step, self.begin_step), self.end_step)
        frac = (t - self.begin_step) / (self.end_step - self.begin_step)
        si, sf = self.initial_sparsity, self.final_sparsity
        return sf + (si - sf) * (1.0 - frac) ** self.power

    def should_update(self, step: int) -> bool:
        """Masks change at ``begin_step``, every ``frequency`` steps after it, and at ``end_step``."""
        if step < self.begin_step or step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def to_dict(self) -> dict[str, Any]:
        return {"type": "PolynomialDecay", **asdict(self)}


class GradualPruner:
    """Holds the masks of the selected weights and applies the schedule; see the module docstring.

    ``step()`` is called once per optimizer step, after it. Masks are bool tensors of the weights'
    shapes (one byte an element, training-time only; ``strip()`` drops them).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: PolynomialDecay,
        *,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        filter_fn: Callable[[str, nn.Module], bool] | None = None,
        scope: str = "layer",
    ) -> None:
        if scope not in ("layer", "global"):
            raise MemoptError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.model, self.schedule, self.scope = model, schedule, scope
        self.report = PruneReport(
            {"type": "GradualMagnitude", "scope": scope, "schedule": schedule.to_dict()},
            model_bytes(model),
        )
        self.targets = prunable(model, selector(include, exclude, filter_fn), self.report)
        if not self.targets:
            raise MemoptError("prune_low_magnitude: no Linear / Conv module selected")
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in self.targets
        }
        self.global_step = 0
        self.current_sparsity = 0.0
        self._hooks = [
            m.weight.register_hook(self._grad_hook(n)) for n, m in self.targets
        ]  # the gradient of a pruned weight is zero before any optimizer sees it
        self._update(0)

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.masks[name].to(grad.dtype)

        return hook

    @torch.no_grad()
    def _update(self, step: int) -> None:
        if not self.schedule.should_update(step):
            return
        s = self.schedule(step)
        scores = [_w2d(m).abs() for _, m in self.targets]
        if self.scope == "global":
            masks = global_masks(scores, s)
        else:
            masks = [layer_mask(sc, s) for sc in scores]
        for (name, m), keep in zip(self.targets, masks, strict=True):
            self.masks[name] = keep.view(m.weight.shape)
        self.current_sparsity = s
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, m in self.targets:
            m.weight.mul_(self.masks[name].to(m.weight.dtype))

    def step(self) -> None:
        """After ``optimizer.step()``: re-zero pruned weights, advance, update masks on schedule."""
        self.apply_masks()
        self.global_step += 1
        self._update(self.global_step)

    def sparsity(self) -> float:
        """Measured zeros / elements over the pruned weights."""
        zeros = sum(int((m.weight == 0).sum()) for _, m in self.targets)
        total = sum(m.weight.numel() for _, m in self.targets)
        return zeros / total

    def state_dict(self) -> dict[str, Any]:
        """Step and masks (for a training checkpoint; masks as uint8 tensors)."""
        return {"global_step": self.global_step, "current_sparsity": self.current_sparsity,
                "masks": {n: k.to(torch.uint8) for n, k in self.masks.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.current_sparsity = float(state["current_sparsity"])
        for n, k in state["masks"].items():
            self.masks[n] = k.to(torch.bool)
        self.apply_masks()

    def strip(self, compact: bool = True, values: str = "float") -> PruneReport:
        """End training: remove the gradient hooks and masks, and (``compact``) store the pruned
        weights in their smallest form (memopt.prune.compact_: sparse, optionally int8/int4)."""
        self.apply_masks()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        names = [n for n, _ in self.targets]
        rep = self.report
        rep.modules = names
        rep.params_before = sum(m.weight.numel() for _, m in self.targets)
        rep.sparsity = self.sparsity()
        rep.params_after = round(rep.params_before * (1 - rep.sparsity))
        self.masks = {}
        if compact:
            compact_(self.model, values=values, names=names, report=rep)
        rep.bytes_after = model_bytes(self.model)
        return rep


def prune_low_magnitude(
    model: nn.Module,
    schedule: PolynomialDecay,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    scope: str = "layer",
) -> GradualPruner:
    """Start gradual magnitude pruning of ``model``'s Linear / Conv weights (masks applied at once
    for the schedule's step 0); call ``.step()`` after every optimizer step and ``.strip()`` at the
    end."""
    return GradualPruner(
        model, schedule, include=include, exclude=exclude, filter_fn=filter_fn, scope=scope
    )
