"""Rotating a Llama-family model's residual stream, folded into its weights (QuaRot / SpinQuant
style): the same function, weights whose outliers are spread across channels before quantizing.

For an orthogonal ``Q (D, D)`` (D the hidden size), the model computes exactly the same outputs
when every tensor that writes the residual stream is multiplied by ``Q`` and every one that reads
it by ``Qᵀ``, once the RMSNorm weights are folded into the Linears that read the norm's output
(an RMSNorm without weight commutes with ``Q``: ``‖xQ‖ = ‖x‖``):

* RMSNorm ``g`` of a block's attention (MLP) input: folded into q/k/v (gate/up) columns, set to 1;
* embedding ``E ← E Q``; q, k, v, gate, up ``W ← W diag(g) Q`` (they read the stream);
* o_proj, down_proj ``W ← Qᵀ W`` (they write it);
* the final norm ``g_f`` into the head: ``W_head ← W_head diag(g_f) Q``. A tied head becomes a
  weight of its own (it differs from ``E Q`` by ``diag(g_f)``): one more ``V x D`` weight to store.

``Q`` is a random orthogonal matrix (QR of a seeded Gaussian, signs fixed): no power-of-two
Hadamard exists for smollm2's 576. Inference costs nothing more (no online rotation); the bytes
grow by the untied head's. Float64 is used for the products, so the rotated float model matches
the original to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError

__all__ = ["random_orthogonal", "rotate_"]

READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
READS_MLP = ("mlp.gate_proj", "mlp.up_proj")
WRITES = ("self_attn.o_proj", "mlp.down_proj")


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal ``(d, d)`` float64 matrix (Haar: QR of a Gaussian, R's signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


@torch.no_grad()
def rotate_(model: Any, seed: int = 0) -> dict[str, Any]:
    """Rotate a Llama / Mistral / Qwen2 causal LM's residual stream in place (module docstring).
    ``model``: the ``nn.Module`` or a LoadedModel. Returns what was done."""
    m = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    inner = getattr(m, "model", None)
    layers = getattr(inner, "layers", None)
    head = getattr(m, "lm_head", None)
    if inner is None or layers is None or not isinstance(head, nn.Linear):
        raise MemoptError("rotate_: needs a Llama-family causal LM (model.layers, lm_head)")
    emb = inner.embed_tokens
    d = emb.weight.shape[1]
    Q = random_orthogonal(d, seed)  # (D, D) float64
    tied = head.weight is emb.weight
    head_w = head.weight.detach().double() * inner.norm.weight.detach().double()[None, :]
    if tied:  # the head gets a weight of its own
        head.weight = nn.Parameter(torch.empty_like(head.weight), requires_grad=False)
        m.config.tie_word_embeddings = False
    _set(head.weight, head_w @ Q)
    _set(inner.norm.weight, torch.ones(d, dtype=torch.float64))
    _set(emb.weight, emb.weight.detach().double() @ Q)
    for blk in layers:
        for norm_name, names in (("input_layernorm", READS), ("post_attention_layernorm",
                                                                READS_MLP)):  # fmt: skip
            norm = blk.get_submodule(norm_name)
            g = norm.weight.detach().double()
            for nm in names:
                lin = blk.get_submodule(nm)
                _set(lin.weight, (lin.weight.detach().double() * g[None, :]) @ Q)
            _set(norm.weight, torch.ones(d, dtype=torch.float64))
        for nm in WRITES:
            lin = blk.get_submodule(nm)
            if lin.bias is not None:
                _set(lin.bias, lin.bias.detach().double() @ Q)
            _set(lin.weight, Q.t() @ lin.weight.detach().double())
    return {"hidden": d, "untied_head": tied, "seed": seed, "blocks": len(layers)}
