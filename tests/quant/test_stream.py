"""Streamed quantization: same bits as in-memory ``quantize_``, bounded peak RSS, safe failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes
from memopt.core.rss import run_in_child
from memopt.formats.manifest import read_manifest
from memopt.models import load_model
from memopt.models import saved as io
from memopt.quant import (
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    quantize_,
    stream,
)
from memopt.quant.config import method_config
from memopt.quant.stream import quantize_model

CONFIGS = {
    "int8": Int8WeightOnly(),
    "int8-g32": Int8WeightOnly(group_size=32),
    "int8-dynamic": Int8Dynamic(),
    "int4-g32": Int4WeightOnly(group_size=32),
    "int4-g64-sym": Int4WeightOnly(group_size=64, symmetric=True),
    "int3": IntNWeightOnly(bits=3, group_size=32),
    "int2": IntNWeightOnly(bits=2, group_size=16),
    "bfloat16": Cast("bfloat16"),
}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _check_streamed(folder: Path, out: Path, cfg, **select) -> dict:
    ref = load_model(folder)
    report = quantize_(ref.model, cfg, **select)
    result = quantize_model(folder, cfg, out, **select)
    back = load_model(out)
    _assert_same_state(back.model, ref.model)  # bit-identical buffers (int4 in the local layout)
    assert result["bytes_before"] == report.bytes_before
    assert result["bytes_after"] == report.bytes_after == model_bytes(back.model)
    assert result["disk_bytes"] == io.disk_bytes(out)
    assert sorted(result["modules"]) == sorted(report.modules)
    assert result["peak_rss_bytes"] > 0 and result["seconds"] > 0
    ids = torch.randint(0, 512, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, ref.model(ids).logits)
    return result


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_equals_in_memory_tied_llama(tiny_folder, tmp_path, name):
    _check_streamed(tiny_folder("llama"), tmp_path / "out", CONFIGS[name])


@pytest.mark.parametrize("name", ["int8", "int4-g32", "int2"])
def test_streamed_equals_in_memory_gpt2_conv1d(tiny_folder, tmp_path, name):
    _check_streamed(tiny_folder("gpt2"), tmp_path / "out", CONFIGS[name])


def test_include_exclude_and_ties_follow_quantize_(tiny_folder, tmp_path):
    # excluding lm_head leaves its tie partner (the embedding) in float too, as quantize_ does
    res = _check_streamed(
        tiny_folder("llama"), tmp_path / "a", Int4WeightOnly(group_size=32), exclude=["lm_head"]
    )
    assert "model.embed_tokens" in res["skipped"] and "lm_head" not in res["modules"]
    res = _check_streamed(
        tiny_folder("qwen2"), tmp_path / "b", Int8WeightOnly(), include=["*.mlp.*"]
    )
    assert res["modules"] and all(".mlp." in m for m in res["modules"])


def test_bfloat16_source_streams_the_same(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _check_streamed(tmp_path / "bf16", tmp_path / "out", Int4WeightOnly(group_size=32))


def test_calibrated_streamed_block_by_block_equals_in_memory(tiny_folder, tmp_path):
    from memopt.quant.calibrate import calibrate_

    cfg = Int4WeightOnly(group_size=32, algo="gptq")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))  # (N, T)
    ref = load_model(tiny_folder("llama"))
    rtn = load_model(tiny_folder("llama"))
    quantize_(rtn.model, Int4WeightOnly(group_size=32))
    # the default settings: blocks and the tied head/embedding by GPTQ, in RAM and streamed (the
    # head's entries are written last, in their place at the start of the file)
    report = calibrate_(ref.model, cfg, calib_ids=ids)
    result = quantize_model(tiny_folder("llama"), cfg, tmp_path / "out", calib=ids)
    assert result["streamed"] and sorted(result["modules"]) == sorted(report.modules)
    back = load_model(tmp_path / "out").model
    _assert_same_state(back, ref.model)
    # ...and the head is really GPTQ's, not round-to-nearest (which the blocks-only port wrote)
    assert not torch.equal(back.lm_head.qweight.packed, rtn.model.lm_head.qweight.packed)
    assert back.lm_head.qweight is back.model.embed_tokens.qweight  # still tied, stored once
    names = list(read_manifest(tmp_path / "out")["tensors"])
    assert names[0].startswith("model.embed_tokens.")  # file order unchanged: execution order


def test_bad_output_and_bad_config_fail_before_any_work(tiny_folder, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MemoptError, match="existing file"):
        quantize_model(tiny_folder("llama"), Int8WeightOnly(), tmp_path / "f")
    with pytest.raises(MemoptError, match="unknown quantization config"):
        quantize_model(tiny_folder("llama"), {"type": "Int5"}, tmp_path / "g")
    with pytest.raises(MemoptError, match="group_size"):
        quantize_model(tiny_folder("llama"), {"type": "Int4WeightOnly", "group_size": 48}, "x")


def test_failure_midway_leaves_no_output(tiny_folder, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted (simulated)")

    monkeypatch.setattr(stream, "_quantize_rows", boom)
    with pytest.raises(RuntimeError):
        quantize_model(tiny_folder("llama"), Int8WeightOnly(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---- the bound, on the real model ----

EMBEDDING_F32 = 49152 * 576 * 4  # the largest float32 tensor of SmolLM2-135M (113 MB)


@pytest.fixture(scope="module")
def smollm2_int4(tmp_path_factory) -> tuple[int, dict, Path]:
    out = tmp_path_factory.mktemp("stream") / "smollm2-int4"
    # the one import baseline (memopt.core.rss.import_baseline): a child's peak RSS once it has
    # imported torch, transformers (auto classes, Llama modeling code), tokenizers, gguf
    base = run_in_child("memopt.core.rss:import_baseline", timeout=300)["result"]
    cfg = {"type": "Int4WeightOnly", "group_size": 64, "algo": "rtn"}
    res = run_in_child(
        "memopt.quant.stream:quantize_model_job", "smollm2", cfg, str(out), timeout=600
    )
    return base, res, out


def test_smollm2_int4_peak_rss_within_the_bound(smollm2_int4):
    base, res, out = smollm2_int4
    # bound: imports (memopt.core.rss.import_baseline: interpreter, torch, transformers, ...) + the
    # output + the largest float32 tensor; the float32 model itself is 538 MB
    bound = base + res["bytes_after"] + EMBEDDING_F32
    assert res["bytes_before"] == 538_060_288
    assert res["peak_rss_bytes"] <= bound, (res["peak_rss_bytes"], bound)
    # the GGUF's own blocks are not carried over: requantized from their dequantized values
    assert res["note"] == "requantized from the dequantized Q4_1/Q8_0 weights of the GGUF"
    assert res["disk_bytes"] == io.disk_bytes(out)
    assert res["bytes_after"] < res["disk_bytes"] < res["bytes_after"] + 4_000_000  # + tokenizer


def test_smollm2_streamed_equals_in_memory(smollm2_int4):
    _, _, out = smollm2_int4
    ref = load_model("smollm2", dtype=torch.float32)  # requantized from the dequantized weights
    quantize_(ref.model, Int4WeightOnly(group_size=64))
    back = load_model(out)
    _assert_same_state(back.model, ref.model)
    assert (out / "tokenizer.json").is_file()


def test_method_config_maps_cli_methods_and_refuses_bad_options():
    assert method_config("int4") == Int4WeightOnly(group_size=64, algo="gptq")
    assert method_config("int4", 32, "rtn") == Int4WeightOnly(group_size=32, algo="rtn")
    assert method_config("int2") == IntNWeightOnly(bits=2, group_size=32)
    assert method_config("bfloat16") == Cast("bfloat16")
    assert method_config("int8-dynamic") == Int8Dynamic()
    for bad in [("int5",), ("int4", 48), ("int8", None, "gptq"), ("float16", 64)]:
        with pytest.raises(MemoptError):
            method_config(*bad)


def test_group_size_dividing_no_layer_is_refused(tiny_folder, tmp_path):
    with pytest.raises(MemoptError, match="does not divide"):
        quantize_model(tiny_folder("llama"), Int8WeightOnly(group_size=96), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_calibrated_int3_streamed_equals_in_memory(tiny_folder, tmp_path):
    """int3 by GPTQ (``--method int3 --algo gptq``): streamed = in memory, bit for bit."""
    from memopt.quant.calibrate import calibrate_

    cfg = method_config("int3", 32, "gptq")
    assert cfg == IntNWeightOnly(bits=3, group_size=32, algo="gptq")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))  # (N, T)
    ref = load_model(tiny_folder("llama"))
    report = calibrate_(ref.model, cfg, calib_ids=ids)
    assert report.formats == {"int3": 16}
    result = quantize_model(tiny_folder("llama"), cfg, tmp_path / "out", calib=ids)
    assert result["streamed"] and sorted(result["modules"]) == sorted(report.modules)
    back = load_model(tmp_path / "out").model
    _assert_same_state(back, ref.model)
    assert back.lm_head.qweight is back.model.embed_tokens.qweight
