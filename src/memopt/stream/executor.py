"""Run a model under a byte budget: resident what fits, the rest streamed block by block from its file.

Every source streams in its stored form: a safetensors file's tensors in their dtype, a memopt
folder's quantized weights, a GGUF's quantized blocks (the architecture of :func:`build_meta`, its
Linear and Embedding weights :class:`~memopt.weights.GGMLWeight` modules, counted and read as the
file's bytes; GGMLWeight.linear dequantizes one row block of one layer's weight at a time).

The architecture is built on the meta device. Its blocks are the modules of its largest
``nn.ModuleList`` (a transformer's layers); everything else is *the rest* (norms, rotary tables,
position embeddings), loaded once and kept. Two parts of the rest get special care, because in a
small LM with a large vocabulary they are the largest tensors of all (often one tied tensor):

* the input embedding is read by rows under a budget: a lookup copies only the rows it needs out
  of the file (``pread``, which maps nothing) and, for GGUF or a memopt quantized folder,
  dequantizes only those rows;
* the output head (``get_output_embeddings()``, a float Linear, a memopt QLinear or a GGML one) is
  a sequence of row chunks, each about one block's bytes, streamed like blocks; a linear over a
  chunk of rows computes the same dot products as over all of them (tested bit for bit, float and
  int4/int8).

The plan (:func:`plan_budget`) keeps everything resident when it fits; a GGUF that the decode engine
runs (:mod:`memopt.engine`: :func:`memopt.generate.generate` picks it when every tensor is real) is
planned with the engine's terms (its float32 KV cache, one position's activations, no
dequantization). Otherwise it pins as many blocks as the budget allows after the rest, the KV
cache, the activations, a runtime reserve and a working set of two streamed units (the one
computing and the one being prefetched); the others are *units* streamed in execution order,
cyclically (after the head's last chunk comes the first streamed block of the next forward),
through transformers' forward. A unit is fetched on a background thread while the previous one
computes: mapped pages are populated (``MADV_POPULATE_READ``), memopt int4 weights repacked for
this CPU's kernel; the forward pre-hook installs the fetched tensors in the meta block, the forward
hook puts the meta tensors back and releases the unit's pages (``MADV_DONTNEED``): its RSS is given
back.

Weights are the same tensors as in memory (views of the same file bytes, copies of them, or the same
dequantization of the same bytes) and run through the same modules, so the outputs are bit for bit
those of the in-memory model run the same way.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.heap import bound_heap, trim_heap
from memopt.core.modules import find_blocks
from memopt.core.pages import (
    Span,
    forget_file_mapping,
    populate,
    register_file_mapping,
    release,
    span_of,
)
from memopt.engine.llama import GGML_TYPES, arch_of, library
from memopt.engine.runtime import INT4_EMBEDDING_TRANSIENT
from memopt.engine.runtime import RUNTIME_BYTES as FOLDER_RUNTIME_BYTES
from memopt.engine.runtime import RUNTIME_INT4_BYTES as FOLDER_RUNTIME_INT4_BYTES
from memopt.formats.gguf import dequantize
from memopt.formats.manifest import read_manifest
from memopt.formats.safetensors import SafetensorsReader
from memopt.measure.generation import kv_cache_bytes
from memopt.models import (
    LoadedModel,
    ModelSource,
    build_meta,
    match_key,
    materialize_buffers,
    resolve,
)
from memopt.weights.ggml import GGMLWeight
from memopt.weights.kernels import set_untimed
from memopt.weights.modules import QEmbedding, QLinear, QModule
from memopt.weights.quantized import Int4Weight, Int8Weight, disk_layout, empty_weight, fill_weight

__all__ = [
    "ENGINE_RESERVE_BYTES",
    "RESERVE_BYTES",
    "StreamPlan",
    "StreamedModel",
    "activation_bytes",
    "plan_budget",
    "stream_model",
]

# RSS a streamed run adds beyond the tensors the plan counts: the tokenizer, Python objects of the
# model and its hooks, page tables, the allocator's slack, the mapped file headers, and the code
# pages of PyTorch that transformers' forward touches for the first time (libtorch_cpu.so, 12-13 MB
# on smollm2, read from /proc/self/smaps; 24 MiB without them kept the GGUF at 55 % of its stored
# bytes up to 4.7 MB over its budget); set from bench/stream.py's measurements, rounded up.
RESERVE_BYTES = 29 << 20
# A run through memopt's decode engine (everything resident, memopt.engine) needs less: no
# transformers forward, hooks or prefetch thread; what it adds is the engine's library and its
# OpenMP runtime, the model's Python objects and page tables (the bundled GGUF at 135 MB, three
# runs: 24.3 MB over its weights, KV cache and logits, of which ~14 MB are the parsed header's
# leftovers, counted apart as the reader's scratch, 12 MiB; rounded up with a margin).
ENGINE_RESERVE_BYTES = 14 << 20
# A quantized model needs no more: what its first forward would add is the kernels timing their
# candidates at first use (oneDNN's initialization), which they do not do under a budget
# (memopt.weights.kernels._UNTIMED).

Payload = list[
    tuple[nn.Module, str, str, Any]
]  # (owner, attribute, "param"|"buffer"|"attr", value)


# --------------------------------------------------------------------------------------------------
# Predicting the parts of the budget


def activation_bytes(config: Any, tokens: int, batch: int = 1, itemsize: int = 4) -> int:
    """Peak activation bytes of one forward over ``tokens`` new positions (the prefill's is largest).

    Live at the peak of a Llama-style block: the residual stream and its normed copy, q/k/v and the
    attention output (~6 × (B, T, H)); the MLP's gate, up and their product (3 × (B, T, I)); the
    attention scores and probabilities when SDPA takes its math path (2 × (B, heads, T, T)); and the
    logits (B, T, V), twice while the head's chunks are concatenated."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    t = batch * tokens
    per_block = 6 * t * hidden + 3 * t * inter + 2 * batch * heads * tokens * tokens
    return (per_block + 2 * t * vocab) * itemsize


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass
class StreamPlan:
    """What a budget allows: which blocks stay resident, which units stream, and the byte terms.

    ``predicted_peak_bytes`` is the prediction of the run's peak RSS over the import baseline:
    ``rest + pinned + 2 × largest streamed unit + kv_cache + activations + reserve + scratch``.
    """

    model: str
    budget_bytes: int | None
    model_bytes: int  # every weight as it is held in RAM (a GGUF's blocks as stored)
    rest_bytes: int  # resident outside the blocks (norms, rotary, quantized embeddings...)
    block_bytes: list[int]
    head_bytes: int  # a float output head streamed in chunks when not pinned (0: part of the rest)
    head_chunks: int
    pinned_blocks: list[int]
    head_pinned: bool
    streamed_units: int
    unit_bytes: int  # the largest streamed unit
    kv_cache_bytes: int
    activation_bytes: int
    reserve_bytes: int
    min_budget_bytes: int
    tokens: int  # positions the KV cache was sized for
    scratch_bytes: int = 0  # dequantization temporaries (GGUF) and the source's own metadata
    # a GGML embedding read by rows under a budget, resident when the whole model fits (0: none)
    embedding_bytes: int = 0
    embedding_pinned: bool = False
    # everything resident and memopt's decode engine runs it (memopt.generate picks it then): the
    # KV cache, activation and scratch terms are the engine's (its float32 cache of exactly the
    # positions asked for, one position computed at a time, no dequantization)
    engine: bool = False

    @property
    def pinned_bytes(self) -> int:
        return (
            sum(self.block_bytes[i] for i in self.pinned_blocks)
            + (self.head_bytes if self.head_pinned else 0)
            + (self.embedding_bytes if self.embedding_pinned else 0)
        )

    @property
    def working_bytes(self) -> int:
        return 2 * self.unit_bytes if self.streamed_units else 0

    @property
    def predicted_peak_bytes(self) -> int:
        return (
            self.rest_bytes
            + self.pinned_bytes
            + self.working_bytes
            + self.kv_cache_bytes
            + self.activation_bytes
            + self.reserve_bytes
            + self.scratch_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            pinned_bytes=self.pinned_bytes,
            working_bytes=self.working_bytes,
            predicted_peak_bytes=self.predicted_peak_bytes,
        )
        return out


def _mb(n: int, up: bool = False) -> str:
    """Megabytes (10⁶ B) for a message; ``up``: rounded up, so that the size named is enough."""
    digits = 0 if n >= 100e6 else 1 if n >= 1e6 else 3
    scale = 10**digits
    value = (math.ceil if up else round)(n / 1e6 * scale) / scale
    return f"{value:.{digits}f} MB"


@dataclass(frozen=True)
class _EngineTerms:
    """The byte terms of a run through memopt's decode engine (the whole model resident)."""

    kv: int
    act: int
    scratch: int
    reserve: int


def _plan(
    name: str,
    budget: int | None,
    rest: int,
    blocks: list[int],
    head: int,
    kv: int,
    act: int,
    reserve: int,
    tokens: int,
    scratch: int = 0,
    *,
    embedding: int = 0,
    engine: _EngineTerms | None = None,
) -> StreamPlan:
    """Everything resident when it fits (through the decode engine when ``engine`` gives its terms,
    else transformers' forward with ``kv``, ``act`` and ``scratch``); else pin blocks in order while
    the budget allows and stream the others and the head's chunks. ``embedding``: the bytes of an
    embedding read by rows unless everything is resident."""
    unit = max(blocks) if blocks else 0
    chunks = max(1, math.ceil(head / unit)) if head and unit else (1 if head else 0)
    head_unit = math.ceil(head / chunks) if chunks else 0
    largest = max(unit, head_unit)
    fixed = rest + kv + act + reserve + scratch
    minimum = fixed + 2 * largest
    weights = rest + sum(blocks) + head + embedding
    total = weights + kv + act + reserve + scratch
    engine_total = (
        weights + engine.kv + engine.act + engine.reserve + engine.scratch if engine else None
    )
    smallest = minimum if engine_total is None else min(minimum, engine_total)
    plan = StreamPlan(
        name, budget, weights, rest, list(blocks), head, chunks, [], False,
        0, 0, kv, act, reserve, smallest, tokens, scratch, embedding,
    )  # fmt: skip
    if engine is not None and (budget is None or budget >= engine_total):
        plan.engine = True  # everything resident, run by the engine: its terms
        plan.kv_cache_bytes, plan.activation_bytes = engine.kv, engine.act
        plan.scratch_bytes, plan.reserve_bytes = engine.scratch, engine.reserve
    if plan.engine or budget is None or budget >= total:  # everything resident: nothing to stream
        plan.pinned_blocks = list(range(len(blocks)))
        plan.head_pinned = bool(head)
        plan.embedding_pinned = bool(embedding)
        return plan
    if budget < smallest:
        if engine_total is not None and engine_total < minimum:
            parts = (
                f"{_mb(weights)} of weights, all resident for memopt's decode engine + "
                f"{_mb(engine.kv)} KV cache + {_mb(engine.act)} activations + "
                f"{_mb(engine.reserve + engine.scratch)} runtime"
            )  # fmt: skip
        else:
            parts = (
                f"{_mb(rest)} resident + 2 × {_mb(largest)} streamed blocks + {_mb(kv)} KV cache + "
                f"{_mb(act)} activations + {_mb(reserve + scratch)} runtime"
            )
        raise MemoptError(
            f"--max-memory {_mb(budget)} is too small for {name}: the smallest budget that works is "
            f"{_mb(smallest, up=True)} ({parts})"
        )
    room = budget - minimum
    for i, b in enumerate(blocks):
        if b > room:
            break
        plan.pinned_blocks.append(i)
        room -= b
    streamed_blocks = len(blocks) - len(plan.pinned_blocks)
    plan.streamed_units = streamed_blocks + (chunks if head else 0)
    if plan.streamed_units:
        sizes = [blocks[i] for i in range(len(blocks)) if i not in plan.pinned_blocks]
        if head and not plan.head_pinned:
            sizes.append(head_unit)
        plan.unit_bytes = max(sizes)
    return plan


# --------------------------------------------------------------------------------------------------
# Reading tensors: mapped safetensors or a GGUF file


class _Reader:
    """``tensor(name) -> (tensor, spans to release)``; rows of a 2-D tensor for embeddings/heads."""

    dequantizes = False

    def names(self) -> list[str]:
        raise NotImplementedError

    def ram_bytes(self, name: str) -> int:
        raise NotImplementedError

    def tensor(self, name: str) -> tuple[torch.Tensor, list[Span]]:
        raise NotImplementedError

    def rows(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, list[Span]]:
        raise NotImplementedError

    def gather(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def copy(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """An own copy of the tensor (or of its rows ``r0:r1``), holding no pages of the file."""
        t, spans = self.tensor(name) if rows is None else self.rows(name, *rows)
        t = t.clone()
        release(spans)
        return t

    def scratch_bytes(self, block_tensors: list[str], engine: bool = False) -> int:
        """Memory beyond the tensors while the blocks' tensors (file names) stream, or (``engine``)
        while the decode engine runs the whole model: none for mapped views."""
        return 0

    def release_all(self) -> None:
        """Give back every page of the mapped file(s)."""


class _MappedReader(_Reader):
    def __init__(self, folder: Path, name: str) -> None:
        self.src = SafetensorsReader(folder, name)

    def names(self) -> list[str]:
        return self.src.names()

    def ram_bytes(self, name: str) -> int:
        return self.src.nbytes(name)

    def tensor(self, name: str) -> tuple[torch.Tensor, list[Span]]:
        return self.src.get(name), [self.src.span(name)]

    def rows(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, list[Span]]:
        t = self.src.get(name)[r0:r1]  # (r1 - r0, K), contiguous: rows are consecutive bytes
        start = t.data_ptr()
        return t, [Span(start, start + t.numel() * t.element_size())]

    def gather(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        return self.src.read_rows(name, idx)  # (*idx.shape, H): copies, nothing mapped

    def copy(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.src.read(name, *(rows or (0, None)))  # by pread: nothing mapped

    def release_all(self) -> None:
        self.src.release_all()


class _GGUFReader(_Reader):
    """A GGUF file's tensors, each in the form the model holds it.

    The quantized weights that the model keeps as GGML blocks (``kept``: its
    :class:`~memopt.weights.GGMLWeight` modules) are their stored bytes, ``(rows, row_bytes)
    uint8``: views of the file's mapping, whose pages a streamed unit populates and releases as a
    safetensors file's are (llama's q/k rows, which llama.cpp reorders, are copies in Hugging Face
    order, :meth:`GGUFSource.raw`). Float tensors (norms) and any quantized tensor the model holds
    as floats are dequantized copies (:meth:`GGUFSource.read`, which leaves torch's thread count
    alone: a process-wide setting the compute thread would see change). Rows of a kept embedding
    are copied by ``pread`` (nothing mapped)."""

    dequantizes = True  # its float tensors are dequantized copies: a float embedding reads by rows

    def __init__(self, path: Path) -> None:
        from memopt.formats.gguf import GGUFSource

        self.src = GGUFSource(path)
        self.src.drop_metadata()  # the config and tensor table are read: their objects can go
        trim_heap()
        self.kept: set[str] = set()  # names held as GGML blocks (set by _map_model)
        base, size = self.src.region()  # the whole file's mapping, from its first byte
        self.base = base
        # releases widen to whole page-cache folios inside the mapping (memopt.core.pages)
        self._bounds = [(base, base + size)]
        register_file_mapping(self._bounds)
        weakref.finalize(self, forget_file_mapping, self._bounds)
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def names(self) -> list[str]:
        return self.src.names()

    def ram_bytes(self, name: str) -> int:
        if name in self.kept:
            return self.src.nbytes(name)  # the stored bytes
        return math.prod(self.src.shape(name)) * 4  # dequantized to float32

    def scratch_bytes(self, block_tensors: list[str], engine: bool = False) -> int:
        # The parsed header leaves objects behind (bench/stream.py, rounded up). Dequantizing a
        # tensor makes 3 float temporaries of its size (codes, scaled codes, the result): a block's
        # tensor held as floats, read whole, or a kept weight's row block in GGMLWeight.linear
        # (about 1 MiB of float32 rows, memopt.weights.kernels.row_block); the decode engine
        # computes from the blocks and needs none.
        if engine:
            return _GGUF_HEADER_LEFTOVER
        largest = max(
            [_GGML_ROW_TEMP if n in self.kept else self.ram_bytes(n) for n in block_tensors],
            default=0,
        )
        return 3 * largest + _GGUF_HEADER_LEFTOVER

    def release_all(self) -> None:
        release([_span(*self.src.region())])

    def tensor(self, name: str) -> tuple[torch.Tensor, list[Span]]:
        span = _span(*self.src.region(name))
        if name not in self.kept:
            out = self.src.read(name)  # dequantized: owns its memory
            release([span])  # the pages the read touched
            return out, []
        _, raw = self.src.raw(name)  # (rows, row_bytes)
        if raw.flags.writeable:  # an un-permuted copy (llama q/k): the pages it read can go
            release([span])
            return torch.from_numpy(raw), []
        return _readonly_tensor(raw), [span]  # a view of the mapping

    def rows(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, list[Span]]:
        if name not in self.kept:
            out = self.src.read(name, slice(r0, r1))  # (r1 - r0, K), dequantized
            release([_span(*self.src.region(name))])
            return out, []
        t, spans = self.tensor(name)  # a view touches nothing yet
        if not spans:
            return t[r0:r1].clone(), []
        part = t[r0:r1]  # quantized rows are consecutive runs of blocks
        return part, [span_of(part)]

    def gather(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        out = self.src.read(name, idx)  # (*idx.shape, H): only the rows asked for
        # the rows are dequantized copies: the pages (whole folios) the lookup mapped can go
        release([_span(*self.src.region(name))])
        return out

    def gather_blocks(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (1-D) of a kept weight's blocks, ``(len(idx), row_bytes)`` uint8, copied by
        ``pread``: nothing of the file is mapped, so nothing is left to release."""
        address, length = self.src.region(name)
        n_rows = self.src.shape(name)[0]
        row_bytes = length // n_rows
        out = torch.empty(idx.numel(), row_bytes, dtype=torch.uint8)  # (n, row_bytes)
        buf = out.numpy()
        offset = address - self.base  # the tensor's first byte in the file
        for j, r in enumerate(idx.tolist()):
            if not 0 <= r < n_rows:
                raise MemoptError(f"{name}: row {r} is out of range ({n_rows} rows)")
            if os.preadv(self.fd, [memoryview(buf[j])], offset + r * row_bytes) != row_bytes:
                raise MemoptError(f"{self.src.path}: short read of {name!r}")
        return out


_GGUF_HEADER_LEFTOVER = 12 << 20  # what a parsed GGUF header leaves behind, rounded up
_GGML_ROW_TEMP = 1 << 20  # float32 rows a GGML linear dequantizes at a time (kernels.row_block)


def _readonly_tensor(raw: Any) -> torch.Tensor:
    """A tensor over a read-only numpy view of the mapping: never written (weights are only read),
    so torch's warning about non-writable memory does not apply."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw)


def _span(address: int, length: int) -> Span:
    return Span(address, address + length)


# --------------------------------------------------------------------------------------------------
# Units and the prefetching streamer


@dataclass
class _Unit:
    """One streamed piece of the model (a block, or a row chunk of the head)."""

    name: str
    nbytes: int
    fetch: Callable[[], tuple[Payload, list[Span]]]  # runs on the prefetch thread
    restore: Payload  # meta tensors to put back on release
    spans: list[Span] = field(default_factory=list)
    installed: bool = False


def _install(payload: Payload) -> None:
    for owner, attr, kind, value in payload:
        if kind == "param":
            keep = value is None or value.is_meta
            owner._parameters[attr] = value if keep else nn.Parameter(value, requires_grad=False)
        elif kind == "buffer":
            owner._buffers[attr] = value
        else:
            setattr(owner, attr, value)


@dataclass
class StreamStats:
    fetches: int = 0
    prefetch_hits: int = 0  # the unit was already fetched when its compute began
    prefetch_waits: int = 0  # submitted ahead but not finished: compute waited for it
    misses: int = 0  # not submitted ahead: fetched on the compute thread
    wait_s: float = 0.0
    fetch_s: float = 0.0
    streamed_bytes: int = 0


class _Streamer:
    """Units in execution order, cyclically: :meth:`acquire` installs unit ``i`` (fetched ahead
    when ``prefetch``) and submits unit ``i + 1``'s fetch; :meth:`release` puts ``i``'s meta tensors
    back and gives its pages back."""

    def __init__(self, units: list[_Unit], prefetch: bool) -> None:
        self.units = units
        self.prefetch = prefetch and len(units) > 1
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="memopt-prefetch")
        self.pending: dict[int, Future] = {}
        self.stats = StreamStats()
        self.lock = threading.Lock()

    def add(self, unit: _Unit) -> int:
        """Append ``unit`` (units run in the order added); its index."""
        self.units.append(unit)
        return len(self.units) - 1

    def attach(self, block: nn.Module, i: int) -> None:
        """Hooks on ``block``: unit ``i`` installed before its forward, released after (both
        return None: the hooks change no input and no output)."""
        block.register_forward_pre_hook(lambda _m, _args: self.acquire(i))
        block.register_forward_hook(lambda _m, _args, _out: self.release(i))

    def _fetch(self, i: int) -> tuple[Payload, list[Span]]:
        start = time.perf_counter()
        out = self.units[i].fetch()
        with self.lock:
            self.stats.fetch_s += time.perf_counter() - start
            self.stats.fetches += 1
            self.stats.streamed_bytes += self.units[i].nbytes
        return out

    def acquire(self, i: int) -> None:
        unit = self.units[i]
        fut = self.pending.pop(i, None)
        if fut is None:
            self.stats.misses += 1
            payload, spans = self._fetch(i)
        else:
            if fut.done():
                self.stats.prefetch_hits += 1
            else:
                self.stats.prefetch_waits += 1
            start = time.perf_counter()
            payload, spans = fut.result()
            self.stats.wait_s += time.perf_counter() - start
        _install(payload)
        unit.spans, unit.installed = spans, True
        if self.prefetch:
            nxt = (i + 1) % len(self.units)
            if nxt not in self.pending and not self.units[nxt].installed:
                self.pending[nxt] = self.pool.submit(self._fetch, nxt)

    def release(self, i: int) -> None:
        unit = self.units[i]
        _install(unit.restore)  # meta tensors back: the fetched ones lose their last reference
        release(unit.spans)
        unit.spans, unit.installed = [], False

    def close(self) -> None:
        for fut in self.pending.values():
            try:
                _, spans = fut.result()
                release(spans)
            except Exception:  # noqa: BLE001 (a failed prefetch that nobody needed)
                pass
        self.pending.clear()
        self.pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------------
# Modules that read the embedding by rows and compute the head by chunks


class _RowEmbedding(nn.Module):
    """An embedding whose rows are read from the file on lookup (dequantized from GGUF, or copied
    out of safetensors by ``pread``): nothing of the table stays resident."""

    def __init__(self, reader: _Reader, name: str, like: nn.Embedding) -> None:
        super().__init__()
        self.reader, self.name = reader, name
        self.num_embeddings, self.embedding_dim = like.num_embeddings, like.embedding_dim
        self.padding_idx = like.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        return self.reader.gather(self.name, ids)


class _QuantRowEmbedding(nn.Module):
    """A memopt quantized embedding whose rows are read from the file on lookup (by ``pread``)
    and dequantized: nothing of the table stays resident. int4 rows interleaved in blocks of
    ``block_n`` on disk are read a whole block at a time."""

    def __init__(self, reader: _Reader, spec: dict[str, Any], names: list[str]) -> None:
        super().__init__()
        self.reader, self.spec, self.names = reader, spec, names
        self.num_embeddings, self.embedding_dim = (int(d) for d in spec["shape"])
        self.block = int(spec.get("block_n") or 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        flat = ids.reshape(-1)
        b = self.block
        blocks = torch.unique(flat // b)  # (U,) sorted
        rows = (blocks[:, None] * b + torch.arange(b)).reshape(-1)  # (U * b,) whole blocks
        tensors = {n.rsplit(".", 1)[1]: self.reader.gather(n, rows) for n in self.names}
        qw = empty_weight({**self.spec, "shape": [rows.numel(), self.embedding_dim]})
        fill_weight(qw, tensors, keep_layout=True)
        local = torch.searchsorted(blocks, flat // b) * b + flat % b  # row of each id in qw
        return qw.rows(local.view(ids.shape))


class _GGMLRowEmbedding(nn.Module):
    """A GGUF embedding kept as GGML blocks whose rows are read on lookup (by ``pread``) and
    dequantized (the values of :meth:`GGMLWeight.rows`): nothing of the table stays resident."""

    def __init__(self, reader: _GGUFReader, name: str, like: QEmbedding) -> None:
        super().__init__()
        self.reader, self.name = reader, name
        qw = like.qweight
        assert isinstance(qw, GGMLWeight)
        self.ggml_type = qw.ggml_type
        self.num_embeddings, self.embedding_dim = qw.shape
        self.padding_idx = like.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        flat = ids.reshape(-1)
        rows, local = torch.unique(flat, return_inverse=True)  # each row read once
        blocks = self.reader.gather_blocks(self.name, rows)  # (U, row_bytes)
        values = dequantize(blocks, self.ggml_type, (rows.numel(), self.embedding_dim))
        return values[local].reshape(*ids.shape, self.embedding_dim)


class _WeightChunk(nn.Module):
    """Rows of a float head's weight, installed while the chunk computes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("weight", None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, rows)
        return F.linear(h, self.weight)


class _StreamedHead(nn.Module):
    """The output head as row chunks of its weight, each a streamed unit: logits chunk by chunk."""

    def __init__(self, streamer: _Streamer, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.streamer = streamer
        self.chunks = nn.ModuleList()  # each holds one chunk's weight while it computes
        self.units: list[int] = []
        self.bias = bias

    def add(self, chunk: nn.Module, unit: int) -> None:
        self.chunks.append(chunk)
        self.units.append(unit)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, V)
        parts = []
        for c, i in zip(self.chunks, self.units, strict=True):
            self.streamer.acquire(i)
            parts.append(c(h))  # (B, T, rows of this chunk)
            self.streamer.release(i)
        out = torch.cat(parts, -1)
        return out if self.bias is None else out + self.bias


# --------------------------------------------------------------------------------------------------
# The streamed model


@dataclass
class StreamedModel:
    """A model whose blocks stream under ``plan``; ``loaded`` runs like any LoadedModel
    (``memopt.generate.generate(streamed.loaded, ...)``). Call :meth:`close` when done."""

    loaded: LoadedModel
    plan: StreamPlan
    _streamer: _Streamer | None = None
    _untimed_before: bool | None = None  # kernels' untimed setting before this model set it

    def stats(self) -> dict[str, Any]:
        return asdict(self._streamer.stats) if self._streamer is not None else asdict(StreamStats())

    def close(self) -> None:
        if self._streamer is not None:
            self._streamer.close()
        if self._untimed_before is not None:
            set_untimed(self._untimed_before)
            self._untimed_before = None

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Entry points: plan from the headers; stream = plan, then fill the meta model


def plan_budget(
    spec: str | Path | ModelSource,
    max_memory: int | None,
    *,
    tokens: int = 512,
    batch: int = 1,
    prompt_tokens: int | None = None,
    reserve_bytes: int = RESERVE_BYTES,
    kv_int8: bool = False,
) -> StreamPlan:
    """The plan :func:`stream_model` would follow, without reading a weight (headers only).

    Raises :class:`MemoptError` naming the smallest budget that works when ``max_memory`` is
    below it; ``plan.predicted_peak_bytes`` is the predicted peak RSS over the import baseline.
    """
    layout = _map_model(spec if isinstance(spec, ModelSource) else resolve(spec))
    return _plan_layout(layout, max_memory, tokens, batch, prompt_tokens, reserve_bytes, kv_int8)


def stream_model(
    spec: str | Path | ModelSource,
    max_memory: int | None,
    *,
    tokens: int = 512,
    batch: int = 1,
    prompt_tokens: int | None = None,
    prefetch: bool = True,
    reserve_bytes: int = RESERVE_BYTES,
    kv_int8: bool = False,
) -> StreamedModel:
    """Prepare ``spec`` (bundled name, HF folder, GGUF, memopt folder) to run within ``max_memory``
    bytes of RSS over the import baseline (None: no budget, everything resident but still mapped).

    ``tokens``: positions the KV cache must hold (prompt + new tokens); ``prompt_tokens``: the
    longest single forward (the prefill), for the activation term (default ``tokens``). Raises
    :class:`MemoptError` before reading any weight when the budget is below the smallest that works.
    ``kv_int8``: keep the KV cache as int8 (:mod:`memopt.weights.kvcache`: int8 codes in place of
    float32; outputs no longer bit-identical).
    """
    layout = _map_model(spec if isinstance(spec, ModelSource) else resolve(spec))
    plan = _plan_layout(layout, max_memory, tokens, batch, prompt_tokens, reserve_bytes, kv_int8)
    return _StreamedBuilder(layout, plan, max_memory is not None, prefetch).build(kv_int8)


# --------------------------------------------------------------------------------------------------
# Where the model's tensors are: in the file, in a block, in the rest, in the head

# A memopt quantized weight: (its weight module, its spec in the manifest, its tensors in the file).
_QuantWeight = tuple[nn.Module, dict[str, Any], list[str]]


@dataclass
class _Layout:
    """A meta model and where each of its tensors is, found from the file's headers only.

    A *key* is a parameter or buffer name of the model (``model.layers.3.mlp.up_proj.weight``); a
    *qkey* names a memopt quantized weight module (``model.layers.3.mlp.up_proj.qweight``), whose
    buffers are filled at once from its tensors in the file. Every key of a block has
    a tensor in the file (``file_of``).
    """

    source: ModelSource
    loaded: LoadedModel  # its model on the meta device
    reader: _Reader
    list_name: str  # the nn.ModuleList whose modules are the blocks
    blocks: nn.ModuleList
    file_of: dict[str, str]  # key -> tensor name in the file (aliases and a tied head included)
    qweights: dict[str, _QuantWeight]  # qkey -> its weight
    block_keys: list[list[str]]  # the float keys of each block
    block_q: list[list[str]]  # the qkeys of each block
    rest_keys: list[str]  # the float keys outside the blocks, the streamable float head's excepted
    resident_q: list[str]  # the qkeys outside the blocks, the row-wise head and embedding excepted
    emb: nn.Module | None  # the input embedding
    emb_name: str | None  # its name, when a float nn.Embedding or a GGUF's GGML QEmbedding
    head: nn.Module | None  # the output embedding
    head_name: str | None  # its name, when a float nn.Linear or a GGUF's GGML QLinear
    head_float: bool  # that head's weight has a tensor in the file: it streams by rows
    qhead_name: str | None  # a quantized head that streams by rows (a QLinear of a _ROW_FORMATS)
    qhead_key: str | None
    qemb_name: str | None  # a quantized embedding read by rows (a QEmbedding of a _ROW_FORMATS)
    qemb_key: str | None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def head_ggml(self) -> bool:
        """The head (``head_name``) is a QLinear over GGML blocks (a GGUF as stored)."""
        return isinstance(self.head, QLinear) and isinstance(self.head.qweight, GGMLWeight)

    @property
    def emb_ggml(self) -> bool:
        """The embedding (``emb_name``) is a QEmbedding over GGML blocks (a GGUF as stored)."""
        return isinstance(self.emb, QEmbedding) and isinstance(self.emb.qweight, GGMLWeight)

    @property
    def head_key(self) -> str | None:
        """The key of the head's weight: its ``weight``, or its GGML ``qweight.blocks``."""
        return _weight_key(self.head_name, self.head_ggml)

    @property
    def emb_key(self) -> str | None:
        return _weight_key(self.emb_name, self.emb_ggml)

    @property
    def row_embedding(self) -> bool:
        """The embedding's table is in the file: under a budget, read by rows on lookup."""
        return self.emb_key is not None and self.emb_key in self.file_of

    @property
    def tied(self) -> bool:
        """The head reads the embedding's tensor in the file."""
        return (
            self.head_key is not None
            and self.emb_key is not None
            and self.emb_key in self.file_of
            and self.file_of.get(self.head_key) == self.file_of[self.emb_key]
        )

    def block_of(self, key: str) -> int | None:
        """The index of the block that holds ``key``; None outside the blocks."""
        return _block_index(key, self.list_name)

    def ram(self, key: str) -> int:
        """Bytes of ``key``'s tensor as held in RAM (0: no tensor in the file)."""
        return self.reader.ram_bytes(self.file_of[key]) if key in self.file_of else 0

    def qram(self, qkey: str) -> int:
        return sum(self.reader.ram_bytes(n) for n in self.qweights[qkey][2])

    def rest_bytes(self) -> int:
        """The resident bytes outside the blocks: a tied tensor once, a row-read embedding never."""
        seen_files: set[str] = set()
        total = 0
        for key in self.rest_keys:
            if key in self.file_of and self.file_of[key] in seen_files:
                continue  # tied / aliased: one tensor
            if self.row_embedding and key == self.emb_key:
                continue  # read by rows: only the rows a lookup needs are ever touched
            seen_files.add(self.file_of.get(key, key))
            total += self.ram(key)
        return total + sum(self.qram(q) for q in self.resident_q)

    def block_bytes(self) -> list[int]:
        return [
            sum(self.ram(k) for k in keys) + sum(self.qram(q) for q in qkeys)
            for keys, qkeys in zip(self.block_keys, self.block_q, strict=True)
        ]

    def head_bytes(self) -> int:
        """The bytes of a head that streams by rows (0: no such head, it is part of the rest)."""
        if self.head_float:
            assert self.head_key is not None
            return self.ram(self.head_key)
        return self.qram(self.qhead_key) if self.qhead_key else 0

    def block_tensors(self) -> list[str]:
        """The file's tensors that the blocks hold."""
        return [self.file_of[k] for keys in self.block_keys for k in keys if k in self.file_of] + [
            n for qkeys in self.block_q for q in qkeys for n in self.qweights[q][2]
        ]

    def pinnable_embedding_bytes(self) -> int:
        """A GGML embedding read by rows under a budget that stays resident when the whole model
        fits (so that the decode engine can run it): its bytes; 0 for any other embedding (a tied
        one is resident with its pinned head)."""
        if not (self.emb_ggml and self.row_embedding) or self.tied:
            return 0
        assert self.emb_key is not None
        return self.ram(self.emb_key)


def _map_model(source: ModelSource) -> _Layout:
    """``source``'s architecture on the meta device, and where its tensors are (headers only).

    Raises :class:`MemoptError` for a model that cannot stream: not a transformers model, no list
    of blocks, or a block buffer that no file holds."""
    manifest = read_manifest(source.path) if source.kind == "memopt" else None
    # a GGUF streams in its stored form: its quantized Linear / Embedding weights GGML blocks
    loaded = build_meta(source)
    model = loaded.model
    if loaded.task != "causal-lm" and loaded.task != "encoder":
        raise MemoptError(f"{source.name}: streaming needs a transformers model")
    reader: _Reader = (
        _GGUFReader(source.path)
        if source.kind == "gguf"
        else _MappedReader(source.path, source.name)
    )
    found = find_blocks(model)
    if found is None:
        raise MemoptError(f"{source.name}: no list of blocks to stream (no nn.ModuleList)")
    list_name, blocks = found

    targets: dict[str, Any] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    file_of, qweights = _file_names(model, targets, manifest, reader)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_ggml = isinstance(emb, QEmbedding) and isinstance(emb.qweight, GGMLWeight)
    head_ggml = isinstance(head, QLinear) and isinstance(head.qweight, GGMLWeight)
    emb_name = _module_name(model, emb) if isinstance(emb, nn.Embedding) or emb_ggml else None
    head_name = _module_name(model, head) if type(head) is nn.Linear or head_ggml else None
    head_key, emb_key = _weight_key(head_name, head_ggml), _weight_key(emb_name, emb_ggml)
    if head_key and emb_key and head_key not in file_of and emb_key in file_of:
        file_of[head_key] = file_of[emb_key]  # a tied head reads the embedding's
    head_float = head_key is not None and head_key in file_of
    block_keys, block_q, rest_keys, rest_q = _group_keys(
        targets, qweights, list_name, len(blocks), head_key, head_float
    )
    unfilled = [k for keys in block_keys for k in keys if k not in file_of]
    if unfilled:
        raise MemoptError(
            f"{source.name}: {unfilled[0]!r} is computed, not stored; streaming blocks that own "
            "such buffers is not supported"
        )

    # A memopt folder's quantized head and embedding are planned as the float ones are: under a
    # budget the head streams in row chunks unless pinned, and the embedding is read by rows.
    # Sparse (pruned) formats stay resident.
    qhead_name = qhead_key = qemb_name = qemb_key = None
    if manifest is not None:
        qhead_name, qhead_key = _row_wise(model, manifest, qweights, rest_q, head, QLinear)
        qemb_name, qemb_key = _row_wise(model, manifest, qweights, rest_q, emb, QEmbedding)
    resident_q = [q for q in rest_q if q not in (qhead_key, qemb_key)]
    return _Layout(
        source, loaded, reader, list_name, blocks, file_of, qweights, block_keys, block_q,
        rest_keys, resident_q, emb, emb_name, head, head_name, head_float,
        qhead_name, qhead_key, qemb_name, qemb_key,
    )  # fmt: skip


def _file_names(
    model: nn.Module,
    targets: dict[str, Any],
    manifest: dict[str, Any] | None,
    reader: _Reader,
) -> tuple[dict[str, str], dict[str, _QuantWeight]]:
    """Each key's tensor name in the file, and (memopt folder) the quantized weights by qkey."""
    file_of: dict[str, str] = {}
    qweights: dict[str, _QuantWeight] = {}
    if manifest is None:
        # a GGUF's weights kept as GGML blocks: "<module>.qweight.blocks" holds "<module>.weight"
        ggml = {
            f"{name}.weight": f"{name}.qweight.blocks"
            for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, QModule) and isinstance(m.qweight, GGMLWeight)
        }
        for n in reader.names():
            held = match_key(n, ggml) if ggml else None
            key = ggml[held] if held is not None else match_key(n, targets)
            if key is not None:
                file_of[key] = n
                if held is not None and isinstance(reader, _GGUFReader):
                    reader.kept.add(n)  # read as its stored bytes
        return file_of, qweights
    for key, wspec in manifest["weights"].items():
        names = [f"{key}.{suffix}" for suffix in disk_layout(wspec)]
        qweights[key] = (model.get_submodule(key), wspec, names)
    quant_files = {n for _, _, names in qweights.values() for n in names}
    for n in manifest["tensors"]:
        if n not in quant_files:
            file_of[n] = n
    for alias, first in manifest["aliases"].items():
        file_of[alias] = first
    return file_of, qweights


def _group_keys(
    targets: dict[str, Any],
    qweights: dict[str, _QuantWeight],
    list_name: str,
    n_blocks: int,
    head_key: str | None,
    head_float: bool,
) -> tuple[list[list[str]], list[list[str]], list[str], list[str]]:
    """``(block_keys, block_q, rest_keys, rest_q)``: the keys and qkeys of each block, and those
    outside the blocks. A float head's weight is left out of the rest when it streams by rows."""
    block_keys: list[list[str]] = [[] for _ in range(n_blocks)]
    block_q: list[list[str]] = [[] for _ in range(n_blocks)]
    rest_keys: list[str] = []
    quant_prefixes = tuple(f"{q}." for q in qweights)
    for key in targets:
        if key.startswith(quant_prefixes):
            continue  # quantized weights' buffers: filled through their weight
        b = _block_index(key, list_name)
        if b is not None:
            block_keys[b].append(key)
        elif key != head_key:
            rest_keys.append(key)
    rest_q: list[str] = []
    for qkey in qweights:
        b = _block_index(qkey, list_name)
        (rest_q if b is None else block_q[b]).append(qkey)
    if head_key and not head_float:
        rest_keys.append(head_key)  # no tensor of its own (or none in the file): with the rest
    return block_keys, block_q, rest_keys, rest_q


def _block_index(key: str, list_name: str) -> int | None:
    """The index of the block of ``list_name`` that holds ``key``; None outside the blocks."""
    if not key.startswith(list_name + "."):
        return None
    return int(key[len(list_name) + 1 :].split(".", 1)[0])


def _row_wise(
    model: nn.Module,
    manifest: dict[str, Any],
    qweights: dict[str, _QuantWeight],
    rest_q: list[str],
    module: nn.Module | None,
    cls: type,
) -> tuple[str | None, str | None]:
    """``module``'s name and qkey when it is a ``cls`` outside the blocks whose quantized format
    has one row per output row in every file tensor (streamable by rows); else (None, None)."""
    name = _module_name(model, module) if isinstance(module, cls) else None
    key = manifest["modules"].get(name, {}).get("weight") if name else None
    if key in rest_q and qweights[key][1]["format"] in _ROW_FORMATS:
        return name, key
    return None, None


def _plan_layout(
    layout: _Layout,
    max_memory: int | None,
    tokens: int,
    batch: int,
    prompt_tokens: int | None,
    reserve_bytes: int,
    kv_int8: bool,
) -> StreamPlan:
    """The byte terms of ``layout`` under ``max_memory``, and what they allow (:func:`_plan`)."""
    config = layout.loaded.config
    itemsize = 4
    kv_size = 1 if kv_int8 else itemsize
    kv = 0
    if layout.loaded.task == "causal-lm":
        # the full cache plus one layer's K and V again (the cache grows by torch.cat: old and new
        # live for a moment)
        kv = kv_cache_bytes(config, tokens, batch, kv_size, 1)
    act = activation_bytes(config, prompt_tokens or tokens, batch, itemsize)
    budgeted = max_memory is not None
    block_tensors = layout.block_tensors()
    engine = None
    if _engine_runs(layout, batch):
        engine = _EngineTerms(
            # (layers, positions, kv_dim) float32 K and V, or int8 with a scale a position and head
            kv_cache_bytes(config, tokens, 1, kv_size),
            _engine_activation_bytes(config, tokens),
            layout.reader.scratch_bytes(block_tensors, engine=True) if budgeted else 0,
            _engine_reserve(layout, reserve_bytes) if budgeted else 0,
        )
    return _plan(
        layout.source.name, max_memory, layout.rest_bytes(), layout.block_bytes(),
        layout.head_bytes(), kv, act, reserve_bytes if budgeted else 0, tokens,
        layout.reader.scratch_bytes(block_tensors) if budgeted else 0,
        embedding=layout.pinnable_embedding_bytes(), engine=engine,
    )  # fmt: skip


def _engine_runs(layout: _Layout, batch: int) -> bool:
    """Whether memopt's decode engine runs ``layout``'s model once all of it is resident
    (:func:`memopt.generate.generate` then picks it): a GGUF kept in its stored form or a memopt
    folder, every quantized weight of a kind the engine computes with, every float tensor float32, an architecture it runs
    (:func:`memopt.engine.llama.arch_of`), the engine built for this machine; batch 1 (the engine
    keeps its own KV cache, float32 or int8)."""
    if batch != 1 or layout.source.kind not in ("gguf", "memopt"):
        return False
    if layout.loaded.task != "causal-lm":
        return False
    model = layout.model
    for m in model.modules():
        if isinstance(m, QModule) and not _engine_weight(m):
            return False
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return False
    try:
        arch_of(layout.loaded.config, model)
    except Exception:  # noqa: BLE001 (the engine's own "cannot run this": transformers runs it)
        return False
    return library() is not None


def _engine_reserve(layout: _Layout, reserve_bytes: int) -> int:
    """What the engine's run holds beyond the plan's terms: a GGUF's mapped blocks need
    ENGINE_RESERVE_BYTES; a memopt folder's weights are loaded (converted to the engine's
    layout), measured as memopt.engine.runtime states: more with int4 weights, more again with an
    int4 embedding. ``reserve_bytes`` 0 counts none (the tensors' own bytes alone)."""
    if layout.source.kind != "memopt" or not reserve_bytes:
        return min(reserve_bytes, ENGINE_RESERVE_BYTES)
    int4 = [m for m in layout.model.modules()
            if isinstance(m, QModule) and isinstance(m.qweight, Int4Weight)]  # fmt: skip
    if not int4:
        return FOLDER_RUNTIME_BYTES
    embeddings = [m for m in int4 if isinstance(m, QEmbedding)]
    return FOLDER_RUNTIME_INT4_BYTES + sum(
        math.ceil(4 * math.prod(m.qweight.shape) * INT4_EMBEDDING_TRANSIENT) for m in embeddings
    )


def _engine_weight(module: QModule) -> bool:
    """Whether the decode engine computes with ``module``'s weight as it is held: GGUF blocks of
    the types it reads (memopt.engine.llama.GGML_TYPES), memopt's int8, or its int4 in row blocks
    the engine reads (up to 128 rows, dividing the rows), weight-only."""
    qw = module.qweight
    if getattr(module, "dynamic", False):
        return False
    if isinstance(qw, GGMLWeight):
        return qw.ggml_type in GGML_TYPES
    if isinstance(qw, Int8Weight):
        return True
    if isinstance(qw, Int4Weight):
        return not qw.block_n or (qw.block_n <= 128 and qw.shape[0] % qw.block_n == 0)
    return False


def _engine_activation_bytes(config: Any, tokens: int) -> int:
    """What the decode engine computes with besides the weights and its KV cache: its scratch
    (``memopt_scratch_floats``: a handful of vectors of the hidden and MLP widths, the attention
    scores of one position against ``tokens``) and the logits of one position, float32."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    widest = max(hidden, inter, heads * head_dim)
    return (8 * widest + 2 * inter + heads * tokens + head_dim + vocab) * 4


def _weight_key(module_name: str | None, ggml: bool) -> str | None:
    """The key of a module's weight: ``<name>.weight``, or a GGML weight's ``<name>.qweight.blocks``."""
    if module_name is None:
        return None
    return f"{module_name}.qweight.blocks" if ggml else f"{module_name}.weight"


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for n, m in model.named_modules():
        if m is module:
            return n
    return None


# --------------------------------------------------------------------------------------------------
# Filling the meta model as the plan says


class _StreamedBuilder:
    """Fills ``layout``'s meta model as ``plan`` says and returns it as a :class:`StreamedModel`:
    the rest and the pinned blocks resident; the other blocks, then the head's row chunks, the
    units of one :class:`_Streamer`, in execution order. Weights are read from here on. Build once.
    """

    def __init__(self, layout: _Layout, plan: StreamPlan, budgeted: bool, prefetch: bool) -> None:
        self.layout = layout
        self.plan = plan
        self.budgeted = budgeted  # a max_memory was given
        self.prefetch = prefetch
        self.reader = layout.reader
        self.model = layout.model
        self.streamer = _Streamer([], prefetch)

    def build(self, kv_int8: bool) -> StreamedModel:
        if self.budgeted:
            bound_heap()
        with torch.no_grad():
            self._install_rest()
            self._install_float_embedding()
            self._install_quant_embedding()
            self._install_pinned_blocks()
            self._materialize_computed_buffers()
            self._add_streamed_blocks()
            self._add_float_head()
            self._add_quant_head()
            self.streamer.prefetch = self.prefetch and len(self.streamer.units) > 1
            # Loading touched pages that are not needed now (GGUF: quantized bytes already
            # dequantized; mapped safetensors: headers, pinned blocks not yet run): give them back.
            self.reader.release_all()
            trim_heap()
        self._check_all_filled()
        return self._finish(kv_int8)

    # --- resident parts ---------------------------------------------------------------------------

    def _install_rest(self) -> None:
        """Everything outside the blocks, the head and a row-read embedding, resident."""
        lay = self.layout
        keys = [k for k in lay.rest_keys if not (lay.row_embedding and k == lay.emb_key)]
        _install(self._float_payload(keys, resident=True)[0])
        if lay.resident_q:
            _install(self._quant_payload(lay.resident_q))
            self.reader.release_all()  # the quantized bytes are repacked: their pages can go

    def _install_float_embedding(self) -> None:
        """A float (or GGML) embedding's table: read by rows on lookup, or resident as a view of
        the file."""
        lay = self.layout
        if not lay.row_embedding:
            return
        assert lay.emb_key is not None and lay.emb_name is not None
        name = lay.file_of[lay.emb_key]
        tied_and_pinned = self.plan.head_pinned and lay.tied
        if lay.emb_ggml:
            assert isinstance(lay.emb, QEmbedding) and isinstance(self.reader, _GGUFReader)
            if tied_and_pinned:
                return  # its GGMLWeight is the head's, filled with the pinned head
            if self.budgeted and not self.plan.embedding_pinned:  # rows copied by pread on lookup
                _set_module(self.model, lay.emb_name, _GGMLRowEmbedding(self.reader, name, lay.emb))
            else:
                _install(self._float_payload([lay.emb_key], resident=True)[0])
            return
        assert isinstance(lay.emb, nn.Embedding)
        if self.reader.dequantizes or (self.budgeted and not tied_and_pinned):
            # rows read on lookup (dequantized, or copied by pread: mapping them would map whole
            # page-cache folios, see SafetensorsReader.read_rows)
            row_embedding = _RowEmbedding(self.reader, name, lay.emb)
            _set_module(self.model, lay.emb_name, row_embedding)
        else:  # resident anyway (no budget, or the pinned tied head's): a view of the mapping
            _install(self._float_payload([lay.emb_key])[0])

    def _install_quant_embedding(self) -> None:
        """A row-wise quantized embedding: read by rows on lookup under a budget, else resident;
        tied to a pinned head, it is filled with the head."""
        lay = self.layout
        if lay.qemb_key is None or (self.plan.head_pinned and lay.qemb_key == lay.qhead_key):
            return
        assert lay.qemb_name is not None
        if not self.budgeted:
            _install(self._quant_payload([lay.qemb_key]))
        else:
            _, wspec, names = lay.qweights[lay.qemb_key]
            _set_module(self.model, lay.qemb_name, _QuantRowEmbedding(self.reader, wspec, names))

    def _install_pinned_blocks(self) -> None:
        for i in self.plan.pinned_blocks:
            floats, _ = self._float_payload(self.layout.block_keys[i], resident=True)
            _install(floats + self._quant_payload(self.layout.block_q[i]))

    def _materialize_computed_buffers(self) -> None:
        """Buffers no file holds (rotary tables), computed for the rest of the model only: the
        blocks and a quantized head (and a GGML embedding) are detached meanwhile, as their meta
        weights (quantized ones are buffers) would be zero-filled."""
        lay = self.layout
        detach = [lay.list_name] + ([lay.qhead_name] if lay.qhead_name else [])
        detach += [
            n for n, g in ((lay.head_name, lay.head_ggml), (lay.emb_name, lay.emb_ggml)) if n and g
        ]
        kept = {name: self.model.get_submodule(name) for name in detach}
        for name in detach:
            _set_module(self.model, name, nn.Module())
        try:
            materialize_buffers(self.model)
        finally:
            for name, module in kept.items():
                _set_module(self.model, name, module)

    # --- streamed units ---------------------------------------------------------------------------

    def _add_streamed_blocks(self) -> None:
        """Each block not pinned: a unit, installed by hooks around the block's forward."""
        lay = self.layout
        for i, block in enumerate(lay.blocks):
            if i in self.plan.pinned_blocks:
                continue
            keys, qkeys = lay.block_keys[i], lay.block_q[i]
            fetch = partial(self._fetch_block, keys, qkeys)
            unit = _Unit(f"{lay.list_name}.{i}", self.plan.block_bytes[i], fetch,
                         self._meta_tensors(keys, qkeys))  # fmt: skip
            self.streamer.attach(block, self.streamer.add(unit))

    def _add_float_head(self) -> None:
        """A float (or GGML) head: its weight resident when pinned, else row chunks of it as units
        (a GGML head's chunk: a QLinear over those rows' blocks, consecutive bytes of the file)."""
        lay = self.layout
        if not lay.head_float:
            return
        head = lay.head
        assert lay.head_name is not None and lay.head_key is not None
        wname = lay.file_of[lay.head_key]
        if self.plan.head_pinned:
            if lay.head_ggml:  # a view of the mapping (tied: the embedding's weight too)
                _install(self._float_payload([lay.head_key], resident=True)[0])
            else:
                assert isinstance(head, nn.Linear)
                _install([(head, "weight", "param", self.reader.tensor(wname)[0])])
            return
        assert isinstance(head, (nn.Linear, QLinear))
        streamed = _StreamedHead(self.streamer, head.bias)
        n_out, k = head.out_features, head.in_features
        step = math.ceil(n_out / self.plan.head_chunks)
        for r0, r1 in _row_ranges(n_out, step):
            chunk: nn.Module
            if lay.head_ggml:
                assert isinstance(head, QLinear) and isinstance(head.qweight, GGMLWeight)
                qw = head.qweight
                row_bytes = int(qw.blocks.shape[1])
                meta = torch.empty((r1 - r0, row_bytes), dtype=torch.uint8, device="meta")
                chunk = QLinear(GGMLWeight(meta, qw.ggml_type, (r1 - r0, k)), None)
                owner: nn.Module = chunk.qweight
                slot: tuple[str, str] = ("blocks", "buffer")
                restore: Payload = [(owner, "blocks", "buffer", meta)]
                nbytes = (r1 - r0) * row_bytes  # the stored rows
            else:
                chunk = owner = _WeightChunk()
                slot = ("weight", "param")
                restore = [(chunk, "weight", "param", None)]
                nbytes = (r1 - r0) * k * 4  # float32 rows
            fetch = partial(self._fetch_rows, owner, slot, wname, r0, r1)
            unit = _Unit(f"{lay.head_name}[{r0}:{r1}]", nbytes, fetch, restore)
            streamed.add(chunk, self.streamer.add(unit))
        _set_module(self.model, lay.head_name, streamed)

    def _add_quant_head(self) -> None:
        """A row-wise quantized head: resident when pinned (with a tied embedding, which shares its
        weight), else row chunks of it as units, each a QLinear over those rows."""
        lay = self.layout
        if lay.qhead_key is None:
            return
        assert lay.qhead_name is not None
        if self.plan.head_pinned:
            _install(self._quant_payload([lay.qhead_key]))
            return
        qw, wspec, names = lay.qweights[lay.qhead_key]
        streamed = _StreamedHead(self.streamer, self.model.get_submodule(lay.qhead_name).bias)
        n_out, k = qw.shape
        block = int(wspec.get("block_n") or 1)  # int4 rows interleave within blocks of block_n
        step = math.ceil(math.ceil(n_out / self.plan.head_chunks) / block) * block
        for r0, r1 in _row_ranges(n_out, step):
            cspec = {**wspec, "shape": [r1 - r0, k]}
            qchunk = QLinear(empty_weight(cspec), None)
            fetch = partial(self._fetch_quant_rows, qchunk, cspec, names, r0, r1)
            # every file tensor of the weight has one row per output row
            nbytes = sum(self.reader.ram_bytes(n) * (r1 - r0) // n_out for n in names)
            restore = [(qchunk.qweight, a, "buffer", b) for a, b in qchunk.qweight._buffers.items()]
            unit = _Unit(f"{lay.qhead_name}[{r0}:{r1}]", nbytes, fetch, restore)
            streamed.add(qchunk, self.streamer.add(unit))
        _set_module(self.model, lay.qhead_name, streamed)

    # --- fetches (on the prefetch thread) ---------------------------------------------------------

    def _fetch_block(self, keys: list[str], qkeys: list[str]) -> tuple[Payload, list[Span]]:
        floats, spans = self._float_payload(keys)
        return floats + self._quant_payload(qkeys), _settle(spans)

    def _fetch_rows(
        self, owner: nn.Module, slot: tuple[str, str], wname: str, r0: int, r1: int
    ) -> tuple[Payload, list[Span]]:
        t, spans = self.reader.rows(wname, r0, r1)  # (r1 - r0, H) floats, or (r1 - r0, bytes)
        return [(owner, *slot, t)], _settle(spans)

    def _fetch_quant_rows(
        self, qchunk: QLinear, cspec: dict[str, Any], names: list[str], r0: int, r1: int
    ) -> tuple[Payload, list[Span]]:
        return self._quant_rows(qchunk.qweight, cspec, names, (r0, r1)), []  # copies: no pages

    # --- payloads: what to install where ---------------------------------------------------------

    def _float_payload(self, keys: list[str], resident: bool = False) -> tuple[Payload, list[Span]]:
        """``keys``' tensors read from the file (views of the mapping, or dequantized), and the
        spans of the file that they hold; keys without a tensor in the file are skipped."""
        payload: Payload = []
        spans: list[Span] = []
        for key in keys:
            if key not in self.layout.file_of:
                continue
            t, s = self.reader.tensor(self.layout.file_of[key])
            if resident and self.budgeted and t.nbytes < _COPY_BELOW:
                # A resident view of a small tensor (a norm's weight) maps its neighbours' pages
                # when first read (fault-around, large page-cache folios), and nothing would
                # release them: a copy holds no page of the file.
                t = t.clone()
                release(s)
                s = []
            owner, attr, kind = _owner(self.model, key)
            payload.append((owner, attr, kind, t))
            spans += s
        return payload, spans

    def _quant_payload(self, qkeys: list[str]) -> Payload:
        """The buffers that fill the quantized weights ``qkeys``: copies, holding no mapped page."""
        payload: Payload = []
        for qkey in qkeys:
            qw, wspec, names = self.layout.qweights[qkey]
            payload += self._quant_rows(qw, wspec, names, None)
        return payload

    def _quant_rows(
        self, qw: nn.Module, wspec: dict[str, Any], names: list[str], rows: tuple[int, int] | None
    ) -> Payload:
        """The payload that fills ``qw`` with the weight's rows ``r0:r1`` (None: all of them)."""
        # Own copies, read by pread: mapped codes used in place made a multi-threaded decode much
        # slower, and ATen's int8 kernel faults on codes that are not 64-byte aligned (folders
        # written before memopt aligned its files).
        tensors = {n.rsplit(".", 1)[1]: self.reader.copy(n, rows) for n in names}
        tmp = empty_weight(wspec)
        _fill(tmp, wspec, tensors)
        out: Payload = [(qw, a, "buffer", b) for a, b in tmp._buffers.items()]
        if hasattr(tmp, "block_n"):
            out.append((qw, "block_n", "attr", tmp.block_n))
        return out

    def _meta_tensors(self, keys: list[str], qkeys: list[str]) -> Payload:
        """What is installed now (meta tensors) for ``keys`` and ``qkeys``: a unit's restore."""
        out: Payload = []
        for key in keys:
            owner, attr, kind = _owner(self.model, key)
            value = owner._parameters[attr] if kind == "param" else owner._buffers[attr]
            out.append((owner, attr, kind, value))
        for qkey in qkeys:
            qw = self.layout.qweights[qkey][0]
            out += [(qw, a, "buffer", b) for a, b in qw._buffers.items()]
        return out

    # --- the result -------------------------------------------------------------------------------

    def _check_all_filled(self) -> None:
        """Every tensor left on the meta device belongs to a streamed unit."""
        lay = self.layout
        model = self.model
        left = [
            n
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t is not None
            and t.is_meta
            and not self._streamed(n)
            and not any(
                name and n.startswith(f"{name}.chunks.") for name in (lay.qhead_name, lay.head_name)
            )
        ]
        if left:
            raise MemoptError(f"{lay.source.name}: no weight in the file for {left[0]!r}")

    def _streamed(self, key: str) -> bool:
        block = self.layout.block_of(key)
        return block is not None and block not in self.plan.pinned_blocks

    def _finish(self, kv_int8: bool) -> StreamedModel:
        lay = self.layout
        config = lay.loaded.config
        if kv_int8:
            from memopt.weights.kvcache import use_int8_kv_cache

            use_int8_kv_cache(self.model, config)
        model = self.model.eval()
        out = StreamedModel(LoadedModel(model, lay.loaded.task, lay.source.name, config, lay.source),
                            self.plan)  # fmt: skip
        units = self.streamer.units
        out._streamer = self.streamer if units else None
        if self.budgeted:  # kernels' first calls: no timing of candidates (kernels._UNTIMED)
            out._untimed_before = set_untimed(True)
        if not units:
            self.streamer.close()
        return out


# --------------------------------------------------------------------------------------------------
# Helpers


_COPY_BELOW = 1 << 20  # resident float tensors smaller than this are copied out of the mapping
# quantized formats whose disk tensors all have one row per output row (streamable by rows)
_ROW_FORMATS = ("int8", "int4", "int2", "int3")
_FILL_ROWS = 4096  # int4 rows repacked at a time: a multiple of every kernel row block (32, 64)


def _fill(qw: nn.Module, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """``memopt.weights.quantized.fill_weight``, in row chunks for a large int4 weight.

    Repacking int4 codes into the CPU kernel's row-interleaved layout unpacks all codes first: for
    a large embedding a transient larger than the weight itself. The layout interleaves rows only
    within blocks of 32 or 64, so chunks of ``_FILL_ROWS`` rows give the same bytes (``tests/stream``
    compares with the whole-tensor fill)."""
    n = int(spec["shape"][0])
    if not isinstance(qw, Int4Weight) or n <= _FILL_ROWS:
        fill_weight(qw, tensors)
        return
    k = int(spec["shape"][1])
    g = int(spec["group_size"])
    packed = torch.empty(n, k // 2, dtype=torch.uint8)  # filled chunk by chunk: no concatenation
    scale_zero = torch.empty(k // g, n, 2, dtype=torch.bfloat16)
    block_n = None
    for r0, r1 in _row_ranges(n, _FILL_ROWS):
        part = empty_weight({**spec, "shape": [r1 - r0, k]})
        fill_weight(part, {name: v[r0:r1] for name, v in tensors.items()})
        packed[r0:r1] = part._buffers["packed"]  # (rows, K/2)
        scale_zero[:, r0:r1] = part._buffers["scale_zero"]  # (K/G, rows, 2)
        block_n = part.block_n
    qw._buffers["packed"] = packed
    qw._buffers["scale_zero"] = scale_zero
    qw.block_n = block_n


def _row_ranges(n: int, step: int) -> Iterator[tuple[int, int]]:
    """``(r0, r1)`` over ``range(n)`` in steps of ``step`` rows, the last one possibly shorter."""
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _settle(spans: list[Span]) -> list[Span]:
    """After a fetch: the spans are those of mapped views (copies and dequantized tensors own their
    memory, and their readers gave back what they touched): their pages are populated now, off the
    compute thread, and released after the unit's use."""
    populate(spans)
    return spans


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str, str]:
    """The module that holds ``key``, its attribute and whether a parameter or a buffer."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    kind = "param" if attr in owner._parameters else "buffer"
    return owner, attr, kind


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
