"""Model sources: every transformers architecture loads through memopt's one path, same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_ARCHS
from memopt.core.errors import MemoptError
from memopt.models import build_meta, load_model, resolve


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hf_folder_matches_transformers(tiny_folder, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_folder(arch)
    ours = load_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert ours.task == "causal-lm"
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours.model(input_ids=ids, use_cache=False).logits
        b = ref(input_ids=ids, use_cache=False).logits
    # Same weights, same kernels: bit-identical.
    assert torch.equal(a, b)


def test_tied_weights_stay_tied(tiny_folder) -> None:
    loaded = load_model(tiny_folder("llama"))
    m = loaded.model
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_build_meta_reads_no_weights(tiny_folder) -> None:
    meta = build_meta(tiny_folder("gpt2"))
    assert all(p.is_meta for p in meta.model.parameters())
    assert sum(p.numel() for p in meta.model.parameters()) == sum(
        p.numel() for p in load_model(tiny_folder("gpt2")).model.parameters()
    )


def test_minilm_matches_transformers() -> None:
    from transformers import AutoModel

    minilm = load_model("minilm")  # its own copy: other tests may change the shared fixture
    ref = AutoModel.from_pretrained(minilm.source.path).eval()
    ids = torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(
            minilm.model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
        )
    assert minilm.task == "encoder"
    # all-MiniLM-L6-v2 has 22,713,216 parameters (22.7 M).
    assert sum(p.numel() for p in minilm.model.parameters()) == 22_713_216


def test_resolve_bundled_names() -> None:
    assert resolve("minilm").kind == "hf"
    assert resolve("smollm2").kind == "gguf"


# ---- bad input: one line, MemoptError ------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_path() -> None:
    with pytest.raises(MemoptError) as exc:
        resolve("/no/such/model")
    assert "no such model" in _one_line(exc)


def test_unknown_bundled_name() -> None:
    with pytest.raises(MemoptError) as exc:
        resolve("gpt-17")
    assert "bundled" in _one_line(exc)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(MemoptError) as exc:
        resolve(tmp_path)
    assert "config.json" in _one_line(exc)


def test_bad_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MemoptError):
        build_meta(tmp_path)


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors(tiny_folder, tmp_path: Path) -> None:
    folder = _copy_folder(tiny_folder("gpt2"), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoptError) as exc:
        load_model(folder)
    assert "truncated" in _one_line(exc)


def test_corrupt_safetensors_header(tiny_folder, tmp_path: Path) -> None:
    folder = _copy_folder(tiny_folder("gpt2"), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(MemoptError) as exc:
        load_model(folder)
    assert "corrupt" in _one_line(exc)


def test_weights_of_the_wrong_shape(tiny_folder, tmp_path: Path) -> None:
    folder = _copy_folder(tiny_folder("gpt2"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_embd"] = 32  # the file's tensors are 64 wide
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MemoptError) as exc:
        load_model(folder)
    assert "shape" in _one_line(exc)


def test_tensor_the_architecture_lacks_is_refused(tiny_folder, tmp_path: Path) -> None:
    """A q_proj.bias for a q_proj built without bias: the config does not describe the file."""
    from safetensors.torch import load_file, save_file

    folder = _copy_folder(tiny_folder("llama"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MemoptError) as exc:
        load_model(folder)
    assert "q_proj.bias" in _one_line(exc)


def test_extra_head_in_checkpoint_is_skipped(tiny_folder, tmp_path: Path) -> None:
    """Tensors of modules the architecture does not have (another head) are not an error."""
    from safetensors.torch import load_file, save_file

    folder = _copy_folder(tiny_folder("llama"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["score.weight"] = torch.zeros(2, 64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_model(folder).task == "causal-lm"
