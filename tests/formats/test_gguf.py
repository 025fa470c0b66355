"""memopt.formats.gguf: dequantization, names and layout, logits against transformers, tokenizer, errors.

Expensive things (the bundled SmolLM2 load, transformers' own GGUF load of it, the tokenizer
conversion) are built once per module and shared.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from conftest import gguf_llama as _tiny_llama
from conftest import write_llama_gguf as _write_llama_gguf
from memopt import models
from memopt.core.errors import MemoptError
from memopt.formats.gguf import (
    SUPPORTED_TYPES,
    GGUFSource,
    _reader_class,
    dequantize,
    gguf_config,
    gguf_tokenizer,
    hf_name,
)

SMOLLM2 = models.resolve("smollm2").path
PROMPT_IDS = torch.tensor([[1, 504, 3458, 5250, 11, 359, 253, 1345, 42, 29, 37, 64]])
LOGITS_TOL = 1e-3  # max abs difference allowed between our logits and transformers' (seen: 0.0)


# --------------------------------------------------------------------------------------------------
# Dequantization of each supported type against gguf.quants.dequantize


def _random_blocks(qtype: QT, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes of ``qtype`` whose float16 scale fields hold finite values."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    # Byte offsets of the f16 fields of each layout (d, and m/dmin where present).
    f16_at = {QT.Q4_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82), QT.Q3_K: (108,),
              QT.Q5_K: (0, 2)}[qtype]  # fmt: skip
    for off in f16_at:
        vals = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, off : off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return raw


QUANTIZABLE = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.BF16, QT.F16]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_dequantize_matches_gguf_exactly(qtype: QT) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((48, 256)).astype(np.float32)
    values[3] = 0.0  # an all-zero row (scale 0)
    raw = values.astype(np.float16) if qtype == QT.F16 else gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(np.ascontiguousarray(raw), qtype.name, values.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == values.shape
    np.testing.assert_array_equal(ours.numpy(), expected)  # bit-identical


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q2_K, QT.Q3_K, QT.Q5_K],
                         ids=lambda q: q.name)  # fmt: skip
def test_dequantize_k_quants_match_gguf_exactly(qtype: QT) -> None:
    # gguf cannot quantize to K types, so feed both decoders the same random blocks.
    raw = _random_blocks(qtype, 64, np.random.default_rng(1))
    expected = gguf.quants.dequantize(raw, qtype).reshape(-1)
    ours = dequantize(raw, qtype.name, (64 * 256,))
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_dequantize_large_tensor_in_chunks_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    import memopt.formats.gguf as gl

    values = np.random.default_rng(2).standard_normal((40, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, QT.Q4_1)
    monkeypatch.setattr(gl, "_CHUNK_BLOCKS", 7)  # 80 blocks in slices of 7
    np.testing.assert_array_equal(
        dequantize(raw, "Q4_1", values.shape).numpy(), gguf.quants.dequantize(raw, QT.Q4_1)
    )


def test_unsupported_type_is_named() -> None:
    with pytest.raises(MemoptError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), "IQ2_XXS", (256,))
    assert "Q4_1" in SUPPORTED_TYPES and "Q6_K" in SUPPORTED_TYPES


# --------------------------------------------------------------------------------------------------
# The bundled file: config, names, shapes, raw blocks


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    return GGUFSource(SMOLLM2)


def test_config_matches_metadata() -> None:
    cfg = gguf_config(SMOLLM2)
    assert type(cfg).__name__ == "LlamaConfig"
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 576, 1536)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == 64 and cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rope_parameters["rope_type"] == "default"
    assert cfg.tie_word_embeddings is True  # the file has no output.weight
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


def test_names_and_shapes_match_hf_state_dict(source: GGUFSource) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gguf_config(SMOLLM2))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected.pop("lm_head.weight")  # tied to the embedding; the file has none
    assert sorted(source.names()) == sorted(expected)
    assert {n: source.shape(n) for n in source.names()} == expected
    assert source.dtype("model.norm.weight") == torch.float32


def test_raw_blocks_and_types(source: GGUFSource) -> None:
    assert source.ggml_type("model.embed_tokens.weight") == "Q8_0"
    assert source.ggml_type("model.layers.0.mlp.up_proj.weight") == "Q4_1"
    assert source.ggml_type("model.norm.weight") == "F32"
    kind, raw = source.raw("model.layers.0.mlp.up_proj.weight")
    assert kind == "Q4_1" and raw.dtype == np.uint8 and raw.shape == (1536, 576 // 32 * 20)
    assert source.nbytes("model.layers.0.mlp.up_proj.weight") == raw.nbytes
    # Dequantizing the raw blocks gives get()'s values, q/k rows included (hf_rows=True).
    name = "model.layers.2.self_attn.k_proj.weight"
    kind, raw = source.raw(name)
    assert torch.equal(dequantize(raw, kind, source.shape(name)), source.get(name))
    _, file_order = source.raw(name, hf_rows=False)
    assert not file_order.flags.writeable and not np.array_equal(file_order, raw)


def test_fast_reader_parses_like_gguf_reader() -> None:
    ours, theirs = _reader_class()(SMOLLM2), gguf.GGUFReader(SMOLLM2)
    assert list(ours.fields) == list(theirs.fields)
    for key, a in ours.fields.items():
        b = theirs.fields[key]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types)
        assert len(a.parts) == len(b.parts)
        for x, y in zip(a.parts, b.parts, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.n_bytes, a.data_offset) == (
            b.name,
            b.tensor_type,
            b.n_bytes,
            b.data_offset,
        )
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data[:1], b.data[:1])


def test_get_matches_gguf_dequantize_with_documented_permutation(source: GGUFSource) -> None:
    reader = _reader_class()(SMOLLM2)  # gguf's reader, only faster to build (same fields)
    tensors = {t.name: t for t in reader.tensors}
    for gname, heads in [
        ("blk.0.attn_q.weight", 9),
        ("blk.0.attn_k.weight", 3),
        ("blk.0.ffn_down.weight", 0),
    ]:
        t = tensors[gname]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)  # (out, in), file row order
        if heads:  # llama.cpp's (n_head, head_dim/2, 2, in) back to (n_head, 2, head_dim/2, in)
            rows, cols = ref.shape
            ref = ref.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        np.testing.assert_array_equal(source.get(hf_name(gname)).numpy(), ref)
    assert source.get("model.norm.weight", torch.bfloat16).dtype == torch.bfloat16


def test_hf_name() -> None:
    assert hf_name("blk.12.ffn_gate.weight") == "model.layers.12.mlp.gate_proj.weight"
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("rope_freqs.weight") is None


# --------------------------------------------------------------------------------------------------
# Logits: memopt's load against transformers' own GGUF conversion


@pytest.fixture(scope="module")
def memopt_logits() -> torch.Tensor:
    loaded = models.load_model("smollm2", dtype=torch.float32)  # dequantized, as transformers does
    with torch.no_grad():
        return loaded.model(PROMPT_IDS).logits


def test_logits_equal_transformers_gguf_load(memopt_logits: torch.Tensor) -> None:
    # transformers' from_pretrained(gguf_file=...) needs `accelerate`; for llama it converts the
    # file with load_gguf_checkpoint (the code below), so we call that directly.
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = gguf_config(SMOLLM2)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=meta)["tensors"]
    with no_init_weights():  # every weight is overwritten below; skip 135 M random draws
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    model.tie_weights()
    with torch.no_grad():
        expected = model.eval()(PROMPT_IDS).logits
    diff = (memopt_logits - expected).abs().max().item()
    assert diff < LOGITS_TOL, f"max abs logits difference {diff}"


# --------------------------------------------------------------------------------------------------
# A tiny llama written here: the un-permutation gives back the original model's logits


@pytest.mark.parametrize(
    ("qtype", "tied", "arch", "bias", "float_stems"),
    [
        (QT.F32, True, "llama", False, ()),
        (QT.F32, False, "llama", False, ()),
        (QT.Q8_0, True, "llama", False, ()),
        (QT.Q4_1, False, "llama", True, ()),  # quantized q/k rows un-permuted, biases too
        (QT.Q4_0, True, "llama", False, ("token_embd",)),  # float tied embedding, Q4_0 blocks
        (QT.F32, True, "llama", True, ()),  # q/k biases are un-permuted like their rows
        (QT.F32, False, "qwen2", False, ()),  # qwen2: q/k/v biases, rows not permuted by llama.cpp
    ],
    ids=["f32-tied", "f32-untied", "q8_0-tied", "q4_1-untied-bias", "q4_0-float-tied-embedding",
         "f32-qk-bias", "qwen2"],
)  # fmt: skip
def test_tiny_model_round_trip_logits(
    tmp_path: Path, qtype: QT, tied: bool, arch: str, bias: bool, float_stems: tuple[str, ...]
) -> None:
    """Loaded as shipped (quantized tensors kept in their blocks) and dequantized to float32, a
    GGUF gives the original model's logits with its weights as stored."""
    from memopt.weights import GGMLWeight, QuantizedWeight

    model = _tiny_llama(tied, arch, bias)
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path, model, qtype, arch, float_stems)
    if qtype != QT.F32:  # the reference is the original model with its weights as stored
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and not (float_stems and "embed_tokens" in name):
                    q = gguf.quants.quantize(p.numpy(), qtype)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype)))
    ids = torch.tensor([[1, 5, 17, 42, 88, 3, 60]])
    with torch.no_grad():
        want = model(ids).logits
    for kwargs in ({}, {"dtype": torch.float32}):
        loaded = models.load_model(path, **kwargs)
        assert loaded.config.tie_word_embeddings is tied
        assert type(loaded.model) is type(model)
        kinds = {type(m) for m in loaded.model.modules() if isinstance(m, QuantizedWeight)}
        assert kinds == ({GGMLWeight} if qtype != QT.F32 and not kwargs else set())
        if tied:  # one weight, whether float or blocks
            held = [getattr(m, "qweight", None) or m.weight for m in (
                loaded.model.lm_head, loaded.model.model.embed_tokens)]  # fmt: skip
            assert held[0] is held[1]
        with torch.no_grad():
            diff = (loaded.model(ids).logits - want).abs().max().item()
        assert diff < 1e-4, (kwargs, diff)


# --------------------------------------------------------------------------------------------------
# Bad files: one-line MemoptError naming the file


def _one_line_error(path: Path, fn) -> str:
    with pytest.raises(MemoptError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_llama_gguf(path, _tiny_llama(True), QT.Q8_0)
    return path


@pytest.mark.parametrize("fn", [gguf_config, GGUFSource], ids=["config", "source"])
def test_garbage_file(tmp_path: Path, fn) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "not a GGUF file" in _one_line_error(path, fn)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _one_line_error(empty, fn)
    # Right magic, garbage after it.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 200)
    _one_line_error(bad, fn)


@pytest.mark.parametrize("keep", [0.3, 0.95, 0.9999], ids=["header", "data", "last-bytes"])
def test_truncated_file(tmp_path: Path, tiny_file: Path, keep: float) -> None:
    data = tiny_file.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    message = _one_line_error(path, lambda p: GGUFSource(p).names())
    assert "truncated" in message or "corrupt" in message
    with pytest.raises(MemoptError):
        models.load_model(path)


def test_non_llama_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "unsupported GGUF architecture 'gpt2'" in _one_line_error(path, gguf_config)
    _one_line_error(path, GGUFSource)


def test_unsupported_tensor_type_names_the_type(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(1)
    writer.add_tensor("output_norm.weight", np.zeros((1, 66), np.uint8), raw_dtype=QT.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MemoptError, match="IQ2_XXS"):
        GGUFSource(path).get("model.norm.weight")


# --------------------------------------------------------------------------------------------------
# Tokenizer: converted once by transformers, cached, reloaded with the same behaviour

SENTENCES = [
    "Hello, world! How are you today?",
    "  Leading spaces, tabs\tand\nnewlines; unicode: café, naïve, 東京, emoji 🙂.",
    "def f(x):\n    return x ** 2  # code",
]


def test_tokenizer_cached_equals_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = gguf_tokenizer(SMOLLM2)  # transformers' own GGUF conversion, then written to the cache
    entries = list((tmp_path / "memopt" / "tokenizers").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    cached = gguf_tokenizer(SMOLLM2)  # read back from the cache
    for text in SENTENCES:
        assert cached(text)["input_ids"] == first(text)["input_ids"]
        assert cached.decode(first(text)["input_ids"]) == first.decode(first(text)["input_ids"])
    assert cached.chat_template == first.chat_template and cached.chat_template
    assert (cached.bos_token, cached.eos_token, cached.pad_token) == (
        first.bos_token,
        first.eos_token,
        first.pad_token,
    )
    assert cached.eos_token == "<|im_end|>"
    chat = [{"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(chat, tokenize=False) == first.apply_chat_template(
        chat, tokenize=False
    )
