"""memopt.quant: lower-precision weights with real byte savings, fast on CPU.

``quantize_(model, Int4WeightOnly(group_size=64))`` replaces covered modules (Linear, Embedding,
Conv1d/2d, transformers' Conv1D) in place and returns a :class:`QuantReport` of measured bytes;
``quantize_model`` (memopt.quant.stream) does the same from a file to a folder without holding the
float model. ``Mixed(((pattern, config), ...), default)`` gives each module the format of the first
rule that matches its name (a per-layer precision plan), in both. The weight kinds themselves live
in memopt.weights.
"""

from memopt.quant.api import QuantReport, quantize_
from memopt.quant.config import (
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    Mixed,
    QuantConfig,
    register,
)

__all__ = [
    "Cast",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8WeightOnly",
    "IntNWeightOnly",
    "Mixed",
    "QuantConfig",
    "QuantReport",
    "quantize_",
    "register",
]
