"""Export a model for other tools: a GGUF file that llama.cpp loads and runs, or a plain Hugging
Face folder that ``transformers`` loads with ``from_pretrained``.

Any MODEL memopt loads can be exported. A memopt folder is loaded (its quantized weights stay
quantized); a Hugging Face folder or a GGUF file is built on the meta device and each tensor is read
from its file when it is written, so an export holds one tensor at a time beyond the model.

GGUF (:func:`export` with ``fmt="gguf"``; the writer is memopt.formats.gguf_writer): each weight
kind becomes the GGML type that holds it exactly where one does, checked by decoding the written
blocks with the reader's bit-exact dequantizer and comparing with memopt's own dequantized weight:

* int8, groups of any multiple of 32 (per channel included, when K is a multiple of 32) -> Q8_0:
  the group's scale is every one of its blocks' ``d``; exact when the scale is a float16 (bfloat16
  values usually are);
* int4 symmetric -> Q4_0, ``d = scale``; int4 asymmetric -> Q4_1, ``d = scale``,
  ``m = zero - 8 * scale`` (memopt's value is ``(c - 8) * scale + zero``): exact, because memopt's
  quantizer picks each zero so that ``m`` is a float16 (memopt.weights.primitives); a block whose
  ``m`` is not (a folder from before that) has its ``m`` rounded to the nearest float16 (codes
  kept) and the error reported; groups of 64 or 128 are whole blocks of 32 too;
* int2 / int3 -> Q4_0 / Q4_1 the same way (their codes fit in 4 bits);
* GGML blocks (a GGUF source) -> the same blocks, the same bytes;
* any other kind (sparse) -> its dequantized float weight (F32 / F16 / BF16), exact;
* a group that is not a multiple of 32 -> requantized from the dequantized weight by gguf.quants
  (Q8_0 for int8, Q4_0 / Q4_1 for int4 and below), the error reported;
* float tensors as stored (F32, F16, BF16); 1-D ones (norms) as F32.

The result says which tensors are exact and, for the others, the SQNR and the largest absolute
error against memopt's values. Architecture keys come from the config, the tokenizer from the
source GGUF's keys (copied) or from the model's tokenizer (built: byte-level BPE only).

Hugging Face folder (``fmt="safetensors"``): config.json, model.safetensors with float weights
(quantized ones dequantized to the dtype they were quantized from), the tokenizer files.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.atomic import (
    check_output,
    lock_output,
    releases_outputs,
    staged_folder,
    unlock_output,
)
from memopt.core.errors import MemoptError
from memopt.formats.gguf import dequantize as ggml_dequantize
from memopt.formats.gguf_writer import (
    BLOCK,
    GGUFTensor,
    carried_metadata,
    config_metadata,
    encode_q4_0,
    encode_q4_1,
    encode_q8_0,
    gguf_name,
    permute_rows,
    quantize_values,
    tensor_nbytes,
    tokenizer_metadata,
    write_gguf,
)
from memopt.formats.manifest import MANIFEST, WEIGHTS
from memopt.formats.safetensors import SafetensorsWriter, dtype_name
from memopt.models.load import (
    LoadedModel,
    ModelSource,
    architecture,
    build_meta,
    load_model,
    match_key,
    resolve,
    tensor_source,
)
from memopt.models.saved import copy_tokenizer, disk_bytes
from memopt.weights import (
    GGMLWeight,
    Int4Weight,
    Int8Weight,
    IntNWeight,
    QConv,
    QModule,
    QuantizedWeight,
)
from memopt.weights.primitives import sqnr, unpack

__all__ = ["FORMATS", "export"]

FORMATS = ("gguf", "safetensors")

ProgressFn = Callable[[int, int], None]

_FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@releases_outputs
def export(
    model: str | Path | LoadedModel,
    fmt: str,
    out: str | Path,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` (``"gguf"``: the file ``out``; ``"safetensors"``: the Hugging
    Face folder ``out``); returns what was written (``format``, ``path``, ``bytes`` and, for GGUF,
    which tensors are exact and the error of the others). Bad input: MemoptError, nothing written."""
    if fmt not in FORMATS:
        raise MemoptError(f"unknown export format {fmt!r} (supported: {', '.join(FORMATS)})")
    if isinstance(model, LoadedModel):
        loaded, lazy = model, None
        source = loaded.source
    else:
        source = resolve(model)
        loaded = lazy = None
    out = Path(out).expanduser()
    _check_output(fmt, out, source)
    if loaded is None:
        assert source is not None
        loaded, lazy = _open(source)
    if loaded.config is None:
        raise MemoptError(f"{loaded.name}: a plain module has no config to export")
    if fmt == "gguf":
        try:
            return _export_gguf(loaded, lazy, out, progress)
        finally:
            unlock_output(out)
    return _export_safetensors(loaded, lazy, out, progress)


def _check_output(fmt: str, out: Path, source: ModelSource | None) -> None:
    """Refuse, before reading any weight, an output that would clobber the wrong thing."""
    if source is not None and out.resolve() in (source.path.resolve(), source.folder.resolve()):
        raise MemoptError(f"output {out} is the model being exported")
    if fmt == "gguf":
        if out.is_dir():
            raise MemoptError(
                f"output {out} is a folder: --format gguf writes one file "
                f"(e.g. {out / 'model.gguf'})"
            )
        out.parent.mkdir(parents=True, exist_ok=True)  # as the file's own write would
        lock_output(out)  # a second export into the same file refuses (as for folders)
        return
    if (out / MANIFEST).is_file():
        raise MemoptError(f"output {out} is a memopt folder, not a Hugging Face one: not replaced")
    check_output(out, "config.json")


# --------------------------------------------------------------------------------------------------
# The model's tensors, each once, and where the values of a meta-built model's come from


class _Lazy:
    """The files of a meta-built Hugging Face model: each tensor read when it is written, found
    by the identity of the model's meta tensor."""

    def __init__(self, source: ModelSource, model: nn.Module) -> None:
        self.src = tensor_source(source)
        targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        targets.update(dict(model.named_buffers(remove_duplicate=False)))
        self.file_of: dict[int, str] = {}
        for name in self.src.names():
            key = match_key(name, targets)
            if key is not None:
                self.file_of.setdefault(id(targets[key]), name)

    def _name(self, t: torch.Tensor, what: str) -> str:
        name = self.file_of.get(id(t))
        if name is None:
            raise MemoptError(f"{what}: not in the model's weight files")
        return name

    def dtype(self, t: torch.Tensor, what: str) -> torch.dtype:
        """The dtype :meth:`get` returns: the stored one."""
        return self.src.dtype(self._name(t, what))

    def get(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return self.src.get(self._name(t, what))


def _open(source: ModelSource) -> tuple[LoadedModel, _Lazy | None]:
    """A memopt folder or a GGUF file loaded (quantized weights as they are: mapped, small); a
    Hugging Face folder built on the meta device, its tensors read one at a time when written."""
    if source.kind != "hf":
        return load_model(source), None
    if not any(source.path.glob("*.safetensors")):
        raise MemoptError(f"{source.name}: the folder has config.json but no *.safetensors weights")
    loaded = build_meta(source)
    return loaded, _Lazy(source, loaded.model)


@dataclass
class _Item:
    name: str  # the Hugging Face state-dict name
    shape: tuple[int, ...]
    dtype: torch.dtype  # the float dtype of its values
    tensor: torch.Tensor | None = None  # a float tensor (real, or meta: read from the file)
    weight: QuantizedWeight | None = None
    first: str | None = None  # the name this tensor / weight was met under first (tied)


def _items(model: nn.Module) -> list[_Item]:
    """Every persistent tensor and quantized weight of ``model`` in registration (execution)
    order; one met again (a tied head) has ``first`` set."""
    items: list[_Item] = []
    seen: dict[int, str] = {}
    renamed: dict[str, str] = {}  # a QConv's inner "x.conv." -> "x." (the float module's names)
    for mname, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedWeight):
            continue
        prefix = f"{mname}." if mname else ""
        for old, new in renamed.items():
            if prefix.startswith(old):
                prefix = new + prefix[len(old) :]
        if isinstance(m, QConv):
            renamed[f"{prefix}conv."] = prefix
        if isinstance(m, QModule):
            qw = m.qweight
            name = prefix + "weight"
            items.append(_Item(name, qw.shape, qw.dtype, weight=qw, first=seen.get(id(qw))))
            seen.setdefault(id(qw), name)
        own = list(m._parameters.items())
        own += [(a, b) for a, b in m._buffers.items() if a not in m._non_persistent_buffers_set]
        for attr, t in own:
            if t is None:
                continue
            name = prefix + attr
            items.append(_Item(name, tuple(t.shape), t.dtype, tensor=t, first=seen.get(id(t))))
            seen.setdefault(id(t), name)
    return items


def _dtype(item: _Item, lazy: _Lazy | None) -> torch.dtype:
    """The dtype of an item's values: the file's for a tensor of a meta-built model (a checkpoint
    may keep some tensors in another dtype than the one the meta model was built in)."""
    if item.tensor is not None and item.tensor.is_meta and lazy is not None:
        return lazy.dtype(item.tensor, item.name)
    return item.dtype


def _float_values(item: _Item, lazy: _Lazy | None) -> torch.Tensor:
    assert item.tensor is not None
    if item.tensor.is_meta:
        if lazy is None:
            raise MemoptError(f"{item.name}: on the meta device (not loaded)")
        return lazy.get(item.tensor, item.name)
    return item.tensor.detach().cpu()


# --------------------------------------------------------------------------------------------------
# GGUF


@dataclass
class _Written:
    """What one GGUF tensor was made from, and how close its values are to memopt's."""

    ggml_type: str
    source: str
    exact: bool = True
    why: str = ""
    sqnr_db: float = float("inf")
    max_abs_error: float = 0.0


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as (rows, bytes per row) uint8: one row per index of its first dim."""
    t = t.contiguous()
    return t.view(torch.uint8).reshape(t.shape[0] if t.dim() else 1, -1)


def _compare(w: _Written, rows: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Decode the written rows and compare with memopt's float32 values; the error if not exact."""
    decoded = ggml_dequantize(rows, w.ggml_type, tuple(reference.shape))
    if not torch.isfinite(decoded).all() and torch.isfinite(reference).all():
        raise MemoptError(
            f"GGUF export: {name} does not fit {w.ggml_type} (its scales overflow float16)"
        )
    if torch.equal(decoded, reference):
        w.exact, w.why = True, ""
        return
    w.exact = False
    w.sqnr_db = sqnr(reference, decoded)
    w.max_abs_error = float((decoded.double() - reference.double()).abs().max())


def _per_block(x: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group parameters ``(N, K/G)`` -> one per block of 32, ``(N, K/32)``, as float64."""
    return x.double().repeat_interleave(group // BLOCK, dim=1)


def _weight_plan(qw: QuantizedWeight, name: str) -> tuple[str, Callable[[_Written], torch.Tensor]]:
    """``(ggml_type, produce)`` for a quantized weight; ``produce(written)`` returns its rows of
    bytes (Hugging Face row order) and fills ``written``'s exactness."""
    n, k = qw.shape
    if isinstance(qw, GGMLWeight):
        t = qw.ggml_type

        def ggml(w: _Written) -> torch.Tensor:
            w.source = f"GGML {t} blocks, copied"
            return qw.blocks.contiguous()

        return t, ggml

    g = qw.group_size or k
    label = f"{qw.fmt} {'per channel' if g == k else f'g{g}'}"
    if isinstance(qw, (Int8Weight, Int4Weight, IntNWeight)) and k % BLOCK == 0:
        t = "Q8_0" if isinstance(qw, Int8Weight) else "Q4_0" if _symmetric(qw) else "Q4_1"

        def blocks(w: _Written) -> torch.Tensor:
            w.source = label
            ref = qw.dequantize(torch.float32)
            if g % BLOCK:
                rows = quantize_values(ref, t)
                w.why = f"group {g} is not a multiple of {BLOCK}: requantized"
            else:
                rows, exact = _encode(qw, t, g)
                if not bool(exact.all()):
                    what = "scale" if t != "Q4_1" else "scale or zero - 8 * scale"
                    w.why = (
                        f"{what} not a float16 in {int((~exact).sum())} of {exact.numel()} blocks: "
                        "rounded to the nearest (codes kept)"
                    )
            _compare(w, rows, ref, name)
            return rows

        return t, blocks

    # any other kind (sparse), or rows that are not whole blocks: the dequantized float weight
    dtype = qw.dtype if qw.dtype in _FLOAT_TYPES else torch.float32
    t = _FLOAT_TYPES[dtype]

    def dense(w: _Written) -> torch.Tensor:
        w.source = f"{qw.fmt}, dequantized to {dtype_name(dtype)}"
        if k % BLOCK and isinstance(qw, (Int8Weight, Int4Weight, IntNWeight)):
            w.source += f" (rows of {k} are not whole blocks of {BLOCK})"
        return _rows(qw.dequantize(dtype))

    return t, dense


def _symmetric(qw: QuantizedWeight) -> bool:
    if isinstance(qw, Int4Weight):
        return bool(getattr(qw, "symmetric", False))
    return getattr(qw, "offset", None) is None


def _encode(qw: QuantizedWeight, t: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks from the weight's own codes and scales (group ``g`` a multiple of 32)."""
    n, k = qw.shape
    if isinstance(qw, Int8Weight):
        return encode_q8_0(qw.qdata, _per_block(qw.scale, g))  # value q * s
    if isinstance(qw, Int4Weight):
        codes = qw.codes_rows(0, n)  # (N, K) 0..15, value (c - 8) * s + z
        s = _per_block(qw.scale_zero[..., 0].t(), g)
        if t == "Q4_0":
            return encode_q4_0(codes, s)
        z = _per_block(qw.scale_zero[..., 1].t(), g)
        return encode_q4_1(codes, s, z - 8 * s)
    assert isinstance(qw, IntNWeight)
    mid = 2 ** (qw.bits - 1)
    codes = unpack(qw.packed, qw.bits, k)  # value (c - mid) * s (+ offset)
    s = _per_block(qw.scale, g)
    if t == "Q4_0":  # (q - 8) * d with q = c - mid + 8
        return encode_q4_0(codes + (8 - mid), s)
    return encode_q4_1(codes, s, _per_block(qw.offset, g) - mid * s)


def _float_plan(item: _Item, lazy: _Lazy | None) -> tuple[str, Callable[[_Written], torch.Tensor]]:
    assert item.tensor is not None
    stored = _dtype(item, lazy)
    if not stored.is_floating_point:
        raise MemoptError(f"GGUF export: {item.name} is {dtype_name(stored)}, not a float")
    dtype = torch.float32 if len(item.shape) < 2 else stored
    t = _FLOAT_TYPES.get(dtype, "F32")

    def floats(w: _Written) -> torch.Tensor:
        values = _float_values(item, lazy)
        w.source = dtype_name(values.dtype)
        out = values.to(torch.float32 if t == "F32" else dtype)
        if not torch.equal(out.double(), values.double()):  # float64 rounded to float32
            w.exact, w.why = False, f"{dtype_name(values.dtype)} rounded to {t}"
            w.sqnr_db = sqnr(values, out)
            w.max_abs_error = float((out.double() - values.double()).abs().max())
        return _rows(out)

    return t, floats


def _tokenizer_keys(loaded: LoadedModel) -> tuple[list[Any], str]:
    source = loaded.source
    if source is not None and source.kind == "gguf":
        return carried_metadata(source.path), f"copied from {source.path.name}"
    try:
        tok = loaded.tokenizer()
    except MemoptError:
        tok = None
    if tok is None:
        raise MemoptError(
            f"{loaded.name}: no tokenizer; a GGUF file for llama.cpp needs one (tokenizer.json)"
        )
    return tokenizer_metadata(tok, int(loaded.config.vocab_size)), "built from the tokenizer"


def _export_gguf(
    loaded: LoadedModel, lazy: _Lazy | None, out: Path, progress: ProgressFn | None
) -> dict[str, Any]:
    config = loaded.config
    arch, metadata = config_metadata(config, loaded.name)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    heads = {"attn_q": n_head, "attn_k": n_kv} if arch == "llama" else {}
    plans: list[GGUFTensor] = []
    written: dict[str, _Written] = {}
    for item in _items(loaded.model):
        if item.first is not None:
            continue  # a tied head: llama.cpp uses token_embd when output is absent
        name = gguf_name(item.name)
        if name is None:
            raise MemoptError(f"GGUF export: tensor {item.name} has no GGUF name")
        if item.weight is not None:
            ggml_type, produce = _weight_plan(item.weight, item.name)
        else:
            ggml_type, produce = _float_plan(item, lazy)
        stem = name.split(".")[-2] if name.startswith("blk.") else ""
        w = written[name] = _Written(ggml_type, "")
        plans.append(
            GGUFTensor(name, ggml_type, item.shape, _producer(produce, w, heads.get(stem, 0)))
        )
    for p in plans:
        tensor_nbytes(p.ggml_type, p.shape)  # rows of whole blocks, checked before writing
    tok_keys, tok_how = _tokenizer_keys(loaded)  # before writing: its refusal leaves no file
    with torch.no_grad():  # the first of two keys wins: a source GGUF's own name is kept
        size = write_gguf(out, arch, [*tok_keys, *metadata], plans, progress)
    types: dict[str, int] = {}
    for w in written.values():
        types[w.ggml_type] = types.get(w.ggml_type, 0) + 1
    return {
        "format": "gguf",
        "path": str(out),
        "bytes": size,
        "model": loaded.name,
        "architecture": arch,
        "tokenizer": tok_how,
        "tensors": len(written),
        "types": types,
        "all_exact": all(w.exact for w in written.values()),
        "exact": [n for n, w in written.items() if w.exact],
        "requantized": {
            n: {
                "type": w.ggml_type,
                "from": w.source,
                "why": w.why,
                "sqnr_db": w.sqnr_db,
                "max_abs_error": w.max_abs_error,
            }
            for n, w in written.items()
            if not w.exact
        },
        "sources": {n: w.source for n, w in written.items()},
    }


def _producer(
    produce: Callable[[_Written], torch.Tensor], w: _Written, heads: int
) -> Callable[[], torch.Tensor]:
    def data() -> torch.Tensor:
        rows = produce(w)
        return permute_rows(rows, heads) if heads else rows

    return data


# --------------------------------------------------------------------------------------------------
# A Hugging Face folder


def _export_safetensors(
    loaded: LoadedModel, lazy: _Lazy | None, out: Path, progress: ProgressFn | None
) -> dict[str, Any]:
    config = copy.deepcopy(loaded.config)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    expected = _expected_shapes(config, loaded)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    items = [it for it in _items(loaded.model) if it.first is None or not tied]
    layout = [(it.name, _dtype(it, lazy), expected.get(it.name, it.shape)) for it in items]
    dequantized = [it.name for it in items if it.weight is not None]
    counts: dict[torch.dtype, int] = {}
    for _, dt, shape in layout:
        counts[dt] = counts.get(dt, 0) + _numel(shape)
    config.dtype = max(counts, key=counts.get) if counts else torch.float32
    total = sum(_numel(s) * dt.itemsize for _, dt, s in layout)
    done = 0
    with torch.no_grad(), staged_folder(out, "config.json") as tmp:
        config.to_json_file(str(tmp / "config.json"))
        files = copy_tokenizer(loaded.source, tmp, loaded)
        writer = SafetensorsWriter(tmp / WEIGHTS, layout)
        try:
            for it, (_, dtype, shape) in zip(items, layout, strict=True):
                if it.weight is not None:
                    values = it.weight.dequantize(dtype)
                else:
                    values = _float_values(it, lazy).to(dtype)
                writer.write(it.name, _as_shape(values, shape, it.name))
                done += _numel(shape) * dtype.itemsize
                if progress is not None:
                    progress(done, total)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return {
        "format": "safetensors",
        "path": str(out),
        "bytes": disk_bytes(out),
        "model": loaded.name,
        "tensors": len(items),
        "dtype": dtype_name(config.dtype),
        "dequantized": dequantized,
        "files": sorted(["config.json", WEIGHTS, *files]),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _expected_shapes(config: Any, loaded: LoadedModel) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the float architecture (a quantized Conv1D is stored (N, K), the
    float one (K, N); a quantized convolution flattened)."""
    task = loaded.task if loaded.task != "module" else "causal-lm"
    with torch.device("meta"):
        model = architecture(config, task)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _as_shape(values: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(values.shape) == tuple(shape):
        return values.contiguous()
    if values.dim() == 2 and tuple(values.shape[::-1]) == tuple(shape):
        return values.t().contiguous()  # transformers' Conv1D stores (in, out)
    if values.numel() == _numel(shape):
        return values.reshape(shape).contiguous()
    raise MemoptError(f"{name}: shape {tuple(values.shape)}, the architecture has {tuple(shape)}")
