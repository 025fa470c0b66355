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
    "FitMarker": "memopt.keras.measure",
    "estimate": "memopt.keras.measure",
    "profile": "memopt.keras.measure",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'memopt.keras' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
