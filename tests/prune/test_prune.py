"""prune_: exact sparsity per method, N:M patterns, calibrated methods, prune + int8, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memopt.core.errors import MemoptError
from memopt.prune import (
    NM,
    Magnitude,
    SparseGPT,
    SparseWeight,
    Structured,
    Wanda,
    config_for_method,
    prune_,
    sparsity_of,
)
from memopt.prune.calibrated import sparsegpt_prune
from memopt.quant import Int8WeightOnly, quantize_
from memopt.weights.primitives import sqnr


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 8)
    )


def _dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m.weight.detach().clone()
        elif isinstance(getattr(m, "qweight", None), SparseWeight):
            out[name] = m.qweight.dequantize()
    return out


@pytest.mark.parametrize("s", [0.3, 0.5, 0.77])
def test_magnitude_layer_exact(s):
    m = _mlp()
    before = _dense_weights(m)
    rep = prune_(m, Magnitude(s), compact=False)
    for name, w in _dense_weights(m).items():
        assert int((w == 0).sum()) == round(s * w.numel()), name
        kept = before[name][w != 0].abs().min()
        dropped = before[name][w == 0].abs().max()
        assert kept >= dropped  # the smallest went
    assert rep.sparsity == pytest.approx(s, abs=1 / 1000)


def test_magnitude_global_exact_and_uneven():
    m = _mlp()
    with torch.no_grad():
        m[0].weight.mul_(10)  # larger weights: this layer should lose less
    prune_(m, Magnitude(0.6, scope="global"), compact=False)
    ws = _dense_weights(m)
    total = sum(w.numel() for w in ws.values())
    assert sum(int((w == 0).sum()) for w in ws.values()) == round(0.6 * total)
    assert (ws["0"] == 0).float().mean() < 0.6 < (ws["2"] == 0).float().mean()


def test_nm_pattern_every_group():
    m = _mlp()
    rep = prune_(m, NM(2, 4, score="magnitude"), compact=False)
    for w in _dense_weights(m).values():
        groups = (w != 0).view(w.shape[0], -1, 4).sum(-1)  # (N, K/4)
        assert torch.equal(groups, torch.full_like(groups, 2))
    assert rep.sparsity == 0.5


def test_wanda_rows_exact_and_uses_activations():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 16, bias=False))
    x = torch.randn(256, 32)
    x[:, 0] *= 100.0  # feature 0 is loud: Wanda keeps its weights even where they are small
    with torch.no_grad():
        lin[0].weight[:, 0] = 0.01
    prune_(lin, Wanda(0.5), calib=x, compact=False)
    w = lin[0].weight
    assert torch.equal((w == 0).sum(1), torch.full((16,), 16))  # each row loses exactly half
    assert bool((w[:, 0] != 0).all())


def test_wanda_blockwise_on_tiny_llama(tiny_folder):
    from memopt.models import load_model

    loaded = load_model(tiny_folder("llama"))
    ids = torch.randint(0, 512, (4, 32))
    rep = prune_(loaded.model, Wanda(0.5), calib=ids, include=["model.layers.*"])
    assert len(rep.modules) == 2 * 7 and rep.sparsity == 0.5
    assert rep.formats == {"sparse-bitmask-float": 14}
    assert "lm_head" not in rep.modules
    assert rep.bytes_after < rep.bytes_before
    out = loaded.model(input_ids=ids[:1]).logits
    assert torch.isfinite(out).all()


def test_sparsegpt_beats_wanda_on_its_data():
    """With the same sparsity, SparseGPT's compensated weights reproduce the layer's outputs on the
    calibration inputs better than Wanda's mask alone (its whole point)."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    x = torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128)  # low rank
    h = x.t() @ x
    pruned = sparsegpt_prune(w, h, 0.5)
    assert torch.equal((pruned == 0).sum(1), torch.full((48,), 64))  # exact per row
    from memopt.prune.masks import row_mask

    wanda = w * row_mask(w.abs() * h.diagonal().sqrt(), 0.5)
    err_sgpt = (x @ (pruned - w).t()).norm()
    err_wanda = (x @ (wanda - w).t()).norm()
    assert err_sgpt < 0.5 * err_wanda
    nm = sparsegpt_prune(w, h, 0.5, nm=(2, 4))
    assert torch.equal((nm != 0).view(48, -1, 4).sum(-1), torch.full((48, 32), 2))


def test_prune_then_int8():
    m = _mlp()
    x = torch.randn(10, 64)
    masked = _mlp()
    prune_(masked, Magnitude(0.5), compact=False)  # the float reference: dense with zeros
    rep = prune_(m, Magnitude(0.5), values="int8")
    assert set(rep.formats) == {"sparse-bitmask-int8"}
    dense_int8 = _mlp()
    q = quantize_(dense_int8, Int8WeightOnly())
    assert rep.bytes_after < q.bytes_after  # sparse int8 < dense int8
    with torch.no_grad():
        assert sqnr(masked(x), m(x)) > 30.0
        pairs = zip(_dense_weights(m).items(), _dense_weights(masked).values(), strict=True)
        for (name, w), w_ref in pairs:
            assert torch.equal(w == 0, w_ref == 0), name  # same pattern after quantization
    assert sparsity_of(m) == pytest.approx(0.5, abs=1e-3)


def test_int8_values_store_the_tied_embedding_and_head_int8():
    """A tied embedding and lm_head (left dense by pruning: they share one weight) are stored
    int8 per channel, one weight for both, when the kept values are int8 or int4; the logits
    stay within 30 dB SQNR of the float-valued pruned model's (a tiny random Llama: int8 rounding
    of every weight gives ~40 dB)."""
    from memopt.models.toy import tiny_llama
    from memopt.weights.quantized import Int8Weight

    ref = tiny_llama(seed=3)
    prune_(ref.model, Magnitude(0.5))
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    for values in ("int8", "int4"):
        lm = tiny_llama(seed=3)
        rep = prune_(lm.model, Magnitude(0.5), values=values)
        emb, head = lm.model.model.embed_tokens, lm.model.lm_head
        assert isinstance(emb.qweight, Int8Weight) and head.qweight is emb.qweight
        assert rep.formats["int8"] == 2 and rep.bytes_after < 0.3 * rep.bytes_before
        with torch.no_grad():
            got = sqnr(ref.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
        assert got > (30.0 if values == "int8" else 15.0), (values, got)
    lm = tiny_llama(seed=3)
    prune_(lm.model, Magnitude(0.5))  # float values: the tied weight stays float32
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight


def test_compact_only_when_smaller():
    m = _mlp()
    rep = prune_(m, Magnitude(0.01))  # 1 %: the bitmask costs more than the zeros save
    assert rep.formats == {"dense": 3}
    assert rep.bytes_after == rep.bytes_before


@pytest.mark.parametrize(
    "make",
    [
        lambda: Magnitude(1.0),
        lambda: Magnitude(-0.1),
        lambda: Magnitude(0.5, scope="row"),
        lambda: Wanda(float("nan")),
        lambda: NM(4, 2),
        lambda: NM(2, 4, score="random"),
        lambda: Structured(1.0),
        lambda: config_for_method("random"),
        lambda: config_for_method("2:x"),
        lambda: config_for_method("2:4", 0.3),
    ],
)
def test_bad_configs(make):
    with pytest.raises(MemoptError) as exc:
        make()
    assert "\n" not in str(exc.value)


def test_bad_calls():
    with pytest.raises(MemoptError, match="does not divide"):
        prune_(nn.Sequential(nn.Linear(30, 8)), NM(2, 4, score="magnitude"))
    with pytest.raises(MemoptError, match="calib"):
        prune_(_mlp(), Wanda(0.5))
    with pytest.raises(MemoptError):
        prune_(_mlp(), Magnitude(0.5), values="int3")
    with pytest.raises(MemoptError):
        prune_(_mlp(), Magnitude(0.5), include="0")  # a string, not a list


def test_methods_map():
    assert config_for_method("2:4") == NM(2, 4, score="sparsegpt")
    assert config_for_method("wanda", 0.6) == Wanda(0.6)
    assert config_for_method("sparsegpt") == SparseGPT(0.5)
    assert config_for_method("structured") == Structured(0.25)
    assert F is not None


def test_owl_block_sparsities(tiny_folder):
    """OWL: per-block sparsities in [s - λ, s + λ] with mean s, at least one block at each end
    (the outlier ratios are scaled onto the whole span); the pruned model's sparsity stays s."""
    from memopt.models import load_model
    from memopt.prune.calibrated import block_sparsities

    loaded = load_model(tiny_folder("llama"))
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    targets = [(n, m) for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)]
    got = block_sparsities(loaded.model, targets, ids, 0.5, 0.1)
    assert len(got) == 2 and abs(sum(got) / 2 - 0.5) < 1e-9
    assert min(got) == pytest.approx(0.4) and max(got) == pytest.approx(0.6)
    assert block_sparsities(loaded.model, targets, ids, 0.5, 0.0) == [0.5, 0.5]
    rep = prune_(loaded.model, SparseGPT(0.5, owl=0.1), calib=ids, include=["model.layers.*"])
    assert rep.sparsity == pytest.approx(0.5, abs=0.01)
    per = [sparsity_of(loaded.model, [f"model.layers.{b}.mlp.up_proj"]) for b in range(2)]
    assert sorted(per) == pytest.approx(sorted(got), abs=0.01)  # each block at its own sparsity
    with pytest.raises(MemoptError, match="owl"):
        SparseGPT(0.5, owl=0.6)
