"""quantize_ on modules and whole models: kernels vs reference, bytes, ties, patterns, configs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_similar
from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes
from memopt.quant import (
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    QuantConfig,
    quantize_,
)
from memopt.weights import QConv, QEmbedding, QLinear, QuantizedWeight
from memopt.weights.kernels import INT8_KERNELS

WEIGHT_CONFIGS = [
    Int8WeightOnly(),
    Int8WeightOnly(group_size=32),
    Int8Dynamic(),
    Int4WeightOnly(group_size=32),
    Int4WeightOnly(group_size=128, symmetric=True),
    IntNWeightOnly(bits=3, group_size=32),
    IntNWeightOnly(bits=2, group_size=64),
]
IDS = [repr(c) for c in WEIGHT_CONFIGS]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.embed = nn.Embedding(100, 128)
        self.conv1 = nn.Conv1d(128, 128, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 8, 2, padding=1, padding_mode="reflect")  # K = 32 * 2 * 2
        self.fc1 = nn.Linear(128, 256)
        self.gpt2 = Conv1D(128, 256)  # weight (256 in, 128 out)
        self.head = nn.Linear(128, 64, bias=False)
        self.norm = nn.LayerNorm(64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, 128)
        h = h + self.conv1(h.transpose(1, 2)).transpose(1, 2)
        img = h.reshape(h.shape[0], 32, 8, -1)  # (B, 32, 8, T / 2)
        h = h + self.conv2(img).mean() * 0.01
        h = self.gpt2(F.gelu(self.fc1(h)))
        return self.norm(self.head(h))


@pytest.fixture(scope="module")
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


@pytest.mark.parametrize("config", WEIGHT_CONFIGS, ids=IDS)
def test_whole_toy_model_quantized_and_no_float_weight_left(toy, config):
    model = copy.deepcopy(toy)
    shapes = {
        tuple(m.weight.shape)
        for m in model.modules()
        if hasattr(m, "weight") and not isinstance(m, nn.LayerNorm)
    }
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = toy(ids)
    report = quantize_(model, config)
    assert sorted(report.modules) == ["conv1", "conv2", "embed", "fc1", "gpt2", "head"]
    assert sum(report.formats.values()) == 6 and not report.skipped
    assert report.bytes_after == model_bytes(model) < report.bytes_before
    for m in model.modules():
        if isinstance(m, (QLinear, QEmbedding, QConv)):
            for t in [*m.parameters(), *m.buffers()]:
                assert not (t.is_floating_point() and tuple(t.shape) in shapes), m
    assert all(not isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    out = model(ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if config.fmt in ("int8", "int8-dynamic", "int4"):
        assert_similar(out, ref, min_cosine=0.95)


@pytest.mark.parametrize("config", WEIGHT_CONFIGS, ids=IDS)
@pytest.mark.parametrize("m", [1, 8, 33])
def test_linear_kernel_matches_dequantized_reference(config, m):
    """Kernel error alone: the quantized Linear vs F.linear with its own dequantized weight."""
    torch.manual_seed(m)
    model = nn.Sequential(nn.Linear(256, 192))
    quantize_(model, config)
    q: QLinear = model[0]
    x = torch.randn(m, 256)
    if config == Int8Dynamic():  # reference quantizes the activations per token as well
        sx = x.abs().amax(1, keepdim=True) / 127
        x_ref = torch.round(x / sx).clamp(-127, 127) * sx
    else:
        x_ref = x
    ref = F.linear(x_ref, q.qweight.dequantize(), q.bias)
    assert_similar(q(x), ref, min_cosine=0.9999)


@pytest.mark.parametrize("kernel", sorted(INT8_KERNELS))
def test_each_int8_kernel_matches_reference(kernel, monkeypatch):
    monkeypatch.setenv("MEMOPT_KERNEL", kernel)
    model = nn.Sequential(nn.Linear(320, 128))
    quantize_(model, Int8WeightOnly())
    x = torch.randn(5, 320)
    ref = F.linear(x, model[0].qweight.dequantize(), model[0].bias)
    assert_similar(model[0](x), ref, min_cosine=0.9999)


@pytest.mark.parametrize("config", [Int8WeightOnly(), Int4WeightOnly(32), IntNWeightOnly(3, 32)])
def test_embedding_gathers_rows_exactly(config):
    emb = nn.Sequential(nn.Embedding(192, 64))
    quantize_(emb, config)
    q: QEmbedding = emb[0]
    idx = torch.tensor([[0, 31, 32, 63], [64, 150, 191, 5]])  # both nibbles of the int4 layout
    assert torch.equal(q(idx), q.qweight.dequantize()[idx])


@pytest.mark.parametrize("config", [Int8WeightOnly(), Int4WeightOnly(32)])
def test_conv_matches_dequantized_reference(config):
    model = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, padding_mode="circular"))
    conv = copy.deepcopy(model[0])
    quantize_(model, config)
    x = torch.randn(2, 32, 10, 10)
    w = model[0].qweight.dequantize().reshape(conv.weight.shape)
    ref = conv._conv_forward(x, w, conv.bias)
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_minilm_whole_model_int8_bytes_and_cosine():
    from memopt.models import load_model

    lm = load_model("minilm")
    model = lm.model.eval()
    enc = lm.tokenizer()(
        [
            "The quick brown fox jumps over the lazy dog.",
            "Memory is the bottleneck of inference on small machines.",
            "Python lists are mutable sequences.",
            "It rained all day, so the match was cancelled.",
        ],
        padding=True,
        return_tensors="pt",
    )
    mask = enc["attention_mask"][..., None].float()

    def embed(mod: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = mod(**enc).last_hidden_state
        return (h * mask).sum(1) / mask.sum(1)  # mean pooling, (B, 384)

    ref = embed(model)
    report = quantize_(model, Int8WeightOnly())
    assert "embeddings.word_embeddings" in report.modules  # the 30522 x 384 table too
    assert report.bytes_after <= 0.27 * report.bytes_before
    assert_similar(embed(model), ref, min_cosine=0.999, rows=True)  # every sentence


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("config", [Int8WeightOnly(), Int4WeightOnly(32), IntNWeightOnly(2, 32)])
def test_tied_lm_head_stays_tied_and_stored_once(config):
    model = _tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize_(model, config)
    qw = model.model.embed_tokens.qweight
    assert model.lm_head.qweight is qw  # one quantized tensor for both
    assert {"lm_head", "model.embed_tokens"} <= set(report.modules)
    # stored once: counted once by unique storage, and the buffers of the model hold it once
    assert sum(1 for m in model.modules() if isinstance(m, QuantizedWeight) and m is qw) == 1
    assert model_bytes(model) == sum(b.nbytes for b in model.buffers()) + sum(
        p.nbytes for p in model.parameters()
    )
    with torch.no_grad():
        out = model(ids).logits
    if config.fmt != "int2":
        assert_similar(out, ref, min_cosine=0.98)
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 15)


def test_tie_with_excluded_partner_leaves_both_float():
    model = _tiny_llama()
    report = quantize_(model, Int8WeightOnly(), exclude=["lm_head"])
    assert "model.embed_tokens" in report.skipped
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_include_exclude_and_filter_fn(toy):
    model = copy.deepcopy(toy)
    report = quantize_(model, Int8WeightOnly(), include=["fc*", "head", "conv*"], exclude=["conv2"])
    assert sorted(report.modules) == ["conv1", "fc1", "head"]
    assert isinstance(model.conv2, nn.Conv2d) and isinstance(model.embed, nn.Embedding)
    model = copy.deepcopy(toy)
    report = quantize_(model, Int4WeightOnly(32), filter_fn=lambda n, m: isinstance(m, nn.Linear))
    assert sorted(report.modules) == ["fc1", "head"]


def test_group_that_does_not_divide_is_skipped_with_reason():
    model = nn.Sequential(nn.Linear(96, 32), nn.Linear(64, 32))
    report = quantize_(model, Int4WeightOnly(group_size=64))
    assert report.modules == ["1"] and "does not divide" in report.skipped["0"]


def test_cast_keeps_norms_float32_and_runs_minilm():
    from memopt.models import load_model

    lm = load_model("minilm")
    model = lm.model.eval()
    enc = lm.tokenizer()(["A short sentence.", "Another one, a little longer."], padding=True,
                         return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    report = quantize_(model, Cast("float16"))
    assert model.embeddings.LayerNorm.weight.dtype == torch.float32
    assert model.encoder.layer[0].attention.self.query.weight.dtype == torch.float16
    assert report.formats["float32 (kept)"] == 13
    assert report.bytes_after < 0.51 * report.bytes_before
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert_similar(out.float(), ref, min_cosine=0.999)


def test_cast_keeps_ties():
    model = _tiny_llama()
    quantize_(model, Cast("bfloat16"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16
    model(torch.tensor([[1, 2, 3]]))


BAD = [
    lambda: Int4WeightOnly(group_size=48),
    lambda: Int4WeightOnly(group_size=True),
    lambda: Int4WeightOnly(symmetric="yes"),
    lambda: Int8WeightOnly(group_size=0),
    lambda: Int8WeightOnly(group_size=-32),
    lambda: IntNWeightOnly(bits=5),
    lambda: IntNWeightOnly(bits=2, group_size=100),
    lambda: Cast(dtype="float8"),
    lambda: Cast(keep=[1]),
    lambda: QuantConfig.from_dict({"type": "Int9"}),
    lambda: QuantConfig.from_dict({"type": "Int4WeightOnly", "bits": 4}),
    lambda: quantize_(nn.Linear(4, 4), "int8"),  # type: ignore[arg-type]
    lambda: quantize_(nn.Linear(4, 4), Int8WeightOnly(), include="fc"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("make", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_values_refused_with_one_line_error(make):
    with pytest.raises(MemoptError) as e:
        make()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config", [*WEIGHT_CONFIGS, Cast("bfloat16", keep=("*norm*",))], ids=str)
def test_config_json_round_trip(config):
    import json

    d = json.loads(json.dumps(config.to_dict()))
    assert QuantConfig.from_dict(d) == config


def test_opt_learned_positions_stay_float_and_the_model_runs(tiny_folder) -> None:
    """OPT's positional embedding is an nn.Embedding subclass whose forward takes positions:
    quantize_ leaves it float (saying why) and the quantized model still runs."""
    from memopt.models import load_model

    loaded = load_model(tiny_folder("opt"))
    report = quantize_(loaded.model, Int8WeightOnly())
    assert any("forward of its own" in why for why in report.skipped.values())
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()
