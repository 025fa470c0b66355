"""rotate_: the residual stream rotated, folded into the weights: the same function, exactly."""

from __future__ import annotations

import torch

from memopt.models.toy import tiny_llama
from memopt.quant.rotate import random_orthogonal, rotate_


def test_random_orthogonal():
    q = random_orthogonal(48, seed=3)
    torch.testing.assert_close(q @ q.t(), torch.eye(48, dtype=torch.float64))
    assert torch.equal(q, random_orthogonal(48, seed=3))  # seeded


def test_rotation_keeps_the_function():
    """Norm weights away from 1 (so the folds matter): logits equal to float32 rounding (measured
    max 4e-7 of a 0.9 scale), norms become 1, the tied head gets its own weight."""
    lm = tiny_llama()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        ids = torch.randint(0, 512, (2, 16), generator=g)
        before = lm.model(input_ids=ids).logits
        emb_before = lm.model.model.embed_tokens.weight.clone()
        done = rotate_(lm.model)
        after = lm.model(input_ids=ids).logits
    assert done["untied_head"] and not lm.config.tie_word_embeddings
    assert lm.model.lm_head.weight is not lm.model.model.embed_tokens.weight
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())
    assert torch.equal(lm.model.model.norm.weight, torch.ones(64))
    assert torch.equal(lm.model.model.layers[0].input_layernorm.weight, torch.ones(64))
    # the embedding really changed (rotated), row norms kept
    assert not torch.allclose(lm.model.model.embed_tokens.weight, emb_before)
    torch.testing.assert_close(
        lm.model.model.embed_tokens.weight.norm(dim=1), emb_before.norm(dim=1)
    )
