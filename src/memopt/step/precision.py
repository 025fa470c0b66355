"""Mixed precision: 16-bit weights and gradients, float32 master weights, loss scaling for float16.

The model holds bfloat16 or float16 parameters, so its forward, backward, activations and gradients
are 16-bit (2 bytes per parameter for the weights and 2 for the gradients, instead of 4 + 4). An
update of ``lr · m / √v`` is often below a 16-bit weight's resolution (bfloat16 keeps 8 significant
bits: an update smaller than 2⁻⁹ of the weight is lost), so the optimizer updates float32 *master*
copies and the model's 16-bit weights are rounded from them after each step (Micikevicius et al.
2018). Memory per parameter: 2 (weights) + 2 (grads) + 4 (master) + the optimizer's state.

:class:`MasterWeights` runs the optimizer one parameter at a time: it converts one 16-bit gradient
to float32, steps that master, copies it back into the 16-bit weight and drops both gradients before
the next, so the float32 gradient temporary is one parameter's, never the model's.

Why masters rather than stochastic rounding of the update into the 16-bit weights (which needs no
master copy): with checkpointing and the chunked LM loss (:mod:`memopt.step.loss`), AdamW8bit
with bfloat16 + masters already meets the training-memory target against plain float32 AdamW.
Without masters (the update rounded to nearest into bfloat16) the peak is lower but small updates
are lost: the training and, more so, the held-out loss fall behind plain AdamW's, where with
masters they keep up (bench/train.py; the README's training-step table). Stochastic rounding
would make that update unbiased without a master copy; with the target met, the exact update was
kept.

float16 has a narrow exponent range: small gradients underflow to zero. :class:`LossScaler` scales
the loss before the backward (so the gradients are scaled too), unscales the float32 gradients in
the step, skips the step and halves the scale when a gradient is not finite, and doubles the scale
after ``growth_interval`` clean steps. bfloat16 has float32's exponent range and needs no scaling.

``torch.autocast`` is the other route (float32 weights, 16-bit compute): :func:`autocast_context`
gives it for a device; the activations it saves are 16-bit, the weights and gradients stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LossScaler", "MasterWeights", "autocast_context"]


@dataclass
class LossScaler:
    """Dynamic loss scaling for float16 training (see the module docstring)."""

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    good_steps: int = 0
    skipped_steps: int = 0

    def update(self, finite: bool) -> None:
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.scale = max(1.0, self.scale * self.backoff_factor)
            self.good_steps = 0
            self.skipped_steps += 1

    def state(self) -> dict[str, float]:
        return {
            "scale": self.scale,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])


class MasterWeights:
    """Float32 master copies of a model's 16-bit parameters, stepped by an optimizer over them.

    ``masters[i]`` is a float32 leaf tensor for ``params[i]`` (same shape; a DTensor shard under
    FSDP2 stays a DTensor). Build the optimizer over :attr:`masters`, then call :meth:`step` after
    the backward instead of ``optimizer.step()``.
    """

    def __init__(self, params: list[torch.Tensor], scaler: LossScaler | None = None) -> None:
        self.params = params
        # detach().float() copies (the parameters are 16-bit), so masters share nothing
        self.masters = [p.detach().float().requires_grad_(True) for p in params]
        self.scaler = scaler

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step every master whose parameter has a gradient; returns False if a scaled float16
        gradient overflowed (the step is then skipped and the scale lowered)."""
        inv = 1.0 / self.scaler.scale if self.scaler is not None else 1.0
        if self.scaler is not None and not self._all_finite():
            for p in self.params:
                p.grad = None
            self.scaler.update(False)
            return False
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if p.grad is None:
                    continue
                m.grad = p.grad.float()  # (shape of p) float32: one parameter's temporary
                p.grad = None
                if inv != 1.0:
                    m.grad.mul_(inv)
                # torch optimizers skip parameters without a gradient: this steps m alone
                optimizer.step()
                m.grad = None
                p.copy_(m)  # round the updated master into the 16-bit weight
        if self.scaler is not None:
            self.scaler.update(True)
        return True

    def _all_finite(self) -> bool:
        flags = [torch.isfinite(p.grad).all() for p in self.params if p.grad is not None]
        if not flags or flags[0].device.type == "meta":
            return True  # an estimate has no data to check
        return bool(torch.stack([f.to("cpu") for f in flags]).all())

    def zero_grad(self) -> None:
        for m in self.masters:
            m.grad = None


def autocast_context(
    device: torch.device | str, dtype: torch.dtype | None
) -> AbstractContextManager:
    """``torch.autocast`` for ``device`` at ``dtype``, or a context that does nothing for None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def sixteen_bit(model: nn.Module) -> Iterator[torch.Tensor]:
    """The model's trainable 16-bit floating parameters."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            yield p
