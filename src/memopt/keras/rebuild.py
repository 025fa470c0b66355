"""Rebuild a Keras model with some layers replaced: the config rewritten, the weights carried over.

Keras models are rebuilt from their config (``serialize_keras_object``), not edited in place: a
model keeps references to its old variables where an edit does not reach them (a Sequential's
``_functional._torch_params`` keeps every float kernel that Keras's own ``quantize`` replaced).
A rebuilt model holds only what its layers hold. Layers are found in the config by name (Keras
names are unique within a model; a Bidirectional's LSTMs are ``forward_lstm`` / ``backward_lstm``
both as objects and in its config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.keras.backend import keras_module
from memopt.weights import QuantizedWeight

keras = keras_module()

__all__ = [
    "Replacement",
    "layers_of",
    "live_parameter_bytes",
    "rebuild",
    "restore_initializers",
    "zero_initializers",
]


@dataclass
class Replacement:
    """A layer's replacement: the new (unbuilt) layer, its stored weights, its float variables."""

    layer: Any
    stored: dict[str, QuantizedWeight] = field(default_factory=dict)
    floats: dict[str, torch.Tensor] = field(default_factory=dict)  # variable name -> value


def layers_of(model: Any) -> list[Any]:
    """Every layer inside ``model`` (nested ones included), each once, in Keras's order."""
    out, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def live_parameter_bytes(model: Any) -> int:
    """Bytes of every tensor torch sees as the model's parameter (``_torch_params`` included)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        s = p.untyped_storage()
        if id(s) not in seen:
            seen.add(id(s))
            total += s.nbytes()
    return total


def zero_initializers(config: Any) -> Any:
    """``config`` with every initializer ``zeros``: a rebuilt model's values are assigned after
    its build (initializing them is wasted work, and an LSTM's orthogonal initializer needs a QR
    decomposition, which PyTorch has no bfloat16 CPU kernel for)."""
    if isinstance(config, list):
        return [zero_initializers(c) for c in config]
    if not isinstance(config, dict):
        return config
    return {
        k: "zeros" if k.endswith("_initializer") and v is not None else zero_initializers(v)
        for k, v in config.items()
    }


def restore_initializers(old: Any, new: Any) -> None:
    """The initializers of ``old``'s layers on ``new``'s layers of the same name, so that the
    rebuilt model's config is the user's (see :func:`zero_initializers`)."""
    olds = {layer.name: layer for layer in layers_of(old)}
    for layer in layers_of(new):
        src = olds.get(layer.name)
        if src is None or type(src) is not type(layer):
            continue
        for attr, value in vars(src).items():
            if attr.endswith("_initializer") and hasattr(layer, attr):
                setattr(layer, attr, value)


def _rewrite(node: Any, entries: dict[str, dict[str, Any]]) -> Any:
    if isinstance(node, list):
        return [_rewrite(n, entries) for n in node]
    if not isinstance(node, dict):
        return node
    if "class_name" in node and isinstance(node.get("config"), dict):
        name = node["config"].get("name")
        if name in entries:
            # the new layer's class and config; the node's place in the model (a Functional's
            # "name" and "inbound_nodes", the "build_config") stays
            entry = entries[name]
            new = dict(node)
            for key in ("module", "class_name", "config", "registered_name"):
                if key in entry:
                    new[key] = entry[key]
            return new
    return {k: _rewrite(v, entries) for k, v in node.items()}


def rebuild(model: Any, plan: dict[str, Replacement]) -> Any:
    """A new model: ``model`` with the layers named in ``plan`` replaced, every other variable
    copied from ``model`` (by its path), compiled alike (its optimizer not built)."""
    names = [layer.name for layer in layers_of(model)]
    dup = {n for n in names if names.count(n) > 1 and n in plan}
    if dup:
        raise MemoptError(f"layer names are not unique in the model: {sorted(dup)}")
    config = keras.saving.serialize_keras_object(model)
    compile_config = config.pop("compile_config", None)
    entries = {n: keras.saving.serialize_keras_object(r.layer) for n, r in plan.items()}
    new = keras.saving.deserialize_keras_object(zero_initializers(_rewrite(config, entries)))
    restore_initializers(model, new)
    by_name = {layer.name: layer for layer in layers_of(new)}
    owned: set[int] = set()
    with torch.no_grad():
        for name, rep in plan.items():
            layer = by_name.get(name)
            if layer is None or not layer.built:
                raise MemoptError(f"layer {name!r} was not rebuilt (is the model built?)")
            for wname, qw in rep.stored.items():
                layer.set_stored(wname, qw)
            own = {v.name: v for v in layer.variables}
            for vname, value in rep.floats.items():
                own[vname].value.copy_(value)
            owned.update(id(v) for v in layer.variables)
        # the other variables, in the models' order (paths differ: a rebuilt model's layers are
        # built outside the scope that named the original's)
        replaced = {
            id(v) for layer in layers_of(model) if layer.name in plan for v in layer.variables
        }
        sources = [v for v in model.variables if id(v) not in replaced]
        targets = [v for v in new.variables if id(v) not in owned]
        if len(sources) != len(targets):
            raise MemoptError(
                f"the rebuilt model has {len(targets)} other variables, the original {len(sources)}"
            )
        for src, v in zip(sources, targets, strict=True):
            if tuple(src.shape) != tuple(v.shape):
                raise MemoptError(f"variable {v.path}: shape {v.shape}, its source {src.shape}")
            v.value.copy_(src.value)
    if compile_config:  # an uncompiled model's is {}: compile() would add RMSprop's variables
        new.compile(**keras.saving.deserialize_keras_object(compile_config))
    return new
