"""Upper bounds on a model's sizes, as any format states them (config.json, GGUF metadata).

Far above any published model, low enough that the meta model (one Python object per module) and
an estimate stay small and quick: a file over them is refused before anything is built from it
(a config of 10^9 layers would otherwise take minutes and gigabytes to build on the meta device).
"""

from __future__ import annotations

import os

from memopt.core.units import parse_size

__all__ = [
    "BUILD_MEMORY",
    "MAX_HEADS",
    "MAX_LAYERS",
    "MAX_MODULES",
    "MAX_POSITIONS",
    "MAX_VOCAB",
    "MAX_WIDTH",
    "build_memory",
]

MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # hidden size, intermediate size, head dimension
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 27

# The build itself (memopt.core.memcap, around every meta build: estimate, load, quantize...): at
# most this many modules (a 4096-layer Llama has 53,255; Llama-3-405B 1,650) and at most this
# much resident memory over what the process held when the build began (measured, peak: a 70B
# Llama's build 157 MiB, first import of its transformers code included; a 4096-layer Llama's
# 303 MiB; the estimate's meta step after it, bounded through the module count, adds 11 MiB and
# 250 MiB).
MAX_MODULES = 1 << 16
BUILD_MEMORY = 2 << 30


def build_memory() -> int:
    """The build's memory limit in bytes: ``MEMOPT_BUILD_MEMORY`` (e.g. ``4GiB``) or BUILD_MEMORY."""
    text = os.environ.get("MEMOPT_BUILD_MEMORY")
    return BUILD_MEMORY if not text else parse_size(text)
