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

``Q`` is, by ``kind``: ``"random"``, a random orthogonal matrix (QR of a seeded Gaussian, signs
fixed); ``"hadamard"``, a randomized Hadamard matrix ``diag(s) H / sqrt(D)`` (QuaRot), ``s`` seeded
random signs. No power-of-two Hadamard fits smollm2's 576, but Kronecker products of Sylvester's
(order 2^a) and Paley's (order q + 1, q a prime = 3 mod 4) give one: 576 = 12 x 48 (Paley, q = 11
and q = 47). A Hadamard matrix spreads every channel over all D with the same weight 1/sqrt(D)
(a random orthogonal one only on average), which flattens a weight's outliers further. Inference
costs nothing more (no online rotation); the bytes grow by the untied head's. Float64 is used for
the products, so the rotated float model matches the original to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError

__all__ = ["KINDS", "hadamard", "random_orthogonal", "rotate_", "rotation"]

KINDS = ("random", "hadamard")

READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
READS_MLP = ("mlp.gate_proj", "mlp.up_proj")
WRITES = ("self_attn.o_proj", "mlp.down_proj")


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal ``(d, d)`` float64 matrix (Haar: QR of a Gaussian, R's signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(n**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a ``(q + 1, q + 1)`` Hadamard matrix for a prime ``q = 3 mod 4``.
    ``S = [[0, 1ᵀ], [-1, C]]`` with ``C[i, j] = χ(j - i)`` (χ the Legendre symbol mod q) is skew,
    ``S Sᵀ = q I``, so ``I + S`` has orthogonal ±1 rows."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)])  # (q,)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q  # (q, q): j - i mod q
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, chi[idx].double()
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(d: int) -> torch.Tensor | None:
    """A ``(d, d)`` float64 ±1 Hadamard matrix (``H Hᵀ = d I``), a Kronecker product of Sylvester's
    and Paley's; None when no such product has order ``d``."""
    if d == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if d % 2 == 0 and (d & (d - 1)) == 0:  # a power of two: Sylvester
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.kron(h2, h)
        return h
    for p in range(d, 3, -4):  # the largest Paley order first (fewer factors)
        q = p - 1
        if d % p == 0 and q % 4 == 3 and _is_prime(q):
            rest = hadamard(d // p)
            if rest is not None:
                return torch.kron(_paley(q), rest)
    return None


def rotation(d: int, kind: str = "random", seed: int = 0) -> torch.Tensor:
    """The ``(d, d)`` float64 orthogonal matrix of ``kind`` (:data:`KINDS`), seeded."""
    if kind == "random":
        return random_orthogonal(d, seed)
    if kind != "hadamard":
        raise MemoptError(f"rotation kind must be one of {', '.join(KINDS)}, got {kind!r}")
    h = hadamard(d)
    if h is None:
        raise MemoptError(f"no Hadamard matrix of order {d} (Sylvester x Paley products only)")
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1  # (d,) random ±1
    return signs[:, None] * h / d**0.5  # diag(s) H / sqrt(d): orthogonal


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


@torch.no_grad()
def rotate_(model: Any, seed: int = 0, kind: str = "random") -> dict[str, Any]:
    """Rotate a Llama / Mistral / Qwen2 causal LM's residual stream in place (module docstring).
    ``model``: the ``nn.Module`` or a LoadedModel; ``kind``: the rotation (:func:`rotation`).
    Returns what was done."""
    m = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    inner = getattr(m, "model", None)
    layers = getattr(inner, "layers", None)
    head = getattr(m, "lm_head", None)
    if inner is None or layers is None or not isinstance(head, nn.Linear):
        raise MemoptError("rotate_: needs a Llama-family causal LM (model.layers, lm_head)")
    emb = inner.embed_tokens
    d = emb.weight.shape[1]
    Q = rotation(d, kind, seed)  # (D, D) float64
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
    return {"hidden": d, "untied_head": tied, "kind": kind, "seed": seed, "blocks": len(layers)}
