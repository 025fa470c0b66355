"""memopt.models.saved: save -> load gives the same model (bit for bit), real bytes, safe failures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes
from memopt.formats.manifest import FORMAT_VERSION, MANIFEST, WEIGHTS, read_manifest
from memopt.formats.safetensors import SafetensorsWriter
from memopt.models import build_meta, load_model
from memopt.models import saved as io
from memopt.quant import (
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    quantize_,
)
from memopt.weights import QLinear

CONFIGS = {
    "float32": None,
    "bfloat16": Cast("bfloat16"),
    "int8": Int8WeightOnly(),
    "int8-g32": Int8WeightOnly(group_size=32),
    "int8-dynamic": Int8Dynamic(),
    "int4-g32": Int4WeightOnly(group_size=32),
    "int4-g64-sym": Int4WeightOnly(group_size=64, symmetric=True),
    "int3": IntNWeightOnly(bits=3, group_size=32),
    "int2": IntNWeightOnly(bits=2, group_size=32),
}

IDS = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(1))  # (B, T)


def _quantized(folder: Path, cfg):
    loaded = load_model(folder)
    if cfg is not None:
        quantize_(loaded.model, cfg)
    return loaded


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(IDS).logits


def _weights_header(folder: Path) -> tuple[int, dict]:
    with open(folder / WEIGHTS, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return n, json.loads(fh.read(n))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_tied_llama_is_bit_identical(tiny_folder, tmp_path, name):
    cfg = CONFIGS[name]
    loaded = _quantized(tiny_folder("llama"), cfg)
    ref = _logits(loaded)
    io.save(loaded, tmp_path / "out", quant_config=cfg)
    back = load_model(tmp_path / "out")  # models.load_model delegates memopt folders to io.load
    assert torch.equal(_logits(back), ref)
    sd, sd2 = loaded.model.state_dict(), back.model.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    m = back.model
    if cfg is None or isinstance(cfg, Cast):  # float: still one Parameter
        assert m.lm_head.weight is m.model.embed_tokens.weight
    else:  # quantized: one weight module under two parents, stored once
        assert isinstance(m.lm_head, QLinear)
        assert m.lm_head.qweight is m.model.embed_tokens.qweight
        manifest = read_manifest(tmp_path / "out")
        assert manifest["tied"] == [["model.embed_tokens", "lm_head"]]
        assert not any(t.startswith("lm_head.") for t in manifest["tensors"])
    assert model_bytes(m) == model_bytes(loaded.model)


@pytest.mark.parametrize("name", ["float32", "int4-g32", "int8-dynamic"])
def test_round_trip_gpt2_conv1d(tiny_folder, tmp_path, name):
    cfg = CONFIGS[name]
    loaded = _quantized(tiny_folder("gpt2"), cfg)
    io.save(loaded, tmp_path / "out", quant_config=cfg)
    assert torch.equal(_logits(load_model(tmp_path / "out")), _logits(loaded))


def test_minilm_int8_round_trip_with_tokenizer(tmp_path):
    loaded = load_model("minilm")
    quantize_(loaded.model, Int8WeightOnly())
    tok = loaded.tokenizer()
    batch = tok(
        ["a memory-mapped weight", "int8 on every Linear"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = loaded.model(**batch).last_hidden_state
    io.save(loaded, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.task == "encoder"
    with torch.no_grad():
        assert torch.equal(back.model(**batch).last_hidden_state, ref)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert back.tokenizer()("int8")["input_ids"] == tok("int8")["input_ids"]
    # the 30522 x 384 embedding is int8 too: the file is about a quarter of float32's 90.9 MB
    assert io.disk_bytes(tmp_path / "m") < 0.3 * 90.9e6


def test_disk_bytes_equal_ram_bytes_plus_stated_overhead(tiny_folder, tmp_path):
    loaded = _quantized(tiny_folder("llama"), Int4WeightOnly(group_size=32))
    out = tmp_path / "out"
    io.save(loaded, out)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert io.disk_bytes(out) == sum(os.path.getsize(p) for p in files)
    n, _ = _weights_header(out)
    # the weights file is exactly: 8-byte length + header + every tensor's bytes, which are the
    # model's bytes in RAM (int4: same byte count in the kernel's layout as on disk)
    assert os.path.getsize(out / WEIGHTS) == 8 + n + model_bytes(loaded.model)
    assert n % 8 == 0
    overhead = io.disk_bytes(out) - model_bytes(loaded.model)
    small = sum(os.path.getsize(p) for p in files if p.name != WEIGHTS)
    assert overhead == 8 + n + small  # manifest + config.json + safetensors header, nothing else


def test_manifest_is_versioned_readable_and_in_execution_order(tiny_folder, tmp_path):
    cfg = Int4WeightOnly(group_size=64)
    io.save(_quantized(tiny_folder("llama"), cfg), tmp_path / "out", quant_config=cfg)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["format"] == "memopt" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["memopt_version"] and manifest["task"] == "causal-lm"
    assert manifest["quantization"] == [{"config": cfg.to_dict()}]
    assert manifest["config"]["model_type"] == "llama"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    spec = manifest["weights"]["model.layers.0.self_attn.q_proj.qweight"]
    assert spec["format"] == "int4" and spec["group_size"] == 64 and spec["shape"] == [64, 64]
    assert spec["tensors"]["packed"] == {"dtype": "uint8", "shape": [64, 32]}
    assert spec["tensors"]["scale"]["dtype"] == "bfloat16"
    # execution order: embedding, block 0, block 1, final norm; the file's offsets follow it
    order = manifest["tensors"]
    assert order[0].startswith("model.embed_tokens.")
    blocks = [int(t.split(".")[2]) for t in order if t.startswith("model.layers.")]
    assert blocks == sorted(blocks)
    _, header = _weights_header(tmp_path / "out")
    starts = [header[t]["data_offsets"][0] for t in order]
    assert starts == sorted(starts)


def test_build_meta_of_a_saved_folder_has_the_quantized_modules(tiny_folder, tmp_path):
    io.save(_quantized(tiny_folder("llama"), Int8WeightOnly()), tmp_path / "out")
    meta = build_meta(tmp_path / "out")
    q = meta.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QLinear) and q.qweight.qdata.is_meta
    assert q.qweight.qdata.dtype == torch.int8


def test_safetensors_writer_output_reads_back(tmp_path):
    from safetensors import safe_open

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randint(0, 255, (4, 4), dtype=torch.uint8),
        "d": torch.zeros(0, 3),
    }
    w = SafetensorsWriter(
        tmp_path / "x.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()]
    )
    w.write("a", tensors["a"])
    w.write("b", [tensors["b"][:3], tensors["b"][3:]])  # row chunks of one tensor
    w.write("c", tensors["c"])
    w.write("d", tensors["d"])
    w.close()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


# ---- failures: one line, and never a half-written output ----


@pytest.fixture
def saved(tiny_folder, tmp_path) -> Path:
    out = tmp_path / "saved"
    io.save(_quantized(tiny_folder("llama"), Int4WeightOnly(group_size=32)), out)
    return out


def _one_line_error(fn) -> str:
    with pytest.raises(MemoptError) as info:
        fn()
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_corrupt_manifest_is_one_line(saved):
    (saved / MANIFEST).write_text('{"format": "memopt", "format_version": 1, "task": ')
    assert "corrupt manifest" in _one_line_error(lambda: load_model(saved))


def test_manifest_from_a_newer_format_is_refused(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (saved / MANIFEST).write_text(json.dumps(manifest))
    assert "newer memopt" in _one_line_error(lambda: load_model(saved))


def test_missing_tensor_is_one_line(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / WEIGHTS))
    del tensors["model.layers.1.mlp.down_proj.qweight.scale"]
    save_file(tensors, str(saved / WEIGHTS))
    msg = _one_line_error(lambda: load_model(saved))
    assert "model.layers.1.mlp.down_proj.qweight.scale" in msg and "missing" in msg


def test_truncated_weights_are_one_line(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert "truncated" in _one_line_error(lambda: load_model(saved))


def test_output_path_that_is_a_file_is_refused(tiny_folder, tmp_path):
    target = tmp_path / "file.bin"
    target.write_text("x")
    loaded = load_model(tiny_folder("llama"))
    assert "existing file" in _one_line_error(lambda: io.save(loaded, target))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    _one_line_error(lambda: io.save(loaded, tmp_path / "foreign"))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_a_failure_midway_leaves_no_output_and_keeps_the_old_one(saved, tiny_folder, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    loaded = _quantized(tiny_folder("llama"), Int8WeightOnly())
    calls = {"n": 0}
    real_write = SafetensorsWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] % 5 == 0:  # the 5th tensor of each save
            raise OSError("disk full (simulated)")
        return real_write(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError):
        io.save(loaded, saved)  # over an earlier output
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # untouched
    with pytest.raises(OSError):
        io.save(loaded, saved.parent / "fresh")
    assert not (saved.parent / "fresh").exists()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved"]  # no temporary left
    monkeypatch.undo()
    io.save(loaded, saved)  # and a successful save replaces it
    assert torch.equal(_logits(load_model(saved)), _logits(loaded))


def test_saved_folder_resaves_with_its_configs(saved, tmp_path):
    back = load_model(saved)
    back.model.memopt_quantization = [{"config": {"type": "Int4WeightOnly", "group_size": 32}}]
    io.save(back, tmp_path / "again")
    assert torch.equal(_logits(load_model(tmp_path / "again")), _logits(back))
    shutil.rmtree(tmp_path / "again")


def test_corrupt_weight_entry_is_one_line(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest["weights"]["model.layers.0.mlp.up_proj.qweight"]["shape"]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    assert "corrupt manifest" in _one_line_error(lambda: load_model(saved))
