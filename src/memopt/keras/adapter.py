"""The Keras front end's adapter for the measurement layer (see :mod:`memopt.core.frontends`).

Keras layers on the torch backend are ``nn.Module`` objects, but Keras does not register them as
torch submodules (their variables reach torch through each layer's ``_torch_params``), so
``named_modules()`` of a Keras model shows only its root. Here every layer is named by its Keras
path relative to the model (``bidirectional/forward_lstm``), and the compiled optimizer's variables
(Adam's moments, its iteration counter) are the ``optimizer`` category.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["estimate", "layer_name", "named_layers", "optimizer_tensors", "profile"]


def layer_name(model: Any, layer: Any) -> str:
    """``layer``'s Keras path relative to ``model`` ("" for the model itself)."""
    if layer is model:
        return ""
    root = f"{model.path}/" if getattr(model, "path", "") else ""
    path = getattr(layer, "path", None) or layer.name
    return path[len(root) :] if root and path.startswith(root) else path


def named_layers(model: Any) -> list[tuple[str, nn.Module]]:
    """Every layer of ``model``, nested ones included (a Bidirectional's LSTMs), root "" first."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if id(layer) in seen or not isinstance(layer, nn.Module):
            continue
        seen.add(id(layer))
        out.append((layer_name(model, layer), layer))
    return out


def optimizer_tensors(model: Any) -> list[torch.Tensor]:
    """The torch tensors of the compiled optimizer's variables (empty before it is built)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return []
    out = []
    for v in getattr(optimizer, "variables", []):
        value = getattr(v, "_value", None)  # None while the variable is not initialised
        if isinstance(value, torch.Tensor):
            out.append(value)
    return out


def estimate(model: Any, spec: Any = None) -> Any:
    from memopt.keras.measure import estimate as run

    return run(model, spec)


def profile(model: Any, spec: Any = None) -> Any:
    from memopt.keras.measure import profile as run

    return run(model, spec)
