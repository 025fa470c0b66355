"""A GGUF file's quantized weights kept in their blocks: zero-copy in RAM, the same logits as the
dequantized model, saved bit for bit; the commands that need float weights get them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from conftest import gguf_llama, write_llama_gguf
from memopt.core.modules import model_bytes
from memopt.formats.gguf import GGUFSource
from memopt.models import build_meta, keeps_blocks, load_model, resolve, stored_dtype
from memopt.weights import GGMLWeight, QEmbedding, QLinear, QuantizedWeight

# The quantized model dequantizes exactly the values the float32 model holds; only the order of
# the sums in its matmuls (row blocks) may differ. Seen: 0.0 on smollm2.
LOGITS_TOL = 1e-4
IDS = torch.tensor([[1, 504, 3458, 5250, 11, 359, 253, 1345, 42, 29, 37, 64]])


def _ggml(model: nn.Module) -> dict[str, GGMLWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GGMLWeight)}


def _file_tensor_bytes(path: Path) -> int:
    src = GGUFSource(path)
    return sum(src.nbytes(n) for n in src.names())


# --------------------------------------------------------------------------------------------------
# The bundled model as shipped


def test_smollm2_keeps_its_blocks_zero_copy(smollm2_blocks) -> None:  # noqa: ANN001
    from memopt.core.pages import file_mappings

    model = smollm2_blocks.model
    path = resolve("smollm2").path
    # every Linear and the embedding: QLinear / QEmbedding around the file's blocks
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert isinstance(model.model.embed_tokens, QEmbedding) and isinstance(model.lm_head, QLinear)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight  # tied: one weight
    assert {w.ggml_type for w in _ggml(model).values()} == {"Q4_1", "Q8_0"}
    # weights in RAM: the file's tensor bytes (96.6 MB), not 538 MB of float32
    held, stored = model_bytes(model), _file_tensor_bytes(path)
    assert held <= 1.05 * stored, (held, stored)
    # the blocks are views of the file's mapping (llama q/k rows, reordered, are copies)
    spans = file_mappings(path)
    up = model.model.layers[0].mlp.up_proj.qweight.blocks
    assert any(s.start <= up.data_ptr() < s.end for s in spans)
    assert stored_dtype("smollm2") == torch.float32  # its float tensors (the norms)
    assert smollm2_blocks.model.model.norm.weight.dtype == torch.float32


def test_build_meta_has_the_loaded_structure() -> None:
    meta = build_meta("smollm2")
    loaded = load_model("smollm2")
    want = {n: (w.ggml_type, tuple(w.blocks.shape)) for n, w in _ggml(loaded.model).items()}
    got = {n: (w.ggml_type, tuple(w.blocks.shape)) for n, w in _ggml(meta.model).items()}
    assert got == want and all(w.blocks.is_meta for w in _ggml(meta.model).values())
    for kwargs in ({"dtype": torch.float32}, {"dequantize": True}, {"dtype": torch.bfloat16}):
        float_meta = build_meta("smollm2", **kwargs).model
        assert not any(isinstance(m, QuantizedWeight) for m in float_meta.modules()), kwargs
    assert keeps_blocks("smollm2") and keeps_blocks("smollm2", torch.bfloat16, dequantize=False)
    assert not keeps_blocks("smollm2", torch.float32)
    assert not keeps_blocks("smollm2", dequantize=True)


def test_quantized_logits_equal_the_dequantized_model(smollm2, smollm2_blocks) -> None:  # noqa: ANN001
    with torch.no_grad():
        want = smollm2.model(IDS).logits  # float32, every tensor dequantized
        got = smollm2_blocks.model(IDS).logits
    diff = (got - want).abs().max().item()
    assert diff <= LOGITS_TOL, f"max |quantized - float32| logits {diff}"


def test_saved_folder_round_trips_the_blocks(smollm2_blocks, tmp_path: Path) -> None:  # noqa: ANN001
    from memopt.models.saved import disk_bytes, save

    out = tmp_path / "smollm2-gguf"
    manifest = save(smollm2_blocks, out)
    assert {s["format"] for s in manifest["weights"].values()} == {"ggml-q4_1", "ggml-q8_0"}
    assert manifest["quantization"][0]["config"]["source"] == "gguf"
    # the file's bytes, plus the tokenizer files and the manifest
    assert disk_bytes(out) < 1.1 * _file_tensor_bytes(resolve("smollm2").path) + 4e6
    back = load_model(out)
    want, got = _ggml(smollm2_blocks.model), _ggml(back.model)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name].ggml_type == w.ggml_type
        assert torch.equal(got[name].blocks, w.blocks), name  # bit for bit
    assert back.model.lm_head.qweight is back.model.model.embed_tokens.qweight
    with torch.no_grad():
        assert torch.equal(back.model(IDS).logits, smollm2_blocks.model(IDS).logits)


# --------------------------------------------------------------------------------------------------
# Commands that need float weights get them (a tiny Q8_0 GGUF)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf"
    write_llama_gguf(path, gguf_llama(tied=True), QT.Q8_0)
    return path


def test_step_policy_inference_as_stored_training_dequantized(tiny_gguf: Path) -> None:
    from memopt.compose import memory_report, step_spec
    from memopt.step.step import StepSpec

    assert step_spec(tiny_gguf).dequantize is False  # inference: the blocks as stored
    assert step_spec(tiny_gguf, dtype="float32").dequantize is True  # a dtype: dequantized
    assert step_spec(tiny_gguf, "train").dequantize is True  # training: float weights
    assert StepSpec(task="train").dequantize is True and StepSpec().dequantize is False
    blocks = sum(w.blocks.numel() for w in _ggml(build_meta(tiny_gguf).model).values())
    infer = memory_report(tiny_gguf, seq=16)
    assert infer["breakdown"]["buffers"] >= blocks  # the blocks, counted as stored
    assert infer["weights"] == "GGUF blocks as stored"  # and the report says so
    as_float = memory_report(tiny_gguf, seq=16, dtype="float32")
    float_params = sum(p.numel() for p in build_meta(tiny_gguf, torch.float32).model.parameters())
    assert as_float["breakdown"]["params"] == 4 * float_params and "weights" not in as_float
    train = memory_report(tiny_gguf, task="train", seq=16)
    assert train["breakdown"]["params"] == 4 * float_params and train["breakdown"]["grads"] > 0
    measured = memory_report(tiny_gguf, seq=16, measured=True)
    assert measured["peak_bytes"] == infer["peak_bytes"]  # estimate == profile, to the byte


def test_training_step_loads_float_weights(tiny_gguf: Path) -> None:
    """What finetune's worker does: load as the training spec says, then train a step."""
    from memopt.core.errors import MemoptError
    from memopt.step.step import StepSpec, prepare
    from memopt.step.trainer import Trainer

    spec = StepSpec(task="train", batch=1, seq=8)
    loaded = load_model(tiny_gguf, dequantize=spec.dequantize)
    assert not any(isinstance(m, QuantizedWeight) for m in loaded.model.modules())
    spec.check_model(loaded)
    prepare(loaded, spec)
    loss = Trainer(loaded, spec, prepared=True).step([{"input_ids": IDS[:, :8] % 96}])
    assert torch.isfinite(torch.as_tensor(loss))
    with pytest.raises(MemoptError, match="no gradients"):  # the blocks themselves cannot train
        StepSpec(task="train", dequantize=False).check_model(load_model(tiny_gguf))


def test_prune_gets_float_weights(tiny_gguf: Path, tmp_path: Path) -> None:
    from memopt.prune import prune_model

    result = prune_model(tiny_gguf, "magnitude", 0.5, tmp_path / "pruned")
    assert result["modules"] > 0 and result["sparsity"] == pytest.approx(0.5, abs=0.01)
    back = load_model(tmp_path / "pruned")
    assert not any(isinstance(m, GGMLWeight) for m in back.model.modules())


def test_quantize_requantizes_with_a_note(tiny_gguf: Path, tmp_path: Path) -> None:
    from memopt.quant.config import method_config
    from memopt.quant.stream import quantize_model

    result = quantize_model(tiny_gguf, method_config("int8"), tmp_path / "int8")
    assert result["note"] == "requantized from the dequantized Q8_0 weights of the GGUF"
    back = load_model(tmp_path / "int8")
    assert {m.fmt for m in back.model.modules() if isinstance(m, QuantizedWeight)} == {"int8"}


def test_plan_captures_the_dequantized_model(tiny_gguf: Path) -> None:
    from memopt.plan import GGUF_NOTE, load_planned, plan_model

    loaded = load_planned(tiny_gguf)
    assert not any(isinstance(m, QuantizedWeight) for m in loaded.model.modules())
    plan = plan_model(loaded, batch=1, seq=8)
    assert plan.to_dict()["note"] == GGUF_NOTE
