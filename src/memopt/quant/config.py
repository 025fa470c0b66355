"""Quantization configs: frozen dataclasses, validated on construction, JSON round-trippable.

``quantize_`` dispatches on ``type(config)`` through :data:`REGISTRY`, filled by ``@register``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from memopt.errors import MemoptError

__all__ = [
    "CONFIGS",
    "INT4_ALGOS",
    "REGISTRY",
    "Cast",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8WeightOnly",
    "IntNWeightOnly",
    "QuantConfig",
    "register",
]

REGISTRY: dict[type, Callable[..., Any]] = {}  # config type -> handler
CONFIGS: dict[str, type[QuantConfig]] = {}  # class name -> config type, for from_dict


def register(config_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register(Int8WeightOnly)`` makes the function the handler of that config."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY[config_type] = fn
        return fn

    return deco


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise MemoptError(msg)


@dataclass(frozen=True)
class QuantConfig:
    """Base of every config. ``to_dict()`` / ``from_dict()`` carry it in JSON manifests."""

    fmt: ClassVar[str] = "?"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        CONFIGS[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> QuantConfig:
        d = dict(d)
        name = d.pop("type", None)
        cls = CONFIGS.get(name) if isinstance(name, str) else None
        if cls is None:
            raise MemoptError(f"unknown quantization config type {name!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra:
            raise MemoptError(f"{name}: unknown field(s) {', '.join(sorted(extra))}")
        return cls(**d)


_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Cast(QuantConfig):
    """Cast floating parameters and buffers to ``dtype``, except modules whose name matches ``keep``
    (fnmatch, case-insensitive), which stay in float32; casts at their boundaries keep forward
    running."""

    dtype: str = "float16"
    keep: tuple[str, ...] = ("*norm*", "*ln_*")

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("float16", "bfloat16", "float32"),
            f"Cast: dtype must be float16, bfloat16 or float32, got {self.dtype!r}",
        )
        keep = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep)
        _check(all(isinstance(p, str) for p in keep), "Cast: keep must be a list of patterns")
        object.__setattr__(self, "keep", keep)

    @property
    def fmt(self) -> str:  # type: ignore[override]
        return self.dtype


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """Symmetric int8 weights, per output channel (``group_size=None``) or per group of inputs.

    ``embedding_group_size``: with per-channel matmul weights (``group_size=None``), the group size
    of weights that only lookups read (an embedding not tied to a Linear; None: per channel too;
    an explicit ``group_size`` applies to every weight). Why a separate default of 128: a lookup
    dequantizes only the gathered rows, so groups cost it no speed, while a matmul weight keeps
    per-channel scales for the fused kernel (grouped int8 measured 2-3x slower at batch 1, see
    memopt.quant.kernels). Measured on all-MiniLM-L6-v2 (64 sentences, cosine vs float32):
    per channel everywhere 0.2534x bytes, cosine_min 0.99900-0.99915; embeddings in groups of 128
    0.2561x, 0.99920; groups of 128 everywhere 0.2589x, 0.99961 but 2x slower Linears. A group
    that does not divide the embedding's width falls back to per channel.
    """

    fmt: ClassVar[str] = "int8"
    group_size: int | None = None
    embedding_group_size: int | None = 128

    def __post_init__(self) -> None:
        for field_name in ("group_size", "embedding_group_size"):
            g = getattr(self, field_name)
            _check(
                g is None or (isinstance(g, int) and not isinstance(g, bool) and g > 0),
                f"Int8WeightOnly: {field_name} must be None or a positive integer, got {g!r}",
            )

    def group_for(self, k: int, lookup_only: bool) -> int | None:
        """The group size of a weight with ``k`` inputs (None: per output channel)."""
        g = self.embedding_group_size
        if lookup_only and self.group_size is None and g is not None and k % g == 0:
            return g
        return self.group_size


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """int8 weights per output channel, int8 activations per token quantized at run time,
    int32 accumulation (``torch._int_mm``). Embeddings get int8 weight-only (no matmul there)."""

    fmt: ClassVar[str] = "int8-dynamic"


# How int4 codes are chosen: "rtn" rounds each weight to nearest; "gptq" is calibrated (needs
# calibration inputs; memopt.quant.calibrate). Same storage either way.
INT4_ALGOS = ("rtn", "gptq")


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """int4 weights, two per byte, one bfloat16 scale (+ zero unless symmetric) per group.

    ``algo="gptq"`` chooses the codes with calibration data (memopt.quant.calibrate); ``"rtn"``
    rounds to nearest."""

    fmt: ClassVar[str] = "int4"
    group_size: int = 128
    symmetric: bool = False
    algo: str = "rtn"

    def __post_init__(self) -> None:
        _check(
            self.group_size in _GROUPS and not isinstance(self.group_size, bool),
            f"Int4WeightOnly: group_size must be one of 32, 64, 128, got {self.group_size!r}",
        )
        _check(
            isinstance(self.symmetric, bool),
            f"Int4WeightOnly: symmetric must be true or false, got {self.symmetric!r}",
        )
        _check(
            self.algo in INT4_ALGOS,
            f"Int4WeightOnly: algo must be one of {', '.join(INT4_ALGOS)}, got {self.algo!r}",
        )


@dataclass(frozen=True)
class IntNWeightOnly(QuantConfig):
    """2- or 3-bit weights (int2: 4 per byte; int3: 8 in 3 bytes), float16 scale (+ offset)
    per group. Runs by blocked dequantize + float32 matmul: smaller, not faster."""

    bits: int = 2
    group_size: int = 32
    symmetric: bool = False

    def __post_init__(self) -> None:
        _check(
            self.bits in (2, 3) and not isinstance(self.bits, bool),
            f"IntNWeightOnly: bits must be 2 or 3, got {self.bits!r}",
        )
        _check(
            self.group_size in (16, *_GROUPS) and not isinstance(self.group_size, bool),
            f"IntNWeightOnly: group_size must be one of 16, 32, 64, 128, got {self.group_size!r}",
        )
        _check(
            isinstance(self.symmetric, bool),
            f"IntNWeightOnly: symmetric must be true or false, got {self.symmetric!r}",
        )

    @property
    def fmt(self) -> str:  # type: ignore[override]
        return f"int{self.bits}"
