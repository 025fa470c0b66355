"""An int8 KV cache: keys and values stored as int8 with one float32 scale per position and head.

Per position and head (the last axis, head_dim, shares a scale): symmetric, ``scale = amax / 127``.
A cache of T positions holds ``2 × layers × kv_heads × T × (head_dim + 4)`` bytes instead of
``2 × layers × kv_heads × T × head_dim × 4`` (float32): 3.8× less for head_dim 64. Each update
dequantizes the layer's whole cache for attention (one layer's float keys and values at a time).
Outputs are no longer bit-identical to the float cache's: this is an option, off by default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Int8KVLayer", "int8_kv_cache", "use_int8_kv_cache"]


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, T, D) float -> int8 codes (B, H, T, D), float32 scales (B, H, T, 1)."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 127.0
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _layer_base() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class Int8KVLayer(_layer_base()):  # type: ignore[misc]
    """A ``DynamicLayer`` whose keys and values live as int8 (see the module docstring)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self.qk: list[torch.Tensor] = []
        self.qv: list[torch.Tensor] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = _quantize(key_states)
            self._v = _quantize(value_states)
        else:
            k, ks = _quantize(key_states)
            v, vs = _quantize(value_states)
            self._k = (torch.cat([self._k[0], k], -2), torch.cat([self._k[1], ks], -2))
            self._v = (torch.cat([self._v[0], v], -2), torch.cat([self._v[1], vs], -2))
        # the float keys/values exist only for this layer's attention, then are dropped
        keys = (self._k[0].float() * self._k[1]).to(self.dtype)  # (B, H, T, D)
        values = (self._v[0].float() * self._v[1]).to(self.dtype)
        self.keys = self.values = torch.empty(0)  # nothing float kept between steps
        self._len = keys.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return getattr(self, "_len", 0) if self.is_initialized else 0

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))


def int8_kv_cache(config: Any) -> Any:
    """A transformers ``Cache`` of :class:`Int8KVLayer`, one per layer of ``config``."""
    from transformers.cache_utils import Cache

    n = int(config.num_hidden_layers)
    return Cache(layers=[Int8KVLayer() for _ in range(n)])


def use_int8_kv_cache(model: nn.Module, config: Any) -> None:
    """Make ``model`` start an int8 KV cache whenever it is called with ``use_cache=True`` and no
    cache (a prefill), whatever calls it (``memopt.generate.generate``, transformers' generate)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    names = [n for n in ("cache", "past_key_values") if n in params]

    def pre(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if kwargs.get("use_cache") and all(kwargs.get(n) is None for n in names) and names:
            kwargs[names[0]] = int8_kv_cache(config)
        return args, kwargs

    model.register_forward_pre_hook(pre, with_kwargs=True)
