"""Quantization configs: frozen dataclasses, validated on construction, JSON round-trippable.

``quantize_`` dispatches on ``type(config)`` through :data:`REGISTRY`, filled by ``@register``
(the config base and its registry: memopt.core.config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from memopt.core.config import Config, Registry
from memopt.core.config import check as _check
from memopt.core.errors import MemoptError
from memopt.formats.safetensors import dtype_name
from memopt.weights import kernels
from memopt.weights.quantized import Int4Weight, Int8Weight, IntNWeight, QuantizedWeight

__all__ = [
    "INT4_ALGOS",
    "METHODS",
    "REGISTRY",
    "Cast",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8WeightOnly",
    "IntNWeightOnly",
    "QuantConfig",
    "WeightPlan",
    "method_config",
    "register",
]

REGISTRY = Registry("quantization")  # config type -> handler
register = REGISTRY.register


@dataclass
class WeightPlan:
    """What a config makes of one ``(N, K)`` weight: its manifest entry (known before any value is
    read: streamed quantization writes the file's header from it), the maker of the weight from
    float rows, and whether a Linear also quantizes its activations (int8 dynamic)."""

    spec: dict[str, Any]
    make: Callable[[torch.Tensor], QuantizedWeight]
    dynamic: bool = False


@dataclass(frozen=True)
class QuantConfig(Config, family="quantization"):
    """Base of every quantization config. ``to_dict()`` / ``from_dict()`` carry it in manifests.

    A config that stores weights in a memopt.weights kind says how in :meth:`plan_weight`; both
    ``quantize_`` and the streamed ``quantize_model`` follow it."""

    fmt: ClassVar[str] = "?"

    def plan_weight(
        self, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        """The plan for an ``(N, K)`` weight of ``dtype``, or why it stays as it is.
        ``lookup_only``: only embeddings read it (no matmul)."""
        raise MemoptError(f"{type(self).__name__} does not store weights in a quantized kind")


def _undivided(g: int | None, k: int) -> str | None:
    return f"group size {g} does not divide {k} inputs" if g is not None and k % g else None


def _spec(fmt: str, n: int, k: int, dtype: torch.dtype, g: int | None, **kw: Any) -> dict:
    return {"format": fmt, "shape": [n, k], "dtype": dtype_name(dtype), "group_size": g, **kw}


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
    per-channel scales for the fused kernel (grouped int8 runs slower at batch 1, see
    memopt.weights.kernels). On an encoder's embeddings, grouping the embedding alone recovers
    part of the cosine to float32 that per-channel int8 loses, for a few bytes and no speed;
    grouping every weight recovers more but slows the Linears (bench/quantize.py measures the
    default). A group that does not divide the embedding's width falls back to per channel.
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

    def plan_weight(
        self, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        g = self.group_for(k, lookup_only)
        why = _undivided(g, k)
        if why:
            return why
        return WeightPlan(_spec("int8", n, k, dtype, g), lambda w: Int8Weight(w, g))


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """int8 weights per output channel, int8 activations per token quantized at run time,
    int32 accumulation (``torch._int_mm``). Embeddings get int8 weight-only (no matmul there)."""

    fmt: ClassVar[str] = "int8-dynamic"

    def plan_weight(
        self, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        return WeightPlan(_spec("int8", n, k, dtype, None), Int8Weight, dynamic=True)


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

    def plan_weight(
        self, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        g, sym = self.group_size, self.symmetric
        why = _undivided(g, k)
        if why:
            return why
        # the codes in this CPU's kernel layout: loading them here needs no repacking
        spec = _spec("int4", n, k, dtype, g, symmetric=sym, block_n=kernels.int4_block_n(n))
        return WeightPlan(spec, lambda w: Int4Weight(w, g, sym))


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

    def plan_weight(
        self, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        bits, g, sym = self.bits, self.group_size, self.symmetric
        why = _undivided(g, k)
        if why:
            return why
        spec = _spec(f"int{bits}", n, k, dtype, g, symmetric=sym, bits=bits)
        return WeightPlan(spec, lambda w: IntNWeight(w, bits, g, sym))


# ``memopt quantize --method M [--group-size G] [--algo A]``: the config behind each method
METHODS: dict[str, Callable[[int | None, str | None], QuantConfig]] = {
    "float32": lambda g, a: Cast("float32"),
    "float16": lambda g, a: Cast("float16"),
    "bfloat16": lambda g, a: Cast("bfloat16"),
    "int8": lambda g, a: Int8WeightOnly(group_size=g),
    "int8-dynamic": lambda g, a: Int8Dynamic(),
    "int4": lambda g, a: Int4WeightOnly(group_size=g or 64, algo=a or "gptq"),
    "int3": lambda g, a: IntNWeightOnly(bits=3, group_size=g or 32),
    "int2": lambda g, a: IntNWeightOnly(bits=2, group_size=g or 32),
}
_NO_GROUP = ("float32", "float16", "bfloat16", "int8-dynamic")


def method_config(
    method: str, group_size: int | None = None, algo: str | None = None
) -> QuantConfig:
    """The config behind ``memopt quantize --method M [--group-size G] [--algo A]``.

    Defaults: int4 group 64 calibrated (``gptq``; ``--algo rtn`` for round-to-nearest), int8 per
    output channel (embeddings read only by lookups: groups of 128, see Int8WeightOnly), int3/int2
    group 32. Invalid combinations raise MemoptError in one line.
    """
    if method not in METHODS:
        raise MemoptError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if algo is not None and method != "int4":
        raise MemoptError(f"--algo applies to int4 only, not {method}")
    if group_size is not None and method in _NO_GROUP:
        raise MemoptError(f"--group-size does not apply to {method}")
    return METHODS[method](group_size, algo)
