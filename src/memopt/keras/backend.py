"""Keras 3 on its torch backend: the one place memopt imports Keras.

Keras reads ``KERAS_BACKEND`` once, at its first import, so it is set here before that import; a
Keras already imported with another backend cannot be switched, and that is an error that says so
(memopt's layers run PyTorch kernels on the variables' torch tensors).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from memopt.core.errors import MemoptError

__all__ = ["keras_module"]


def keras_module() -> ModuleType:
    """``keras``, imported on the torch backend (``KERAS_BACKEND=torch`` set first if unset)."""
    if "keras" not in sys.modules:
        wanted = os.environ.get("KERAS_BACKEND")
        if wanted not in (None, "", "torch"):
            raise MemoptError(
                f"memopt.keras runs Keras on its torch backend, but KERAS_BACKEND={wanted!r}; "
                "unset it or set KERAS_BACKEND=torch before importing keras"
            )
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as exc:  # the optional extra is missing
        raise MemoptError("memopt.keras needs Keras 3: pip install 'memopt[keras]'") from exc
    backend = keras.backend.backend()
    if backend != "torch":
        raise MemoptError(
            f"keras was imported with the {backend!r} backend before memopt.keras; memopt needs "
            "the torch backend: set KERAS_BACKEND=torch before the first `import keras`"
        )
    return keras
