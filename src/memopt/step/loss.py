"""Next-token cross-entropy with the LM head run over chunks of tokens, each chunk checkpointed.

Why: once the blocks are checkpointed, most of a causal LM's remaining activation memory is at the
head. A ``(B, T, V)`` logits tensor for SmolLM2 at batch 4 × seq 512 is 4·512·49152·4 B = 403 MB in
float32, and the loss keeps more of the same size alive around it (the float32 upcast, the
log-softmax saved for the backward, the gradient of each). Here the base model gives the hidden
states ``(B, T, C)``; the head and the loss then run over ``chunk`` tokens at a time, each chunk
under ``torch.utils.checkpoint``, so a chunk's logits are dropped after its forward and recomputed
in its backward. The peak holds one chunk's logits, not the sequence's; the price is one more head
matmul per token in the backward.

The value is the one transformers computes (``ForCausalLMLoss``): labels shifted left by one, the
last position of each row and ``-100`` labels ignored, the float32 mean over the counted tokens;
only the order of the float32 sum differs (a sum per chunk, then over chunks). Tied embeddings
stay tied: the head's weight is the embedding's parameter, used once per chunk, so its gradient is
one ``.grad`` that both uses add into.

:func:`head_of` decides when a model can take this path: a base model (``model.base_model``) and an
``nn.Linear`` output embedding, and no logit transform in its config (soft-capping, a logit scale)
that its own forward would apply between the head and the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "IGNORE_INDEX",
    "LOSS_CHUNK_BYTES",
    "causal_lm_hidden",
    "chunk_tokens",
    "chunked_causal_lm_loss",
    "head_of",
]

IGNORE_INDEX = -100  # transformers' label for "no loss here"

# Default chunk: the tokens whose float32 logits fill 32 MiB (170 tokens for SmolLM2's 49152-word
# vocabulary). A chunk's backward holds ~4 logits-sized float32 tensors (logits, log-softmax,
# their gradients), so ~130 MB at the head instead of ~1.6 GB for the whole batch 4 × seq 512;
# a chunk of that many rows is still large enough for the head's matmul to run at full speed.
LOSS_CHUNK_BYTES = 32 * 2**20

# Config attributes a causal LM's forward applies to the logits before its loss; a model that
# sets any of them keeps its own forward (the chunked path would skip the transform).
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


def head_of(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(base_model, lm_head)`` when ``model`` is a causal LM whose logits are ``lm_head(hidden)``,
    else None (the caller then runs the model's own forward with ``labels``)."""
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if base is None or base is model or get_head is None:
        return None
    head = get_head()
    if type(head) is not nn.Linear:
        return None
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            return None
    if any(type(p).__name__ == "DTensor" for p in head.parameters()):
        return None  # FSDP2: the root's forward hook unshards the head; calling past it would not
    return base, head


def chunk_tokens(vocab: int, budget_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Tokens per chunk whose float32 logits ``(chunk, vocab)`` fit ``budget_bytes`` (at least 1)."""
    return max(1, budget_bytes // (4 * vocab))


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed float32 cross-entropy of one chunk: hidden (n, C), weight (V, C), targets (n,)."""
    logits = F.linear(hidden, weight, bias).float()  # (n, V): upcast as transformers does
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")  # ()


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels``, ``chunk`` tokens at a
    time (see the module docstring). hidden (B, T, C), labels (B, T) → () float32."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1 token, got {chunk}")
    # position t predicts label t + 1; each row's last position has nothing to predict
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B·T, C), a view: the final norm's output
    targets = targets.reshape(-1).to(flat.device)  # (B·T,)
    total: torch.Tensor | None = None
    for start in range(0, flat.shape[0], chunk):
        part = checkpoint(
            _chunk_loss_sum,
            flat[start : start + chunk],
            head.weight,
            head.bias,
            targets[start : start + chunk],
            use_reentrant=False,
        )
        total = part if total is None else total + part
    assert total is not None
    # a tensor count (no .item()), so the same code runs on the meta device
    count = (targets != IGNORE_INDEX).sum()
    return total / count


def causal_lm_hidden(base: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The base model's last hidden state (B, T, C) for the step's inputs (labels left out)."""
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    out = base(**rest)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
