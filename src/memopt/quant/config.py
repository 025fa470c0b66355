"""Quantization configs: frozen dataclasses, validated on construction, JSON round-trippable.

``quantize_`` dispatches on ``type(config)`` through :data:`REGISTRY`, filled by ``@register``
(the config base and its registry: memopt.core.config).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from memopt.core.config import Config, Registry
from memopt.core.config import check as _check
from memopt.core.errors import MemoptError
from memopt.core.modules import matches
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
    "Mixed",
    "QuantConfig",
    "WeightPlan",
    "gptq_config",
    "is_calibrated",
    "method_config",
    "read_config",
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

    def plan_module(
        self, name: str, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        """The plan for the ``(N, K)`` weight of module ``name`` (fully qualified), or why it stays
        as it is: :meth:`plan_weight` for a config that treats every module alike; a
        :class:`Mixed` config asks the rule that matches ``name``. ``quantize_`` and the streamed
        ``quantize_model`` both plan each weight through this."""
        return self.plan_weight(n, k, dtype, lookup_only)

    def config_for(self, name: str) -> QuantConfig | None:
        """The config that decides module ``name``'s format (None: it stays float): the config
        itself, or a :class:`Mixed` config's matching rule."""
        return self


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
    algo: str = "rtn"  # "gptq": codes chosen with calibration data, as Int4WeightOnly's

    def __post_init__(self) -> None:
        _check(
            self.bits in (2, 3) and not isinstance(self.bits, bool),
            f"IntNWeightOnly: bits must be 2 or 3, got {self.bits!r}",
        )
        _check(
            self.algo in INT4_ALGOS,
            f"IntNWeightOnly: algo must be one of {', '.join(INT4_ALGOS)}, got {self.algo!r}",
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


# What a Mixed rule may hold: a config with a weight plan of its own, neither a cast nor a mix
def _nestable(config: Any) -> bool:
    return (
        isinstance(config, QuantConfig)
        and not isinstance(config, (Cast, Mixed))
        and type(config).plan_weight is not QuantConfig.plan_weight
    )


def _nested(config: Any, where: str) -> QuantConfig | None:
    """A rule's (or the default's) config from a config, its dict, or None (float)."""
    if config is None:
        return None
    if isinstance(config, dict):
        try:
            config = QuantConfig.from_dict(config)
        except MemoptError as e:
            raise MemoptError(f"Mixed: {where}: {e}") from None
    got = type(config).__name__ if isinstance(config, QuantConfig) else repr(config)
    _check(
        _nestable(config),
        f"Mixed: {where} must be null (float) or a weight config (Int8WeightOnly, Int8Dynamic, "
        f"Int4WeightOnly, IntNWeightOnly), got {got}",
    )
    return config


@dataclass(frozen=True)
class Mixed(QuantConfig):
    """A format per module: the plan of ``memopt fit``, a precision chosen for each layer.

    ``rules``: ``(pattern, config)`` pairs, in order; ``pattern`` is an fnmatch pattern over fully
    qualified module names (case-sensitive, as ``include`` / ``exclude``), and the first rule whose
    pattern matches a module gives its format. ``config`` is any weight config (Int8WeightOnly,
    Int8Dynamic, Int4WeightOnly with algo rtn or gptq, IntNWeightOnly), or None: the module stays
    float. ``default``: the config of modules that no rule matches (None: they stay float).

    Tied weights (a tied embedding and lm_head) are one weight and get one format: the rule of the
    *first* module of the tie group in the model's module order (``named_modules``), e.g.
    ``model.embed_tokens`` in a tied Llama, whatever a rule matching ``lm_head`` says. A tied
    output projection whose rule is ``Int4WeightOnly(algo="gptq")`` is calibrated as a uniform
    calibrated config calibrates it (memopt.quant.calibrate.gptq_head), with that rule's group size.

    Calibrated rules (``algo="gptq"``) need calibration data, as a uniform one does: the
    transformer's blocks are quantized in order, each block's GPTQ Linears from inputs that the
    already-quantized earlier blocks produce; inside a block, the modules whose rule is not
    calibrated are quantized first, so that both the block's GPTQ stages and the next blocks see
    the mixed model (memopt.quant.calibrate). Modules outside the blocks (the embedding, a head not
    calibrated) are quantized last, as the uniform path does.

    JSON form: ``{"type": "Mixed", "rules": [[pattern, config dict or null], ...], "default":
    config dict or null}``.
    """

    fmt: ClassVar[str] = "mixed"
    rules: tuple[tuple[str, QuantConfig | None], ...] = ()
    default: QuantConfig | None = None

    def __post_init__(self) -> None:
        rules = self.rules
        _check(
            isinstance(rules, (list, tuple)),
            f"Mixed: rules must be a list of [pattern, config] pairs, got {rules!r}",
        )
        out = []
        for i, rule in enumerate(rules):
            _check(
                isinstance(rule, (list, tuple)) and len(rule) == 2,
                f"Mixed: rule {i} must be a [pattern, config] pair, got {rule!r}",
            )
            pattern, config = rule
            _check(
                isinstance(pattern, str) and pattern != "",
                f"Mixed: rule {i}'s pattern must be a non-empty string, got {pattern!r}",
            )
            out.append((pattern, _nested(config, f"rule {i} ({pattern!r})")))
        object.__setattr__(self, "rules", tuple(out))
        object.__setattr__(self, "default", _nested(self.default, "default"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "Mixed",
            "rules": [[p, None if c is None else c.to_dict()] for p, c in self.rules],
            "default": None if self.default is None else self.default.to_dict(),
        }

    def match(self, name: str) -> int | None:
        """The index of the first rule whose pattern matches module ``name``, None if none does."""
        return next((i for i, (p, _) in enumerate(self.rules) if matches(name, (p,))), None)

    def config_for(self, name: str) -> QuantConfig | None:
        i = self.match(name)
        return self.default if i is None else self.rules[i][1]

    def configs(self) -> list[QuantConfig]:
        """Every config the mix may give a module (rules and default, floats left out)."""
        return [c for c in (*(c for _, c in self.rules), self.default) if c is not None]

    def plan_module(
        self, name: str, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        i = self.match(name)
        config = self.default if i is None else self.rules[i][1]
        if config is None:
            if i is None:
                return "no rule of the Mixed config matches (no default: kept float)"
            return f"Mixed rule {i} ({self.rules[i][0]!r}) keeps it float"
        return config.plan_module(name, n, k, dtype, lookup_only)

    def plan_weight(
        self, n: int, k: int, dtype: torch.dtype, lookup_only: bool = False
    ) -> WeightPlan | str:
        raise MemoptError("Mixed plans each module by its name: call plan_module(name, ...)")


def gptq_config(config: QuantConfig, name: str) -> Int4WeightOnly | IntNWeightOnly | None:
    """The calibrated config of module ``name`` under ``config`` (a uniform
    ``Int4WeightOnly(algo="gptq")`` or ``IntNWeightOnly(algo="gptq")``, or a Mixed config's matching
    rule), None where its format is not calibrated."""
    c = config.config_for(name)
    return c if _calibrated(c) else None


def _calibrated(c: Any) -> bool:
    return isinstance(c, (Int4WeightOnly, IntNWeightOnly)) and c.algo != "rtn"


def is_calibrated(config: QuantConfig) -> bool:
    """Whether ``config`` needs calibration data: calibrated int4 / int3 / int2, or a Mixed config
    with such a rule (or default)."""
    configs = config.configs() if isinstance(config, Mixed) else [config]
    return any(_calibrated(c) for c in configs)


# ``memopt quantize --method M [--group-size G] [--algo A]``: the config behind each method
METHODS: dict[str, Callable[[int | None, str | None], QuantConfig]] = {
    "float32": lambda g, a: Cast("float32"),
    "float16": lambda g, a: Cast("float16"),
    "bfloat16": lambda g, a: Cast("bfloat16"),
    "int8": lambda g, a: Int8WeightOnly(group_size=g),
    "int8-dynamic": lambda g, a: Int8Dynamic(),
    "int4": lambda g, a: Int4WeightOnly(group_size=g or 64, algo=a or "gptq"),
    "int3": lambda g, a: IntNWeightOnly(bits=3, group_size=g or 32, algo=a or "rtn"),
    "int2": lambda g, a: IntNWeightOnly(bits=2, group_size=g or 32, algo=a or "rtn"),
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
    if algo is not None and method not in ("int4", "int3", "int2"):
        raise MemoptError(f"--algo applies to int4, int3 and int2 only, not {method}")
    if group_size is not None and method in _NO_GROUP:
        raise MemoptError(f"--group-size does not apply to {method}")
    return METHODS[method](group_size, algo)


def read_config(path: str | Path) -> QuantConfig:
    """A quantization config from a JSON file (``memopt quantize --config FILE``): any config's
    ``to_dict()`` form, a Mixed one included. Errors are one-line MemoptErrors."""
    p = Path(path)
    if not p.is_file():
        raise MemoptError(f"no such config file: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemoptError(f"{path}: not a JSON config ({str(e).splitlines()[0]})") from None
    config = QuantConfig.from_dict(data)
    if not isinstance(config, QuantConfig):
        raise MemoptError(f"{path}: not a quantization config")
    return config
