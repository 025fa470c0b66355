"""memopt.quant: lower-precision weights with real byte savings, fast on CPU.

``quantize_(model, Int4WeightOnly(group_size=64))`` replaces covered modules (Linear, Embedding,
Conv1d/2d, transformers' Conv1D) in place and returns a :class:`QuantReport` of measured bytes.
"""

from memopt.quant.api import QuantReport, model_bytes, quantize_
from memopt.quant.config import (
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    QuantConfig,
    register,
)
from memopt.quant.modules import (
    Int4Weight,
    Int8Weight,
    IntNWeight,
    QConv,
    QEmbedding,
    QLinear,
    QuantizedWeight,
)
from memopt.quant.primitives import choose_qparams, dequantize, pack, quantize, sqnr, unpack

__all__ = [
    "Cast",
    "Int4Weight",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8Weight",
    "Int8WeightOnly",
    "IntNWeight",
    "IntNWeightOnly",
    "QConv",
    "QEmbedding",
    "QLinear",
    "QuantConfig",
    "QuantReport",
    "QuantizedWeight",
    "choose_qparams",
    "dequantize",
    "model_bytes",
    "pack",
    "quantize",
    "quantize_",
    "register",
    "sqnr",
    "unpack",
]
