"""memopt.weights: every stored weight kind (int8, int4, int2/int3, sparse, cast, GGML blocks), the modules that
run them, the kernels and the quantization primitives. Importing the package registers every kind,
so that :func:`kind_of` finds any format a manifest names."""

from memopt.weights.cast import boundary_of, cast_modules_, set_boundary
from memopt.weights.ggml import GGMLWeight
from memopt.weights.modules import MODULE_KINDS, QConv, QEmbedding, QLinear, QModule
from memopt.weights.quantized import (
    Int4Weight,
    Int8Weight,
    IntNWeight,
    QuantizedWeight,
    disk_layout,
    disk_tensors,
    empty_weight,
    fill_weight,
    kind_of,
    weight_spec,
)
from memopt.weights.sparse import SparseWeight

__all__ = [
    "MODULE_KINDS",
    "GGMLWeight",
    "Int4Weight",
    "Int8Weight",
    "IntNWeight",
    "QConv",
    "QEmbedding",
    "QLinear",
    "QModule",
    "QuantizedWeight",
    "SparseWeight",
    "boundary_of",
    "cast_modules_",
    "disk_layout",
    "disk_tensors",
    "empty_weight",
    "fill_weight",
    "kind_of",
    "set_boundary",
    "weight_spec",
]
