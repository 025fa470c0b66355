"""Bench: malformed model files, and what memopt does with each (the hardening contract's figures).

Real files of the four formats memopt reads are built once from a tiny Llama (hidden 64, 2 layers,
vocab 128): a Hugging Face folder (config.json + model.safetensors), a GGUF file (Q8_0 matrices,
F32 norms), and two memopt folders (int8 and int4, group 32: memopt.json + model.safetensors).
Each case is one structured mutation of one of them:

* ``safetensors``: truncation, byte flips and length edits in the header, the header replaced by a
  non-object or deep JSON, one tensor's ``dtype`` / ``shape`` / ``data_offsets`` edited (junk of
  every JSON type, same-size dtypes, swapped or grown dims, shifted or overlapping ranges),
  entries removed, renamed into a block the config lacks, duplicated, ``__metadata__`` edits;
* ``gguf``: metadata values replaced (every GGUF type, NaN, infinities, 0, -1, huge), keys removed
  or duplicated, tensor infos edited (name, dims, GGML type, offset), tensors removed or added,
  truncation, byte flips in the header;
* ``manifest``: a value anywhere in memopt.json replaced, removed or its list cut, junk of every
  JSON type, structured edits of shapes, group sizes, dtypes, classes, task, files;
* ``config``: a value of config.json replaced (0, -1, 10^9, 2^63, NaN, strings, lists...) or
  removed, the JSON cut or nested deep; loaded with its weights, or estimated from config.json alone.

Each case runs in a worker process (imports paid once) under an address-space limit (the worker's
size after its imports + 2 GiB) and a 10 s alarm, and ends as one of:

``refused``      MemoptError: the contract's one-line refusal (exit 2 from the command line);
``same``         loaded, and the model equals the original's (every tensor's bytes, dtype and shape,
                 every module's class and ``extra_repr``, cast boundaries, task; for config.json and
                 GGUF metadata, where an in-domain edit makes a valid variant such as another
                 epsilon, the tensors alone), the edited value being within its domain;
``silent``       loaded something it should have refused: a different model (tensors, modules), or an
                 out-of-domain value (NaN epsilon, 0 layers, task "foo") accepted;
``traceback``    any other exception (an internal error: exit 1 from the command line);
``hang``         the 10 s alarm, or the worker stopped answering;
``blowup``       MemoryError, the worker killed, or peak RSS grown by more than 2x the file's size +
                 64 MiB (the interpreter's own working memory) during the case.

The table gives the count per format and outcome, then the places (mutation kinds) where anything
other than ``refused`` / ``same`` happened. ``--cli N`` also runs N cases per format through the
command line (``memopt estimate`` / ``memopt quantize``), counting exit codes and stderr lines.

    PYTHONPATH=src .venv/bin/python bench/fuzz.py [--cases 2500] [--seed 0] [--cli 0]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import queue
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FORMATS",
    "OUTCOMES",
    "Case",
    "build_originals",
    "main",
    "make_case",
    "run_case",
]

FORMATS = ("safetensors", "gguf", "manifest", "config")
OUTCOMES = ("refused", "same", "silent", "traceback", "hang", "blowup")
CASE_SECONDS = 10
MEMORY_ALLOWANCE = 64 << 20  # the interpreter's own working memory during a load

# --------------------------------------------------------------------------------------------------
# The originals


def _tiny_model() -> Any:
    from memopt.models.toy import tiny_llama

    return tiny_llama(
        seed=0,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def build_originals(root: Path) -> dict[str, Path]:
    """Write the originals under ``root`` (once; a finished set is reused): name -> path."""
    paths = {
        "hf": root / "hf",
        "gguf": root / "tiny.gguf",
        "int8": root / "int8",
        "int4": root / "int4",
        "config_only": root / "config_only",
    }
    if (root / "done").is_file():
        return paths
    import torch

    import memopt
    from memopt.quant import Int4WeightOnly, Int8WeightOnly, quantize_

    loaded = _tiny_model()
    loaded.model.save_pretrained(paths["hf"], safe_serialization=True)
    paths["config_only"].mkdir(exist_ok=True)
    shutil.copy(paths["hf"] / "config.json", paths["config_only"] / "config.json")
    write_gguf(paths["gguf"], gguf_struct(loaded.model))
    for name, cfg in (("int8", Int8WeightOnly()), ("int4", Int4WeightOnly(group_size=32))):
        m = _tiny_model()
        with torch.no_grad():
            quantize_(m.model, cfg)
        memopt.save(m, paths[name], quant_config=cfg)
    (root / "done").write_text("ok\n")
    return paths


# --------------------------------------------------------------------------------------------------
# GGUF as a structure (so that any field can be given any type), and its writer

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
         U64: "<Q", I64: "<q", F64: "<d"}  # fmt: skip
_STEMS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass
class GTensor:
    name: str
    dims: list[int]  # GGUF order: innermost first
    type: int  # GGML type id
    offset: int  # relative to the data section
    data: bytes


@dataclass
class GFile:
    kvs: list[tuple[str, int, Any]]  # (key, GGUF type, value); arrays: (elem type, [values])
    tensors: list[GTensor]
    version: int = 3
    alignment: int = 32
    raw_tail: bytes | None = None  # the data section as written (None: from the tensors)


def gguf_struct(model: Any) -> GFile:
    """The tiny Llama as llama.cpp's converter would write it: q/k rows permuted, 2-D Q8_0."""
    import gguf
    import numpy as np

    cfg = model.config
    kvs: list[tuple[str, int, Any]] = [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "tiny"),
        ("llama.block_count", U32, cfg.num_hidden_layers),
        ("llama.context_length", U32, cfg.max_position_embeddings),
        ("llama.embedding_length", U32, cfg.hidden_size),
        ("llama.feed_forward_length", U32, cfg.intermediate_size),
        ("llama.attention.head_count", U32, cfg.num_attention_heads),
        ("llama.attention.head_count_kv", U32, cfg.num_key_value_heads),
        ("llama.attention.layer_norm_rms_epsilon", F32, cfg.rms_norm_eps),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.vocab_size", U32, cfg.vocab_size),
        ("llama.rope.dimension_count", U32, cfg.hidden_size // cfg.num_attention_heads),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("general.file_type", U32, 7),
    ]
    tensors: list[GTensor] = []
    offset = 0
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, _, kind = name.rpartition(".")
        parts = stem.split(".")
        if parts[:2] == ["model", "layers"]:
            gname = f"blk.{parts[2]}.{_STEMS['.'.join(parts[3:])]}.{kind}"
        else:
            gname = f"{_STEMS[stem]}.{kind}"
        a = w.float().numpy()
        gstem = gname.split(".")[-2]
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gstem)
        if heads and gname.startswith("blk."):
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 2:
            data = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0).tobytes()
            qtype = 8
        else:
            data = np.ascontiguousarray(a, dtype=np.float32).tobytes()
            qtype = 0
        tensors.append(GTensor(gname, list(reversed(a.shape)), qtype, offset, data))
        offset += len(data) + (-len(data) % 32)
    return GFile(kvs, tensors)


def _value(t: int, v: Any) -> bytes:
    if t == STR:
        b = v.encode("utf-8", "surrogatepass") if isinstance(v, str) else bytes(v)
        return struct.pack("<Q", len(b)) + b
    if t == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(_value(et, x) for x in items)
    return struct.pack(_PACK[t], v)


def _gguf_head(g: GFile) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", g.version, len(g.tensors), len(g.kvs))]
    for key, t, v in g.kvs:
        out.append(_value(STR, key) + struct.pack("<I", t) + _value(t, v))
    for t in g.tensors:
        out.append(_value(STR, t.name) + struct.pack("<I", len(t.dims)))
        out.append(b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.dims))
        out.append(struct.pack("<IQ", t.type & 0xFFFFFFFF, t.offset & (2**64 - 1)))
    head = b"".join(out)
    return head + b"\0" * (-len(head) % g.alignment)


def _gguf_data(g: GFile) -> bytes:
    data = bytearray()
    for t in sorted(g.tensors, key=lambda t: t.offset):
        if t.offset > len(data):
            data += b"\0" * (t.offset - len(data))
        data[t.offset : t.offset + len(t.data)] = t.data
    return bytes(data)


def gguf_bytes(g: GFile) -> bytes:
    return _gguf_head(g) + (_gguf_data(g) if g.raw_tail is None else g.raw_tail)


def write_gguf(path: Path, g: GFile) -> None:
    path.write_bytes(gguf_bytes(g))


# --------------------------------------------------------------------------------------------------
# Mutations

_JUNK: list[Any] = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63, -(2**63), 2**64 + 5, 10**9,
                    10**12, 1.5, -0.5, 0.0, math.nan, math.inf, -math.inf, "", "x", "F32", "64", [],
                    [1], [1, 2, 3], [-1, 5], [[]], {}, {"a": 1}]  # fmt: skip


def _junk(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(_JUNK))


def _deep(rng: random.Random) -> str:
    n = rng.choice([1000, 100_000])
    return rng.choice(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])


@dataclass
class Case:
    """One mutated input: where it lies, how to run it, and what a correct reader must do."""

    fmt: str
    place: str  # the mutation kind, for the table
    path: Path  # the file or folder to load
    target: str  # "load" or "estimate"
    original: str  # key of the original's fingerprint
    size: int  # bytes of the input
    must_refuse: bool = False  # an out-of-domain value: only a refusal is right
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _st_parse(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _st_pack(header_text: bytes, body: bytes) -> bytes:
    header_text += b" " * (-(len(header_text) + 8) % 8)
    return len(header_text).to_bytes(8, "little") + header_text + body


def mutate_safetensors(rng: random.Random, data: bytes) -> tuple[str, bytes, bool]:
    """``(place, bytes, must_refuse)``: one mutation of a safetensors file."""
    n, header, body = _st_parse(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["truncate", "flip", "length", "top", "deep", "dtype", "dtype", "shape",
                       "shape", "offsets", "offsets", "remove", "rename", "duplicate", "metadata",
                       "extra"])  # fmt: skip
    if kind == "truncate":
        return "truncate", data[: rng.randrange(len(data))], True
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4])):
            i = rng.randrange(8 + n)
            b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
        return "header byte flip", bytes(b), False
    if kind == "length":
        new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), 2**63, 2**64 - 1, rng.randrange(n)])
        return "header length", new.to_bytes(8, "little") + data[8:], new != n
    if kind == "top":
        text = json.dumps(rng.choice([[], [1, 2], "header", 3, None, 1.5, True]))
        return "header not an object", _st_pack(text.encode(), body), True
    if kind == "deep":
        return "deep JSON", _st_pack(_deep(rng).encode(), body), True
    name = rng.choice(names)
    entry = header[name]
    refuse = True
    if kind == "dtype":
        entry["dtype"] = rng.choice(["I32", "U32", "I16", "F16", "BF16", "I64", "F64", "U8", "I8",
                                     "BOOL", "U16", "U64", "F8_E4M3", "C64", "", "f32", 32, None,
                                     ["F32"]])  # fmt: skip
        refuse = entry["dtype"] != "F32"
    elif kind == "shape":
        shape = list(entry["shape"])
        op = rng.choice(["swap", "grow", "zero", "neg", "extra1", "junk", "float", "drop"])
        if op == "swap" and len(shape) > 1:
            shape[0], shape[1] = shape[1], shape[0]
        elif op == "grow":
            shape[rng.randrange(len(shape))] += rng.choice([1, -1, 64, 2**40])
        elif op == "zero":
            shape[rng.randrange(len(shape))] = 0
        elif op == "neg":
            shape[rng.randrange(len(shape))] *= -1
        elif op == "extra1":
            shape.append(1)
        elif op == "float":
            shape = [float(s) for s in shape]
        elif op == "drop":
            shape = shape[1:]
        else:
            shape = _junk(rng)
        refuse = shape != entry["shape"] or op == "float"
        entry["shape"] = shape
    elif kind == "offsets":
        a, b = entry["data_offsets"]
        op = rng.choice(["shift", "end", "reverse", "overlap", "junk", "huge", "short"])
        if op == "shift":
            k = rng.choice([1, 4, 8, -4, 64, -a])
            new: Any = [a + k, b + k]
        elif op == "end":
            new = [a, b + rng.choice([4, -4, 8])]
        elif op == "reverse":
            new = [b, a]
        elif op == "overlap":
            other = header[rng.choice(names)]["data_offsets"]
            new = [other[0], other[0] + (b - a)]
        elif op == "huge":
            new = [2**62, 2**62 + (b - a)]
        elif op == "short":
            new = [a] if rng.random() < 0.5 else []
        else:
            new = _junk(rng)
        refuse = new != [a, b]
        entry["data_offsets"] = new
    elif kind == "remove":
        del header[name]
    elif kind == "rename":
        block = f"model.layers.{rng.choice([2, 3, 9, 100])}."
        new_name = rng.choice(
            [name.replace("model.layers.0.", block), name + "x", "", "lm_head.weight", name.upper()]
        )
        if new_name == name:
            return "rename tensor", data, False
        header[new_name] = header.pop(name)
    elif kind == "duplicate":
        # the same key twice in the JSON text: which one wins is a reader's guess
        text = json.dumps(header)[:-1] + f", {json.dumps(name)}: " + json.dumps(entry) + "}"
        junk = dict(entry, data_offsets=[0, entry["data_offsets"][1] - entry["data_offsets"][0]])
        text = text.replace(f"{json.dumps(name)}: {json.dumps(entry)}",
                            f"{json.dumps(name)}: {json.dumps(junk)}", 1)  # fmt: skip
        return "duplicate key", _st_pack(text.encode(), body), True
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([_junk(rng), {"format": _junk(rng)}, {"x": "y"}])
        refuse = not (
            isinstance(header["__metadata__"], dict)
            and all(isinstance(v, str) for v in header["__metadata__"].values())
        )
    elif kind == "extra":
        header[rng.choice(["extra.weight", "zzz"])] = rng.choice(
            [{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, _junk(rng)]
        )
    place = f"{kind} ({'key' if kind in ('remove', 'rename', 'extra') else 'entry'})"
    return place, _st_pack(json.dumps(header).encode(), body), refuse


# GGUF: the keys whose values have a domain (the oracle's own statement of it)
_COUNTS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
           "attention.head_count", "attention.head_count_kv", "vocab_size",
           "rope.dimension_count")  # fmt: skip
_INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)


def _gguf_value_ok(key: str, t: int, v: Any, original: dict[str, Any]) -> bool:
    """Whether a correct reader may accept ``key`` = ``v`` (of GGUF type ``t``) in this file."""
    short = key.removeprefix("llama.")
    if key == "general.architecture":
        return t == STR and v == "llama"
    if short in _COUNTS:
        if t not in _INT_TYPES or v <= 0:
            return False
        if short == "block_count":
            return v == original[key]  # the blocks present
        return True
    if short in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
        return t in (F32, F64) and math.isfinite(v) and v > 0
    if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
        return t in _INT_TYPES and 0 <= v < original["llama.vocab_size"]
    if key == "general.alignment":
        return t in _INT_TYPES and v > 0 and v & (v - 1) == 0
    return True


def _checked_key(key: str) -> bool:
    """Keys whose values have a domain (others are free text or unused by memopt)."""
    short = key.removeprefix("llama.")
    return (
        short in _COUNTS
        or short in ("attention.layer_norm_rms_epsilon", "rope.freq_base")
        or key in ("general.architecture", "general.alignment")
        or (key.startswith("tokenizer.ggml.") and key.endswith("_token_id"))
    )


def _gguf_junk(rng: random.Random, t: int, v: Any) -> tuple[int, Any]:
    choice = rng.randrange(6)
    if choice == 0 and t in _INT_TYPES:
        return t, rng.choice([0, 1, 3, v + 1, v * 2]) if t in (U8, U16, U32, U64) or v >= 0 else 0
    if choice == 1:
        return rng.choice([(I32, -1), (I64, -(2**40)), (U64, 2**64 - 1), (U32, 2**32 - 1),
                           (I32, 0), (U64, 10**9), (U32, 10**9)])  # fmt: skip
    if choice == 2:
        return F32, rng.choice([math.nan, math.inf, -math.inf, -1.0, 0.0, 1.5, 1e-6, 1e30])
    if choice == 3:
        return F64, rng.choice([math.nan, -0.0, 2.0, 64.0])
    if choice == 4:
        return rng.choice([(STR, "64"), (STR, ""), (BOOL, True), (BOOL, False)])
    return ARR, rng.choice([(U32, [64]), (U32, []), (STR, ["a"])])


def mutate_gguf(rng: random.Random, g: GFile) -> tuple[str, bytes, bool]:
    """``(place, bytes, must_refuse)``: one mutation of the GGUF structure (or its bytes)."""
    g = copy.deepcopy(g)
    original = {k: v for k, _, v in g.kvs}
    kind = rng.choice(["value", "value", "value", "value", "remove kv", "duplicate kv", "name",
                       "dims", "dims", "type", "type", "offset", "offset", "remove tensor",
                       "extra tensor", "truncate", "flip", "version", "counts"])  # fmt: skip
    if kind in ("value", "counts"):
        i = rng.randrange(len(g.kvs))
        if kind == "counts":  # the structural counts, most often the interesting ones
            keys = [k for k, _, _ in g.kvs]
            i = keys.index(rng.choice([k for k in keys if k.removeprefix("llama.") in _COUNTS]))
        key, t, v = g.kvs[i]
        nt, nv = _gguf_junk(rng, t, v)
        g.kvs[i] = (key, nt, nv)
        ok = _gguf_value_ok(key, nt, nv, original) if nt != ARR else not _checked_key(key)
        if key == "general.architecture":
            ok = nt == STR and nv == "llama"
        return f"metadata {key.removeprefix('llama.')}", gguf_bytes(g), not ok
    if kind == "remove kv":
        i = rng.randrange(len(g.kvs))
        key = g.kvs.pop(i)[0]
        optional = key in ("general.name", "general.file_type", "llama.vocab_size",
                           "llama.rope.dimension_count", "llama.rope.freq_base",
                           "llama.attention.head_count_kv", "tokenizer.ggml.bos_token_id",
                           "tokenizer.ggml.eos_token_id")  # fmt: skip
        return "metadata removed", gguf_bytes(g), not optional
    if kind == "duplicate kv":
        i = rng.randrange(len(g.kvs))
        key, t, v = g.kvs[i]
        nt, nv = _gguf_junk(rng, t, v)
        g.kvs.append((key, nt, nv))
        return "metadata key twice", gguf_bytes(g), True
    if kind == "version":
        g.version = rng.choice([0, 1, 2, 4, 2**31])
        return "version", gguf_bytes(g), g.version not in (2, 3)
    if kind == "truncate":
        data = gguf_bytes(g)
        return "truncate", data[: rng.randrange(len(data))], True
    if kind == "flip":
        data = bytearray(gguf_bytes(g))
        end = len(_gguf_head(g))  # the metadata and the tensor table
        for _ in range(rng.choice([1, 2])):
            i = rng.randrange(end)
            data[i] = rng.randrange(256)
        return "header byte flip", bytes(data), False
    t = rng.choice(g.tensors)
    if kind == "name":
        before = t.name
        t.name = rng.choice([f"blk.{rng.choice([2, 5, 99])}.{t.name.split('.', 2)[-1]}",
                             "blk.x.attn_q.weight", "unknown.weight", "", t.name + "s",
                             rng.choice(g.tensors).name])  # fmt: skip
        return "tensor name", gguf_bytes(g), t.name != before
    if kind == "dims":
        before = list(t.dims)
        op = rng.randrange(5)
        if op == 0 and len(t.dims) > 1:
            t.dims = list(reversed(t.dims))
        elif op == 1:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 2**32, 2**63, 2**64 - 1])
        elif op == 2:  # a trailing 1: the same tensor (ggml's own shapes are 4-D, 1-padded)
            t.dims = t.dims + [1]
            return "tensor dims", gguf_bytes(g), False
        elif op == 3:
            t.dims = []
        else:
            t.dims[0] += rng.choice([32, -32, 1])
        return "tensor dims", gguf_bytes(g), t.dims != before
    if kind == "type":
        new = rng.choice([0, 1, 2, 3, 6, 7, 8, 12, 14, 30, 99, 2**31])
        same = new == t.type
        t.type = new
        return "tensor type", gguf_bytes(g), not same
    if kind == "offset":  # the table changes, the data stays where it was
        tail = _gguf_data(g)
        others = [o.offset for o in g.tensors if o is not t]
        new = rng.choice([t.offset + 32, t.offset - 32, t.offset + 1, 2**40, 2**64 - 32,
                          rng.choice(others)])  # fmt: skip
        before, t.offset = t.offset, max(new, 0)
        g.raw_tail = tail
        return "tensor offset", gguf_bytes(g), t.offset != before
    if kind == "remove tensor":
        g.tensors.remove(t)
        return "tensor removed", gguf_bytes(g), True
    # extra tensor: a block the metadata does not count, or a name nobody knows
    extra = GTensor(
        rng.choice(
            [
                f"blk.2.{t.name.split('.', 2)[-1]}"
                if t.name.startswith("blk.")
                else "blk.2.attn_norm.weight",
                "rope_freqs.weight",
                "blk.0.attn_q.bias",
            ]
        ),  # fmt: skip
        list(t.dims),
        t.type,
        max(o.offset + len(o.data) for o in g.tensors),
        t.data,
    )
    extra.offset += -extra.offset % g.alignment
    g.tensors.append(extra)
    return "tensor added", gguf_bytes(g), True


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _text_mutation(obj: Any, rng: random.Random) -> tuple[str, bytes, bool]:
    """A JSON file's text broken as text: cut short, nested too deep, or not an object (each must
    be refused)."""
    text = json.dumps(obj)
    op = rng.choice(["cut", "deep", "top"])
    if op == "cut":
        return "JSON cut", text[: rng.randrange(len(text))].encode(), True
    if op == "deep":
        return "deep JSON", _deep(rng).encode(), True
    return "not an object", json.dumps(_junk(rng)).encode(), True


def mutate_manifest(rng: random.Random, manifest: dict[str, Any]) -> tuple[str, bytes, bool]:
    """``(place, bytes of memopt.json, must_refuse)``."""
    m = copy.deepcopy(manifest)
    kind = rng.choice(["replace", "replace", "replace", "remove", "cut", "structured",
                       "structured", "structured", "text"])  # fmt: skip
    if kind == "text":
        return _text_mutation(m, rng)
    # most paths lie in config (ignored by a load: the folder's config.json is read); pick
    # among the ones a load reads three times in four
    paths = [p for p in _paths(m) if p]
    if rng.random() < 0.75:
        paths = [p for p in paths if p[0] != "config" and p[0] != "quantization"] or paths
    path = rng.choice(paths)
    parent, last = _get(m, path[:-1]), path[-1]
    top = str(path[0])
    where = top if len(path) == 1 else f"{top}.{'entry' if len(path) == 2 else path[-1]}"
    # most edits are judged by the model they load (the fingerprint); these by their values
    checked = {
        "task": lambda v: v in ("causal-lm", "encoder"),
        "format": lambda v: v == "memopt",
        "format_version": lambda v: type(v) is int and v == 1,
        "files": lambda v: False,
    }  # files: judged against the folder in make_case
    required = ("task", "tensors", "weights", "modules", "aliases", "non_persistent",
                "cast_hooks", "format", "format_version", "files")  # fmt: skip
    if kind == "remove" and isinstance(parent, dict):
        del parent[last]
        return f"{where} removed", json.dumps(m).encode(), len(path) == 1 and top in required
    if kind == "cut" and isinstance(parent, list):
        del parent[last]
        return f"{where} cut", json.dumps(m).encode(), top == "files"
    old = parent[last]
    if kind == "structured":
        if isinstance(old, bool) or old is None:  # not the other boolean: that is valid
            new: Any = rng.choice([1, "true", [], {}]) if old is not None else rng.choice([1, "x"])
        elif isinstance(old, int):
            new = rng.choice([0, -1, old + 1, old * 2, 7, 2**40])
        elif isinstance(old, str):
            new = rng.choice(["float16", "bfloat16", "int8", "int4", "Int8Weight", "QLinear",
                              "foo", "", "model.layers.0.mlp", "causal-lm", "encoder",
                              old + "x"])  # fmt: skip
        elif isinstance(old, list):
            new = old[::-1] if len(old) > 1 else old + old
        else:
            new = {}
    else:
        new = _junk(rng)
    if new == old and type(new) is type(old):
        return f"{where} unchanged", json.dumps(m).encode(), False
    parent[last] = new
    if top in checked:
        return f"{where} edited", json.dumps(m).encode(), not checked[top](_get(m, path[:1]))
    refuse = len(path) == 1 and top in required  # a required key of another type
    if (
        top in ("tensors", "non_persistent")
        and isinstance(new, list)
        and len(path) == 1
        and (sorted(map(str, new)) == sorted(old))
    ):
        refuse = False  # the same names in another order (a file rewritten by another tool)
    return f"{where} edited", json.dumps(m).encode(), refuse


# config.json: the keys whose values have a domain (the oracle's own statement of it)
_CONFIG_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "head_dim")  # fmt: skip


def config_ok(cfg: Any, original: dict[str, Any]) -> bool:
    """Whether a correct reader may accept this config.json for the original weights / as a model
    to estimate: every count a positive int (the layers no more than 2^20), heads dividing,
    epsilon and rope base finite and positive, the model type unchanged."""
    if not isinstance(cfg, dict) or cfg.get("model_type") != original["model_type"]:
        return False
    for key in _CONFIG_COUNTS:
        v = cfg.get(key, original.get(key))
        if v is None and key in ("head_dim", "num_key_value_heads"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > 2**20:
            return False
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv:
        return False
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        return False
    rope = cfg.get("rope_parameters")
    if rope is not None:
        theta = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else None
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            return False
        if not (0 < theta < math.inf) or rope.get("rope_type", "default") != "default":
            return False
    return True


def mutate_config(rng: random.Random, cfg: dict[str, Any]) -> tuple[str, bytes, bool]:
    """``(place, bytes of config.json, must_refuse)``."""
    c = copy.deepcopy(cfg)
    kind = rng.choice(["count", "count", "count", "any", "any", "remove", "text"])
    if kind == "text":
        return _text_mutation(c, rng)
    if kind == "remove":  # transformers' default takes its place: still a config
        key = rng.choice(list(c))
        del c[key]
        return f"{key} removed", json.dumps(c).encode(), key == "model_type"
    if kind == "count":
        key = rng.choice([*_CONFIG_COUNTS, "rms_norm_eps", "rope_parameters"])
        old = c.get(key)
        if key == "rope_parameters":
            c[key] = dict(c[key], rope_theta=rng.choice([0, -1.0, math.nan, math.inf, "1e4", 5e5]))
        else:
            c[key] = rng.choice([0, -1, 1, 3, 10**9, 10**12, 2**63, -(2**31), 1.5, math.nan,
                                 math.inf, "64", None, [64], True,
                                 old * 2 if isinstance(old, (int, float)) else 2])  # fmt: skip
        return f"{key}", json.dumps(c).encode(), not config_ok(c, cfg)
    key = rng.choice(list(c))
    c[key] = _junk(rng)
    return "other key", json.dumps(c).encode(), not config_ok(c, cfg)


# --------------------------------------------------------------------------------------------------
# Making a case on disk


class Originals:
    """The originals' files, parsed once per process, and their fingerprints."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = build_originals(root)
        hf = self.paths["hf"]
        self.st_bytes = (hf / "model.safetensors").read_bytes()
        self.config = json.loads((hf / "config.json").read_text())
        self.gguf = gguf_struct(_tiny_model().model)
        assert gguf_bytes(self.gguf) == self.paths["gguf"].read_bytes()
        self.manifests = {
            k: json.loads((self.paths[k] / "memopt.json").read_text()) for k in ("int8", "int4")
        }
        self.prints: dict[str, Any] = {}

    def fingerprint(self, key: str) -> Any:
        if key not in self.prints:
            from memopt.models import load_model

            path = {"hf": "hf", "gguf": "gguf", "int8": "int8", "int4": "int4"}[key]
            self.prints[key] = fingerprint(load_model(self.paths[path]))
        return self.prints[key]


def make_case(originals: Originals, fmt: str, seed: int, scratch: Path) -> Case:
    """Case number ``seed`` of ``fmt``, written under ``scratch`` (emptied first)."""
    rng = random.Random(f"{fmt}:{seed}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    p = originals.paths
    if fmt == "safetensors":
        place, data, refuse = mutate_safetensors(rng, originals.st_bytes)
        folder = scratch / "hf"
        folder.mkdir()
        shutil.copy(p["hf"] / "config.json", folder / "config.json")
        (folder / "model.safetensors").write_bytes(data)
        return Case(fmt, place, folder, "load", "hf", len(data), refuse)
    if fmt == "gguf":
        place, data, refuse = mutate_gguf(rng, originals.gguf)
        path = scratch / "m.gguf"
        path.write_bytes(data)
        return Case(fmt, place, path, "load", "gguf", len(data), refuse)
    if fmt == "manifest":
        which = rng.choice(["int8", "int4"])
        place, data, refuse = mutate_manifest(rng, originals.manifests[which])
        folder = scratch / which
        shutil.copytree(p[which], folder)
        (folder / "memopt.json").write_bytes(data)
        if place.startswith("files") and refuse:  # a files entry: wrong only if it names no file
            refuse = not _files_ok(folder)
        return Case(fmt, place, folder, "load", which, len(data), refuse)
    place, data, refuse = mutate_config(rng, originals.config)
    target = rng.choice(["load", "estimate"])
    folder = scratch / "hf"
    folder.mkdir()
    if target == "load":
        os.link(p["hf"] / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_bytes(data)
    return Case(fmt, f"{place} ({target})", folder, target, "hf", len(data) + 300_000, refuse)


def _files_ok(folder: Path) -> bool:
    try:
        files = json.loads((folder / "memopt.json").read_text())["files"]
        return (
            files["weights"] == "model.safetensors"
            and files["config"] == "config.json"
            and isinstance(files["tokenizer"], list)
            and all(isinstance(f, str) and (folder / f).is_file() for f in files["tokenizer"])
        )
    except (KeyError, TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# Running a case


def fingerprint(loaded: Any) -> Any:
    """What makes two loaded models the same model: every tensor (bytes, dtype, shape), every
    module's class and ``extra_repr``, the cast boundaries, the task."""
    from memopt.weights import boundary_of

    model = loaded.model
    tensors = {}
    for name, t in model.state_dict().items():
        raw = t.detach().contiguous().reshape(-1).view(t.dtype)
        digest = hashlib.sha1(raw.view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
        tensors[name] = (str(t.dtype), tuple(t.shape), digest)
    modules = {n: (type(m).__name__, m.extra_repr(), str(boundary_of(m)))
               for n, m in model.named_modules()}  # fmt: skip
    return loaded.task, tensors, modules


class Hang(BaseException):
    """The case ran past its alarm."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _rss() -> tuple[int, int]:
    """(RSS now, peak RSS) in bytes, from /proc/self/status."""
    now = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return now, peak


def _reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_case(originals: Originals, case: Case, seconds: int = CASE_SECONDS) -> tuple[str, str]:
    """``(outcome, detail)`` of one case, run in this process."""
    from memopt.core.errors import MemoptError
    from memopt.measure.estimate import estimate
    from memopt.models import load_model

    want = None if case.target == "estimate" else originals.fingerprint(case.original)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    _reset_peak()
    before, _ = _rss()
    signal.alarm(seconds)
    try:
        if case.target == "estimate":
            estimate(case.path)
            got = None
        else:
            got = fingerprint(load_model(case.path))
            if case.fmt in ("config", "gguf"):  # a valid edit makes a valid variant: compare
                got, want = got[1], want[1]  # the tensors (the modules' settings may differ)
        signal.alarm(0)
    except MemoptError as exc:
        signal.alarm(0)
        text = str(exc)
        if "\n" in text.strip():
            return "traceback", f"MemoptError over {len(text.splitlines())} lines"
        return "refused", text
    except Hang:
        return "hang", f"over {seconds} s"
    except MemoryError:
        signal.alarm(0)
        return "blowup", "MemoryError"
    except RecursionError:
        signal.alarm(0)
        return "traceback", "RecursionError"
    except Exception as exc:
        signal.alarm(0)
        return "traceback", f"{type(exc).__name__}: {_where(exc)}: {str(exc)[:120]}"
    finally:
        signal.signal(signal.SIGALRM, old)
    _, peak = _rss()
    if peak - before > 2 * case.size + MEMORY_ALLOWANCE:
        return "blowup", f"peak RSS +{(peak - before) >> 20} MiB"
    if case.must_refuse:
        return "silent", "accepted an out-of-domain input"
    if got is not None and got != want:
        return "silent", "loaded a different model"
    return "same", ""


def _where(exc: BaseException) -> str:
    """The innermost memopt frame of a traceback: file:line."""
    tb, where = exc.__traceback__, "?"
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if "/memopt/" in name:
            where = f"{name.rsplit('/memopt/', 1)[1]}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


# --------------------------------------------------------------------------------------------------
# Workers and the table


def _worker(root: Path, fmt: str, start: int, count: int) -> None:
    """Run cases ``start..start+count`` of ``fmt``, printing one JSON line per case."""
    import torch

    torch.set_num_threads(1)
    originals = Originals(root)
    for key in ("hf", "gguf", "int8", "int4"):
        originals.fingerprint(key)
    _, size = _vm()
    limit = size + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    scratch = Path(tempfile.mkdtemp(prefix="memopt-fuzz-"))
    try:
        for seed in range(start, start + count):
            print(json.dumps({"start": seed}), flush=True)
            case = make_case(originals, fmt, seed, scratch / "case")
            outcome, detail = run_case(originals, case)
            print(json.dumps({"seed": seed, "place": case.place, "outcome": outcome,
                              "detail": detail}), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _vm() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return 0, int(line.split()[1]) * 1024
    return 0, 0


def run_format(root: Path, fmt: str, cases: int, seed: int) -> list[dict[str, Any]]:
    """All cases of one format through worker processes (a dead worker is restarted after the
    case it died in, which counts as a blow-up; one silent for 60 s is killed: a hang)."""
    results: list[dict[str, Any]] = []
    nxt, end = seed, seed + cases
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    while nxt < end:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", fmt, "--root", str(root),
             "--start", str(nxt), "--count", str(end - nxt)],  # fmt: skip
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        current, silent = nxt, False
        while True:
            try:
                line = lines.get(timeout=6 * CASE_SECONDS)
            except queue.Empty:  # no word for a minute: hung where the alarm cannot reach
                proc.kill()
                silent = True
                break
            if line is None:
                break
            msg = json.loads(line)
            if "start" in msg:
                current = msg["start"]
                continue
            results.append(msg)
            nxt = msg["seed"] + 1
        proc.wait()
        if nxt < end and current >= nxt:  # died (or was killed) in case `current`
            outcome = "hang" if silent else "blowup"
            results.append({"seed": current, "place": "?", "outcome": outcome,
                            "detail": f"worker ended (exit {proc.returncode})"})  # fmt: skip
            nxt = current + 1
    return results


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def table(per_format: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"{'format':<12} {'cases':>6} " + " ".join(f"{o:>9}" for o in OUTCOMES)]
    total: Counter[str] = Counter()
    for fmt, results in per_format.items():
        c = Counter(r["outcome"] for r in results)
        total.update(c)
        lines.append(f"{fmt:<12} {len(results):>6} " + " ".join(f"{c[o]:>9}" for o in OUTCOMES))
    n = sum(len(r) for r in per_format.values())
    lines.append(f"{'all':<12} {n:>6} " + " ".join(f"{total[o]:>9}" for o in OUTCOMES))
    bad = Counter()
    example: dict[tuple[str, str, str], str] = {}
    for fmt, results in per_format.items():
        for r in results:
            if r["outcome"] not in ("refused", "same"):
                key = (fmt, r["place"], r["outcome"])
                bad[key] += 1
                example.setdefault(key, r["detail"])
    if bad:
        lines.append("\nnot clean, by place (count, an example):")
        for (fmt, place, outcome), k in bad.most_common(40):
            lines.append(f"  {fmt:<11} {place:<34} {outcome:<9} {k:>5}  "
                         f"{example[(fmt, place, outcome)][:90]}")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Through the command line


def run_cli(root: Path, fmt: str, count: int, seed: int) -> Counter[str]:
    """``count`` cases of ``fmt`` through ``python -m memopt`` (estimate for a config or a
    manifest, quantize for weights): exit codes, and whether stderr was one line."""
    originals = Originals(root)
    out: Counter[str] = Counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with tempfile.TemporaryDirectory(prefix="memopt-fuzz-cli-") as tmp:
        for i in range(seed, seed + count):
            case = make_case(originals, fmt, i, Path(tmp) / "case")
            if case.target == "estimate" or fmt == "manifest":
                cmd = ["estimate", str(case.path), "--json"]
            else:
                cmd = ["quantize", str(case.path), "--method", "int8", "-o", f"{tmp}/out"]
            try:
                done = subprocess.run([sys.executable, "-m", "memopt", *cmd], env=env,
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
            except subprocess.TimeoutExpired:
                out["timeout"] += 1
                continue
            err = [ln for ln in done.stderr.splitlines() if ln.strip()]
            if done.returncode == 2:
                out["exit 2, one line" if len(err) == 1 else "exit 2, several lines"] += 1
            elif done.returncode == 0:
                out["exit 0"] += 1
            else:
                out[f"exit {done.returncode}"] += 1
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2500, help="cases per format")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--root", default=None, help="where the originals are kept")
    ap.add_argument("--cli", type=int, default=0, help="cases per format through the CLI")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.root or Path(tempfile.gettempdir()) / "memopt-fuzz-originals")
    root.mkdir(parents=True, exist_ok=True)
    if args.worker:
        _worker(root, args.worker, args.start, args.count)
        return
    build_originals(root)
    per_format: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    for fmt in args.formats.split(","):
        per_format[fmt] = run_format(root, fmt, args.cases, args.seed)
        print(f"{fmt}: {len(per_format[fmt])} cases, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    print(table(per_format))
    if args.cli:
        print(f"\nthrough the command line ({args.cli} cases per format):")
        for fmt in args.formats.split(","):
            c = run_cli(root, fmt, args.cli, args.seed)
            print(f"  {fmt:<12} " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(per_format))


if __name__ == "__main__":
    main()
