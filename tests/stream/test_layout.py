"""Data locality: memopt's files hold tensors in execution order (a streamed pass reads front to back)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memopt.formats.safetensors import SafetensorsReader
from memopt.models import load_model
from memopt.stream.layout import order_report, save_float_folder


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-block Llama: with 10+ blocks, name order (layers.10 < layers.2) is not execution order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, vocab_size=256,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("layout") / "hf"
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def _execution_order(names: list[str]) -> bool:
    """Tensors of block i all before those of block i + 1, the embedding first, the head last."""
    blocks = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    first_block = next(i for i, n in enumerate(names) if n.startswith("model.layers."))
    last_block = max(i for i, n in enumerate(names) if n.startswith("model.layers."))
    # the embedding (float, or a quantized one's codes and scales) first, the final norm after
    emb = max(i for i, n in enumerate(names) if n.startswith("model.embed_tokens."))
    norm = names.index("model.norm.weight")
    return blocks == sorted(blocks) and emb < first_block and norm > last_block


def test_hf_file_is_sorted_by_name_not_execution(twelve: Path) -> None:
    """The reason memopt writes its own files: safetensors sorts by name."""
    names = SafetensorsReader(twelve).names()
    assert not order_report(twelve)["blocks_in_order"]
    assert not _execution_order(names)


def test_save_float_folder_is_in_execution_order(twelve: Path, tmp_path: Path) -> None:
    out = save_float_folder(load_model(twelve), tmp_path / "f32")
    rep = order_report(out)
    assert rep["blocks"] == 12 and rep["blocks_contiguous"] and rep["blocks_in_order"]
    assert _execution_order(SafetensorsReader(out).names())


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_memopt_quantized_folder_is_in_execution_order(
    twelve: Path, tmp_path: Path, method: str
) -> None:
    from memopt.quant.config import method_config
    from memopt.quant.stream import quantize_model

    out = tmp_path / method
    quantize_model(twelve, method_config(method, 32, "rtn" if method == "int4" else None), out)
    rep = order_report(out)
    assert rep["blocks"] == 12 and rep["blocks_contiguous"] and rep["blocks_in_order"]
    assert _execution_order(SafetensorsReader(out).names())


def test_channels_last_only_for_convolutions() -> None:
    from torch import nn

    from memopt.stream.layout import channels_last_

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(5, 3, 8, 8)  # (B, C, H, W)
    want = cnn(x)
    assert channels_last_(cnn)
    assert cnn[0].weight.is_contiguous(memory_format=torch.channels_last)
    got = cnn(x.contiguous(memory_format=torch.channels_last))
    sqnr = 20 * torch.log10(want.norm() / (want - got).norm().clamp_min(1e-30))
    assert sqnr > 100  # the same sums in another order: float32 rounding only
    mlp = nn.Sequential(nn.Linear(4, 4))
    assert not channels_last_(mlp)
