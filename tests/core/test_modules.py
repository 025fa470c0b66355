"""memopt.core.modules: selection, the one block finder, and transforms that refuse to do nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import find_blocks, model_bytes, require_blocks, selector
from memopt.models.toy import tiny_llama
from memopt.prune import Magnitude, prune_
from memopt.quant import Int8WeightOnly, quantize_


def test_selector_patterns_and_filter() -> None:
    lin = nn.Linear(2, 2)
    sel = selector(["a.*"], ["a.skip*"], lambda n, m: isinstance(m, nn.Linear))
    assert sel("a.x", lin) and not sel("a.skip", lin) and not sel("b.x", lin)
    assert not sel("a.x", nn.ReLU())
    with pytest.raises(MemoptError, match="list of patterns"):
        selector("a.*")


def test_find_blocks_is_the_list_of_blocks() -> None:
    model = tiny_llama().model
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 4
    # works on the meta device too (parameters counted by numel)
    with torch.device("meta"):
        meta = nn.Sequential(nn.ModuleList([nn.Linear(4, 4)] * 2), nn.ModuleList([nn.Linear(8, 8)]))
    assert find_blocks(meta)[0] == "1"
    assert find_blocks(nn.Linear(2, 2)) is None
    with pytest.raises(MemoptError, match="no list of repeated blocks"):
        require_blocks(nn.Linear(2, 2), "streaming")


def test_model_bytes_counts_shared_storage_once() -> None:
    a = nn.Linear(4, 4, bias=False)
    b = nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    assert model_bytes(nn.Sequential(a, b)) == 4 * 4 * 4


def test_quantize_and_prune_refuse_to_change_nothing() -> None:
    convless = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    with pytest.raises(MemoptError, match=r"quantize_: no module .* nn\.Linear"):
        quantize_(convless, Int8WeightOnly())
    with pytest.raises(MemoptError, match=r"prune_: no module .* nn\.Linear"):
        prune_(convless, Magnitude(0.5))
    model = tiny_llama().model
    with pytest.raises(MemoptError, match="include=\\['nothing.\\*'\\]"):
        quantize_(model, Int8WeightOnly(), include=["nothing.*"])
