"""One base for every config (quantization, pruning, and what comes later): frozen dataclasses,
validated on construction, written to and read from JSON, each family with its own registry of
types and of the handlers that ``quantize_`` / ``prune_`` dispatch to on ``type(config)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from memopt.core.errors import MemoptError

__all__ = ["Config", "Registry", "check"]


def check(ok: bool, msg: str) -> None:
    """Raise MemoptError(msg) unless ``ok``: a config's ``__post_init__`` validation."""
    if not ok:
        raise MemoptError(msg)


class Registry:
    """Handlers of one family's config types: ``@registry.register(Int8WeightOnly)``."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.handlers: dict[type, Callable[..., Any]] = {}

    def register(self, config_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.handlers[config_type] = fn
            return fn

        return deco

    def handler(self, config: Any) -> Callable[..., Any]:
        fn = self.handlers.get(type(config))
        if fn is None:
            raise MemoptError(f"no {self.family} handler for {type(config).__name__}")
        return fn


@dataclass(frozen=True)
class Config:
    """Base of every config. A family's base (``QuantConfig``, ``PruneConfig``) is declared with
    ``family="..."``; its subclasses are then found by name in that family for :meth:`from_dict`.

    ``to_dict()`` gives ``{"type": class name, field: value, ...}`` (tuples as lists); that form is
    what format v1 manifests hold. ``VERSION`` is the version of the fields this memopt writes; a
    dict may carry ``"version"`` (read, never required), and one newer than ``VERSION`` is refused.
    """

    VERSION: ClassVar[int] = 1
    family: ClassVar[str] = "config"
    _types: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, family: str | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if family is not None:  # the base of a new family: its own table of types
            cls.family = family
            cls._types = {}
        cls._types[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        if not isinstance(d, dict):
            raise MemoptError(f"a {cls.family} config must be a JSON object, got {d!r}")
        d = dict(d)
        name = d.pop("type", None)
        version = d.pop("version", 1)
        sub = cls._types.get(name) if isinstance(name, str) else None
        if sub is None or not issubclass(sub, cls):
            raise MemoptError(f"unknown {cls.family} config type {name!r}")
        if not isinstance(version, int) or version > sub.VERSION:
            raise MemoptError(f"{name}: config version {version!r} is newer than this memopt's")
        extra = set(d) - {f.name for f in dataclasses.fields(sub)}
        if extra:
            raise MemoptError(f"{name}: unknown field(s) {', '.join(sorted(extra))}")
        return sub(**d)
