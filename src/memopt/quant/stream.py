"""Streamed quantization: source file -> quantized memopt folder, one tensor at a time.

``quantize_model("smollm2", Int4WeightOnly(group_size=64, algo="rtn"), "out/")`` never builds the
float model. The architecture is built on the meta device (no memory); the covered modules are
swapped for their quantized classes with empty weights, which fixes every output tensor's name,
dtype and shape, so the safetensors header is written first and each tensor's bytes follow as they
are made (:class:`memopt.models.saved.SafetensorsWriter`), in execution order. Each weight is read from the
source in row chunks (:data:`CHUNK_BYTES` of float32 at a time: safetensors through ``mmap``,
GGUF blocks dequantized per chunk), quantized chunk by chunk by the same weight classes
``quantize_`` uses (rows are quantized independently, so the result is bit-identical to
quantizing the whole tensor), and its pages of the source mapping are released after use
(``madvise(MADV_DONTNEED)`` on the file-backed mapping: the page cache keeps them, the process's
RSS does not). So the peak is about the imports, the tokenizer, one chunk's temporaries and one
quantized tensor, far under the bound streamed quantization keeps: imports + output size +
largest float32 tensor.

Calibrated int4 (``Int4WeightOnly(algo="gptq")``) goes block by block: the modules before the first
transformer block are materialized to capture its calibration inputs and freed; then for each block,
its float weights are read from the source, :func:`memopt.quant.calibrate.quantize_block_` quantizes
its Linears and returns the next block's inputs, its tensors are written and it goes back to meta.
The output projection (with a tied embedding) is calibrated last, by the function ``calibrate_``
uses (:func:`memopt.quant.calibrate.gptq_head`), from the final hidden states: its tensors keep
their place at the start of the file and are written at the end (``SafetensorsWriter.reserve``).
The float embedding is never built: the capture gathers only the calibration tokens' rows into a
small table, and the head's GPTQ reads its weight 2048 rows at a time from the source (its Hessian
comes from the stored final hidden states, replayed through the final norm: the model call that
carries them gets zero input embeddings, which the replay ignores). Peak (1 MB mmap threshold:
:func:`memopt.core.heap.bound_heap`): the imports + the calibration activations + one float
block + the quantized output, within the same bound (imports + output size + largest float32 tensor);
bench/quantize.py reports both (the README's quantization table).

A :class:`~memopt.quant.config.Mixed` config plans each weight by its module's rule
(``plan_module``, the first module of a tie group deciding for the group, as in ``quantize_``).
With calibrated rules, the float twin's blocks run as ``calibrate_`` runs them: in each block, the
modules whose rule is not calibrated are quantized first (from the float weights just read), then
the GPTQ Linears with their rules' group sizes; the uncalibrated weights are written from the source
in row chunks as usual (the same bits), the GPTQ ones from the block pass, so the folder equals the
in-memory result bit for bit.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core import heap
from memopt.core.atomic import releases_outputs
from memopt.core.errors import MemoptError
from memopt.core.modules import iter_chunks, model_bytes, numel, require_blocks, selector
from memopt.core.pages import file_mappings, release
from memopt.core.rss import peak_rss_bytes
from memopt.formats.safetensors import SafetensorsReader
from memopt.models import (
    LoadedModel,
    ModelSource,
    assign_tensor,
    build_meta,
    load_model,
    match_key,
    materialize_buffers,
    resolve,
)
from memopt.models.saved import (
    Entry,
    check_output,
    describe,
    disk_bytes,
    save,
    staged_folder,
    write_folder,
)
from memopt.quant.api import (
    count_format,
    covered_shape,
    first_of_tie,
    lookup_only_weights,
    quantize_,
    swap_module,
    swap_plan,
)
from memopt.quant.config import (
    Cast,
    Int4WeightOnly,
    Mixed,
    QuantConfig,
    WeightPlan,
    gptq_config,
    is_calibrated,
)
from memopt.weights.quantized import (
    Int4Weight,
    QuantizedWeight,
    disk_tensors,
    empty_weight,
    int4_relayout,
)

__all__ = ["quantize_model", "quantize_model_job", "requantized_note"]

ProgressFn = Callable[[int, int], None]
CHUNK_BYTES = 4 << 20  # float32 bytes of one row chunk: temporaries stay a few times this


# --------------------------------------------------------------------------------------------------
# Reading rows of a source tensor, and giving its pages back


class _Rows:
    """Row-chunk reads of a source's float tensors (by source name) + page release."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        if source.kind == "gguf":
            from memopt.formats.gguf import GGUFSource

            self.gguf = GGUFSource(source.path)
            self.gguf.drop_metadata()  # build_meta read the config: the vocabulary's objects go
            self.st = None
            self._ranges = file_mappings(source.path)
        else:
            self.gguf = None
            self.st = SafetensorsReader(source.path, source.name)

    def names(self) -> list[str]:
        return self.gguf.names() if self.gguf is not None else self.st.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.gguf.shape(name) if self.gguf is not None else self.st.shape(name))

    def rows(self, name: str, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``r0:r1`` as ``dtype`` (possibly a read-only view of the mapping: do not write)."""
        if self.gguf is not None:
            from memopt.formats.gguf import dequantize

            gtype, data = self._raw(name)
            with warnings.catch_warnings():  # a read-only view of the mapping: only read
                warnings.simplefilter("ignore", UserWarning)
                out = dequantize(data[r0:r1], gtype, (r1 - r0, *self.shape(name)[1:]))
        else:
            out = self.st.get(name)[r0:r1]  # a view of the mapping
        return out if not out.is_floating_point() or out.dtype == dtype else out.to(dtype)

    def _raw(self, name: str) -> tuple[str, Any]:
        key = getattr(self, "_raw_key", None)
        if key != name:  # one tensor's raw blocks at a time (q/k rows are reordered: a copy)
            self._raw_val = self.gguf.raw(name)
            self._raw_key = name
        return self._raw_val

    def gather(self, name: str, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index (U,)`` of a 2-D tensor as ``dtype``, owned: only those rows are read
        (an embedding's rows for the calibration tokens, without the whole table)."""
        if self.gguf is not None:
            out = self.gguf.read(name, rows=index)
        else:
            out = self.st.get(name)[index]  # (U, C): a copy of those rows only
        out = out.to(dtype) if out.dtype != dtype else out
        self.release()
        return out

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.gguf is not None:
            return self.gguf.get(name, dtype if dtype.is_floating_point else None)
        return self.st.get(name, dtype)

    def owned(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor as ``dtype``, owned by the caller, built chunk by chunk into one
        preallocated tensor: the peak is the tensor and one chunk's temporaries (dequantizing a
        GGUF tensor whole, then cloning it, held three float32 copies at once), and the source's
        pages are given back after each chunk."""
        shape = self.shape(name)
        if self.gguf is None:  # a view of the mapping: one copy, in the asked dtype
            t = self.st.get(name)
            out = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
            self.release()
            return out
        if len(shape) < 2:  # norms, biases: small (and maybe a view of the mapping)
            out = self.get(name, dtype).clone()
            self.release()
            return out
        probe = self.rows(name, 0, 1, dtype)  # (1, ...): the dtype a non-float tensor keeps
        out = torch.empty(shape, dtype=probe.dtype)
        step = max(1, CHUNK_BYTES // max(1, probe.numel() * probe.element_size()))
        for a, b in iter_chunks(shape[0], step):
            out[a:b] = self.rows(name, a, b, dtype)
            self.release()
            heap.trim()
        return out

    def release(self) -> None:
        """Drop every mapped page of the source from this process's RSS (the page cache keeps
        them; a later read refaults). The whole mapping, not just the tensor just read: the kernel
        maps neighbouring pages on each fault ("fault-around"), and over a few hundred tensors
        those neighbours add up to RSS that dropping only each tensor's pages never gives back."""
        if self.gguf is not None:
            self._raw_key = None
            self._raw_val = None
            release(self._ranges)
        else:
            self.st.release_all()


# --------------------------------------------------------------------------------------------------
# Planning: which modules become which quantized weights (the rules of quantize_, on meta)


@dataclass
class _Planned:
    src: str  # source tensor name of the float weight
    transpose: bool  # transformers' Conv1D stores (in, out)
    weight: WeightPlan  # the manifest entry and the maker of the weight from float rows
    gptq: bool = False
    qw: QuantizedWeight | None = None
    head: bool = False  # the output projection by GPTQ: written last, once every block is done


@dataclass
class _Plan:
    weights: dict[int, _Planned] = field(default_factory=dict)  # id(empty weight) -> plan
    modules: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _plan(
    model: nn.Module,
    config: QuantConfig,
    select: Callable[[str, nn.Module], bool],
    src_of: Callable[[str], str | None],
    gptq_linears: set[str],
    gptq_head: str | None = None,
) -> _Plan:
    """Swap the selected covered modules of a meta model for quantized ones with empty weights,
    by ``quantize_``'s own rules (:func:`memopt.quant.api.swap_plan`) and the config's plan of
    each weight (:meth:`~memopt.quant.config.QuantConfig.plan_module`, with the name of the first
    module of a tie group, as ``quantize_`` asks it). ``gptq_linears``: Linears that the
    calibrated path fills instead (quantize_block_ decides their codes); ``gptq_head``: the name of
    the output projection when the calibrated path quantizes it (with its tied embedding)."""
    plan = _Plan()
    lookup = lookup_only_weights(model)
    done: dict[int, QuantizedWeight | str] = {}
    swaps = swap_plan(model, select, plan.skipped)
    owners: dict[int, list[str]] = {}
    for name, _, key in swaps:
        owners.setdefault(key, []).append(name)
    for name, m, key in swaps:
        qw = done.get(key)
        if isinstance(qw, str):  # the first module of its tie group stays as it is: all do
            plan.skipped[name] = qw
            continue
        if qw is None:
            (n, k), transposed = covered_shape(m)
            made = config.plan_module(name, n, k, m.weight.dtype, key in lookup)
            if isinstance(made, str):
                plan.skipped[name] = done[key] = made
                continue
            src = src_of(f"{name}.weight")
            if src is None:
                raise MemoptError(f"source has no tensor for {name}.weight")
            qw = done[key] = empty_weight(made.spec)
            head = gptq_head is not None and gptq_head in owners[key]
            gptq = name in gptq_linears or head
            plan.weights[id(qw)] = _Planned(src, transposed, made, gptq, qw, head)
        new = swap_module(model, name, m, qw, plan.weights[id(qw)].weight.dynamic)
        plan.modules.append(name)
        count_format(plan.formats, new)
    return plan


def _quantize_rows(rows: _Rows, p: _Planned, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """The disk form of one weight, as row chunks per tensor, built from row chunks of its float
    source tensor (each chunk's source pages are given back as soon as it is quantized)."""
    assert p.qw is not None
    n, k = p.qw.shape
    if p.transpose:  # (in, out) on disk: small in practice (GPT-2), read whole and transpose
        whole = rows.get(p.src, dtype).t()  # (N, K) view
        read = lambda a, b: whole[a:b]  # noqa: E731
    else:
        read = lambda a, b: rows.rows(p.src, a, b, dtype)  # noqa: E731
    step = max(64, CHUNK_BYTES // (4 * max(k, 1)) // 64 * 64)  # a multiple of every int4 block_n
    parts: dict[str, list[torch.Tensor]] = {}
    for a, b in iter_chunks(n, step):
        w = read(a, b)  # (rows, K)
        for suffix, t in _disk_tensors(p.weight.make(w), p.qw).items():
            parts.setdefault(suffix, []).append(t.clone() if t._base is not None else t)
        del w
        rows.release()
        heap.trim()
    return parts


def _disk_tensors(qw: QuantizedWeight, planned: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``disk_tensors(qw)`` with int4 codes in the planned weight's layout: a chunk of rows (or
    a weight made elsewhere) may have found another kernel layout for its own row count."""
    out = disk_tensors(qw)
    if isinstance(qw, Int4Weight) and qw.block_n != planned.block_n:
        out["packed"] = int4_relayout(out["packed"], qw.shape[1], qw.block_n, planned.block_n)
    return out


# --------------------------------------------------------------------------------------------------
# The calibrated path: one transformer block at a time


class _Calibrated:
    """Runs calibrate.quantize_block_ block by block on a second meta model (the float one),
    materializing one block's weights from the source at a time."""

    def __init__(self, fmodel, rows, src_of, config, select, calib, progress) -> None:
        from memopt.quant import calibrate

        self.cal = calibrate
        self.fmodel, self.rows, self.src_of = fmodel, rows, src_of
        self.config, self.select, self.progress = config, select, progress
        self.prefix, self.blocks = require_blocks(fmodel, "calibration")
        self.calib = calib
        self.current = -1
        self.inputs: list | None = None
        self.ids: torch.Tensor | None = None
        self.as_tuple = True  # whether the blocks return tuples (set by the first block run)
        self.done: dict[str, QuantizedWeight] = {}
        # what a block's pass may quantize (calibrate_'s rule): with a Mixed config, only modules
        # whose weight is their own (a tie group waits for the end, for its first module's rule)
        if isinstance(config, Mixed):
            single = calibrate.single_weights(fmodel, select)
            self.in_block = lambda full, m: full in single
        else:
            self.in_block = select

    def head_config(self, model: nn.Module) -> Int4WeightOnly | None:
        """The calibrated config of the output projection's tie group (its first module's rule),
        None when it is not calibrated."""
        head = self.cal.output_projection(model)
        name = next((nm for nm, m in model.named_modules() if m is head), None)
        return None if name is None else gptq_config(self.config, first_of_tie(model, name))

    def head_name(self, model: nn.Module) -> str | None:
        """The name of ``model``'s output projection if calibration will quantize it, else None
        (:func:`memopt.quant.calibrate.gptq_head`'s conditions, checked on the meta model)."""
        head, config = self.cal.output_projection(model), self.head_config(model)
        if config is None or not isinstance(head, nn.Linear):
            return None
        if head.in_features % config.group_size:
            return None
        if not self.cal.DEFAULT_SETTINGS.lm_head:
            return None
        name = next((nm for nm, m in model.named_modules() if m is head), None)
        return name if name is not None and self.select(name, head) else None

    def linears(self) -> set[str]:
        """Full names of the Linears quantize_block_ will quantize by GPTQ (selected, calibrated
        rule, group divides)."""
        out = set()
        for b, block in enumerate(self.blocks):
            for nm, m in block.named_modules():
                full = f"{self.prefix}.{b}.{nm}"
                config = gptq_config(self.config, full) if isinstance(m, nn.Linear) else None
                divides = config is not None and m.in_features % config.group_size == 0
                if divides and self.in_block(full, m):
                    out.add(full)
        return out

    def _fill(
        self, module: nn.Module, prefix: str, skip: Callable[[str], bool] | None = None
    ) -> None:
        """Read the meta tensors of ``module`` (names under ``prefix``) from the source; names
        for which ``skip`` is true are left on meta."""
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_meta or (skip is not None and skip(name)):
                continue
            src = self.src_of(f"{prefix}{name}")
            if src is not None:
                assign_tensor(module, name, self.rows.owned(src, t.dtype))

    def _outside(self) -> tuple[list[str], Callable[[str], bool]]:
        """The meta tensors outside the blocks that the capture and the head's Hessian need (the
        final norm, position tables...), and the predicate that leaves the rest on meta: the
        blocks, the embedding and the output projection, the largest float32 tensors of a small
        LM, which are never read whole: the capture gathers the calibration tokens' rows, the
        head's GPTQ reads a chunk of rows at a time."""
        big = {
            n
            for n, t in self.fmodel.named_parameters(remove_duplicate=False)
            if t is self.embedding().weight or t is getattr(self.head(), "weight", None)
        }

        def skip(name: str) -> bool:
            return name.startswith(self.prefix + ".") or name in big

        tensors = [*self.fmodel.named_parameters(), *self.fmodel.named_buffers()]
        return [n for n, t in tensors if t.is_meta and not skip(n)], skip

    def embedding(self) -> nn.Embedding:
        return self.fmodel.get_input_embeddings()

    def head(self) -> nn.Module | None:
        return self.cal.output_projection(self.fmodel)

    def _capture(self, tokenizer: Callable[[], Any]) -> None:
        """Inputs of block 0, with the embedding's rows of the calibration tokens only."""
        calib = self.calib
        if isinstance(calib, torch.Tensor):
            ids = calib
        else:
            ids = self.cal.calibration_ids(tokenizer(), calib)  # the tokenizer is dropped now
        self.ids = ids  # (N, T)
        names, skip = self._outside()
        self._fill(self.fmodel, "", skip=skip)
        emb = self.embedding()
        src = self.src_of(next(n for n, t in self.fmodel.named_parameters() if t is emb.weight))
        if src is None:
            raise MemoptError("calibration: the source has no tensor for the input embedding")
        uniq, local = torch.unique(ids, return_inverse=True)  # (U,) token ids, (N, T) in 0..U-1
        # The embedding module's own forward (a subclass may scale it) on a (U, C) table of the
        # calibration tokens' rows, fed the remapped ids; padding_idx off meanwhile (F.embedding
        # asserts it lies inside the table; it changes gradients only, not the forward).
        meta_weight, pad = emb.weight, emb.padding_idx
        emb.weight = nn.Parameter(self.rows.gather(src, uniq, meta_weight.dtype), False)
        emb.padding_idx = None
        try:
            self.inputs = self.cal.capture_inputs(
                self.fmodel, self.blocks[0], local, self.cal.CALIB_BATCH, emb
            )
        finally:
            emb.weight, emb.padding_idx = meta_weight, pad
        self._to_meta(self.fmodel, names)
        heap.trim()

    @staticmethod
    def _to_meta(model: nn.Module, names: list[str]) -> None:
        for n in names:
            owner_name, _, attr = n.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            t = owner._parameters.get(attr, owner._buffers.get(attr))
            if t is not None and not t.is_meta:
                assign_tensor(model, n, torch.empty_like(t, device="meta"))

    def weight(self, full: str, tokenizer: Callable[[], Any]) -> QuantizedWeight:
        """The calibrated weight of Linear ``full`` (``prefix.b.rest``): block b run if needed."""
        b = int(full[len(self.prefix) + 1 :].split(".", 1)[0])
        if self.inputs is None:
            self._capture(tokenizer)
        while self.current < b:
            self._next_block()
        if b != self.current:
            raise RuntimeError(f"calibrated weights asked out of block order ({full})")
        return self.done[full]

    def head_weight(self, tokenizer: Callable[[], Any]) -> QuantizedWeight:
        """The output projection (and tied embedding) by GPTQ, after every block:
        :func:`memopt.quant.calibrate.gptq_head` on the final hidden states, with the small
        tensors outside the blocks read back (the final norm) and the head's float weight read
        from the source 2048 rows at a time, never whole."""
        if self.inputs is None:
            self._capture(tokenizer)
        while self.current < len(self.blocks) - 1:
            self._next_block()
        if self.current >= 0:
            self.blocks[self.current].to("meta")  # written already: only the head is left
        names, skip = self._outside()
        self._fill(self.fmodel, "", skip=skip)
        head = self.head()
        assert isinstance(head, nn.Linear)
        src = self.src_of(next(n for n, t in self.fmodel.named_parameters() if t is head.weight))
        if src is None:
            raise MemoptError("calibration: the source has no tensor for the output projection")
        width, dtype = head.in_features, head.weight.dtype

        def embed(ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C): the replay ignores it
            return torch.zeros(*ids.shape, width, dtype=dtype)

        def read(r0: int, r1: int) -> torch.Tensor:  # (r1 - r0, C) float rows of the head
            self.rows.release()  # the previous chunk's pages
            heap.trim()
            return self.rows.rows(src, r0, r1, dtype)

        qw = self.cal.gptq_head(
            self.fmodel, self.blocks, self.ids, self.inputs, self.as_tuple,
            self.head_config(self.fmodel), embed=embed, read=read,
        )  # fmt: skip
        self.inputs = None
        self.rows.release()
        self._to_meta(self.fmodel, names)
        heap.trim()
        if qw is None:
            raise RuntimeError("the planned GPTQ of the output projection did not run")
        return qw

    def _next_block(self) -> None:
        if self.current >= 0:
            self.blocks[self.current].to("meta")  # the previous block is written: free it
        self.done.clear()
        b = self.current = self.current + 1
        here = f"{self.prefix}.{b}"
        block = self.blocks[b]
        self._fill(block, here + ".")

        def on_linear(nm: str, qw: Any) -> None:
            if not isinstance(qw, str):
                self.done[f"{here}.{nm}"] = qw

        outputs = self.cal.quantize_block_(
            block,
            self.inputs,
            self.config,
            select=lambda nm, m: self.in_block(f"{here}.{nm}", m),
            on_linear=on_linear,
            consume=True,
            name=here,
        )
        self.as_tuple = isinstance(outputs[0], (tuple, list))
        self.inputs = self.cal.next_inputs(self.inputs, outputs)
        del outputs
        # Hessians ((K, K) float32) and GPTQ's working copies freed: without the trim glibc keeps
        # them and RSS grows with every block while the live tensors do not; with it, it stays flat
        heap.trim()
        if self.progress is not None:
            self.progress(b + 1, len(self.blocks))


# --------------------------------------------------------------------------------------------------
# The entry point


def _as_config(config: QuantConfig | dict[str, Any]) -> QuantConfig:
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    if not isinstance(config, QuantConfig):
        raise MemoptError(f"not a quantization config: {config!r}")
    return config


def _meta_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _source_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Model tensor name -> source tensor name (allowing a base-model prefix on either side)."""
    targets = {n: None for n, _ in model.named_parameters(remove_duplicate=False)}
    targets.update({n: None for n, _ in model.named_buffers(remove_duplicate=False)})
    out = {}
    for src in names:
        key = match_key(src, targets)
        if key is not None:
            out[key] = src
    return out


def _check_shapes(name: str, model: nn.Module, key_to_src: dict[str, str], rows: Any) -> None:
    """Refuse, before anything is written, a file whose tensors do not have the shapes of the
    architecture its config (or metadata) describes: the streamed path reads rows by the
    architecture's shapes, so a mismatch would otherwise surface as an error deep inside."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for key, src in key_to_src.items():
        want, got = tuple(tensors[key].shape), tuple(rows.shape(src))
        if want != got:
            raise MemoptError(
                f"{name}: tensor {src!r} has shape {got}, the architecture expects {want}"
            )


@releases_outputs
def quantize_model(
    model_spec: str | Path | ModelSource,
    config: QuantConfig | dict[str, Any],
    out_dir: str | Path,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    calib: str | torch.Tensor | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Quantize a model from its file(s) into a memopt folder without holding the float model.

    ``calib``: calibration text (default: memopt.core.texts.mixed_calib_text) or ``(N, T)`` token
    ids, for calibrated configs. ``progress(bytes written, bytes total)``.

    A GGUF file is requantized from its dequantized weights (the float32 architecture, built with
    ``dequantize=True``): its own Q4_1 / Q8_0 ... blocks are not carried over, and ``note`` says so.

    Returns ``bytes_before`` (the float model as memopt loads it: float32 for GGUF), ``bytes_after``
    (the quantized model in RAM once loaded, exact), ``disk_bytes`` (sum of the written files),
    ``peak_rss_bytes`` (this process's peak resident set so far: run it in a fresh process for a
    figure that belongs to it alone, see :func:`memopt.core.rss.run_in_child`), ``seconds``,
    ``modules`` (names quantized), ``formats``, ``skipped`` and, for a GGUF source, ``note``.
    """
    start = time.perf_counter()
    config = _as_config(config)
    check_output(out_dir)
    source = model_spec if isinstance(model_spec, ModelSource) else resolve(model_spec)
    gptq = is_calibrated(config)
    # streamed: a cast, or a config whose weights have a plan (what a config registered elsewhere
    # may not have: it is quantized in memory); a Mixed config's rules all have one
    planned = isinstance(config, Mixed) or type(config).plan_weight is not QuantConfig.plan_weight
    if source.kind == "memopt" or not (planned or isinstance(config, Cast)):
        return _in_memory(source, config, out_dir, include, exclude, calib, progress, start)
    if gptq:
        try:
            from memopt.quant.calibrate import quantize_block_  # noqa: F401
        except ImportError:
            return _in_memory(source, config, out_dir, include, exclude, calib, progress, start)

    loaded = build_meta(source, dequantize=True)  # the float architecture, a GGUF's too
    model = loaded.model
    bytes_before = _meta_bytes(model)
    note = requantized_note(source)  # before _Rows takes the parsed header
    rows = _Rows(source)
    key_to_src = _source_names(model, rows.names())
    _check_shapes(source.name, model, key_to_src, rows)
    select = selector(include, exclude)
    with torch.no_grad():
        materialize_buffers(model)  # computed buffers (rotary frequencies): small, real
    cal = None
    if gptq:
        # Block by block, glibc's rising mmap threshold left each stage's freed Hessians and
        # copies in the heap, and the peak varied from run to run; a 1 MB threshold keeps it low
        # and steady (a smaller one gains little more) for some extra time in page faults
        heap.bound_heap(1 << 20)
        # The float twin that calibration runs: a copy of the meta model (meta tensors cost
        # nothing; a second build_meta would parse the GGUF's metadata again, and keep it)
        fmodel = copy.deepcopy(model)
        cal = _Calibrated(fmodel, rows, key_to_src.get, config, select, calib, None)

    def src_of(name: str) -> str | None:
        if name in key_to_src:
            return key_to_src[name]
        i = name.rfind(".conv.")
        if i >= 0:  # QConv keeps the convolution as a child: "x.conv.bias" <- "x.bias"
            return key_to_src.get(name[:i] + "." + name[i + 6 :])
        return None

    if isinstance(config, Cast):
        with torch.no_grad():
            report = quantize_(model, config, include=include, exclude=exclude)
        plan = _Plan(modules=report.modules, formats=report.formats)
    else:
        gl = cal.linears() if cal is not None else set()
        head = cal.head_name(model) if cal is not None else None
        plan = _plan(model, config, select, key_to_src.get, gl, head)
    undivided = [n for n, why in plan.skipped.items() if "does not divide" in why]
    if undivided and not plan.modules:
        raise MemoptError(f"{source.name}: {plan.skipped[undivided[0]]} (nor any other layer's)")
    desc = describe(model)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def tokenizer() -> Any:  # called once, for the calibration ids; not kept (a large vocabulary)
        return LoadedModel(model, loaded.task, source.name, None, source).tokenizer()

    def fill(e: Entry) -> torch.Tensor | list[torch.Tensor]:
        if e.weight is None:
            assert e.tensor is not None
            if not e.tensor.is_meta:
                return e.tensor  # a computed buffer
            src = src_of(e.name)
            if src is None:
                raise MemoptError(f"{source.name}: no tensor in the source for {e.name}")
            return rows.owned(src, e.dtype)  # owned: the mapping's pages go right away
        key = id(e.weight)
        if key not in cache:
            cache.clear()  # one weight's disk form at a time
            p = plan.weights[key]
            if p.head:
                assert cal is not None
                qw = cal.head_weight(tokenizer)
                cache[key] = {k: v.contiguous() for k, v in _disk_tensors(qw, p.qw).items()}
                del qw
            elif p.gptq:
                assert cal is not None
                qw = cal.weight(e.weight_key.removesuffix(".qweight"), tokenizer)
                cache[key] = {k: v.contiguous() for k, v in _disk_tensors(qw, p.qw).items()}
            else:
                cache[key] = _quantize_rows(rows, p, e.weight.dtype)
        return cache[key][e.suffix]

    with torch.no_grad(), staged_folder(out_dir) as tmp:
        write_folder(
            tmp,
            desc,
            fill,
            config=loaded.config,
            task=loaded.task,
            name=source.name,
            quant=[_record(config, include, exclude, calib)],
            source=source,
            loaded=None,
            progress=progress,
            late=lambda e: e.weight is not None and plan.weights[id(e.weight)].head,
        )
    out = Path(out_dir)
    bytes_after = sum(numel(e.shape) * e.dtype.itemsize for e in desc.entries)
    return {
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "disk_bytes": disk_bytes(out),
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds": time.perf_counter() - start,
        "modules": list(plan.modules),
        "formats": dict(plan.formats),
        "skipped": dict(plan.skipped),
        "config": config.to_dict(),
        "streamed": True,
        **({"note": note} if note else {}),
    }


def requantized_note(source: ModelSource) -> str | None:
    """The note a quantization of a GGUF file carries: its weights are requantized from their
    dequantized values (the file's own quantized types named); None for other sources."""
    if source.kind != "gguf":
        return None
    from memopt.formats.gguf import QUANTIZED_TYPES, gguf_tensor_types

    types = sorted({t for t in gguf_tensor_types(source.path).values() if t in QUANTIZED_TYPES})
    if not types:
        return None
    return f"requantized from the dequantized {'/'.join(types)} weights of the GGUF"


def _in_memory(source, config, out_dir, include, exclude, calib, progress, start) -> dict:
    """Load the whole model, quantize it in RAM, save: for sources and configs that the
    streamed path does not cover (a memopt folder, a config type registered elsewhere)."""
    note = requantized_note(source)
    loaded = load_model(source, dequantize=True)  # a GGUF's float weights, to requantize
    before = model_bytes(loaded.model)
    if is_calibrated(config):
        from memopt.quant.calibrate import calibrate_

        kw = {"calib_ids": calib} if isinstance(calib, torch.Tensor) else {"calib_text": calib}
        report = calibrate_(loaded, config, include=include, exclude=exclude, **kw)
    else:
        report = quantize_(loaded.model, config, include=include, exclude=exclude)
    after = model_bytes(loaded.model)
    quant = [_record(config, include, exclude, calib)]
    save(loaded, out_dir, quant_config=quant, progress=progress)
    return {
        "bytes_before": before,
        "bytes_after": after,
        "disk_bytes": disk_bytes(out_dir),
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds": time.perf_counter() - start,
        "modules": list(report.modules),
        "formats": dict(report.formats),
        "skipped": dict(report.skipped),
        "config": config.to_dict(),
        "streamed": False,
        **({"note": note} if note else {}),
    }


def _record(config: QuantConfig, include: Any, exclude: Any, calib: Any) -> dict[str, Any]:
    """The manifest's account of one quantization: config, selection, calibration data."""
    rec: dict[str, Any] = {"config": config.to_dict(), "include": include, "exclude": exclude}
    if is_calibrated(config):
        if isinstance(calib, torch.Tensor):
            rec["calib"] = f"token ids {list(calib.shape)}"
        else:
            rec["calib"] = "mixed: docs, code, notes (default)" if calib is None else "user text"
    return rec


def quantize_model_job(
    model_spec: str,
    config: dict[str, Any],
    out_dir: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, Any]:
    """JSON-in, JSON-out form of :func:`quantize_model` for ``run_in_child`` (which then reports
    the child's own peak RSS and its import baseline)."""
    return quantize_model(model_spec, config, out_dir, include=include, exclude=exclude)
