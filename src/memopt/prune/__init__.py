"""memopt.prune: pruning with real byte savings, gradual pruning while training.

``prune_(model, Wanda(0.5), calib=ids)`` zeros weights and stores them sparse (bitmask + packed
values, optionally int8/int4), returning a :class:`PruneReport` of measured bytes;
``Structured`` removes neurons/heads/channels for a smaller dense model; ``prune_low_magnitude``
prunes gradually while training and ``strip()`` makes it compact.
"""

from memopt.prune.api import (
    PruneReport,
    calibration_ids,
    compact_,
    prunable,
    prune_,
    sparsity_of,
)
from memopt.prune.config import (
    METHODS,
    NM,
    Magnitude,
    PruneConfig,
    SparseGPT,
    Structured,
    Wanda,
    config_for_method,
)
from memopt.prune.gradual import GradualPruner, PolynomialDecay, prune_low_magnitude
from memopt.prune.model import prune_model
from memopt.weights.sparse import SparseWeight, sparse_nbytes

__all__ = [
    "METHODS",
    "NM",
    "GradualPruner",
    "Magnitude",
    "PolynomialDecay",
    "PruneConfig",
    "PruneReport",
    "SparseGPT",
    "SparseWeight",
    "Structured",
    "Wanda",
    "calibration_ids",
    "compact_",
    "config_for_method",
    "prunable",
    "prune_",
    "prune_low_magnitude",
    "prune_model",
    "sparse_nbytes",
    "sparsity_of",
]
