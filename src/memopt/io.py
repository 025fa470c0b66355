"""Save and load optimized models: one safetensors file + a versioned JSON manifest, never pickle.

A saved folder holds::

    memopt.json          the manifest (below)
    model.safetensors    every tensor once, in execution order (blocks in order: streaming reads
                         them front to back); quantized weights in their portable disk form
    config.json          the transformers config (also inside the manifest)
    tokenizer files      copied from the source (a GGUF source: its converted tokenizer)

The manifest (``format_version`` 1) records the task, the quantization configs that were applied,
and, per quantized weight, its format, shape, group size and the dtype/shape of each of its tensors,
per quantized module its class and which weight it uses (a tied lm_head names the embedding's weight:
stored once), float tensors shared by several names (``aliases``), the non-persistent buffers that
were saved (rotary frequencies: saved so that the reloaded model computes bit for bit what the saved
one did, whatever dtype a cast left them in) and the dtype casts at module boundaries left by
``Cast``. ``load`` rebuilds the architecture on the meta device from config.json, swaps in the
quantized modules the manifest names, and fills every tensor from the file: the original model is
never needed.

Disk forms: int8 ``qdata (N, K) int8`` + ``scale (N, K/G) float32``; int4 ``packed (N, K/2) uint8``
+ ``scale``, ``zero`` ``(N, K/G) bfloat16``, the packed codes in the layout the weight had in RAM:
the CPU kernel's row-interleaved one (``block_n`` rows per block, recorded in the weight's manifest
entry) where the saving machine has that kernel, else along K (two codes a byte, low nibble first;
``block_n`` null or absent). Why not always along K: converting on every load cost ~1 s for
SmolLM2 (unpack + re-interleave 67 M codes); now a machine whose kernel wants the recorded layout
loads the bytes as they are, and only another layout (another CPU, CUDA) converts; int2/int3
``packed (N, K*bits/8) uint8`` + ``scale`` (+ ``offset``) ``(N, K/G) float16``.

Writes go to a temporary folder beside the output, renamed into place at the end: a failure never
leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.errors import MemoptError
from memopt.models import LoadedModel, ModelSource, Task
from memopt.quant.modules import (
    Int4Weight,
    Int8Weight,
    IntNWeight,
    QConv,
    QEmbedding,
    QLinear,
    QuantizedWeight,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "SafetensorsWriter",
    "build_meta",
    "disk_bytes",
    "load",
    "save",
]

FORMAT_VERSION = 1
MANIFEST = "memopt.json"
WEIGHTS = "model.safetensors"

# Files a tokenizer (and generation defaults) may consist of; copied along when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

ProgressFn = Callable[[int, int], None]

_DTYPE_CODE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise MemoptError(f"unknown dtype {name!r} in the manifest")
    return dt


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------------------------------
# A streaming safetensors writer


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are known (name, dtype, shape) before their data.

    The header (with every offset) goes first, then each tensor's bytes as it is produced, in the
    planned order: a producer never has to hold more than the tensor it is writing. A tensor that
    can only be made later (streamed GPTQ of a tied embedding needs every block done first) is
    :meth:`reserve`-d in its turn and written when ready: the file keeps the planned order. The result is a
    standard safetensors file (8-byte little-endian header length, JSON header padded with spaces so
    that the data starts at a multiple of 64, contiguous data), readable by ``safetensors.safe_open``.
    """

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "memopt"}}
        offset = 0
        for name, dtype, shape in layout:
            if name in header:
                raise ValueError(f"tensor {name!r} planned twice")
            n = _numel(shape) * dtype.itemsize
            header[name] = {
                "dtype": _DTYPE_CODE[dtype],
                "shape": [int(s) for s in shape],
                "data_offsets": [offset, offset + n],
            }
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        # the data starts 64-byte aligned (the format asks for 8): a mapped tensor whose offset
        # and earlier sizes are multiples of 64 is then aligned for the packed int kernels: a
        # loaded int8/int4 folder uses it in place instead of the copy that _aligned makes
        text += b" " * (-(len(text) + 8) % 64)
        self.path = path
        self._layout = list(layout)
        self._next = 0
        self._reserved: dict[str, tuple[int, int]] = {}  # name -> (layout index, file offset)
        self._fh = open(path, "wb")  # noqa: SIM115 (closed by close(), after the last tensor)
        self._fh.write(len(text).to_bytes(8, "little"))
        self._fh.write(text)

    def reserve(self, name: str) -> None:
        """Skip the next planned tensor, ``name``, leaving its bytes to a later :meth:`write`."""
        if self._next >= len(self._layout) or self._layout[self._next][0] != name:
            raise ValueError(f"tensor {name!r} is not the next planned one")
        _, dtype, shape = self._layout[self._next]
        self._reserved[name] = (self._next, self._fh.tell())
        self._fh.seek(_numel(shape) * dtype.itemsize, os.SEEK_CUR)
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Append ``tensor``, the next planned one with the planned dtype and shape (or a reserved
        one, written in its place); or a list of its row chunks (consecutive along dim 0), written
        one after the other without a concat."""
        if name in self._reserved:
            index, offset = self._reserved.pop(name)
            end = self._fh.tell()
            self._fh.seek(offset)
            try:
                self._write(index, name, tensor)
            finally:
                self._fh.seek(end)
            return
        if self._next >= len(self._layout):
            raise ValueError(f"tensor {name!r} was not planned")
        self._write(self._next, name, tensor)
        self._next += 1

    def _write(self, index: int, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        want, dtype, shape = self._layout[index]
        parts = tensor if isinstance(tensor, list) else [tensor]
        rows = sum(int(t.shape[0]) if t.dim() else 1 for t in parts)
        got = (rows, *parts[0].shape[1:]) if parts and parts[0].dim() else tuple(parts[0].shape)
        if name != want or any(t.dtype != dtype for t in parts) or tuple(got) != tuple(shape):
            raise ValueError(
                f"expected {want} {dtype} {tuple(shape)}, got {name} {parts[0].dtype} {got}"
            )
        for t in parts:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)  # raw bytes, no copy
            if flat.numel():
                self._fh.write(memoryview(flat.numpy()))

    def close(self) -> None:
        left = len(self._layout) - self._next + len(self._reserved)
        if left:
            self._fh.close()
            raise ValueError(f"{left} planned tensors were not written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()


# --------------------------------------------------------------------------------------------------
# Quantized weights: spec (manifest), disk form, and an empty twin to fill on load


def _sparse() -> Any:
    """memopt.prune.storage, imported on first use (it imports quant; io must not import prune
    at module level, or the two would import each other)."""
    import memopt.prune.storage as storage

    return storage


def weight_spec(qw: QuantizedWeight) -> dict[str, Any]:
    """What the manifest records of a quantized weight (enough to rebuild it empty)."""
    if isinstance(qw, _sparse().SparseWeight):  # pruned weights: their own format
        return _sparse().io_weight_spec(qw)
    spec: dict[str, Any] = {
        "format": qw.fmt,
        "shape": list(qw.shape),
        "dtype": _dtype_name(qw.dtype),
        "group_size": getattr(qw, "group_size", None),
    }
    if isinstance(qw, (Int4Weight, IntNWeight)):
        spec["symmetric"] = bool(qw.symmetric)
    if isinstance(qw, Int4Weight):
        spec["block_n"] = qw.block_n  # layout of "packed" on disk (None: along K)
    if isinstance(qw, IntNWeight):
        spec["bits"] = int(qw.bits)
    spec["tensors"] = {
        k: {"dtype": _dtype_name(dt), "shape": list(s)} for k, (dt, s) in disk_layout(spec).items()
    }
    return spec


def disk_layout(spec: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of the tensors a weight with this spec writes, in write order."""
    if _sparse().is_sparse_format(spec.get("format")):
        return _sparse().io_disk_layout(spec)
    n, k = (int(s) for s in spec["shape"])
    g = spec.get("group_size")
    fmt = spec["format"]
    if fmt == "int8":
        return {"qdata": (torch.int8, (n, k)), "scale": (torch.float32, (n, k // g if g else 1))}
    if fmt == "int4":
        return {
            "packed": (torch.uint8, (n, k // 2)),
            "scale": (torch.bfloat16, (n, k // g)),
            "zero": (torch.bfloat16, (n, k // g)),
        }
    if fmt in ("int2", "int3"):
        bits = int(spec.get("bits") or fmt[3:])
        out = {
            "packed": (torch.uint8, (n, k * bits // 8)),
            "scale": (torch.float16, (n, k // g)),
        }
        if not spec.get("symmetric"):
            out["offset"] = (torch.float16, (n, k // g))
        return out
    raise MemoptError(f"unknown quantized weight format {fmt!r} in the manifest")


def disk_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The portable form of a quantized weight's tensors (int4: canonical, along K)."""
    if isinstance(qw, _sparse().SparseWeight):
        return _sparse().io_disk_tensors(qw)
    if isinstance(qw, Int8Weight):
        return {"qdata": qw.qdata, "scale": qw.scale}
    if isinstance(qw, Int4Weight):  # packed as it is in RAM (weight_spec records block_n)
        sz = qw.scale_zero  # (K/G, N, 2)
        return {
            "packed": qw.packed,
            "scale": sz[..., 0].t().contiguous(),
            "zero": sz[..., 1].t().contiguous(),
        }
    if isinstance(qw, IntNWeight):
        out = {"packed": qw.packed, "scale": qw.scale}
        if qw.offset is not None:
            out["offset"] = qw.offset
        return out
    raise MemoptError(f"cannot save a quantized weight of type {type(qw).__name__}")


def empty_weight(spec: dict[str, Any], device: str | torch.device = "meta") -> QuantizedWeight:
    """A quantized weight with the spec's attributes and uninitialised buffers (RAM layout)."""
    if _sparse().is_sparse_format(spec["format"]):
        return _sparse().io_empty_weight(spec, device)
    shape = (int(spec["shape"][0]), int(spec["shape"][1]))
    dtype = _dtype_of(spec.get("dtype", "float32"))
    layout = disk_layout(spec)
    fmt = spec["format"]
    cls = {"int8": Int8Weight, "int4": Int4Weight}.get(fmt, IntNWeight)
    qw = cls.__new__(cls)  # not __init__: it quantizes a float weight, which we do not have
    QuantizedWeight.__init__(qw, shape, dtype)
    qw.group_size = spec.get("group_size")

    def buf(name: str, dt: torch.dtype, sh: tuple[int, ...]) -> None:
        qw.register_buffer(name, torch.empty(sh, dtype=dt, device=device))

    if fmt == "int8":
        for name, (dt, sh) in layout.items():
            buf(name, dt, sh)
    elif fmt == "int4":
        qw.symmetric = bool(spec.get("symmetric"))
        qw.block_n = spec.get("block_n")  # the disk layout; fill_weight sets the RAM one
        n, k = shape
        buf("packed", torch.uint8, (n, k // 2))
        buf("scale_zero", torch.bfloat16, (k // qw.group_size, n, 2))
    else:
        qw.bits = int(spec.get("bits") or fmt[3:])
        qw.symmetric = bool(spec.get("symmetric"))
        qw.fmt = fmt
        buf("packed", *layout["packed"])
        buf("scale", *layout["scale"])
        if "offset" in layout:
            buf("offset", *layout["offset"])
        else:
            qw.register_buffer("offset", None)
    return qw


def fill_weight(
    qw: QuantizedWeight, tensors: dict[str, torch.Tensor], *, keep_layout: bool = False
) -> None:
    """Put the disk form ``tensors`` into ``qw`` (int4: converted to this CPU's kernel layout, or
    left in the disk's with ``keep_layout``, for a weight that is only looked up by rows)."""
    if isinstance(qw, _sparse().SparseWeight):
        return _sparse().io_fill_weight(qw, tensors)
    if isinstance(qw, Int4Weight):
        from memopt.quant import kernels

        n, _ = qw.shape
        packed = tensors["packed"]
        cpu = packed.device.type == "cpu"
        want = qw.block_n if keep_layout else kernels.int4_block_n(n) if cpu else None
        packed = int4_relayout(packed, qw.shape[1], qw.block_n, want)  # qw.block_n: disk's
        qw.block_n = want
        qw._buffers["packed"] = _aligned(packed.contiguous())
        sz = torch.stack([tensors["scale"].t(), tensors["zero"].t()], -1)  # (K/G, N, 2)
        qw._buffers["scale_zero"] = _aligned(sz.contiguous())
        return
    for name, t in tensors.items():
        qw._buffers[name] = _aligned(t)


def int4_relayout(packed: torch.Tensor, k: int, have: int | None, want: int | None) -> torch.Tensor:
    """int4 ``packed (N, K/2)`` from layout ``have`` to ``want`` (a row block size of the CPU
    kernel's interleaved layout, or None: along K). The same tensor when they agree."""
    if have == want:
        return packed
    from memopt.quant.primitives import pack, pack_int4_nblock, unpack, unpack_int4_nblock

    codes = unpack(packed, 4, k) if have is None else unpack_int4_nblock(packed, have, k)
    return pack(codes, 4) if want is None else pack_int4_nblock(codes, want)  # (N, K/2)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when its data is not 64-byte aligned.

    safetensors hands out views of its memory map, at offsets that the format only aligns to 8
    bytes; PyTorch's packed int8/int4 CPU kernels use aligned vector loads and crash on such a view
    (a segmentation fault, seen with ``_weight_int8pack_mm`` on AVX-512). A copy comes from PyTorch's
    allocator, which aligns to 64 bytes. Quantized tensors are small, so the copy is cheap.
    """
    return t if t.device.type != "cpu" or t.data_ptr() % 64 == 0 else t.clone()


# --------------------------------------------------------------------------------------------------
# Describing a model: what goes into the file and the manifest, in execution order


@dataclass
class Entry:
    """One tensor of the file: ``tensor`` is a float/int tensor of the model, or for a quantized
    weight ``(weight, suffix)`` whose disk form is computed when written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    weight: QuantizedWeight | None = None
    weight_key: str = ""
    suffix: str = ""


@dataclass
class Description:
    entries: list[Entry]
    modules: dict[str, dict[str, Any]]
    weights: dict[str, dict[str, Any]]
    aliases: dict[str, str]
    non_persistent: list[str]
    cast_hooks: dict[str, list[str]]

    def manifest_part(self) -> dict[str, Any]:
        ties: dict[str, list[str]] = {}
        for name, m in self.modules.items():
            ties.setdefault(m["weight"], []).append(name)
        return {
            "tensors": [e.name for e in self.entries],
            "weights": self.weights,
            "modules": self.modules,
            "tied": [names for names in ties.values() if len(names) > 1],
            "aliases": self.aliases,
            "non_persistent": self.non_persistent,
            "cast_hooks": self.cast_hooks,
        }


def _closure(fn: Any, var: str) -> Any:
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None or var not in code.co_freevars:
        return None
    return fn.__closure__[code.co_freevars.index(var)].cell_contents


def cast_hook_dtypes(m: nn.Module) -> tuple[torch.dtype, torch.dtype] | None:
    """(inner, outer) of the boundary casts ``Cast`` left on ``m``, or None.

    Read from the hooks' closures (``memopt.quant.api._boundary_hooks``): the hooks are functions,
    not data, so this is the only place the dtypes live; load re-creates them with the same function.
    """
    handles = getattr(m, "_memopt_cast_hooks", None)
    if not handles:
        return None
    pre = m._forward_pre_hooks.get(handles[0].id)
    post = m._forward_hooks.get(handles[1].id)
    inner, outer = _closure(pre, "inner"), _closure(post, "outer")
    if isinstance(inner, torch.dtype) and isinstance(outer, torch.dtype):
        return inner, outer
    return None


def describe(model: nn.Module) -> Description:
    """Walk ``model`` (real or meta) in registration order, which for transformers models is
    execution order: embeddings, block 0, block 1, ..., final norm, head. Every tensor once."""
    entries: list[Entry] = []
    modules: dict[str, dict[str, Any]] = {}
    weights: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    non_persistent: list[str] = []
    cast_hooks: dict[str, list[str]] = {}
    seen_tensor: dict[int, str] = {}
    seen_weight: dict[int, str] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedWeight):
            continue  # written through its parent, in disk form
        prefix = f"{mname}." if mname else ""
        hooks = cast_hook_dtypes(m)
        if hooks is not None:
            cast_hooks[mname] = [_dtype_name(hooks[0]), _dtype_name(hooks[1])]
        if isinstance(m, (QLinear, QEmbedding, QConv)):
            qw = m.qweight
            key = seen_weight.get(id(qw))
            if key is None:
                key = seen_weight[id(qw)] = f"{prefix}qweight"
                spec = weights[key] = weight_spec(qw)
                for suffix, (dt, shape) in disk_layout(spec).items():
                    entries.append(Entry(f"{key}.{suffix}", dt, shape, None, qw, key, suffix))
            info: dict[str, Any] = {"class": type(m).__name__, "weight": key}
            if isinstance(m, QLinear):
                info.update(bias=m.bias is not None, dynamic=bool(m.dynamic))
            elif isinstance(m, QEmbedding):
                info["padding_idx"] = m.padding_idx
            else:
                info["weight_shape"] = list(m.weight_shape)
            modules[mname] = info
        own = [(a, t, True) for a, t in m._parameters.items()]
        own += [(a, t, a not in m._non_persistent_buffers_set) for a, t in m._buffers.items()]
        for attr, t, persistent in own:
            if t is None:
                continue
            name = prefix + attr
            first = seen_tensor.get(id(t))
            if first is not None:
                aliases[name] = first
                continue
            seen_tensor[id(t)] = name
            if not persistent:
                non_persistent.append(name)
            entries.append(Entry(name, t.dtype, tuple(t.shape), t))
    return Description(entries, modules, weights, aliases, non_persistent, cast_hooks)


# --------------------------------------------------------------------------------------------------
# Folders: temporary, then renamed into place


def check_output(out_dir: str | Path) -> Path:
    """Refuse an output that is a file, or a non-empty folder that memopt did not write."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MemoptError(f"output {out_dir} is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise MemoptError(f"output {out_dir} is a non-empty folder that memopt did not write")
    if not out.parent.exists():
        raise MemoptError(f"output {out_dir}: its parent folder does not exist")
    return out


class staged_folder:  # noqa: N801 (a context manager used like a function)
    """``with staged_folder(out) as tmp:`` write into ``tmp``; on success it becomes ``out``
    (replacing an earlier memopt output there), on any failure it is removed."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out = check_output(out_dir)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():  # an earlier output: move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "x")
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def disk_bytes(folder: str | Path) -> int:
    """Sum of the sizes of the files in a folder (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# save


def _memopt_version() -> str:
    from memopt import __version__

    return __version__


def _quant_list(quant_config: Any) -> list[dict[str, Any]]:
    """Configs as manifest entries ``{"config": {...}, "include": ..., "exclude": ...}``."""
    if quant_config is None:
        return []
    items = quant_config if isinstance(quant_config, (list, tuple)) else [quant_config]
    out = []
    for item in items:
        if hasattr(item, "to_dict"):
            out.append({"config": item.to_dict()})
        elif isinstance(item, dict) and "config" in item:
            out.append(dict(item))
        elif isinstance(item, dict):
            out.append({"config": dict(item)})
        else:
            raise MemoptError(f"cannot record quantization config {item!r}")
    return out


def copy_tokenizer(source: ModelSource | None, dest: Path, loaded: LoadedModel | None) -> list[str]:
    """Put the source's tokenizer files in ``dest``; returns their names (empty: no tokenizer)."""
    if source is None:
        return []
    if source.kind == "gguf":
        try:
            tok = loaded.tokenizer() if loaded is not None else None
            if tok is None:
                from memopt.gguf_loader import gguf_tokenizer

                tok = gguf_tokenizer(source.path)
        except MemoptError:
            return []
        before = set(os.listdir(dest))
        tok.save_pretrained(str(dest))
        return sorted(set(os.listdir(dest)) - before)
    copied = []
    for name in TOKENIZER_FILES:
        src = source.folder / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


def write_folder(
    tmp: Path,
    desc: Description,
    fill: Callable[[Entry], torch.Tensor | list[torch.Tensor]],
    *,
    config: Any,
    task: Task,
    name: str,
    quant: list[dict[str, Any]],
    source: ModelSource | None,
    loaded: LoadedModel | None = None,
    progress: ProgressFn | None = None,
    late: Callable[[Entry], bool] | None = None,
) -> dict[str, Any]:
    """Write weights (``fill(entry)`` gives each entry's tensor, in order), config, tokenizer and
    manifest into ``tmp``; returns the manifest. Entries for which ``late(entry)`` is true keep
    their place in the file but are filled after all the others."""
    # config and tokenizer first: converting a GGUF tokenizer takes tens of MB for a moment, which
    # is then given back before the weights' own working memory is needed
    config_dict = config.to_dict()
    config.to_json_file(str(tmp / "config.json"))
    tokenizer = copy_tokenizer(source, tmp, loaded)
    layout = [(e.name, e.dtype, e.shape) for e in desc.entries]
    writer = SafetensorsWriter(tmp / WEIGHTS, layout)
    total = sum(_numel(e.shape) * e.dtype.itemsize for e in desc.entries)
    done = 0
    deferred = [e for e in desc.entries if late is not None and late(e)]
    later = {id(e) for e in deferred}
    try:
        for e in desc.entries:
            if id(e) in later:
                writer.reserve(e.name)
                continue
            writer.write(e.name, fill(e))
            done += _numel(e.shape) * e.dtype.itemsize
            if progress is not None:
                progress(done, total)
        for e in deferred:
            writer.write(e.name, fill(e))
            done += _numel(e.shape) * e.dtype.itemsize
            if progress is not None:
                progress(done, total)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    manifest = {
        "format": "memopt",
        "format_version": FORMAT_VERSION,
        "memopt_version": _memopt_version(),
        "name": name,
        "task": task,
        "source": None if source is None else {"kind": source.kind, "name": source.name},
        "quantization": quant,
        "files": {"weights": WEIGHTS, "config": "config.json", "tokenizer": tokenizer},
        "config": config_dict,
        **desc.manifest_part(),
    }
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    return manifest


def save(
    model_or_loaded: nn.Module | LoadedModel,
    out_dir: str | Path,
    *,
    config: Any = None,
    quant_config: Any = None,
    source: ModelSource | str | Path | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Save a (quantized, cast or float) transformers model to ``out_dir``; returns the manifest.

    ``quant_config``: the config(s) applied (``QuantConfig``, dict, or a list), recorded in the
    manifest after those the model was loaded with. ``source`` (default: the LoadedModel's) is where
    the tokenizer is copied from. ``config`` defaults to the LoadedModel's or ``model.config``.
    """
    loaded = model_or_loaded if isinstance(model_or_loaded, LoadedModel) else None
    model = loaded.model if loaded is not None else model_or_loaded
    if not isinstance(model, nn.Module):
        raise MemoptError(f"save: expected an nn.Module or LoadedModel, got {type(model).__name__}")
    config = config if config is not None else getattr(loaded, "config", None)
    config = config if config is not None else getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise MemoptError("save: the model has no transformers config, so it could not be rebuilt")
    if isinstance(source, (str, Path)):
        from memopt.models import resolve

        source = resolve(source)
    source = source if source is not None else getattr(loaded, "source", None)
    from memopt.models import task_of

    task: Task = loaded.task if loaded is not None else task_of(config)
    if task == "module":
        task = task_of(config)
    quant = list(getattr(model, "memopt_quantization", [])) + _quant_list(quant_config)
    name = loaded.name if loaded is not None else type(model).__name__
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise MemoptError(f"save: tensor {n} is on the meta device (not loaded)")
    desc = describe(model)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def fill(e: Entry) -> torch.Tensor:
        if e.weight is None:
            assert e.tensor is not None
            return e.tensor.detach().cpu()
        if e.weight_key not in cache:
            cache.clear()  # one weight's disk form at a time
            cache[e.weight_key] = {k: v.cpu() for k, v in disk_tensors(e.weight).items()}
        return cache[e.weight_key][e.suffix]

    with torch.no_grad(), staged_folder(out_dir) as tmp:
        manifest = write_folder(
            tmp,
            desc,
            fill,
            config=config,
            task=task,
            name=name,
            quant=quant,
            source=source,
            loaded=loaded,
            progress=progress,
        )
    return manifest


# --------------------------------------------------------------------------------------------------
# load


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a saved folder, checked for the keys load needs; MemoptError otherwise."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise MemoptError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MemoptError(f"{path}: corrupt manifest (not JSON: {_one_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "memopt":
        raise MemoptError(f"{path}: not a memopt manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise MemoptError(f"{path}: corrupt manifest (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise MemoptError(
            f"{path}: format version {version} was written by a newer memopt "
            f"(this one reads up to {FORMAT_VERSION})"
        )
    for key, kind in (
        ("task", str),
        ("tensors", list),
        ("weights", dict),
        ("modules", dict),
        ("aliases", dict),
        ("non_persistent", list),
        ("cast_hooks", dict),
    ):
        if not isinstance(manifest.get(key), kind):
            raise MemoptError(
                f"{path}: corrupt manifest ({key!r} missing or not a {kind.__name__})"
            )
    return manifest


def _float_meta(folder: Path, manifest: dict[str, Any], name: str) -> tuple[nn.Module, Any]:
    from memopt.models import _architecture, _tie, load_config

    source = ModelSource("memopt", folder, name)
    config = load_config(source)
    with torch.device("meta"):
        model = _architecture(config, manifest["task"])
    _tie(model)
    return model, config


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_meta(
    model: nn.Module, modules: dict[str, dict[str, Any]], weights: dict[str, dict[str, Any]]
) -> dict[str, QuantizedWeight]:
    """Swap the named modules of a (meta) float model for their quantized classes, with empty
    weights (one per weight key: tied modules share it). Returns weight key -> weight."""
    made: dict[str, QuantizedWeight] = {}
    for mname, info in modules.items():
        key = info.get("weight")
        if key not in weights:
            raise MemoptError(f"manifest: module {mname} names an unknown weight {key!r}")
        qw = made.get(key)
        if qw is None:
            qw = made[key] = empty_weight(weights[key])
        try:
            old = model.get_submodule(mname)
        except AttributeError:
            raise MemoptError(f"manifest: the architecture has no module {mname!r}") from None
        cls = info.get("class")
        if cls == "QLinear":
            bias = getattr(old, "bias", None) if info.get("bias") else None
            new: nn.Module = QLinear(qw, bias, dynamic=bool(info.get("dynamic")))
        elif cls == "QEmbedding":
            new = QEmbedding(qw, info.get("padding_idx"))
        elif cls == "QConv":
            if not isinstance(old, (nn.Conv1d, nn.Conv2d)):
                raise MemoptError(f"manifest: {mname} is not a convolution in the architecture")
            new = QConv(old, qw)
        else:
            raise MemoptError(f"manifest: module {mname} has unknown class {cls!r}")
        _set_module(model, mname, new)
    return made


def _quantized_meta_checked(
    folder: Path, model: nn.Module, manifest: dict[str, Any]
) -> dict[str, QuantizedWeight]:
    """:func:`quantized_meta`, with a damaged manifest entry reported in one line."""
    try:
        return quantized_meta(model, manifest["modules"], manifest["weights"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise MemoptError(
            f"{folder / MANIFEST}: corrupt manifest (module or weight entry: {_one_line(exc)})"
        ) from None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, params: dict[str, Any]) -> None:
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        owner = None
    if owner is not None and attr in owner._parameters:
        old = owner._parameters[attr]
        p = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
        owner._parameters[attr] = params[name] = p
    elif owner is not None and attr in owner._buffers:
        owner._buffers[attr] = params[name] = tensor
    else:
        raise MemoptError(f"unexpected tensor {name!r}: the architecture has no such parameter")


def build_meta(folder: str | Path, name: str | None = None) -> LoadedModel:
    """The saved model's architecture on the meta device, quantized modules in place (estimation)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    model, config = _float_meta(folder, manifest, name or str(folder))
    _quantized_meta_checked(folder, model, manifest)
    return LoadedModel(
        model.eval(), manifest["task"], name or str(folder), config,
        ModelSource("memopt", folder.resolve(), name or str(folder)),
    )  # fmt: skip


def load(
    folder: str | Path, *, name: str | None = None, progress: ProgressFn | None = None
) -> LoadedModel:
    """Rebuild a model saved by :func:`save` (or ``quantize_model``) without the original."""
    from memopt.models import SafetensorsSource, _materialize_buffers
    from memopt.quant.api import _boundary_hooks

    folder = Path(folder)
    name = name or str(folder)
    if not folder.is_dir():
        raise MemoptError(f"{folder}: not a folder")
    manifest = read_manifest(folder)
    model, config = _float_meta(folder, manifest, name)
    made = _quantized_meta_checked(folder, model, manifest)
    src = SafetensorsSource(folder, name)
    present = set(src.names())
    order: list[str] = manifest["tensors"]
    missing = [t for t in order if t not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MemoptError(f"{folder / WEIGHTS}: tensor {missing[0]!r} is missing{more}")
    extra = sorted(present - set(order))
    if extra:
        raise MemoptError(f"{folder / WEIGHTS}: unexpected tensor {extra[0]!r} (not in manifest)")
    suffixes = {k: list(disk_layout(spec)) for k, spec in manifest["weights"].items()}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    params: dict[str, Any] = {}
    total = sum(src.nbytes(t) for t in order)
    done = 0
    with torch.no_grad():
        for tname in order:
            tensor = src.get(tname)
            key, _, suffix = tname.rpartition(".")
            if key in suffixes and suffix in suffixes[key]:
                want = manifest["weights"][key]["tensors"][suffix]
                if (
                    _dtype_name(tensor.dtype) != want["dtype"]
                    or list(tensor.shape) != want["shape"]
                ):
                    raise MemoptError(
                        f"{folder / WEIGHTS}: tensor {tname!r} is {tensor.dtype} "
                        f"{tuple(tensor.shape)}, the manifest says {want['dtype']} {want['shape']}"
                    )
                got = pending.setdefault(key, {})
                got[suffix] = tensor
                if len(got) == len(suffixes[key]):
                    fill_weight(made[key], pending.pop(key))
            else:
                _assign(model, tname, tensor, params)
            done += src.nbytes(tname)
            if progress is not None:
                progress(done, total)
        for alias, first in manifest["aliases"].items():
            if first not in params:
                raise MemoptError(f"manifest: alias {alias!r} of unknown tensor {first!r}")
            owner_name, _, attr = alias.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if attr in owner._parameters:
                owner._parameters[attr] = params[first]
            else:
                owner._buffers[attr] = params[first]
        _materialize_buffers(model)  # buffers nobody saved (none when written by this module)
        for mname, (inner, outer) in manifest["cast_hooks"].items():
            _boundary_hooks(model.get_submodule(mname), _dtype_of(inner), _dtype_of(outer))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MemoptError(f"{folder}: no saved value for {left[0]!r} (corrupt folder)")
    model.memopt_quantization = list(manifest.get("quantization", []))  # kept for a re-save
    return LoadedModel(
        model.eval(), manifest["task"], name, config, ModelSource("memopt", folder.resolve(), name)
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def iter_chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``step`` rows covering ``0..n``."""
    for a in range(0, n, step):
        yield a, min(n, a + step)
