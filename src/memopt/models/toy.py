"""A tiny random Llama (the SmolLM2 architecture at toy size), for tests, benches and examples.

Built from a seed, so every process that builds it gets the same weights: the ranks of a
distributed test and its single-process reference start from one model without sending it.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.models import LoadedModel

__all__ = ["TINY_LLAMA", "tiny_llama", "tiny_tokenizer"]

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


def tiny_tokenizer(vocab_size: int = TINY_LLAMA["vocab_size"]) -> Any:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) of ``vocab_size`` tokens, trained on
    memopt's default sentences: a real tokenizer for the tiny Llama (the same every time, about a
    second), for what needs one (a GGUF file for llama.cpp). Special tokens: ``<|endoftext|>``
    (unk, id 0), ``<|im_start|>`` (bos), ``<|im_end|>`` (eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from memopt.core.texts import default_sentences

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(default_sentences(64), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=specials[0], bos_token=specials[1], eos_token=specials[2]
    )
