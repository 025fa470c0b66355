"""Casts that Keras agrees with: a Keras model rebuilt with every float dtype policy changed.

Changing a Keras model's dtype on the torch side (``model.to(torch.float32)`` or casting the
parameters) leaves Keras believing its variables are still float64: its layers compute in their
policy's dtype, its optimizer builds float64 moments and ``model.save`` writes float64. Here the
model's config (``serialize_keras_object``, nested layers included: a Bidirectional's two LSTMs
carry their own policies) has every float policy replaced, the model is rebuilt from it, and each
variable is assigned its old value cast (torch ``copy_`` converts). A compiled model is compiled
alike, and a built optimizer's state (Adam's moments) is cast into the new optimizer's variables,
so training goes on where it was. The old model is not changed; drop it to free its bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.keras.backend import keras_module
from memopt.keras.rebuild import restore_initializers, zero_initializers

keras = keras_module()

__all__ = ["FLOAT_DTYPES", "cast", "variable_bytes"]

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
# policies that a cast replaces (the mixed ones compute in 16 bits with float32 variables)
_FLOAT_POLICIES = (*FLOAT_DTYPES, "mixed_float16", "mixed_bfloat16")


def variable_bytes(variables: Any) -> int:
    """Exact bytes of Keras variables' torch tensors (each storage once)."""
    seen: set[int] = set()
    total = 0
    for v in variables:
        t = v.value if hasattr(v, "value") else v
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total


def _recast(config: Any, dtype: str) -> Any:
    """``config`` with every float dtype policy (and float input dtype) set to ``dtype``."""
    if isinstance(config, list):
        return [_recast(c, dtype) for c in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key == "dtype" and isinstance(value, str) and value in _FLOAT_POLICIES:
            out[key] = dtype
        elif (
            key == "dtype"
            and isinstance(value, dict)
            and value.get("class_name") == "DTypePolicy"
            and value.get("config", {}).get("name") in _FLOAT_POLICIES
        ):
            out[key] = {**value, "config": {**value["config"], "name": dtype}}
        else:
            out[key] = _recast(value, dtype)
    return out


def cast(model: Any, dtype: str) -> Any:
    """A new Keras model equal to ``model`` with its float variables, computations and optimizer
    state in ``dtype`` (float64, float32, float16 or bfloat16)."""
    if dtype not in FLOAT_DTYPES:
        raise MemoptError(f"cast to one of {', '.join(FLOAT_DTYPES)}, not {dtype!r}")
    if not isinstance(model, keras.Model):
        raise MemoptError(f"memopt.keras.casting takes a keras.Model, not {type(model).__name__}")
    config = keras.saving.serialize_keras_object(model)
    compile_config = config.pop("compile_config", None)
    new = keras.saving.deserialize_keras_object(zero_initializers(_recast(config, dtype)))
    restore_initializers(model, new)
    if len(new.variables) != len(model.variables):
        raise MemoptError(
            f"the rebuilt model has {len(new.variables)} variables, the original "
            f"{len(model.variables)}: build the model (keras.Input or one call) before casting"
        )
    with torch.no_grad():
        for old_v, new_v in zip(model.variables, new.variables, strict=True):
            if tuple(old_v.shape) != tuple(new_v.shape):
                raise MemoptError(f"variable {old_v.path}: shape {old_v.shape} != {new_v.shape}")
            new_v.value.copy_(old_v.value)  # converts the dtype; no intermediate copy
    if compile_config is not None:
        new.compile_from_config(_recast(compile_config, dtype))
        old_opt = model.optimizer
        if old_opt is not None and old_opt.built:
            new.optimizer.build(new.trainable_variables)
            with torch.no_grad():
                for old_v, new_v in zip(old_opt.variables, new.optimizer.variables, strict=True):
                    new_v.value.copy_(old_v.value)
    return new
