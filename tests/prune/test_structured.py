"""Structured pruning: a smaller dense model that runs, reloads, and computes what the dense model
with the removed neurons / heads / channels zeroed computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memopt.core.modules import model_bytes
from memopt.prune import Structured, prune_


def _kept_rows(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Indices of ``old``'s rows that ``new`` kept (rows are unique for random weights)."""
    eq = (new[:, None, :] == old[None, :, :]).all(-1)  # (new, old)
    assert bool((eq.sum(1) == 1).all())
    return eq.float().argmax(1)


def test_cnn_channels_match_masked_dense():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(288, 10)
    )
    ref = copy.deepcopy(cnn)
    x = torch.randn(6, 1, 8, 8)
    rep = prune_(cnn, Structured(0.25))
    assert cnn[0].out_channels == 24 and cnn[4].in_features == 24 * 9
    assert rep.bytes_after < 0.78 * rep.bytes_before
    assert rep.sparsity == pytest.approx(0.25)
    kept = _kept_rows(cnn[0].weight.reshape(24, -1), ref[0].weight.reshape(32, -1))
    gone = sorted(set(range(32)) - set(kept.tolist()))
    with torch.no_grad():
        w = ref[4].weight.view(10, 32, 9)
        w[:, gone] = 0.0  # the dense model without those channels' contributions
        assert torch.allclose(cnn(x), ref(x), atol=1e-5)


def test_llama_ffn_and_heads(tiny_folder, tmp_path):
    from memopt.models import load_model
    from memopt.models.saved import load, save

    loaded = load_model(tiny_folder("llama"))  # hidden 64, ffn 128, 4 heads, 2 kv heads
    ref = copy.deepcopy(loaded.model)
    ids = torch.randint(0, 512, (2, 16))
    rep = prune_(loaded, Structured(0.5), calib=ids)
    cfg = loaded.model.config
    assert cfg.intermediate_size == 64 and cfg.num_attention_heads == 2
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    assert model_bytes(loaded.model) < model_bytes(ref)
    # the reference: zero the down_proj columns of removed neurons, the o_proj columns of removed
    # query heads; each head's attention is independent of the others, so this is the same math
    with torch.no_grad():
        for blk, rblk in zip(loaded.model.model.layers, ref.model.layers, strict=True):
            kept = _kept_rows(blk.mlp.up_proj.weight, rblk.mlp.up_proj.weight)
            gone = sorted(set(range(128)) - set(kept.tolist()))
            rblk.mlp.down_proj.weight[:, gone] = 0.0
            qk = _kept_rows(blk.self_attn.q_proj.weight, rblk.self_attn.q_proj.weight)
            heads = sorted(set((qk // 16).tolist()))
            assert len(heads) == 2 and {h // 2 for h in heads} == {0, 1}  # one per kv group
            for h in set(range(4)) - set(heads):
                rblk.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0.0
        got = loaded.model(input_ids=ids).logits
        want = ref(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    assert rep.changed_config["intermediate_size"] == 64
    # a plain smaller dense model: saves and reloads as one, from its updated config
    save(loaded, tmp_path / "out")
    again = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, got)


def test_bert_ffn_only(minilm):
    model = copy.deepcopy(minilm.model)
    rep = prune_(model, Structured(0.25, heads=False))
    assert model.config.intermediate_size == 1152
    assert model.encoder.layer[0].intermediate.dense.out_features == 1152
    assert rep.bytes_after < rep.bytes_before
    enc = minilm.tokenizer()(["pruning keeps the shape of a dense model"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).last_hidden_state).all()
