"""memopt.step.checkpoint: which blocks to checkpoint, by index or by name pattern."""

from __future__ import annotations

import pytest

from memopt.core.errors import MemoptError
from memopt.models.toy import tiny_llama
from memopt.step.checkpoint import checkpoint_blocks, select_blocks

SMALL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, vocab_size=512)


def test_select_blocks_by_pattern_and_index() -> None:
    model = tiny_llama(**SMALL).model
    assert select_blocks(model, None) == [0, 1, 2, 3]
    assert select_blocks(model, "model.layers.[13]") == [1, 3]
    assert select_blocks(model, [2, "model.layers.0"]) == [0, 2]
    with pytest.raises(MemoptError, match="matches no block"):
        select_blocks(model, "encoder.*")
    with pytest.raises(MemoptError, match="out of range"):
        select_blocks(model, [4])
    names = checkpoint_blocks(model, [0, 1])
    assert names == ["model.layers.0", "model.layers.1"]
