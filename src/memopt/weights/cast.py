"""Float weights in another dtype, with casts at module boundaries: the stored kind of ``Cast``.

A cast module keeps its own floating tensors in its dtype (norms may stay float32 inside a bfloat16
model); forward hooks cast floating inputs to that dtype and its floating outputs to the model's,
so mixed modules run together. The dtypes are kept on the module (:func:`boundary_of`) beside the
hooks: the manifest records them and a load installs the same boundary again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.core.modules import Select, matches
from memopt.weights.quantized import QuantizedWeight

__all__ = ["FLOAT_DTYPES", "boundary_of", "cast_modules_", "set_boundary"]

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

_HOOKS = "_memopt_cast_hooks"
_DTYPES = "_memopt_cast_dtypes"


def _cast_tree(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_cast_tree(v, dtype) for v in x)
    if isinstance(x, list):
        return [_cast_tree(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _cast_tree(v, dtype) for k, v in x.items()}
    return x


def set_boundary(m: nn.Module, inner: torch.dtype, outer: torch.dtype) -> None:
    """Floating inputs enter ``m`` as ``inner``, its floating outputs leave as ``outer``."""
    for h in getattr(m, _HOOKS, ()):
        h.remove()

    def pre(mod: nn.Module, args: Any, kwargs: Any) -> Any:
        return _cast_tree(args, inner), _cast_tree(kwargs, inner)

    def post(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
        return _cast_tree(out, outer)

    setattr(m, _DTYPES, (inner, outer))
    setattr(m, _HOOKS, (
        m.register_forward_pre_hook(pre, with_kwargs=True),
        m.register_forward_hook(post, with_kwargs=True),
    ))  # fmt: skip


def boundary_of(m: nn.Module) -> tuple[torch.dtype, torch.dtype] | None:
    """``(inner, outer)`` of the boundary :func:`set_boundary` put on ``m``, or None."""
    handles = getattr(m, _HOOKS, None)
    dtypes = getattr(m, _DTYPES, None)
    if not handles or dtypes is None or handles[0].id not in m._forward_pre_hooks:
        return None
    return dtypes


def cast_modules_(
    model: nn.Module, dtype: str, keep: tuple[str, ...], select: Select
) -> dict[str, str]:
    """Cast each selected module's own floating tensors to ``dtype``; modules whose name or class
    matches ``keep`` (fnmatch, case-insensitive) go to float32. Returns module name -> what it got.

    ``p.data`` is replaced, not the Parameter, so tied parameters stay one object. Modules with
    tensors of their own get boundary casts (inputs to their dtype; outputs back to ``dtype``), so
    a float32 LayerNorm inside a float16 model runs. Quantized weights keep their own dtypes (their
    scales are part of the format).
    """
    target = FLOAT_DTYPES[dtype]
    done: set[int] = set()
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedWeight) or not select(name, m):
            continue
        kept = bool(name) and (
            matches(name, keep, fold=True) or matches(type(m).__name__, keep, fold=True)
        )
        own_dtype = torch.float32 if kept else target
        own = [
            t
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if t.is_floating_point()
        ]
        if not own:
            continue
        for t in own:
            if id(t) not in done and t.dtype != own_dtype:
                t.data = t.data.to(own_dtype)
            done.add(id(t))
        set_boundary(m, own_dtype, target)
        out[name] = "float32 (kept)" if kept else dtype
    return out
