"""memopt's Keras 3 front end (torch backend): measure, cast, quantize and prune Keras models.

Importing this package sets ``KERAS_BACKEND=torch`` before Keras is imported (an error if Keras is
already imported with another backend). Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from memopt.keras.backend import keras_module

keras_module()

_HOME = {
    # measurement (memopt.estimate / profile / MemoryTracker take a Keras model as well)
    "FitMarker": "memopt.keras.measure",
    "estimate": "memopt.keras.measure",
    "profile": "memopt.keras.measure",
    # data types
    "cast": "memopt.keras.casting",
    "variable_bytes": "memopt.keras.casting",
    "quantize": "memopt.keras.quantizing",
    "QuantizeReport": "memopt.keras.quantizing",
    # structure
    "PolynomialDecay": "memopt.keras.prune",
    "PruneDuringFit": "memopt.keras.prune",
    "prune_magnitude": "memopt.keras.prune",
    "sparsity_of": "memopt.keras.prune",
    "strip": "memopt.keras.prune",
    # allocation
    "set_memory_growth": "memopt.keras.memory",
    "in_place_adam": "memopt.keras.fused",
    # files and layers
    "load_keras": "memopt.keras.files",
    "live_parameter_bytes": "memopt.keras.rebuild",
    "QConv": "memopt.keras.layers",
    "QDense": "memopt.keras.layers",
    "QEmbedding": "memopt.keras.layers",
    "QGRU": "memopt.keras.layers",
    "QLSTM": "memopt.keras.layers",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'memopt.keras' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
