"""Pruning configs: frozen dataclasses, validated on construction, JSON round-trippable.

``prune_`` dispatches on ``type(config)`` through :data:`REGISTRY`, filled by ``@register``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from memopt.core.config import Config, Registry
from memopt.core.config import check as _check
from memopt.core.errors import MemoptError

__all__ = [
    "METHODS",
    "NM",
    "REGISTRY",
    "Magnitude",
    "PruneConfig",
    "SparseGPT",
    "Structured",
    "Wanda",
    "config_for_method",
    "register",
]

REGISTRY = Registry("pruning")  # config type -> handler
register = REGISTRY.register


def _check_sparsity(name: str, s: Any) -> None:
    _check(
        isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= float(s) < 1.0,
        f"{name}: sparsity must be a number in [0, 1), got {s!r}",
    )


@dataclass(frozen=True)
class PruneConfig(Config, family="pruning"):
    """Base of every pruning config. ``to_dict()`` / ``from_dict()`` carry it in JSON manifests."""

    needs_calibration: ClassVar[bool] = False


@dataclass(frozen=True)
class Magnitude(PruneConfig):
    """Zero the smallest ``|w|``: ``sparsity`` of each weight (``scope="layer"``) or of all the
    selected weights together (``"global"``: layers with smaller weights lose more)."""

    sparsity: float = 0.5
    scope: str = "layer"

    def __post_init__(self) -> None:
        _check_sparsity("Magnitude", self.sparsity)
        _check(
            self.scope in ("layer", "global"),
            f"Magnitude: scope must be 'layer' or 'global', got {self.scope!r}",
        )


@dataclass(frozen=True)
class Wanda(PruneConfig):
    """Activation-aware (Wanda, Sun et al. 2023): score ``|W_ij| * ||X_j||_2`` with ``X_j`` input
    feature j over calibration tokens; each output row loses ``sparsity`` of its weights (the
    paper's comparison group). Fast (one pass per block) but it only chooses a mask, with no
    compensation of the remaining weights: at 50 % on a small LM its perplexity is clearly worse
    than SparseGPT's (bench/prune.py; the README's pruning table), so :class:`SparseGPT` is the
    one to use at 50 % on small models."""

    needs_calibration: ClassVar[bool] = True
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        _check_sparsity("Wanda", self.sparsity)


@dataclass(frozen=True)
class SparseGPT(PruneConfig):
    """Calibrated with weight compensation (SparseGPT, Frantar & Alistarh 2023): each row loses
    ``sparsity`` of its weights and the kept ones are updated to cancel the pruning error on the
    calibration inputs (transformer blocks, one at a time; memopt.prune.calibrated)."""

    needs_calibration: ClassVar[bool] = True
    sparsity: float = 0.5
    # OWL's λ (memopt.prune.calibrated): blocks' sparsities spread over [s - λ, s + λ] by their
    # outlier ratio, mean s; 0: the same sparsity in every block
    owl: float = 0.0

    def __post_init__(self) -> None:
        _check_sparsity("SparseGPT", self.sparsity)
        _check(
            isinstance(self.owl, (int, float))
            and not isinstance(self.owl, bool)
            and 0.0 <= float(self.owl) <= min(self.sparsity, 1.0 - self.sparsity),
            f"SparseGPT: owl must be in [0, min(sparsity, 1 - sparsity)], got {self.owl!r}",
        )


@dataclass(frozen=True)
class NM(PruneConfig):
    """N:M semi-structured: in every group of ``m`` consecutive inputs of a row, keep ``n``.
    ``score="wanda"`` ranks with calibrated activations, ``"magnitude"`` with ``|w|``,
    ``"sparsegpt"`` chooses with SparseGPT's score and compensates the kept weights."""

    n: int = 2
    m: int = 4
    score: str = "wanda"

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
        _check(ok and 0 < self.n < self.m, f"NM: need integers 0 < n < m, got {self.n}:{self.m}")
        _check(
            self.score in ("wanda", "magnitude", "sparsegpt"),
            f"NM: score must be 'wanda', 'magnitude' or 'sparsegpt', got {self.score!r}",
        )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.score != "magnitude"


@dataclass(frozen=True)
class Structured(PruneConfig):
    """Remove whole FFN neurons, attention heads (``heads=True``) and conv channels, shrinking the
    tensors and the layer shapes (and the config): a smaller dense model. ``sparsity`` is the
    fraction of neurons / channels removed in each layer (heads: rounded to whole heads per
    key-value group). Ranked by calibrated activations when calibration data is given (``‖a_j‖₂ ·
    ‖W_out[:, j]‖₂``: the size of what neuron j adds to the output), else by weight norms."""

    sparsity: float = 0.25
    heads: bool = True

    def __post_init__(self) -> None:
        _check_sparsity("Structured", self.sparsity)
        _check(
            isinstance(self.heads, bool),
            f"Structured: heads must be true or false, got {self.heads!r}",
        )


# CLI method names (memopt prune --method) -> config builder
METHODS = ("magnitude", "wanda", "sparsegpt", "2:4", "structured")


def config_for_method(method: str, sparsity: float | None = None) -> PruneConfig:
    """The config for a ``memopt prune --method`` value: ``magnitude``, ``wanda``, ``sparsegpt``
    (activation-aware, recommended at 50 %), ``N:M`` (e.g. ``2:4``; its sparsity is ``1 - N/M``,
    a given ``sparsity`` must agree; SparseGPT's mask choice and compensation) or ``structured``."""
    if not isinstance(method, str):
        raise MemoptError(f"unknown pruning method {method!r}")
    if ":" in method:
        a, _, b = method.partition(":")
        try:
            n, m = int(a), int(b)
        except ValueError:
            raise MemoptError(f"bad N:M pattern {method!r} (expected e.g. 2:4)") from None
        # SparseGPT chooses and compensates (what bench/prune.py measures as its 2:4 row)
        cfg = NM(n, m, score="sparsegpt")
        if sparsity is not None and abs(float(sparsity) - cfg.sparsity) > 1e-9:
            raise MemoptError(
                f"{method} prunes {cfg.sparsity:g} of the weights; --sparsity {sparsity} disagrees"
            )
        return cfg
    s = 0.5 if sparsity is None else sparsity
    if method == "magnitude":
        return Magnitude(s)
    if method == "wanda":
        return Wanda(s)
    if method == "sparsegpt":
        return SparseGPT(s)
    if method == "structured":
        return Structured(0.25 if sparsity is None else sparsity)
    raise MemoptError(f"unknown pruning method {method!r} (one of {', '.join(METHODS)}, or N:M)")
