"""memopt.compose.memory: one call behind estimate / profile, its dtype and training policy, and a
MODEL given as config.json alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from memopt.compose import memory_report, step_spec
from memopt.core.errors import MemoptError
from memopt.measure.estimate import estimate
from memopt.models import build_meta, load_model, stored_dtype


@pytest.fixture(scope="module")
def bf16_folder(tiny_folder, tmp_path_factory) -> Path:
    """The tiny Llama saved as a bfloat16 checkpoint."""
    loaded = load_model(tiny_folder("llama"))
    out = tmp_path_factory.mktemp("bf16")
    loaded.model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def config_only(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("config-only")
    shutil.copyfile(tiny_folder("llama") / "config.json", out / "config.json")
    return out


def test_the_checkpoint_dtype_is_the_default(bf16_folder, tiny_folder) -> None:
    assert stored_dtype(bf16_folder) == torch.bfloat16
    assert stored_dtype(tiny_folder("llama")) == torch.float32
    assert stored_dtype("smollm2") == torch.float32  # GGUF: its float tensors, or dequantized
    assert step_spec(bf16_folder).dtype == "bfloat16"
    assert step_spec(bf16_folder, dtype="float32").dtype == "float32"
    # a 16-bit training step keeps float32 master weights; a float32 one needs none
    assert step_spec(bf16_folder, "train").master_weights is True
    assert step_spec(tiny_folder("llama"), "train").master_weights is False


def test_estimate_and_profile_of_a_bf16_checkpoint_run_in_bf16(bf16_folder) -> None:
    est = memory_report(bf16_folder)
    prof = memory_report(bf16_folder, measured=True)
    assert est["spec"]["dtype"] == prof["spec"]["dtype"] == "bfloat16"
    params = sum(p.numel() for p in build_meta(bf16_folder).model.parameters())
    assert est["breakdown"]["params"] == params * 2  # 2 bytes a weight, not 4
    assert prof["peak_bytes"] == est["peak_bytes"]  # the estimator is exact on this step


def test_memory_report_is_the_estimate_of_its_spec(tiny_folder) -> None:
    model = tiny_folder("llama")
    got = memory_report(model, task="train", batch=2, seq=16, optimizer="adamw8bit")
    want = estimate(model, step_spec(model, "train", batch=2, seq=16, optimizer="adamw8bit"))
    assert got["peak_bytes"] == want.peak_bytes
    assert got["breakdown"] == want.breakdown


def test_config_json_alone_estimates_and_nothing_else_loads(config_only, tiny_folder) -> None:
    with_weights = memory_report(tiny_folder("llama"))
    alone = memory_report(config_only)
    assert alone["peak_bytes"] == with_weights["peak_bytes"]
    with pytest.raises(MemoptError, match="needs the weights"):
        load_model(config_only)
    with pytest.raises(MemoptError, match="needs the weights"):
        memory_report(config_only, measured=True)


def test_config_dtype_is_used_without_weights(config_only, tmp_path) -> None:
    cfg = json.loads((config_only / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert memory_report(tmp_path)["spec"]["dtype"] == "bfloat16"


def test_streamed_refuses_another_dtype(tiny_folder) -> None:
    with pytest.raises(MemoptError, match="stored dtype"):
        memory_report(tiny_folder("llama"), dtype="bfloat16", max_memory="1GB")
