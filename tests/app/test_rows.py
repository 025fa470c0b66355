"""demo_row(): the demo's measured training comparison, on a tiny Llama."""

from __future__ import annotations

from memopt.models.toy import tiny_llama
from memopt.train.demo import demo_row


def test_demo_row_measures_both_sides() -> None:
    # a vocabulary large enough that the model's bytes, not AdamW8bit's 1.3 MB of constant lookup
    # tables, dominate the optimized side's peak
    loaded = tiny_llama(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    row = demo_row(loaded, batch=2, seq=32, steps=3)
    assert row["steps"] == 3 and row["options"]["optimizer"] == "adamw8bit"
    for side in ("plain", "optimized"):
        assert row[side]["peak_bytes"] > 0 and row[side]["step_s"] > 0
    # 8-bit state, bf16 weights and checkpointing: less memory even on a toy model
    assert row["peak_ratio"] < 0.9, row
    assert abs(row["loss_rel_diff"]) < 0.05, row  # same batches, same start
    after = loaded.model.state_dict()
    assert all(v.equal(after[k]) for k, v in before.items())  # the caller's model is untouched
