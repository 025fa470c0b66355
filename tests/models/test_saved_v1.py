"""Folders saved by an earlier memopt (format v1, tests/fixtures/v1) load and give the same logits.

The fixtures were written before the package was split into layers; they hold every stored weight
kind (int8, int4 in this CPU kernel's layout, int3, sparse float and sparse int8 values, a bfloat16
cast with float32 norms), each with the logits the reloaded folder gave at the time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memopt.models.saved import load
from memopt.weights import kernels

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v1"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_every_kind_has_a_fixture() -> None:
    assert NAMES == ["cast-bf16", "int3", "int4", "int8", "sparse", "sparse-int8"]


@pytest.mark.parametrize("name", NAMES)
def test_v1_folder_loads_with_identical_outputs(name: str) -> None:
    ref = load_file(str(FIXTURES / f"{name}.outputs.safetensors"))
    loaded = load(FIXTURES / name)
    # each shape's default kernel (the fixtures' logits came from those): a timed choice may pick
    # another valid kernel (bfloat16 or float32 activations), which rounds differently
    with torch.no_grad(), kernels.default_kernels():
        logits = loaded.model(input_ids=ref["input_ids"]).logits.float()
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff == 0.0, f"{name}: max |diff| {diff} (bit for bit expected)"
