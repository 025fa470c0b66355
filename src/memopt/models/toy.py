"""A tiny random Llama (the SmolLM2 architecture at toy size), for tests, benches and examples.

Built from a seed, so every process that builds it gets the same weights: the ranks of a
distributed test and its single-process reference start from one model without sending it.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.models import LoadedModel

__all__ = ["TINY_LLAMA", "tiny_llama"]

# SmolLM2's shape (tied embeddings, grouped-query attention, SiLU MLP), scaled down.
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def tiny_llama(seed: int = 0, **overrides: Any) -> LoadedModel:
    """A randomly initialised ``LlamaForCausalLM`` (``TINY_LLAMA`` with ``overrides``), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA, **overrides}, architectures=["LlamaForCausalLM"])
    config.use_cache = False
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)  # the caller's random stream is not disturbed
    return LoadedModel(model.float(), "causal-lm", "tiny-llama", config)
