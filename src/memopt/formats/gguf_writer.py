"""Writing GGUF files (llama.cpp's format): metadata, tokenizer and tensors, one tensor at a time.

The reader's counterpart (memopt.formats.gguf): names go back from Hugging Face's to GGUF's
(:func:`gguf_name`), llama's q/k rows are put in llama.cpp's rotary order (:func:`permute_rows`, the
inverse of the reader's un-permutation), and integer codes with their scales become GGML blocks
without being requantized where the block can hold them exactly:

* ``Q8_0`` (32 values a block, ``d`` float16): value ``q * d``; :func:`encode_q8_0`;
* ``Q4_0`` (``d`` float16, nibbles): value ``(q - 8) * d``; :func:`encode_q4_0`;
* ``Q4_1`` (``d``, ``m`` float16, nibbles): value ``q * d + m``; :func:`encode_q4_1`.

Each block's ``d`` / ``m`` are given in float64 and rounded to float16 here; the encoders say
which blocks were rounded (a value that float16 holds exactly is written exactly). Values that no
block layout can take from codes (a group that is not a multiple of 32) are requantized from
floats by ``gguf.quants`` (:func:`quantize_values`).

:func:`write_gguf` writes the header (every key and every tensor's type and shape) first, then each
tensor's bytes as its producer makes them, so a model is never held twice; the file is written
under a temporary name and renamed at the end (memopt.core.atomic): a failure leaves no file.
The keys a llama.cpp model needs come from its transformers config (:func:`config_metadata`) and
its tokenizer (:func:`tokenizer_metadata`, or :func:`carried_metadata` to copy a GGUF's
tokenizer and descriptive keys).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memopt.core.atomic import atomic_path
from memopt.core.errors import MemoptError, one_line
from memopt.formats.gguf import (
    _BLOCK_NAMES,
    _TOP_NAMES,
    PRE_TOKENIZER_SPLITS,
    _parse,
    block_layout,
)

__all__ = [
    "ARCHITECTURES",
    "GGUFTensor",
    "KeyValue",
    "carried_metadata",
    "config_metadata",
    "encode_q4_0",
    "encode_q4_1",
    "encode_q8_0",
    "gguf_name",
    "permute_rows",
    "quantize_values",
    "tensor_nbytes",
    "tokenizer_metadata",
    "write_gguf",
]

# transformers model_type -> GGUF architecture (llama.cpp runs Mistral-family models as "llama")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

BLOCK = 32  # values a block of Q8_0 / Q4_0 / Q4_1


# --------------------------------------------------------------------------------------------------
# Names and row order


_GGUF_BLOCK = {hf: g for g, hf in _BLOCK_NAMES.items()}
_GGUF_TOP = {hf: g for g, hf in _TOP_NAMES.items()}


def gguf_name(hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (None if unknown);
    the inverse of :func:`memopt.formats.gguf.hf_name`."""
    stem, _, kind = hf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        inner = _GGUF_BLOCK.get(parts[3])
        if inner is not None:
            return f"blk.{parts[2]}.{inner}.{kind}"
    return None


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's q/k row order -> llama.cpp's (any per-row payload, any dtype): row
    ``j * head_dim/2 + i`` of a head becomes its row ``2i + j``, as llama.cpp's converter does.
    The reader's ``_unpermute_rows`` undoes it."""
    n_rows = rows.shape[0]
    half = n_rows // n_head // 2
    tail = rows.shape[1:]
    return rows.reshape(n_head, 2, half, *tail).transpose(1, 2).reshape(n_rows, *tail).contiguous()


# --------------------------------------------------------------------------------------------------
# Blocks


def tensor_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``ggml_type`` and (torch) ``shape``; rows must be whole blocks."""
    values, nbytes = block_layout(ggml_type)
    k = int(shape[-1])
    if k % values:
        raise MemoptError(f"GGML {ggml_type}: rows of {k} values are not whole blocks of {values}")
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return rows * (k // values) * nbytes


def _f16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 block parameters -> (float16 values, where float16 holds them exactly)."""
    h = x.to(torch.float16)
    return h, (h.double() == x) & torch.isfinite(h)


def _blocks(codes: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    n, k = codes.shape
    if k % BLOCK:
        raise MemoptError(f"rows of {k} values are not whole blocks of {BLOCK}")
    return n, k // BLOCK, codes.reshape(n, k // BLOCK, BLOCK)


def _nibbles(c: torch.Tensor) -> torch.Tensor:
    """(n, b, 32) codes 0..15 -> (n, b, 16) bytes: low nibble value j, high nibble value j + 16."""
    c = c.to(torch.uint8)
    return c[..., :16] | (c[..., 16:] << 4)


def _join(*parts: torch.Tensor) -> torch.Tensor:
    """Concatenate per-block byte fields (n, b, *) into rows of blocks (n, b * block_bytes)."""
    out = torch.cat(parts, dim=-1)
    return out.reshape(out.shape[0], -1).contiguous()


def _bytes(h: torch.Tensor) -> torch.Tensor:
    """(n, b) float16 -> (n, b, 2) uint8, little endian."""
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)


def encode_q8_0(codes: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``(N, K)`` and one scale per block ``(N, K/32)`` (float64) -> Q8_0 rows
    ``(N, K/32 * 34)`` uint8, and per block whether ``d`` was written exactly."""
    _, _, c = _blocks(codes)
    h, exact = _f16(d)
    return _join(_bytes(h), c.to(torch.int8).view(torch.uint8)), exact


def encode_q4_0(codes: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 ``(N, K)`` (value ``(q - 8) * d``), ``d`` per block ``(N, K/32)`` -> Q4_0 rows
    ``(N, K/32 * 18)`` uint8, and per block whether ``d`` was written exactly."""
    _, _, c = _blocks(codes)
    h, exact = _f16(d)
    return _join(_bytes(h), _nibbles(c)), exact


def encode_q4_1(
    codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 ``(N, K)`` (value ``q * d + m``), ``d``, ``m`` per block ``(N, K/32)`` -> Q4_1
    rows ``(N, K/32 * 20)`` uint8, and per block whether ``d`` and ``m`` were written exactly."""
    _, _, c = _blocks(codes)
    hd, exact_d = _f16(d)
    hm, exact_m = _f16(m)
    return _join(_bytes(hd), _bytes(hm), _nibbles(c)), exact_d & exact_m


def quantize_values(values: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Float values ``(N, K)`` requantized to ``ggml_type`` (gguf.quants, llama.cpp's reference
    rounding) -> rows ``(N, row_bytes)`` uint8."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    raw = quantize(values.float().contiguous().numpy(), GGMLQuantizationType[ggml_type])
    return torch.from_numpy(np.ascontiguousarray(raw)).reshape(values.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry: ``vtype`` / ``sub_type`` are ``gguf.GGUFValueType`` names."""

    key: str
    value: Any
    vtype: str
    sub_type: str | None = None


def _rope_theta(config: Any) -> tuple[float, str]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0), str(rope_type or "default")


def config_metadata(config: Any, name: str) -> tuple[str, list[KeyValue]]:
    """``(architecture, keys)`` of a llama.cpp model from its transformers config; MemoptError in
    one line for a model GGUF cannot describe the way memopt and llama.cpp would both run it."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        raise MemoptError(
            f"GGUF export supports the {', '.join(ARCHITECTURES)} architectures, not {model_type!r}"
        )
    theta, rope_type = _rope_theta(config)
    if rope_type != "default":
        raise MemoptError(f"GGUF export: rope scaling {rope_type!r} is not supported")
    hidden = int(config.hidden_size)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    a = arch
    kv = [
        KeyValue("general.name", str(name), "STRING"),
        KeyValue(f"{a}.vocab_size", int(config.vocab_size), "UINT32"),
        KeyValue(f"{a}.context_length", int(config.max_position_embeddings), "UINT32"),
        KeyValue(f"{a}.embedding_length", hidden, "UINT32"),
        KeyValue(f"{a}.block_count", int(config.num_hidden_layers), "UINT32"),
        KeyValue(f"{a}.feed_forward_length", int(config.intermediate_size), "UINT32"),
        KeyValue(f"{a}.attention.head_count", n_head, "UINT32"),
        KeyValue(f"{a}.attention.head_count_kv", n_kv, "UINT32"),
        KeyValue(f"{a}.rope.freq_base", theta, "FLOAT32"),
        KeyValue(f"{a}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), "FLOAT32"),
        KeyValue(f"{a}.rope.dimension_count", head_dim, "UINT32"),
    ]
    if head_dim * n_head != hidden:
        kv += [
            KeyValue(f"{a}.attention.key_length", head_dim, "UINT32"),
            KeyValue(f"{a}.attention.value_length", head_dim, "UINT32"),
        ]
    return arch, kv


# keys of a source GGUF that describe the file written, not the model: never copied
_NOT_CARRIED = ("general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment")  # fmt: skip


def carried_metadata(path: Path) -> list[KeyValue]:
    """The keys of a GGUF file that an export of its model carries, with their stored types:
    every ``tokenizer.*`` key and the descriptive ``general.*`` ones (name, license...)."""
    reader = _parse(Path(path))
    out = []
    for key, field in reader.fields.items():
        if not key.startswith(("tokenizer.", "general.")) or key in _NOT_CARRIED:
            continue
        try:
            value = field.contents()
        except Exception as exc:
            raise MemoptError(
                f"{path}: corrupt GGUF metadata field {key!r} ({one_line(exc)})"
            ) from None
        types = [t.name for t in field.types]
        out.append(KeyValue(key, value, types[0], types[1] if len(types) > 1 else None))
    return out


_GPT2_SPLIT = PRE_TOKENIZER_SPLITS["gpt2"][-1]
# the names of memopt's PRE_TOKENIZER_SPLITS that llama.cpp's vocabulary loader knows, preferred
# first ("gpt2" is memopt's alone: llama.cpp calls that split "gpt-2" and refuses "gpt2")
_LLAMA_CPP_PRE = ("gpt-2", "smollm", "starcoder", "refact")


def _pre_tokenizer_name(pre: Any) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json pre-tokenizer, or MemoptError."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    splits: list[str] = []
    ok = bool(steps) and all(isinstance(s, dict) for s in steps)
    for i, step in enumerate(steps if ok else []):
        last = i == len(steps) - 1
        if step.get("type") == "ByteLevel" and last:
            if step.get("use_regex", True):
                splits.append(_GPT2_SPLIT)
            elif not splits:
                ok = False
        elif (
            step.get("type") == "Split"
            and str(step.get("behavior", "")).lower() == "isolated"
            and not step.get("invert")
            and isinstance(step.get("pattern"), dict)
            and "Regex" in step["pattern"]
            and not last
        ):
            splits.append(step["pattern"]["Regex"])
        else:
            ok = False
    if ok and steps[-1].get("type") == "ByteLevel":
        for name in _LLAMA_CPP_PRE:
            if tuple(splits) == PRE_TOKENIZER_SPLITS.get(name):
                return name
    raise MemoptError(
        "GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp and memopt both name "
        f"(supported: byte-level BPE with the splits of {', '.join(_LLAMA_CPP_PRE)})"
    )


def _merge_text(merge: Any) -> str:
    if isinstance(merge, str):
        return merge
    # tokenizers >= 0.20 writes pairs; GGUF keeps "a b", a space inside a part encoded as U+0120
    return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in p) for p in merge)


def tokenizer_metadata(tok: Any, vocab_size: int) -> list[KeyValue]:
    """GGUF tokenizer keys (``tokenizer.ggml.*``) for a transformers fast tokenizer: a byte-level
    BPE vocabulary (GPT-2 style; llama.cpp's ``gpt2`` model), padded to the model's
    ``vocab_size`` with unused tokens. MemoptError for any other kind of tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise MemoptError("GGUF export needs a fast (tokenizers) tokenizer; the model has another")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MemoptError(
            f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}"
            + (" with byte fallback" if model.get("byte_fallback") else "")
        )
    if spec.get("normalizer") is not None:
        raise MemoptError("GGUF export: tokenizers with a normalizer are not supported")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # noqa: N806 (gguf.TokenType)
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    entries = [(text, int(i), NORMAL) for text, i in model.get("vocab", {}).items()]
    for t in spec.get("added_tokens") or []:
        entries.append((t["content"], int(t["id"]), CONTROL if t.get("special") else USER_DEFINED))
    for text, i, kind in entries:
        if not 0 <= i < vocab_size:
            raise MemoptError(
                f"GGUF export: token id {i} of the tokenizer is outside the model's vocabulary "
                f"({vocab_size} rows)"
            )
        tokens[i], types[i] = text, kind
    names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    kv = [
        KeyValue("tokenizer.ggml.model", "gpt2", "STRING"),
        KeyValue("tokenizer.ggml.pre", pre, "STRING"),
        KeyValue("tokenizer.ggml.tokens", names, "ARRAY", "STRING"),
        KeyValue("tokenizer.ggml.token_type", types, "ARRAY", "INT32"),
    ]
    merges = [_merge_text(m) for m in model.get("merges") or []]
    if merges:
        kv.append(KeyValue("tokenizer.ggml.merges", merges, "ARRAY", "STRING"))
    for role in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{role}_token_id", None)
        key = "padding" if role == "pad" else role
        if isinstance(i, int) and 0 <= i < vocab_size:
            kv.append(KeyValue(f"tokenizer.ggml.{key}_token_id", i, "UINT32"))
    # whether encoding adds BOS / EOS, as the tokenizer itself does it (memopt encodes with it)
    ids = list(tok("a")["input_ids"])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    add_bos = bos is not None and len(ids) > 1 and ids[0] == bos
    add_eos = eos is not None and len(ids) > 1 and ids[-1] == eos
    kv += [
        KeyValue("tokenizer.ggml.add_bos_token", bool(add_bos), "BOOL"),
        KeyValue("tokenizer.ggml.add_eos_token", bool(add_eos), "BOOL"),
    ]
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        kv.append(KeyValue("tokenizer.chat_template", template, "STRING"))
    return kv


# --------------------------------------------------------------------------------------------------
# The file


@dataclass
class GGUFTensor:
    """One tensor to write: its GGUF name, GGML type, torch-order shape, and the producer of its
    bytes (any array or tensor of exactly :func:`tensor_nbytes` bytes), called in turn."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray | torch.Tensor]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.shape)


def _file_type(tensors: list[GGUFTensor]) -> int:
    """``general.file_type`` (gguf.LlamaFileType): the type holding most bytes of 2-D tensors."""
    codes = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
             "Q4_K": 15, "Q6_K": 18, "BF16": 32}  # fmt: skip
    weight: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            weight[t.ggml_type] = weight.get(t.ggml_type, 0) + t.nbytes
    top = max(weight, key=weight.get) if weight else "F32"
    return codes.get(top, 0)


def write_gguf(
    path: str | Path,
    arch: str,
    metadata: Iterable[KeyValue],
    tensors: list[GGUFTensor],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a GGUF file at ``path`` (through a temporary name: a failure leaves no file) and
    return its size. The header is written first, then each tensor's bytes from its producer. Of
    two entries of ``metadata`` with one key, the first is written."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    path = Path(path)
    if path.is_dir():
        raise MemoptError(
            f"output {path} is a folder: --format gguf writes one file (e.g. {path / 'model.gguf'})"
        )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise MemoptError("GGUF export: a tensor name is planned twice")
    total = sum(t.nbytes for t in tensors)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            seen = {"general.architecture"}
            for item in metadata:
                if item.key in seen:
                    continue
                seen.add(item.key)
                sub = GGUFValueType[item.sub_type] if item.sub_type else None
                writer.add_key_value(item.key, item.value, GGUFValueType[item.vtype], sub)
            if "general.file_type" not in seen:
                writer.add_uint32("general.file_type", _file_type(tensors))
            quantized = any(t.ggml_type not in ("F32", "F16", "BF16") for t in tensors)
            if quantized and "general.quantization_version" not in seen:
                writer.add_uint32("general.quantization_version", 2)
            for t in tensors:
                # a non-uint8 dtype: the shape is taken as the tensor's own, not a byte shape
                writer.add_tensor_info(
                    t.name,
                    t.shape,
                    np.dtype(np.float32),
                    t.nbytes,
                    GGMLQuantizationType[t.ggml_type],
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            done = 0
            for t in tensors:
                raw = t.data()
                arr = raw.contiguous().numpy() if isinstance(raw, torch.Tensor) else raw
                arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
                if arr.nbytes != t.nbytes:
                    raise MemoptError(
                        f"GGUF export: tensor {t.name} has {arr.nbytes} bytes, {t.ggml_type} "
                        f"{t.shape} needs {t.nbytes}"
                    )
                writer.write_tensor_data(arr)
                done += t.nbytes
                if progress is not None:
                    progress(done, total)
            writer.close()
            writer = None
        finally:
            if writer is not None:
                writer.close()
    return os.path.getsize(path)
