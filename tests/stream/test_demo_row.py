"""The streaming row of ``memopt demo``: SmolLM2 at 25 % of its float32 bytes, measured in children."""

from __future__ import annotations

from pathlib import Path

from memopt.stream import demo_row


def test_demo_row_smollm2(smollm2, tmp_path: Path) -> None:  # noqa: ANN001 (conftest fixture)
    row = demo_row("smollm2", tmp_path, max_new_tokens=8, loaded=smollm2)
    assert row["budget_bytes"] == int(0.25 * row["float32_bytes"])
    assert 0 < row["peak_over_baseline_bytes"] <= row["budget_bytes"] and row["within_budget"]
    assert row["same_tokens"] and row["tokens"] == 8
    assert row["tokens_per_s_ratio"] > 0
    # the float folder is written once, complete, and reused
    assert (tmp_path / "stream-float32" / "model.safetensors").is_file()
    assert not (tmp_path / "stream-float32.partial").exists()
