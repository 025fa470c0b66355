"""rotate_: the residual stream rotated, folded into the weights: the same function, exactly."""

from __future__ import annotations

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.models.toy import tiny_llama
from memopt.quant.rotate import hadamard, random_orthogonal, rotate_, rotation


def test_random_orthogonal():
    q = random_orthogonal(48, seed=3)
    torch.testing.assert_close(q @ q.t(), torch.eye(48, dtype=torch.float64))
    assert torch.equal(q, random_orthogonal(48, seed=3))  # seeded


@pytest.mark.parametrize("d", [1, 2, 12, 48, 64, 576, 768, 960])
def test_hadamard_orders(d):
    """Sylvester x Paley products: exact ±1 matrices with H Hᵀ = d I (576 = smollm2's width)."""
    h = hadamard(d)
    assert h is not None and bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.t(), d * torch.eye(d, dtype=torch.float64))


def test_randomized_hadamard_is_orthogonal_and_flat():
    """diag(s) H / sqrt(d): orthogonal, every entry ±1/sqrt(d), the signs seeded."""
    q = rotation(576, "hadamard", seed=2)
    torch.testing.assert_close(q @ q.t(), torch.eye(576, dtype=torch.float64))
    torch.testing.assert_close(q.abs(), torch.full_like(q, 576**-0.5))
    assert torch.equal(q, rotation(576, "hadamard", seed=2))
    assert not torch.equal(q, rotation(576, "hadamard", seed=3))
    assert hadamard(36) is None  # 36 = 4 x 9: no Paley order of it is built here
    with pytest.raises(MemoptError, match="no Hadamard"):
        rotation(36, "hadamard")
    with pytest.raises(MemoptError, match="kind"):
        rotation(8, "givens")


@pytest.mark.parametrize("kind", ["random", "hadamard"])
def test_rotation_keeps_the_function(kind):
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
        done = rotate_(lm.model, kind=kind)
        after = lm.model(input_ids=ids).logits
    assert done["untied_head"] and done["kind"] == kind and not lm.config.tie_word_embeddings
    assert lm.model.lm_head.weight is not lm.model.model.embed_tokens.weight
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())
    assert torch.equal(lm.model.model.norm.weight, torch.ones(64))
    assert torch.equal(lm.model.model.layers[0].input_layernorm.weight, torch.ones(64))
    # the embedding really changed (rotated), row norms kept
    assert not torch.allclose(lm.model.model.embed_tokens.weight, emb_before)
    torch.testing.assert_close(
        lm.model.model.embed_tokens.weight.norm(dim=1), emb_before.norm(dim=1)
    )


def _kl(ref: torch.nn.Module, q: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(float || quantized) of the next-token distributions over ``ids (B, T)``."""
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=ids).logits.float(), -1)
        r = torch.log_softmax(q(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - r)).sum(-1).mean())


def test_hadamard_rotated_int3_with_int8_head_calibrates():
    """What bench/calibrate.py's ``gptq+int8head@hadamard`` does, on a tiny Llama: rotated (the
    head untied), the blocks by GPTQ int3, the embedding and the head int8 each; GPTQ's KL to the
    float model on other tokens is below round-to-nearest's in the same mix."""
    import copy

    from memopt.quant import Int8WeightOnly, IntNWeightOnly, quantize_
    from memopt.quant.calibrate import calibrate_
    from memopt.quant.config import Mixed

    ref = tiny_llama().model.eval()
    rotate_(ref, kind="hadamard")
    g = torch.Generator().manual_seed(5)
    calib, held = (torch.randint(0, 512, (n, 32), generator=g) for n in (8, 4))

    def mix(algo: str) -> Mixed:
        int8 = Int8WeightOnly()
        rules = (("model.embed_tokens", int8), ("lm_head", int8))
        return Mixed(rules=rules, default=IntNWeightOnly(bits=3, group_size=32, algo=algo))

    gptq, rtn = copy.deepcopy(ref), copy.deepcopy(ref)
    report = calibrate_(gptq, mix("gptq"), calib)
    quantize_(rtn, mix("rtn"))
    assert report.formats == {"int3": 28, "int8": 2}  # 4 blocks x 7 Linears; embedding, head
    assert gptq.lm_head.qweight is not gptq.model.embed_tokens.qweight
    k_gptq, k_rtn = _kl(ref, gptq, held), _kl(ref, rtn, held)
    assert k_gptq < 0.9 * k_rtn, (k_gptq, k_rtn)  # measured 7.3e-4 vs 9.6e-4 nats
