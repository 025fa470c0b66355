"""Calibrated int4 (GPTQ): output error below RTN's, RTN's exact storage, block and model level."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cosine
from memopt.core.errors import MemoptError
from memopt.core.modules import find_blocks, model_bytes
from memopt.core.texts import CALIB_TOPICS, EVAL_TOPICS, default_calib_text
from memopt.quant import Int4WeightOnly, QuantConfig, quantize_
from memopt.quant.calibrate import (
    GPTQSettings,
    calibrate_,
    calibration_ids,
    capture_inputs,
    gptq_quantize,
    int4_weight_from_codes,
    quantize_block_,
)
from memopt.weights import Int4Weight, QLinear
from memopt.weights.primitives import choose_qparams, quantize

GPTQ64 = Int4WeightOnly(group_size=64, algo="gptq")
GPTQ32 = Int4WeightOnly(group_size=32, algo="gptq")


def correlated_inputs(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """(M, K) activations with correlated features and uneven feature scales, as in an LLM."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(m, k, generator=g) @ mix + 0.5 * torch.randn(m, k, generator=g)
    return x * (torch.rand(k, generator=g) * 3 + 0.1)  # (M, K)


# ---- one Linear ----


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_output_error_below_rtn(symmetric: bool) -> None:
    torch.manual_seed(0)
    n, k = 128, 256
    x = correlated_inputs(4096, k)  # (M, K)
    w = torch.randn(n, k)
    h = x.t() @ x  # (K, K)
    ref = x @ w.t()
    rtn = Int4Weight(w, 64, symmetric)
    codes, scale, zero = gptq_quantize(w, h, 64, symmetric)
    q = int4_weight_from_codes(codes, scale, zero, 64, symmetric)
    e_rtn = (ref - x @ rtn.dequantize().t()).norm()
    e_gptq = (ref - x @ q.dequantize().t()).norm()
    # measured 1.37x (asymmetric) on these inputs; the plain paper variant gives ~1.19x
    assert e_rtn / e_gptq > 1.25, (float(e_rtn), float(e_gptq))
    plain = gptq_quantize(w, h, 64, symmetric, GPTQSettings(act_order=False, search=False))
    qp = int4_weight_from_codes(*plain, 64, symmetric)
    assert (ref - x @ qp.dequantize().t()).norm() < e_rtn  # every variant beats RTN


def test_gptq_codes_and_scales_in_range() -> None:
    w = torch.randn(64, 128)
    x = correlated_inputs(512, 128)
    x[:, 5] = 0  # a dead input: handled, no NaN
    codes, scale, zero = gptq_quantize(w, x.t() @ x, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.dtype == zero.dtype == torch.bfloat16 and scale.shape == (64, 4)
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()


def test_same_storage_as_rtn() -> None:
    """Built from RTN's own codes it is bit-identical to Int4Weight; from GPTQ's, same layout."""
    w = torch.randn(96, 192)
    rtn = Int4Weight(w, 64)
    s, z = choose_qparams(w, 4, 64, False, torch.bfloat16)
    again = int4_weight_from_codes(quantize(w, s, z, 4, 64), s, z, 64)
    layout = {n: (b.dtype, tuple(b.shape)) for n, b in rtn.named_buffers()}
    assert {n: (b.dtype, tuple(b.shape)) for n, b in again.named_buffers()} == layout
    assert all(torch.equal(a, b) for a, b in zip(rtn.buffers(), again.buffers(), strict=True))
    x = correlated_inputs(256, 192)
    g = int4_weight_from_codes(*gptq_quantize(w, x.t() @ x, 64), 64)
    assert {n: (b.dtype, tuple(b.shape)) for n, b in g.named_buffers()} == layout
    assert g.nbytes == rtn.nbytes == 96 * 192 // 2 + (192 // 64) * 96 * 2 * 2
    assert g.block_n == rtn.block_n
    # the kernel computes what the codes say (bf16 activations: ~0.3 % relative)
    y = g.linear(x[:4])
    ref = x[:4] @ g.dequantize().t()
    assert (y - ref).norm() / ref.norm() < 0.01


# ---- one transformer block, a whole model ----


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.1,  # larger than 0.02, so that int4 error is visible at the output
    )
    return LlamaForCausalLM(cfg).eval()


def zipf_tokens(n: int, t: int, seed: int, vocab: int = 256) -> torch.Tensor:
    """Token ids drawn from a skewed distribution: structured input statistics, like text."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, vocab + 1).float()
    return torch.multinomial(p, n * t, replacement=True, generator=g).reshape(n, t)


def block_inputs(model: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    _, blocks = find_blocks(model)
    return capture_inputs(model, blocks[0], ids, batch=4)


def test_quantize_block_outputs_close_to_float() -> None:
    model = tiny_llama()
    _, blocks = find_blocks(model)
    with torch.no_grad():
        inputs = block_inputs(model, zipf_tokens(8, 64, seed=1))
        block = blocks[0]
        ref = [block(*a, **kw) for a, kw in inputs]
        rtn_block = copy.deepcopy(block)
        quantize_(rtn_block, Int4WeightOnly(group_size=32))
        rtn = [rtn_block(*a, **kw) for a, kw in inputs]
        float_block = copy.deepcopy(block)
        out = quantize_block_(block, inputs, GPTQ32)
    assert len(out) == len(inputs)
    linears = [n for n, m in float_block.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7
    for name in linears:
        m = block.get_submodule(name)
        assert isinstance(m, QLinear) and isinstance(m.qweight, Int4Weight)
        assert not any(p.dtype.is_floating_point and p.dim() == 2 for p in m.parameters())

    def worst(outs: list[torch.Tensor]) -> float:  # cosine of the block's own contribution
        pairs = zip(ref, outs, inputs, strict=True)
        return min(cosine(r - a[0], o - a[0]) for r, o, (a, _) in pairs)

    cos_gptq, cos_rtn = worst(out), worst(rtn)
    assert cos_gptq > 0.98  # measured 0.990; RTN 0.975
    assert 1 - cos_gptq < 0.8 * (1 - cos_rtn), (cos_gptq, cos_rtn)


def kl_to_float(ref: nn.Module, model: nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(float || quantized) of next-token distributions: the extra nats per token that a
    perplexity measured against the float model's own predictions would show."""
    with torch.no_grad():
        lp = F.log_softmax(ref(input_ids=ids).logits.float(), -1)
        lq = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_calibrate_whole_model_beats_rtn() -> None:
    ref = tiny_llama()
    calib, held_out = zipf_tokens(16, 64, seed=2), zipf_tokens(8, 64, seed=3)
    rtn = copy.deepcopy(ref)
    quantize_(rtn, Int4WeightOnly(group_size=32))
    gptq = copy.deepcopy(ref)
    report = quantize_(gptq, GPTQ32, calib=calib)
    assert report.formats == {"int4": 16}  # 2 blocks x 7 Linears + embedding + tied lm_head
    assert report.bytes_after < 0.2 * report.bytes_before
    assert gptq.lm_head.qweight is gptq.model.embed_tokens.qweight  # tie kept
    k_rtn, k_gptq = kl_to_float(ref, rtn, held_out), kl_to_float(ref, gptq, held_out)
    # measured 0.059 vs 0.075 nats (the GPTQ'd tied lm_head costs the random embedding a little)
    assert k_gptq < 0.9 * k_rtn, (k_rtn, k_gptq)
    blocks_only = copy.deepcopy(ref)
    calibrate_(blocks_only, GPTQ32, calib, settings=GPTQSettings(lm_head=False))
    k_blocks = kl_to_float(ref, blocks_only, held_out)
    assert k_blocks < 0.8 * k_rtn, (k_rtn, k_blocks)  # measured 0.053
    # same bytes as RTN, module by module
    assert report.bytes_after == model_bytes(rtn)


def test_calibrate_respects_exclude() -> None:
    model = tiny_llama()
    report = calibrate_(model, GPTQ32, zipf_tokens(4, 32, seed=4), exclude=["*mlp*", "lm_head"])
    assert all("mlp" not in m for m in report.modules)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, QLinear)
    assert "lm_head" in report.skipped or "model.embed_tokens" in report.skipped  # tie untouched


# ---- calibration data, config ----


class CharTokenizer:
    def __call__(self, text: str, **kw: object) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_calibration_ids() -> None:
    assert not set(CALIB_TOPICS) & set(EVAL_TOPICS)
    ids = calibration_ids(CharTokenizer(), None, n=16, seq=128)
    assert ids.shape == (16, 128) and ids.dtype == torch.long
    assert len({tuple(r.tolist()) for r in ids}) == 16  # distinct windows
    assert len(default_calib_text()) > 100_000
    short = calibration_ids(CharTokenizer(), "abcdefgh", n=4, seq=32)
    assert short.shape == (1, 8)


def test_config_json_round_trip_and_bad_algo() -> None:
    d = GPTQ64.to_dict()
    assert d == {"type": "Int4WeightOnly", "group_size": 64, "symmetric": False, "algo": "gptq"}
    assert QuantConfig.from_dict(d) == GPTQ64
    old = {"type": "Int4WeightOnly", "group_size": 64, "symmetric": False}
    assert QuantConfig.from_dict(old).algo == "rtn"  # manifests written before algo existed
    with pytest.raises(MemoptError, match="algo"):
        Int4WeightOnly(algo="awq-typo")
    with pytest.raises(MemoptError, match="algo"):
        QuantConfig.from_dict({**d, "algo": "nope"})
    with pytest.raises(MemoptError, match="calib"):
        quantize_(tiny_llama(), GPTQ64)  # calibrated without calibration data
    with pytest.raises(MemoptError):
        calibrate_(tiny_llama(), Int4WeightOnly(group_size=64), zipf_tokens(2, 8, seed=0))


def test_gptq_keeps_rtn_where_its_output_error_is_smaller(smollm2) -> None:
    """``rtn_when_better``: on SmolLM2 as shipped (its Q4_1 weights dequantized), block 0's down
    projection at group 32, round to nearest makes a smaller output error on the calibration
    inputs than GPTQ (8.0 against 9.9, measured), so the calibrated weight is RTN's bit for bit;
    its q projection, where GPTQ's is smaller (0.48 against 0.88), keeps GPTQ's. Without the
    rule both are GPTQ's."""
    import copy

    from memopt.compose.fit import Calibrated
    from memopt.quant.calibrate import GPTQSettings, calibration_ids, quantize_block_
    from memopt.quant.config import Int4WeightOnly

    ids = calibration_ids(smollm2.tokenizer(), n=4, seq=128)
    cal = Calibrated.of(smollm2.model.eval(), ids)
    config = Int4WeightOnly(group_size=32, algo="gptq")
    got = {}
    for rule in (True, False):
        block = copy.deepcopy(cal.blocks[0])
        quantize_block_(block, cal.inputs[0], config, settings=GPTQSettings(rtn_when_better=rule))
        got[rule] = {nm: block.get_submodule(nm).qweight.dequantize(torch.float32)
                     for nm in ("mlp.down_proj", "self_attn.q_proj")}  # fmt: skip
    rtn = {nm: Int4Weight(cal.blocks[0].get_submodule(nm).weight.detach(), 32).dequantize(
        torch.float32) for nm in got[True]}  # fmt: skip
    assert torch.equal(got[True]["mlp.down_proj"], rtn["mlp.down_proj"])
    assert not torch.equal(got[False]["mlp.down_proj"], rtn["mlp.down_proj"])
    assert torch.equal(got[True]["self_attn.q_proj"], got[False]["self_attn.q_proj"])
    assert not torch.equal(got[True]["self_attn.q_proj"], rtn["self_attn.q_proj"])


# ---- int3 / int2 by GPTQ ----


@pytest.mark.parametrize("bits", [3, 2])
def test_gptq_intn_output_error_below_rtn(bits: int) -> None:
    from memopt.quant.calibrate import intn_weight_from_codes
    from memopt.weights.quantized import IntNWeight

    torch.manual_seed(0)
    n, k = 128, 256
    x = correlated_inputs(4096, k)  # (M, K)
    w = torch.randn(n, k)
    ref = x @ w.t()
    rtn = IntNWeight(w, bits, 64, False)
    codes, scale, zero = gptq_quantize(w, x.t() @ x, 64, False, bits=bits)
    assert int(codes.max()) <= 2**bits - 1 and scale.dtype == torch.float16
    q = intn_weight_from_codes(codes, scale, zero, bits, 64)
    assert q.nbytes == rtn.nbytes  # the same storage as round-to-nearest
    e_rtn = (ref - x @ rtn.dequantize().t()).norm()
    e_gptq = (ref - x @ q.dequantize().t()).norm()
    # measured 1.40x (int3) and 1.56x (int2) on these inputs
    assert e_rtn / e_gptq > 1.3, (float(e_rtn), float(e_gptq))


def test_calibrate_int3_whole_model_beats_rtn() -> None:
    from memopt.quant import IntNWeightOnly
    from memopt.weights.quantized import IntNWeight

    ref = tiny_llama()
    calib, held_out = zipf_tokens(16, 64, seed=2), zipf_tokens(8, 64, seed=3)
    rtn = copy.deepcopy(ref)
    quantize_(rtn, IntNWeightOnly(bits=3, group_size=32))
    gptq = copy.deepcopy(ref)
    report = quantize_(gptq, IntNWeightOnly(bits=3, group_size=32, algo="gptq"), calib=calib)
    assert report.formats == {"int3": 16}
    assert isinstance(gptq.model.layers[0].mlp.down_proj.qweight, IntNWeight)
    assert gptq.lm_head.qweight is gptq.model.embed_tokens.qweight  # tie kept
    assert report.bytes_after == model_bytes(rtn)  # same bytes as RTN
    k_rtn, k_gptq = kl_to_float(ref, rtn, held_out), kl_to_float(ref, gptq, held_out)
    assert k_gptq < 0.8 * k_rtn, (k_rtn, k_gptq)  # measured 0.212 vs 0.305 nats
