"""Upper bounds on a model's sizes, as any format states them (config.json, GGUF metadata).

Far above any published model, low enough that the meta model (one Python object per module) and
an estimate stay small and quick: a file over them is refused before anything is built from it
(a config of 10^9 layers would otherwise take minutes and gigabytes to build on the meta device).
"""

from __future__ import annotations

__all__ = ["MAX_HEADS", "MAX_LAYERS", "MAX_POSITIONS", "MAX_VOCAB", "MAX_WIDTH"]

MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # hidden size, intermediate size, head dimension
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 27
