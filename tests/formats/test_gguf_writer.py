"""GGUF export (memopt.formats.gguf_writer, memopt.models.export): blocks, names, and whole models
read back with memopt's own GGUF loader and with gguf's reader.

Exactness: a tensor reported exact decodes (gguf's own dequantizer) to memopt's dequantized
weight bit for bit; the others carry their SQNR, recomputed here. Logits of the GGUF loaded back
against the memopt model: max |diff| within LOGITS_TOL (memopt's int8/int4 kernels compute with
bfloat16 activations, the loaded GGUF in float32; 0.0 is seen where both run float32).
llama.cpp itself is a bench extra, not used here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

import memopt
from memopt.core.errors import MemoptError
from memopt.formats.gguf import _BLOCK_NAMES, GGUFSource, _reader_class, _unpermute_rows, hf_name
from memopt.formats.gguf_writer import (
    encode_q4_0,
    encode_q4_1,
    encode_q8_0,
    gguf_name,
    permute_rows,
    tokenizer_metadata,
)
from memopt.models import load_model, resolve, saved
from memopt.models.export import _encode, export
from memopt.models.toy import tiny_llama, tiny_tokenizer
from memopt.weights.primitives import sqnr
from memopt.weights.quantized import Int4Weight

LOGITS_TOL = 2e-2  # seen: 0.0 (int8 g32), 3.5e-3 (int4: memopt's kernel in bfloat16)
IDS = torch.tensor([[1, 17, 45, 300, 22, 7, 99, 3, 250, 511, 64, 128]])
TEXT = "The capital of France is Paris, 1234 and more."

CONFIGS: dict[str, Callable[[], object]] = {
    "int8-g32": lambda: memopt.Int8WeightOnly(group_size=32),
    "int8": lambda: memopt.Int8WeightOnly(),  # per channel (and the default for embeddings)
    "int8-g16": lambda: memopt.Int8WeightOnly(group_size=16),
    "int4-g32": lambda: memopt.Int4WeightOnly(group_size=32),
    "int4-g64-sym": lambda: memopt.Int4WeightOnly(group_size=64, symmetric=True),
    "int3-g32-sym": lambda: memopt.IntNWeightOnly(bits=3, group_size=32, symmetric=True),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tok) -> Callable[[str], Path]:
    """``folder(kind)``: the tiny Llama with a BPE tokenizer, as a memopt folder quantized as
    ``kind`` (CONFIGS), or a Hugging Face folder ("float32", "bfloat16")."""
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            path = tmp_path_factory.mktemp(kind)
            loaded = tiny_llama()
            if kind in CONFIGS:
                cfg = CONFIGS[kind]()
                memopt.quantize_(loaded.model, cfg)
                saved.save(loaded, path / "m", quant_config=cfg)
            else:
                loaded.model.to(getattr(torch, kind)).save_pretrained(path / "m")
            tok.save_pretrained(path / "m")
            made[kind] = path / "m"
        return made[kind]

    return make


def _logits(loaded, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits.float()


def _memopt_weights(loaded) -> dict[str, torch.Tensor]:
    """The model's weights as memopt computes with them, float32, by Hugging Face name."""
    from memopt.weights import QModule

    out = {}
    for name, m in loaded.model.named_modules():
        if isinstance(m, QModule):
            out[f"{name}.weight"] = m.qweight.dequantize(torch.float32)
    for name, p in loaded.model.named_parameters():
        out.setdefault(name, p.detach().float())
    return out


# --------------------------------------------------------------------------------------------------
# Blocks, names, row order


def test_encoders_decode_to_the_formula_with_gguf() -> None:
    rng = torch.Generator().manual_seed(0)
    n, k = 6, 96
    d = (torch.rand(n, k // 32, generator=rng) * 0.1).to(torch.float16).double()
    m = (torch.rand(n, k // 32, generator=rng) - 0.5).to(torch.float16).double()
    q8 = torch.randint(-128, 128, (n, k), generator=rng, dtype=torch.int8)
    q4 = torch.randint(0, 16, (n, k), generator=rng, dtype=torch.uint8)
    per = lambda x: x.repeat_interleave(32, 1)  # noqa: E731
    cases = [
        (QT.Q8_0, encode_q8_0(q8, d), q8.double() * per(d)),
        (QT.Q4_0, encode_q4_0(q4, d), (q4.double() - 8) * per(d)),
        (QT.Q4_1, encode_q4_1(q4, d, m), q4.double() * per(d) + per(m)),
    ]
    for qtype, (rows, exact), expected in cases:
        assert bool(exact.all())
        assert rows.shape == (n, k // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
        decoded = gguf.quants.dequantize(rows.numpy(), qtype)
        np.testing.assert_array_equal(decoded, expected.float().numpy())
    # a parameter float16 cannot hold is rounded, and said so for its block only
    d2 = d.clone()
    d2[0, 0] = 1.0 + 2.0**-20
    _, exact = encode_q8_0(q8, d2)
    assert not exact[0, 0] and int(exact.sum()) == exact.numel() - 1


def test_permute_rows_inverts_the_readers_unpermutation() -> None:
    rows = torch.arange(64 * 3).reshape(64, 3)
    for heads in (1, 2, 4, 8):
        assert torch.equal(_unpermute_rows(permute_rows(rows, heads), heads), rows)
        assert torch.equal(permute_rows(_unpermute_rows(rows, heads), heads), rows)


def test_gguf_name_inverts_hf_name() -> None:
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    names += [f"blk.7.{stem}.{kind}" for stem in _BLOCK_NAMES for kind in ("weight", "bias")]
    for name in names:
        assert gguf_name(hf_name(name)) == name
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert gguf_name("model.embed_tokens.qweight.qdata") is None


def test_tokenizer_keys_of_a_bpe_tokenizer(tok) -> None:
    kv = {e.key: e.value for e in tokenizer_metadata(tok, 520)}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 520  # padded to the model's rows
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3] * 3
    assert tokens[-1] == "[PAD519]" and types[-1] == 5 and types[100] == 1
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert all(" " in m for m in kv["tokenizer.ggml.merges"])
    with pytest.raises(MemoptError, match="outside"):
        tokenizer_metadata(tok, 100)


# --------------------------------------------------------------------------------------------------
# Whole models


def _check_read_back(path: Path, memopt_model, result: dict) -> dict[str, torch.Tensor]:
    """The file read by gguf's reader and by memopt's loader agrees with the result and with the
    memopt model; returns the GGUF's tensors (float32, Hugging Face layout)."""
    reader = GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                "attention.layer_norm_rms_epsilon", "vocab_size"):  # fmt: skip
        assert f"llama.{key}" in fields, key
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id"):
        assert f"tokenizer.ggml.{key}" in fields, key
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert len(names) == result["tensors"] == len(result["exact"]) + len(result["requantized"])
    assert result["bytes"] == path.stat().st_size
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert all(types[n] == "F32" for n in names if "norm" in n)
    src = GGUFSource(path)
    theirs = {n: src.get(n) for n in src.names()}
    ours = _memopt_weights(memopt_model)
    for gname in names:
        name = hf_name(gname)
        assert name is not None
        if gname in result["exact"]:
            assert torch.equal(theirs[name], ours[name]), gname  # bit for bit
        else:
            info = result["requantized"][gname]
            got = sqnr(ours[name], theirs[name])
            assert got == pytest.approx(info["sqnr_db"], rel=1e-9), gname
            err = (theirs[name].double() - ours[name].double()).abs().max().item()
            assert err == pytest.approx(info["max_abs_error"]), gname
    return theirs


@pytest.mark.parametrize(
    "kind, ggml_type",
    [("int8-g32", "Q8_0"), ("int8", "Q8_0"), ("int4-g64-sym", "Q4_0"), ("int3-g32-sym", "Q4_0")],
)
def test_exact_exports(folder, tmp_path: Path, kind: str, ggml_type: str) -> None:
    out = tmp_path / "m.gguf"
    result = export(str(folder(kind)), "gguf", out)
    assert (result["format"], result["path"]) == ("gguf", str(out))
    assert result["all_exact"] and result["requantized"] == {}
    assert result["types"] == {ggml_type: 29, "F32": 9}  # 4 blocks x 7, embedding; 9 norms
    model = load_model(str(folder(kind)))
    _check_read_back(out, model, result)
    back = load_model(str(out))
    diff = (_logits(back) - _logits(model)).abs().max().item()
    assert diff <= LOGITS_TOL, f"{kind}: logits differ by {diff}"
    if kind == "int8-g32":  # the tokenizer went with it: memopt's GGUF one encodes as the folder's
        assert back.tokenizer()(TEXT)["input_ids"] == model.tokenizer()(TEXT)["input_ids"]


def test_int4_asymmetric_exports_exactly(folder, tmp_path: Path) -> None:
    # memopt's quantizer picks each zero so that Q4_1's float16 m = zero - 8 * scale holds it
    out = tmp_path / "m.gguf"
    result = export(str(folder("int4-g32")), "gguf", out)
    assert result["types"] == {"Q4_1": 29, "F32": 9}
    assert result["all_exact"] and result["requantized"] == {}
    model = load_model(str(folder("int4-g32")))
    _check_read_back(out, model, result)
    diff = (_logits(load_model(str(out))) - _logits(model)).abs().max().item()
    assert diff <= LOGITS_TOL


def test_int4_zero_float16_cannot_hold_is_rounded_and_reported(tmp_path: Path) -> None:
    # a zero from elsewhere (a folder written before the quantizer chose float16-exact zeros):
    # Q4_1's m rounded to the nearest float16, codes and d kept, the error reported for it
    torch.manual_seed(0)
    qw = Int4Weight(torch.randn(64, 128) * 0.02, group_size=32, symmetric=False)
    # scale 2^-7, zero 3 * 2^-20 (both bfloat16): m = 3 * 2^-20 - 2^-4 needs 17 bits, float16 has 11
    qw.scale_zero[0, 0] = torch.tensor([2.0**-7, 3 * 2.0**-20], dtype=torch.bfloat16)
    _, exact = _encode(qw, "Q4_1", 32)
    assert exact.shape == (64, 4) and not bool(exact[0, 0]) and int(exact.sum()) == 64 * 4 - 1


def test_group_not_a_multiple_of_32_is_requantized(folder, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    result = export(str(folder("int8-g16")), "gguf", out)
    assert result["types"] == {"Q8_0": 29, "F32": 9}
    assert len(result["requantized"]) == 29 and not result["all_exact"]
    for info in result["requantized"].values():
        assert "group 16" in info["why"] and info["sqnr_db"] > 40
    _check_read_back(out, load_model(str(folder("int8-g16"))), result)


def test_float_folder_keeps_its_dtype(folder, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    result = export(str(folder("bfloat16")), "gguf", out)
    assert result["all_exact"] and result["types"] == {"BF16": 29, "F32": 9}
    model = load_model(str(folder("bfloat16")), dtype=torch.float32)
    _check_read_back(out, model, result)
    diff = (_logits(load_model(str(out))) - _logits(model)).abs().max().item()
    assert diff < 1e-4


def test_gguf_source_keeps_its_bytes_and_keys(tmp_path: Path) -> None:
    out = tmp_path / "smollm2.gguf"
    result = export("smollm2", "gguf", out)
    assert result["all_exact"]
    a, b = _reader_class()(resolve("smollm2").path), _reader_class()(out)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type
        assert np.array_equal(t.data.view(np.uint8), tb[name].data.view(np.uint8)), name
    for key, field in a.fields.items():
        if key.startswith(("tokenizer.", "llama.", "general.")) and key != "general.alignment":
            assert b.fields[key].contents() == field.contents(), key


# --------------------------------------------------------------------------------------------------
# Hugging Face folder


def test_safetensors_folder_loads_in_transformers(folder, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    result = export(str(folder("int4-g32")), "safetensors", out)
    assert (result["format"], result["path"]) == ("safetensors", str(out))
    assert result["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(result["files"])
    model = load_model(str(folder("int4-g32")))
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = _memopt_weights(model)
    for name, p in hf.state_dict().items():
        assert torch.equal(p, ours[name]), name  # the dequantized weights, bit for bit
    diff = (_logits(model) - hf(input_ids=IDS).logits).abs().max().item()
    assert diff <= LOGITS_TOL
    assert (
        AutoTokenizer.from_pretrained(str(out))(TEXT)["input_ids"]
        == (model.tokenizer()(TEXT)["input_ids"])
    )


# --------------------------------------------------------------------------------------------------
# Refusals: one line, nothing written


def test_refusals_leave_no_file(folder, tiny_folder, tmp_path: Path) -> None:
    with pytest.raises(MemoptError, match="is a folder"):
        export(str(folder("int8")), "gguf", tmp_path)
    with pytest.raises(MemoptError, match="architectures"):
        export(str(tiny_folder("gpt2")), "gguf", tmp_path / "gpt2.gguf")
    with pytest.raises(MemoptError, match="no tokenizer"):
        export(str(tiny_folder("llama")), "gguf", tmp_path / "notok.gguf")
    with pytest.raises(MemoptError, match="unknown export format"):
        export(str(folder("int8")), "onnx", tmp_path / "m.onnx")
    with pytest.raises(MemoptError, match="memopt folder"):
        export(str(folder("int8")), "safetensors", folder("int4-g32"))
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_no_file(folder, tmp_path: Path, monkeypatch) -> None:
    import memopt.models.export as ex

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_compare", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(str(folder("int8")), "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
