"""Keras's Adam / AdamW update written in place by torch's fused kernel: no temporaries per step.

On the torch backend, Keras's Adam updates its variables with ``torch._foreach_*`` calls that
allocate a new list of tensors at each stage (``g * g``, ``m * alpha``, ``sqrt(v)``,
``sqrt(v) + eps``, the quotient: five tensors of every weight's size, every step) and a dozen
scalar tensors (the bias corrections). Counted on the brief's case-1 CNN, 44 of the 171 allocator
calls of a ``train_step`` (``examples/brief/case1_keras.py``).

:func:`in_place_adam` makes the compiled optimizer call ``torch._fused_adam_`` instead: one kernel
that reads the gradient and writes the weight and both moments in place, in Keras's own variables
(the optimizer's state stays Keras's: saved, loaded and counted as before). Its only state is one
preallocated step-count tensor, filled in place. Everything else of ``optimizer.apply`` stays
Keras's (gradient clipping, decoupled weight decay, loss scaling, EMA, accumulation, the
iteration counter), since only ``_parallel_update_step`` is replaced, on this optimizer instance.

The update is Keras's, not PyTorch's: Keras adds epsilon to ``sqrt(v)`` before the bias
correction of ``v`` (``alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)``, ``w -= alpha * m / (sqrt(v) +
eps)``), PyTorch after it (``w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``), so the
kernel is given ``eps / sqrt(1 - b2^t)``: the same function, rounded in another order
(tests/keras/test_keras_memory.py compares 20 steps of both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.keras.backend import keras_module

keras = keras_module()

__all__ = ["InPlaceAdam", "in_place_adam"]


@dataclass
class InPlaceAdam:
    optimizer: Any  # the Keras optimizer now updating in place
    amsgrad: bool


def _keras_adam_update() -> Any:
    from keras.src.backend.torch.optimizers.torch_adam import Adam

    return Adam._parallel_update_step


def in_place_adam(model_or_optimizer: Any) -> InPlaceAdam:
    """Make a compiled Keras model's Adam (or AdamW) update its variables in place with torch's
    fused kernel (see the module doc). Idempotent; the optimizer need not be built yet."""
    opt = model_or_optimizer
    if isinstance(opt, keras.Model):
        opt = getattr(opt, "optimizer", None)  # an uncompiled model has no such attribute
    if opt is None:
        raise MemoptError("in_place_adam: compile the model (an optimizer) first")
    if not isinstance(opt, keras.optimizers.Adam):
        raise MemoptError(f"in_place_adam takes Keras's Adam or AdamW, not {type(opt).__name__}")
    if getattr(type(opt), "_parallel_update_step", None) is not _keras_adam_update():
        raise MemoptError(
            f"{type(opt).__name__} replaces Adam's update step: not Keras's Adam, left as it is"
        )
    if callable(opt.beta_1) or callable(opt.beta_2) or callable(opt.epsilon):
        raise MemoptError("in_place_adam: beta_1, beta_2 and epsilon must be numbers")
    step = torch.zeros((), dtype=torch.float32)  # t, filled in place each step; read by the kernel

    def update(grads: list[Any], variables: list[Any], learning_rate: Any) -> None:
        if not variables:
            return
        index = [opt._get_variable_index(v) for v in variables]
        params = [v.value for v in variables]
        m = [opt._momentums[i].value for i in index]
        v = [opt._velocities[i].value for i in index]
        v_hat = [opt._velocity_hats[i].value for i in index] if opt.amsgrad else []
        t = int(opt._iterations.value) + 1  # Keras's local step
        step.fill_(t)
        lr = learning_rate.value if hasattr(learning_rate, "value") else learning_rate
        b1, b2 = float(opt.beta_1), float(opt.beta_2)
        eps = float(opt.epsilon) / math.sqrt(1.0 - b2**t)  # Keras's epsilon, before correction
        torch._fused_adam_(
            params,
            list(grads),
            m,
            v,
            v_hat,
            [step] * len(params),
            lr=float(lr),
            beta1=b1,
            beta2=b2,
            weight_decay=0.0,  # Keras applies its own (decoupled) weight decay before this
            eps=eps,
            amsgrad=bool(opt.amsgrad),
            maximize=False,
        )

    opt._parallel_update_step = update
    return InPlaceAdam(opt, bool(opt.amsgrad))
