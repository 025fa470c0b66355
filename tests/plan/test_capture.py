"""Capture and lowering: the attention decomposition against SDPA, causal masks found by value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memopt.models import LoadedModel
from memopt.plan import plan_model
from memopt.plan.capture import _is_causal_mask, _sdpa


@pytest.mark.parametrize(
    ("h", "hk", "length", "s_len", "causal", "mask"),
    [
        (4, 4, 300, 300, True, None),  # three chunks, the last one ragged
        (6, 2, 300, 300, True, None),  # grouped-query: K/V read in place
        (4, 4, 40, 40, False, None),
        (6, 2, 70, 90, False, "bool"),  # a (L, S) boolean mask shared by all heads
        (4, 2, 50, 50, False, "float-per-head"),  # (B, H, L, S) additive mask
        (4, 4, 20, 30, True, None),  # L != S: SDPA's top-left causal alignment, one chunk
    ],
)
def test_sdpa_decomposition_matches_torch(
    h: int, hk: int, length: int, s_len: int, causal: bool, mask: str | None
) -> None:
    g = torch.Generator().manual_seed(0)
    b, e = 2, 16
    q = torch.randn(b, h, length, e, generator=g)
    k = torch.randn(b, hk, s_len, e, generator=g)
    v = torch.randn(b, hk, s_len, e, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(length, s_len, generator=g) > 0.3
        m[:, 0] = True  # no fully masked row
    elif mask == "float-per-head":
        m = torch.randn(b, h, length, s_len, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=h != hk)
    got = _sdpa(q, k, v, attn_mask=m, is_causal=causal)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5


def test_causal_mask_by_value() -> None:
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    assert _is_causal_mask(keep[None, None], 5, 5)
    assert _is_causal_mask(torch.zeros(5, 5).masked_fill(~keep, float("-inf")), 5, 5)
    assert not _is_causal_mask(keep.clone().fill_(True), 5, 5)
    assert not _is_causal_mask(keep.expand(2, 1, 5, 5), 5, 5)  # per batch: leave it as a mask
    window = keep & ~torch.ones(5, 5, dtype=torch.bool).tril(-2)  # sliding window: not causal
    assert not _is_causal_mask(window, 5, 5)


def test_traced_causal_mask_becomes_chunked_attention() -> None:
    """A Llama traced at seq 250 builds its causal mask as a tensor; the plan finds it by value,
    so each layer runs 2 chunks of queries (baddbmm) against only the keys they can see."""
    from transformers import AutoModelForCausalLM

    from conftest import _tiny_configs

    torch.manual_seed(0)
    config = _tiny_configs()["llama"]
    model = AutoModelForCausalLM.from_config(config).eval()
    loaded = LoadedModel(model, "causal-lm", "llama", config)
    plan = plan_model(loaded, batch=1, seq=250)
    ops = [str(n.target) for n in plan.program.graph.nodes if n.op == "call_function"]
    # (transformers repeats K/V to every query head before SDPA when traced: one group per chunk)
    assert ops.count("aten.baddbmm.default") == config.num_hidden_layers * 2
    ex = plan.executor()
    with torch.no_grad():
        ref = model(**plan.inputs, use_cache=False).logits
    assert (ex.run(**plan.inputs) - ref).abs().max().item() < 1e-5
