"""memopt.app.rows: the measured rows of ``memopt demo`` beyond its quantization table: pruning
(on MiniLM), streaming (SmolLM2 at 25 % of its float32 bytes, measured in children) and training
(plain against optimized, on a tiny Llama)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from memopt.app.rows import prune_row, stream_row, train_row
from memopt.models.toy import tiny_llama


def test_prune_row(minilm) -> None:  # noqa: ANN001 (conftest fixture)
    lm = copy.deepcopy(minilm)
    row = prune_row(lm, "magnitude", 0.5)
    assert row["technique"] == "prune magnitude 50%" and row["sparsity"] == pytest.approx(0.5)
    assert row["bytes_after"] < 0.8 * row["bytes_before"]  # the 30522 x 384 embedding stays dense


def test_stream_row_smollm2(smollm2, tmp_path: Path) -> None:  # noqa: ANN001 (conftest fixture)
    row = stream_row("smollm2", tmp_path, max_new_tokens=8, loaded=smollm2)
    assert row["budget_bytes"] == int(0.25 * row["float32_bytes"])
    assert 0 < row["peak_over_baseline_bytes"] <= row["budget_bytes"] and row["within_budget"]
    assert row["same_tokens"] and row["tokens"] == 8
    assert row["tokens_per_s_ratio"] > 0
    # the float folder is written once, complete, and reused
    assert (tmp_path / "stream-float32" / "model.safetensors").is_file()
    assert not (tmp_path / "stream-float32.partial").exists()


def test_train_row_measures_both_sides() -> None:
    # a vocabulary large enough that the model's bytes, not AdamW8bit's 1.3 MB of constant lookup
    # tables, dominate the optimized side's peak
    loaded = tiny_llama(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    row = train_row(loaded, batch=2, seq=32, steps=3)
    assert row["steps"] == 3 and row["options"]["optimizer"] == "adamw8bit"
    for side in ("plain", "optimized"):
        assert row[side]["peak_bytes"] > 0 and row[side]["step_s"] > 0
    # 8-bit state, bf16 weights and checkpointing: less memory even on a toy model
    assert row["peak_ratio"] < 0.9, row
    assert abs(row["loss_rel_diff"]) < 0.05, row  # same batches, same start
    after = loaded.model.state_dict()
    assert all(v.equal(after[k]) for k, v in before.items())  # the caller's model is untouched
