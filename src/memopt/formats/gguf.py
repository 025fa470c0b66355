"""GGUF files: config, weights (dequantized, in Hugging Face layout) and tokenizer.

A GGUF file (llama.cpp's format) holds a key/value header, a table of tensors and their data, each
tensor stored as a GGML type: plain floats (F32, F16, BF16) or blocks of quantized values with their
scales (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: 32 values a block; Q4_K, Q6_K: 256 a block). We parse it with
the ``gguf`` package's reader and dequantize whole tensors at once with torch, which is vectorized
and multi-threaded, where ``gguf.quants.dequantize`` works in numpy on one core.

Supported architectures: ``llama`` (which also covers Mistral-family files, which llama.cpp writes
as ``llama``) and ``qwen2``. Anything else, or a file that is not GGUF, is truncated or corrupt,
raises :class:`~memopt.core.errors.MemoptError` in one line naming the file.

Layout facts used below (GGUF v3, little endian):

* tensor dims are stored innermost first (``ne0`` = input features), so the numpy/torch shape is
  the reverse: ``(out_features, in_features)``, already Hugging Face's orientation for a Linear;
* a quantized row of ``in`` values is ``in / block_size`` consecutive blocks; rows are independent,
  so rows can be reordered before dequantization by moving their bytes;
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` per head, from Hugging Face's
  "rotate halves" rotary layout to its own "interleaved pairs" layout; :func:`_unpermute_rows`
  undoes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memopt.core.atomic import staged_folder
from memopt.core.errors import MemoptError, flat, one_line
from memopt.formats.limits import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH

__all__ = [
    "GGUFSource",
    "block_layout",
    "PRE_TOKENIZER_SPLITS",
    "QUANTIZED_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "convert_tokenizer",
    "dequantize",
    "gguf_config",
    "gguf_metadata",
    "gguf_tensor_types",
    "gguf_tokenizer",
    "gguf_tokenizer_file",
    "hf_name",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# --------------------------------------------------------------------------------------------------
# Reading the file


def _reader_class() -> type:
    """``gguf.GGUFReader`` with its ``data`` kept as a plain ndarray view of the memmap.

    The reader slices ``self.data`` once per header part (every token and merge string of the
    vocabulary is two). On a ``np.memmap`` each slice runs memmap's Python-level
    ``__array_finalize__``/``__getitem__``; on a plain ndarray view of the same mapping it does not,
    which makes the parse of a large vocabulary several times faster with identical results (and
    the leaner ``_get`` below faster still).
    Built lazily so that importing this module does not import ``gguf``.
    """
    global _READER_CLASS
    if _READER_CLASS is None:
        from gguf import GGUFReader

        class _FastReader(GGUFReader):
            @property
            def data(self) -> np.ndarray:
                return self._data

            @data.setter
            def data(self, value: np.ndarray) -> None:
                # The view keeps the memmap (its .base) and so the mapping alive.
                self._data = value.view(np.ndarray)

            def _get(
                self,
                offset: int,
                dtype: Any,
                count: int = 1,
                override_order: str | None = None,
            ) -> np.ndarray:
                # The parent's _get, with the byte-ordered dtype looked up once per (dtype,
                # order) instead of rebuilt on each call (several per header part): one view
                # instead of three, the same arrays (dtype, shape, bytes).
                order = self.byte_order if override_order is None else override_order
                dt = _DTYPES.get((dtype, order))
                if dt is None:
                    dt = _DTYPES[(dtype, order)] = np.dtype(dtype).newbyteorder(order)
                count = int(count)
                return self._data[offset : offset + dt.itemsize * count].view(dt)[:count]

        _READER_CLASS = _FastReader
    return _READER_CLASS


_READER_CLASS: type | None = None
_DTYPES: dict[tuple[Any, str], np.dtype] = {}

# One parsed reader handed from gguf_config() to the GGUFSource that load_model() opens right after
# (both need the header; a vocabulary's header is too slow to parse twice). GGUFSource *takes* it
# out of the cache, so no mapping outlives the source that uses it. Keyed by (resolved path, size, mtime).
_HANDOFF: dict[tuple[str, int, int], Any] = {}
_HANDOFF_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise MemoptError(f"{path}: cannot read GGUF file ({exc.strerror or exc})") from None
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _parse(path: Path) -> Any:
    """Parse the header and tensor table; any failure of the parser means a bad file."""
    key = _file_key(path)
    size = key[1]
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise MemoptError(f"{path}: cannot read GGUF file ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise MemoptError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    try:
        # mode "c" (copy-on-write) gives writable arrays, so torch.from_numpy does not warn about
        # read-only memory; nothing is ever written back to the file.
        with np.errstate(all="ignore"):  # an absurd offset overflows numpy's uint64 sum
            reader = _reader_class()(path, mode="c")  # (and the table check below refuses it)
    except MemoryError:
        raise MemoptError(f"{path}: corrupt GGUF header (absurd sizes)") from None
    except Exception as exc:  # the parser reports a bad file with any of ValueError/IndexError/...
        raise MemoptError(f"{path}: corrupt or truncated GGUF file ({one_line(exc)})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise MemoptError(
                f"{path}: truncated GGUF file ({size} bytes; tensor {t.name!r} ends at byte {end})"
            )
    _check_tensor_table(reader, path, size)
    return reader


def _check_tensor_table(reader: Any, path: Path, size: int) -> None:
    """Refuse a tensor table that does not lay the data out as llama.cpp's writers do: every
    dimension at least 1 (their product, in exact arithmetic, the element count the parser used),
    whole blocks along the rows, and the tensors' bytes one after the other from the start of the
    data, each at the next multiple of the alignment after the one before (no overlap, no gap: a
    changed offset or type would otherwise read some other tensor's bytes)."""
    from gguf import GGML_QUANT_SIZES

    align = int(reader.alignment)
    base = int(reader.data_offset)
    spans = []
    for t in reader.tensors:
        dims = [int(d) for d in t.shape.tolist()]
        n = 1
        for d in dims:
            n *= d
        if not dims or min(dims) < 1 or n != int(t.n_elements):
            raise MemoptError(f"{path}: corrupt GGUF tensor table ({t.name!r} has dims {dims})")
        block = GGML_QUANT_SIZES[t.tensor_type][0]
        if dims[0] % block:
            raise MemoptError(
                f"{path}: corrupt GGUF tensor table ({t.name!r}: rows of {dims[0]} values are "
                f"not whole {t.tensor_type.name} blocks of {block})"
            )
        spans.append((int(t.data_offset) - base, int(t.n_bytes), t.name))
    end = 0
    for start, nbytes, name in sorted(spans):
        want = end + (-end % align)
        if start != want:
            raise MemoptError(
                f"{path}: corrupt GGUF tensor table ({name!r} at data offset {start}, "
                f"expected {want}: {'overlaps the tensor before' if start < end else 'a gap'})"
            )
        end = start + nbytes
    if size - base - end >= align:
        raise MemoptError(
            f"{path}: corrupt GGUF file ({size - base - end} bytes after the last tensor's data)"
        )


def _reader(path: Path, take: bool) -> Any:
    """A parsed reader, from the hand-off slot when fresh; ``take`` empties the slot."""
    key = _file_key(path)
    with _HANDOFF_LOCK:
        reader = _HANDOFF.pop(key, None) if take else _HANDOFF.get(key)
    if reader is None:
        reader = _parse(path)
        if not take:
            with _HANDOFF_LOCK:
                _HANDOFF.clear()  # at most one parked reader
                _HANDOFF[key] = reader
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as exc:
        raise MemoptError(f"corrupt GGUF metadata field {key!r} ({one_line(exc)})") from None


def _architecture(reader: Any, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise MemoptError(f"{path}: GGUF file has no general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MemoptError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


# --------------------------------------------------------------------------------------------------
# Config


def gguf_config(path: Path) -> Any:
    """The transformers config of a GGUF file, built from its metadata alone (no tensor read)."""
    path = Path(path)
    reader = _reader(path, take=False)
    return _config(reader, path)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The file's scalar metadata (numbers, strings, booleans) by key; arrays (the vocabulary)
    are left out. The parsed header stays parked for the GGUFSource that follows."""
    reader = _reader(Path(path), take=False)
    out: dict[str, Any] = {}
    for key in reader.fields:
        value = _field(reader, key)
        if isinstance(value, (int, float, str, bool)):
            out[key] = value
    return out


def gguf_tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's GGML type by its Hugging Face name (``"Q4_1"``, ``"F32"``...), from the tensor
    table alone: no tensor read (the parsed header stays parked for the GGUFSource that follows)."""
    path = Path(path)
    reader = _reader(path, take=False)
    types: dict[str, str] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise MemoptError(f"{path}: GGUF tensor {t.name!r} has no known Hugging Face name")
        types[name] = t.tensor_type.name
    return types


_INT_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")


def _count(reader: Any, path: Path, key: str, bound: int, default: Any = None) -> Any:
    """A whole-number metadata value from 1 to ``bound`` (stored as an integer type), or
    ``default`` when the key is absent; MemoptError naming the key otherwise."""
    f = reader.fields.get(key)
    if f is None:
        return default
    value = _field(reader, key)
    kind = f.types[0].name if f.types else "?"
    if kind not in _INT_TYPES or type(value) is not int or not 1 <= value <= bound:
        raise MemoptError(
            f"{path}: GGUF metadata {key} is {value!r} ({kind}), expected a whole number "
            f"from 1 to {bound}"
        )
    return value


def _positive(reader: Any, path: Path, key: str, default: Any = None) -> Any:
    """A finite floating-point metadata value above 0, or ``default`` when the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    value = _field(reader, key)
    kind = f.types[0].name if f.types else "?"
    if kind not in ("FLOAT32", "FLOAT64") or not (math.isfinite(value) and value > 0):
        raise MemoptError(
            f"{path}: GGUF metadata {key} is {value!r} ({kind}), expected a finite number above 0"
        )
    return float(value)


def _token_id(reader: Any, path: Path, key: str, vocab: int) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    value = _field(reader, key)
    kind = f.types[0].name if f.types else "?"
    if kind not in _INT_TYPES or type(value) is not int or not 0 <= value < vocab:
        raise MemoptError(
            f"{path}: GGUF metadata {key} is {value!r} ({kind}), expected a token id from 0 "
            f"to {vocab - 1}"
        )
    return value


def _config(reader: Any, path: Path) -> Any:
    """The transformers config, from metadata checked key by key: counts are whole numbers within
    memopt.formats.limits, heads divide the width and key/value heads the heads, the epsilon and
    rotary base are finite and positive, the block count is the blocks the tensor table holds
    (``blk.0`` to ``blk.{n-1}``, each of them), token ids lie in the vocabulary."""
    arch = _architecture(reader, path)

    def need(key: str, bound: int) -> int:
        value = _count(reader, path, f"{arch}.{key}", bound)
        if value is None:
            raise MemoptError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style frequency scaling, stored as a tensor; the config below would ignore it.
        raise MemoptError(f"{path}: GGUF rope frequency scaling (rope_freqs) is not supported")
    n_vocab = _count(reader, path, f"{arch}.vocab_size", MAX_VOCAB)
    if n_vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens.data) if tokens is not None else None
    if not n_vocab or n_vocab > MAX_VOCAB:
        raise MemoptError(f"{path}: GGUF metadata gives no vocabulary size")
    n_head = need("attention.head_count", MAX_HEADS)
    hidden = need("embedding_length", MAX_WIDTH)
    n_kv = _count(reader, path, f"{arch}.attention.head_count_kv", MAX_HEADS, n_head)
    head_dim = _count(reader, path, f"{arch}.rope.dimension_count", MAX_WIDTH)
    if head_dim is None and hidden % n_head:
        raise MemoptError(
            f"{path}: GGUF metadata {arch}.embedding_length {hidden} is not a multiple of "
            f"{arch}.attention.head_count {n_head}"
        )
    if n_head % n_kv:
        raise MemoptError(
            f"{path}: GGUF metadata {arch}.attention.head_count {n_head} is not a multiple of "
            f"{arch}.attention.head_count_kv {n_kv}"
        )
    n_layers = need("block_count", MAX_LAYERS)
    blocks = {int(n.split(".")[1]) for n in tensor_names if n.startswith("blk.")
              and n.split(".")[1].isdigit()}  # fmt: skip
    if blocks != set(range(n_layers)):
        extra = sorted(blocks - set(range(n_layers)))
        missing = sorted(set(range(n_layers)) - blocks)
        what = f"blk.{extra[0]} is beyond them" if extra else f"blk.{missing[0]} is missing"
        raise MemoptError(
            f"{path}: GGUF metadata {arch}.block_count is {n_layers}, the tensors disagree ({what})"
        )
    kwargs: dict[str, Any] = dict(
        vocab_size=int(n_vocab),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length", MAX_WIDTH),
        num_hidden_layers=n_layers,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        rms_norm_eps=_positive(reader, path, f"{arch}.attention.layer_norm_rms_epsilon"),
        max_position_embeddings=need("context_length", MAX_POSITIONS),
        rope_parameters={
            "rope_theta": _positive(reader, path, f"{arch}.rope.freq_base", 10000.0),
            "rope_type": "default",
        },
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_token_id(reader, path, "tokenizer.ggml.bos_token_id", n_vocab),
        eos_token_id=_token_id(reader, path, "tokenizer.ggml.eos_token_id", n_vocab),
        pad_token_id=_token_id(reader, path, "tokenizer.ggml.padding_token_id", n_vocab),
    )
    if kwargs["rms_norm_eps"] is None:
        raise MemoptError(f"{path}: GGUF metadata lacks {arch}.attention.layer_norm_rms_epsilon")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise MemoptError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    if arch == "llama":
        from transformers import LlamaConfig

        if head_dim is not None:
            kwargs["head_dim"] = head_dim
        # Some llama-architecture files carry projection biases; the config must ask for them.
        kwargs["attention_bias"] = any(n.endswith(".bias") and ".attn_" in n for n in tensor_names)
        kwargs["mlp_bias"] = any(n.endswith(".bias") and ".ffn_" in n for n in tensor_names)
        # Mistral-family GGUFs are written as "llama"; LlamaConfig runs them the same way.
        return _build_config(path, LlamaConfig, "LlamaForCausalLM", kwargs)
    from transformers import Qwen2Config

    return _build_config(path, Qwen2Config, "Qwen2ForCausalLM", kwargs)


def _build_config(path: Path, cls: type, architecture: str, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(architectures=[architecture], **kwargs)
    except Exception as exc:  # transformers' own checks of the values: the file's fault
        raise MemoptError(f"{path}: GGUF metadata makes no {cls.__name__} ({flat(exc)})") from None


# --------------------------------------------------------------------------------------------------
# Names: GGUF -> Hugging Face

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None if unknown)."""
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{kind}"
    return None


# --------------------------------------------------------------------------------------------------
# Dequantization
#
# Each takes the raw bytes of a tensor as a (rows, bytes_per_row) uint8 torch tensor and returns
# (rows, values_per_row) float32. Ours rather than gguf.quants.dequantize because it is faster:
# gguf's numpy code makes several float32 temporaries per block. The arithmetic is
# done in the same order as gguf's (q * d, then + m, in float32), so the values are bit-identical
# to it (checked in tests/formats/test_gguf.py). Every temporary is made on the blocks' device, so
# that the same code runs on the meta device (estimating a model that keeps its blocks).


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of every block, as float32: (n, bytes) -> (n, 1)."""
    return blocks[:, start : start + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Unpack (n, 16) bytes into (n, 32) uint8 values: low nibbles are values 0-15, high ones 16-31."""
    q = torch.empty(qs.shape[0], 32, dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=q[:, :16])
    torch.bitwise_right_shift(qs, 4, out=q[:, 16:])
    return q


# The integer codes stay uint8/int8 (1 byte a value) until the one multiply that writes the float32
# output (torch converts on the fly): fewer bytes moved than converting first, then scaling in place.


def _dq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block (34 bytes): d f16 | 32 x int8; value = q * d
    # (converting first is faster here: the strided int8 view makes the mixed-dtype mul slow)
    d = _f16(blocks, 0)  # (n, 1)
    return blocks[:, 2:].view(torch.int8).float().mul_(d)  # (n, 32)


def _dq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block (18 bytes): d f16 | 16 bytes of nibbles; value = (q - 8) * d
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).view(torch.int8).sub_(8)  # (n, 32) in -8..7
    return torch.mul(q, d)


def _dq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block (20 bytes): d f16 | m f16 | 16 bytes of nibbles; value = q * d + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1) each
    return torch.mul(_nibbles(blocks[:, 4:]), d).add_(m)  # (n, 32)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Bit i of each block's 32-bit ``qh`` word, shifted to bit 4: (n, 4) bytes -> (n, 32) uint8."""
    shift = torch.arange(8, dtype=torch.uint8, device=qh.device)
    bits = qh.unsqueeze(-1) >> shift  # (n, 4, 8): byte j, bit i
    return ((bits & 1) << 4).reshape(qh.shape[0], 32)  # value 8j+i, little-endian word


def _dq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # block (22 bytes): d f16 | qh 4 bytes (5th bit of each value) | 16 bytes of nibbles
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:]) | _high_bits(blocks[:, 2:6])  # (n, 32) in 0..31
    return torch.mul(q.view(torch.int8).sub_(16), d)


def _dq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # block (24 bytes): d f16 | m f16 | qh 4 bytes | 16 bytes of nibbles; value = q * d + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:]) | _high_bits(blocks[:, 4:8])
    return torch.mul(q, d).add_(m)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks: (n, 12) -> (n, 8), (n, 8).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; scales and mins 4-7
    have their low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in
    the top 2 bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]  # (n, 4) each
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    return sc, mn


def _dq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # block (144 bytes, 256 values): d f16 | dmin f16 | 12 bytes scales | 128 bytes of nibbles.
    # Sub-block j (32 values) = q * (d * sc_j) - dmin * min_j; each 32-byte chunk of qs holds two
    # sub-blocks: low nibbles the first, high nibbles the second.
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, mn = _k_scales(blocks[:, 4:16])
    scale = (d * sc.float()).unsqueeze(-1)  # (n, 8, 1)
    offset = (dmin * mn.float()).unsqueeze(-1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)  # (n, chunk, 1, byte)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()  # (n, sub-block, 32)
    return (q * scale - offset).reshape(n, 256)


def _dq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # block (210 bytes, 256 values): ql 128 bytes (low 4 bits) | qh 64 bytes (high 2 bits) |
    # 16 x int8 scales (one per 16 values) | d f16. value = d * scale * (q - 32).
    # Each half (128 values) uses 64 bytes of ql and 32 of qh: values 0-31 are ql[0:32] low nibbles,
    # 32-63 ql[32:64] low, 64-95 ql[0:32] high, 96-127 ql[32:64] high; their high bits are bit
    # pairs 0-1, 2-3, 4-5, 6-7 of qh[0:32].
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)  # (n, half, 1, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # (n, half, 1, 32)
    scales = blocks[:, 192:208].view(torch.int8).float()  # (n, 16)
    d = _f16(blocks, 208)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)  # (n, half, quarter, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 0x03  # (n, half, quarter, 32)
    q = (low | (high << 4)).view(torch.int8).float().sub_(32).reshape(n, 16, 16)
    return (q * (d * scales).unsqueeze(-1)).reshape(n, 256)


def _by_gguf(name: str) -> Any:
    """The dequantizer of a K-quant that memopt does not decode itself (Q2_K, Q3_K, Q5_K: rare in
    the files users run, so the gguf package's numpy code, one core, is fast enough): the values
    are gguf's and llama.cpp's by construction. On the meta device, an empty result."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType[name]

    def fn(blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        if blocks.device.type == "meta":
            return torch.empty(n, 256, device="meta")
        return torch.from_numpy(gguf_dequantize(blocks.cpu().numpy(), qtype)).reshape(n, 256)

    return fn


@dataclass(frozen=True)
class _Kind:
    block_values: int  # values per block
    block_bytes: int  # bytes per block
    fn: Any  # (n_blocks, block_bytes) uint8 -> (n_blocks, block_values) float32, or None for floats


_KINDS: dict[str, _Kind] = {
    "F32": _Kind(1, 4, None),
    "F16": _Kind(1, 2, None),
    "BF16": _Kind(1, 2, None),
    "Q8_0": _Kind(32, 34, _dq_q8_0),
    "Q4_0": _Kind(32, 18, _dq_q4_0),
    "Q4_1": _Kind(32, 20, _dq_q4_1),
    "Q5_0": _Kind(32, 22, _dq_q5_0),
    "Q5_1": _Kind(32, 24, _dq_q5_1),
    "Q4_K": _Kind(256, 144, _dq_q4_k),
    "Q6_K": _Kind(256, 210, _dq_q6_k),
    "Q2_K": _Kind(256, 84, _by_gguf("Q2_K")),
    "Q3_K": _Kind(256, 110, _by_gguf("Q3_K")),
    "Q5_K": _Kind(256, 176, _by_gguf("Q5_K")),
}
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED_TYPES = tuple(_KINDS)
QUANTIZED_TYPES = tuple(k for k in _KINDS if k not in _FLOATS)


def block_layout(ggml_type: str) -> tuple[int, int]:
    """``(values, bytes)`` of one block of a GGML type (a float type: one value a block)."""
    kind = _KINDS.get(ggml_type)
    if kind is None:
        raise MemoptError(
            f"GGML type {ggml_type} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    return kind.block_values, kind.block_bytes


# Above this many blocks a tensor is dequantized in slices, to bound the temporaries.
_CHUNK_BLOCKS = 1 << 18


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's ops on one thread for a while.

    Dequantizing is a handful of cheap elementwise passes per tensor. With several OpenMP threads,
    every pass ends in a barrier that spins whenever another core is busy (other processes), which
    makes loading a model's tensors several times slower than on one thread; on an idle machine the
    extra threads save little (the passes are memory-bound).
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def dequantize(
    raw: torch.Tensor | np.ndarray, ggml_type: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """Float32 values of a tensor of ``ggml_type`` from its raw bytes; ``shape`` is the torch shape."""
    kind = _KINDS.get(ggml_type)
    if kind is None:
        raise MemoptError(
            f"GGML type {ggml_type} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    data = torch.from_numpy(raw) if isinstance(raw, np.ndarray) else raw
    data = data.reshape(-1).view(torch.uint8)
    if ggml_type in _FLOATS:
        return data.view(_FLOATS[ggml_type]).reshape(shape).float()
    blocks = data.reshape(-1, kind.block_bytes)  # (n_blocks, block_bytes)
    n = blocks.shape[0]
    if n <= _CHUNK_BLOCKS:
        return kind.fn(blocks).reshape(shape)
    out = torch.empty(n, kind.block_values, device=blocks.device)
    for i in range(0, n, _CHUNK_BLOCKS):
        out[i : i + _CHUNK_BLOCKS] = kind.fn(blocks[i : i + _CHUNK_BLOCKS])
    return out.reshape(shape)


def _unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order of a q/k projection (any per-row payload, any dtype).

    llama.cpp stores head h's rows as (head_dim/2, 2) pairs -- row 2i+j of the head is Hugging
    Face's row j*head_dim/2 + i -- so reshaping to (n_head, head_dim/2, 2, ...) and swapping the
    middle axes gives back (n_head, 2, head_dim/2, ...), Hugging Face's order.
    """
    n_rows = rows.shape[0]
    half = n_rows // n_head // 2
    tail = rows.shape[1:]
    return rows.reshape(n_head, half, 2, *tail).transpose(1, 2).reshape(n_rows, *tail).contiguous()


# --------------------------------------------------------------------------------------------------
# The tensor source


@dataclass(frozen=True)
class _Entry:
    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]  # torch / Hugging Face orientation
    nbytes: int
    data: np.ndarray  # raw view into the mapping: floats as (rows, cols), blocks as (rows, bytes)
    heads: int  # > 0: rows to un-permute with this many heads (llama q/k)


class GGUFSource:
    """Tensors of a GGUF file by their Hugging Face names, dequantized on :meth:`get`.

    The file is memory-mapped once; nothing is read until a tensor is asked for. :meth:`raw` gives
    the quantized blocks themselves, for transforms that want to keep or requantize them.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        reader = _reader(self.path, take=True)
        self.architecture = _architecture(reader, self.path)
        self._reader = reader  # owns the memory map that the entries view
        arch = self.architecture
        n_head = _count(reader, self.path, f"{arch}.attention.head_count", MAX_HEADS)
        if n_head is None:
            raise MemoptError(f"{self.path}: GGUF metadata lacks {arch}.attention.head_count")
        n_kv = _count(reader, self.path, f"{arch}.attention.head_count_kv", MAX_HEADS, n_head)
        # llama.cpp permutes q/k rows for llama only (qwen2 is converted without it)
        permuted = (
            {"attn_q": int(n_head), "attn_k": int(n_kv)} if self.architecture == "llama" else {}
        )
        self._entries: dict[str, _Entry] = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                raise MemoptError(
                    f"{self.path}: GGUF tensor {t.name!r} has no known Hugging Face name"
                )
            ggml_type = t.tensor_type.name
            stem = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
            heads = permuted.get(stem, 0)
            dims = [int(d) for d in t.shape.tolist()]  # ne0 (a row's values) first
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else dims[0]
            if heads and rows % (2 * heads):
                raise MemoptError(
                    f"{self.path}: GGUF tensor {t.name!r} has {rows} rows, not a whole number of "
                    f"rotary pairs for {heads} heads"
                )
            self._entries[name] = _Entry(
                t.name,
                ggml_type,
                tuple(int(d) for d in reversed(t.shape.tolist())),
                int(t.n_bytes),
                t.data,
                heads,
            )

    def names(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise MemoptError(f"{self.path}: no tensor {name!r} in the GGUF file") from None

    def nbytes(self, name: str) -> int:
        """Bytes as stored in the file (quantized blocks included)."""
        return self._entry(name).nbytes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`get` returns by default: float32, whatever the stored type."""
        self._entry(name)
        return torch.float32

    def ggml_type(self, name: str) -> str:
        """The tensor's GGML type name as stored: ``"Q4_1"``, ``"Q8_0"``, ``"F32"``..."""
        return self._entry(name).ggml_type

    def raw(self, name: str, hf_rows: bool = True) -> tuple[str, np.ndarray]:
        """``(ggml_type, bytes)``: the stored data as a (rows, bytes_per_row) uint8 array.

        Row r holds output feature r of the Hugging Face weight (``hf_rows=True``: llama q/k rows
        are put back in Hugging Face order, a copy) or the file's own row order (``False``: a
        read-only view of the mapping). A 1-D tensor is one row, except a llama q/k bias: one row
        per value, so that its values can be reordered like the weight's rows.
        """
        e = self._entry(name)
        data = self._rows(e).numpy()
        if hf_rows and e.heads:
            return e.ggml_type, _unpermute_rows(torch.from_numpy(data), e.heads).numpy()
        view = data.view()
        view.flags.writeable = False
        return e.ggml_type, view

    @staticmethod
    def _rows(e: _Entry) -> torch.Tensor:
        """The stored bytes as (rows, bytes_per_row) uint8, a view of the mapping."""
        if e.heads and len(e.shape) == 1:
            rows = e.shape[0]  # a q/k bias: one row per value
        else:
            rows = int(np.prod(e.shape[:-1], dtype=np.int64))  # 1 for a 1-D tensor
        return torch.from_numpy(e.data.reshape(-1).view(np.uint8).reshape(rows, -1))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor dequantized, in Hugging Face layout, as ``dtype`` (default float32)."""
        with _one_thread():
            out = self.read(name)
            if dtype is not None and dtype.is_floating_point and dtype != out.dtype:
                out = out.to(dtype)
        return out

    def read(self, name: str, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Float32 values of the tensor (or of some of its rows), in Hugging Face layout.

        ``rows``: a ``slice`` of rows (a range of the file's bytes: quantized rows are independent
        runs of blocks) or an index tensor of any shape (a gather: an embedding lookup), whose
        shape then leads the result's, ``(*rows.shape, *shape[1:])``. Only those rows' bytes are
        read. Unlike :meth:`get`, torch's thread count is left alone (a process-wide setting that a
        caller on another thread would see change). The result owns its memory.
        """
        e = self._entry(name)
        if e.ggml_type not in _KINDS:
            raise MemoptError(
                f"{self.path}: tensor {e.gguf_name!r} is {e.ggml_type}, a GGML type memopt cannot "
                f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        data = self._rows(e)  # (rows, bytes_per_row), a view of the mapping
        if e.heads:
            if rows is not None:
                raise MemoptError(
                    f"{name}: rows of a permuted llama q/k weight cannot be read alone"
                )
            # Rows are independent, so reorder their (fewer) bytes rather than the floats.
            data = _unpermute_rows(data, e.heads)
        lead: tuple[int, ...] = e.shape[:1]
        if isinstance(rows, slice):
            data = data[rows]
            lead = (data.shape[0],)
        elif rows is not None:
            data = data[rows.reshape(-1)]  # (n, bytes_per_row): a copy of only those rows
            lead = tuple(rows.shape)
        shape = e.shape if rows is None else (*lead, *e.shape[1:])
        out = dequantize(data, e.ggml_type, shape)
        if out.untyped_storage().data_ptr() == self._rows(e).untyped_storage().data_ptr():
            out = out.clone()  # an F32 tensor viewed the mapping: own the memory instead
        return out

    def region(self, name: str | None = None) -> tuple[int, int]:
        """``(address, length)`` of a tensor's stored bytes in the mapping (``None``: all the
        tensors' data), for ``madvise`` (populate ahead, or give the pages back after use)."""
        data = self._reader.data if name is None else self._entry(name).data
        return int(data.ctypes.data), int(data.nbytes)

    def drop_metadata(self) -> None:
        """Forget the parsed key-value metadata (every vocabulary string as a numpy view, a Python
        object each) once the config and tokenizer are made; tensors stay
        readable (they need only the mapping and the tensor table)."""
        self._reader.fields = {}


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memopt" / "tokenizers"


def gguf_tokenizer(path: Path) -> Any:
    """The file's tokenizer as a transformers fast tokenizer, converted once and cached on disk.

    transformers' conversion of a GGUF vocabulary is slow and takes much transient memory; it
    runs once, in a child process (so that the caller's peak RSS, e.g. while quantizing, is not the
    converter's), and the result is saved under ``$XDG_CACHE_HOME/memopt/tokenizers/<key>/`` (key:
    resolved path, size and mtime of the file), written to a temporary folder and renamed into
    place. Afterwards it is read back from there.
    """
    from transformers import AutoTokenizer

    from memopt.core.rss import ChildProcessFailed, run_in_child

    path = Path(path)
    cached = _tokenizer_cache(path)
    if not (cached / "tokenizer_config.json").is_file():
        # If the child cannot run (no way to start one here), convert in this process below.
        with contextlib.suppress(ChildProcessFailed):
            run_in_child("memopt.formats.gguf:convert_tokenizer", str(path))
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cache entry: convert again
    return _convert(path, cached)


def convert_tokenizer(path: str) -> dict[str, Any]:
    """Convert the tokenizer of the GGUF at ``path`` into the cache (run in a child process)."""
    _convert(Path(path), _tokenizer_cache(Path(path)))
    return {}


# Bumped whenever the conversion changes what it writes: older cache entries are then not read.
_TOKENIZER_CACHE_VERSION = 2

# llama.cpp's pre-tokenizers (``tokenizer.ggml.pre``) as regex splits applied in order before the
# byte-level BPE, as llama.cpp's llama-vocab.cpp lists them. transformers' GGUF conversion keeps
# only the GPT-2 split, so the ids differ wherever the others split (SmolLM2: every digit alone).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),  # llama.cpp's own name for it (convert_hf_to_gguf writes this one)
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
}


def gguf_tokenizer_file(path: Path) -> Path:
    """The ``tokenizer.json`` of the file's converted tokenizer (converted once, cached: see
    :func:`gguf_tokenizer`), for a reader that needs only the ``tokenizers`` library."""
    path = Path(path)
    cached = _tokenizer_cache(path) / "tokenizer.json"
    if not cached.is_file():
        gguf_tokenizer(path)  # converts (in a child process) and fills the cache
    if not cached.is_file():
        raise MemoptError(f"{path}: its converted tokenizer could not be cached")
    return cached


def _tokenizer_cache(path: Path) -> Path:
    real, size, mtime = _file_key(path)
    key = f"{real}\0{size}\0{mtime}\0{_TOKENIZER_CACHE_VERSION}"
    return _cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]


def _apply_pre_tokenizer(tok: Any, reader: Any, path: Path) -> None:
    """Give the converted tokenizer the file's own pre-tokenizer (``tokenizer.ggml.pre``), so that
    its ids are llama.cpp's. A byte-level BPE vocabulary only; others are left as converted."""
    pre = _field(reader, "tokenizer.ggml.pre")
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2" or pre is None:
        return
    splits = PRE_TOKENIZER_SPLITS.get(str(pre))
    if splits is None:
        raise MemoptError(
            f"{path}: pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join(PRE_TOKENIZER_SPLITS)})"
        )
    from tokenizers import Regex, pre_tokenizers

    steps = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits[:-1]]
    # the last split is GPT-2's own: ByteLevel applies exactly that regex, then maps bytes
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)


def _convert(path: Path, cached: Path) -> Any:
    from transformers import AutoTokenizer

    reader = _reader(path, take=False)  # also rejects bad files with a clear message
    _architecture(reader, path)
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:
        raise MemoptError(
            f"{path}: cannot build the tokenizer from GGUF ({one_line(exc)})"
        ) from None
    _apply_pre_tokenizer(tok, reader, path)
    try:
        with staged_folder(cached, None) as tmp:
            tok.save_pretrained(str(tmp))
    except OSError:
        pass  # no writable cache: still return the tokenizer, just convert again next time
    return tok
