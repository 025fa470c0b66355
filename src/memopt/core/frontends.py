"""Model front ends that are not plain PyTorch (Keras 3 on its torch backend): where their adapter lives.

A Keras model on the torch backend is an ``nn.Module``, but its layers are not registered as torch
submodules, its optimizer is not a ``torch.optim.Optimizer`` and its weights are built by Keras.
The measurement layer (tracker, estimate, profile) asks :func:`adapter_for` whether an object
belongs to a front end; the front end's package (above the measurement layer) implements the
adapter. Lookup is by the front end's own base class, and only when its library is already imported
(``sys.modules``): a plain PyTorch model never pays for it, and nothing here imports Keras.

An adapter module provides:

- ``named_layers(model) -> list[tuple[str, nn.Module]]``: every layer by its path, root "" first;
- ``optimizer_tensors(model) -> list[torch.Tensor]``: the optimizer's state (counted as
  ``optimizer``);
- ``estimate(model, spec)`` / ``profile(model, spec)``: a ``MemoryReport``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

__all__ = ["FRONTENDS", "adapter_for"]

# library (as imported), its base class of every model and layer, the module implementing the adapter
FRONTENDS: tuple[tuple[str, str, str], ...] = (("keras", "Layer", "memopt.keras.adapter"),)


def adapter_for(obj: Any) -> ModuleType | None:
    """The adapter module of ``obj``'s front end, or None for anything else (plain PyTorch)."""
    for library, base_name, home in FRONTENDS:
        lib = sys.modules.get(library)
        base = getattr(lib, base_name, None) if lib is not None else None
        if isinstance(base, type) and isinstance(obj, base):
            return importlib.import_module(home)
    return None
