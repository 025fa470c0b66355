"""Run a model under a byte budget: resident what fits, the rest streamed block by block from its file.

The architecture is built on the meta device. Its blocks are the modules of its largest
``nn.ModuleList`` (a transformer's layers); everything else is *the rest* (norms, rotary tables,
position embeddings), loaded once and kept. Two parts of the rest get special care, because in a
small LM they are the largest tensors of all (SmolLM2: 113 MB of 538 MB, the tied embedding):

* the input embedding is read by rows under a budget: a lookup copies only the rows it needs out
  of the file (``pread``, which maps nothing) and, for GGUF or a memopt quantized folder,
  dequantizes only those rows;
* the output head (``get_output_embeddings()``, a float Linear or a memopt QLinear) is a sequence
  of row chunks, each about one block's bytes, streamed like blocks; a linear over a chunk of rows
  computes the same dot products as over all of them (tested bit for bit, float and int4/int8).

The plan (:func:`plan_budget`) pins as many blocks as the budget allows after the rest, the KV cache,
the activations, a runtime reserve and a working set of two streamed units (the one computing and
the one being prefetched); the others are *units* streamed in execution order, cyclically (after the
head's last chunk comes the first streamed block of the next forward). A unit is fetched on a
background thread while the previous one computes: mapped pages are populated
(``MADV_POPULATE_READ``), GGUF blocks dequantized, memopt int4 weights repacked for this CPU's
kernel; the forward pre-hook installs the fetched tensors in the meta block, the forward hook puts
the meta tensors back and releases the unit's pages (``MADV_DONTNEED``): its RSS is given back.

Weights are the same tensors as in memory (views of the same file bytes, or the same dequantization
of the same bytes) and run through the same modules, so the outputs are bit for bit those of the
in-memory model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.heap import bound_heap, trim_heap
from memopt.core.modules import find_blocks
from memopt.core.pages import Span, populate, release
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
from memopt.weights.kernels import set_untimed
from memopt.weights.modules import QEmbedding, QLinear
from memopt.weights.quantized import Int4Weight, disk_layout, empty_weight, fill_weight

__all__ = [
    "RESERVE_BYTES",
    "StreamPlan",
    "StreamedModel",
    "activation_bytes",
    "plan_budget",
    "stream_model",
]

# RSS a streamed run adds beyond the tensors the plan counts: the tokenizer, Python objects of the
# model and its hooks, page tables, the allocator's slack and the mapped file headers. Measured on
# SmolLM2 (bench/stream.py) and rounded up.
RESERVE_BYTES = 24 << 20
# A quantized model needs no more: its first forward brought ~20 MB more than a float model's while
# the kernels timed their candidates at first use (oneDNN's initialization, see memopt.weights.kernels
# _UNTIMED); under a budget they no longer do (SmolLM2 int4 at its smallest budget: 45 MB measured,
# 50 MB predicted).

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
    model_bytes: int  # every weight as it is held in RAM (float32 for GGUF)
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

    @property
    def pinned_bytes(self) -> int:
        return sum(self.block_bytes[i] for i in self.pinned_blocks) + (
            self.head_bytes if self.head_pinned else 0
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
) -> StreamPlan:
    """Pin blocks in order while the budget allows; then the whole head if it fits too."""
    unit = max(blocks) if blocks else 0
    chunks = max(1, math.ceil(head / unit)) if head and unit else (1 if head else 0)
    head_unit = math.ceil(head / chunks) if chunks else 0
    largest = max(unit, head_unit)
    fixed = rest + kv + act + reserve + scratch
    minimum = fixed + 2 * largest
    total = fixed + sum(blocks) + head
    plan = StreamPlan(
        name, budget, rest + sum(blocks) + head, rest, list(blocks), head, chunks, [], False,
        0, 0, kv, act, reserve, minimum, tokens, scratch,
    )  # fmt: skip
    if budget is None or budget >= total:  # everything resident: nothing to stream
        plan.pinned_blocks = list(range(len(blocks)))
        plan.head_pinned = bool(head)
        return plan
    if budget < minimum:
        raise MemoptError(
            f"--max-memory {_mb(budget)} is too small for {name}: the smallest budget that works is "
            f"{_mb(minimum, up=True)} ({_mb(rest)} resident + 2 × {_mb(largest)} streamed blocks + "
            f"{_mb(kv)} KV cache + {_mb(act)} activations + {_mb(reserve + scratch)} runtime)"
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

    def scratch_bytes(self, largest_tensor: int) -> int:
        """Memory beyond the tensors while streaming: none for mapped views."""
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
    """Dequantizes on demand from the GGUF file's mapping (:meth:`GGUFSource.read`), leaving
    torch's thread count alone (a process-wide setting: the compute thread would see it)."""

    dequantizes = True

    def __init__(self, path: Path) -> None:
        from memopt.formats.gguf import GGUFSource

        self.src = GGUFSource(path)
        self.src.drop_metadata()  # the config and tensor table are read: ~30 MB of objects go
        trim_heap()

    def names(self) -> list[str]:
        return self.src.names()

    def ram_bytes(self, name: str) -> int:
        return math.prod(self.src.shape(name)) * 4  # dequantized to float32

    def scratch_bytes(self, largest_tensor: int) -> int:
        # Dequantizing a tensor makes ~3 float temporaries of its size (codes, scaled codes, the
        # result), and the parsed header leaves ~12 MB of objects behind (measured on SmolLM2).
        return 3 * largest_tensor + (12 << 20)

    def release_all(self) -> None:
        release([_span(*self.src.region())])

    def tensor(self, name: str) -> tuple[torch.Tensor, list[Span]]:
        return self.src.read(name), [_span(*self.src.region(name))]

    def rows(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, list[Span]]:
        out = self.src.read(name, slice(r0, r1))  # (r1 - r0, K)
        start, length = self.src.region(name)
        per_row = length // self.src.shape(name)[0]  # quantized rows: equal runs of blocks
        return out, [Span(start + r0 * per_row, start + r1 * per_row)]

    def gather(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        out = self.src.read(name, idx)  # (*idx.shape, H): only the rows asked for
        # the rows are dequantized copies: the pages (whole folios) the lookup mapped can go
        release([_span(*self.src.region(name))])
        return out


def _span(address: int, length: int) -> Span:
    return Span(address, address + length)


# --------------------------------------------------------------------------------------------------
# Units and the prefetching streamer


@dataclass
class _Unit:
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
    def __init__(self, units: list[_Unit], prefetch: bool) -> None:
        self.units = units
        self.prefetch = prefetch and len(units) > 1
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="memopt-prefetch")
        self.pending: dict[int, Future] = {}
        self.stats = StreamStats()
        self.lock = threading.Lock()

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
    ``block_n`` on disk are read a whole block (64 rows, 18 KB at SmolLM2's width) at a time."""

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
# Building a streamed model


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


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str, str]:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    kind = "param" if attr in owner._parameters else "buffer"
    return owner, attr, kind


def _match(name: str, targets: dict[str, Any]) -> str | None:
    return match_key(name, targets)


def _meta_model(source: ModelSource) -> tuple[LoadedModel, dict[str, Any] | None]:
    manifest = None
    if source.kind == "memopt":
        manifest = read_manifest(source.path)
    return build_meta(source), manifest


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for n, m in model.named_modules():
        if m is module:
            return n
    return None


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
    out = _build(
        spec, max_memory, tokens, batch, prompt_tokens, True, reserve_bytes, kv_int8, dry=True
    )
    assert isinstance(out, StreamPlan)
    return out


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
    ``kv_int8``: keep the KV cache as int8 (:mod:`memopt.weights.kvcache`; ~3.8× smaller, outputs no
    longer bit-identical).
    """
    out = _build(spec, max_memory, tokens, batch, prompt_tokens, prefetch, reserve_bytes, kv_int8)
    assert isinstance(out, StreamedModel)
    return out


def _build(
    spec: str | Path | ModelSource,
    max_memory: int | None,
    tokens: int,
    batch: int,
    prompt_tokens: int | None,
    prefetch: bool,
    reserve_bytes: int,
    kv_int8: bool = False,
    dry: bool = False,
) -> StreamPlan | StreamedModel:
    source = spec if isinstance(spec, ModelSource) else resolve(spec)
    loaded, manifest = _meta_model(source)
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

    # tensors of the model -> names in the file
    targets: dict[str, Any] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    file_of: dict[str, str] = {}
    qweights: dict[
        str, tuple[nn.Module, dict[str, Any], list[str]]
    ] = {}  # key -> (qw, spec, names)
    if manifest is not None:
        for key, wspec in manifest["weights"].items():
            qw = model.get_submodule(key)
            qweights[key] = (qw, wspec, [f"{key}.{s}" for s in disk_layout(wspec)])
        quant_files = {n for _, _, names in qweights.values() for n in names}
        for n in manifest["tensors"]:
            if n not in quant_files:
                file_of[n] = n
        for alias, first in manifest["aliases"].items():
            file_of[alias] = first
    else:
        for n in reader.names():
            key = _match(n, targets)
            if key is not None:
                file_of[key] = n
    # a tied head that the file does not hold reads the input embedding's tensor
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_name = _module_name(model, emb) if isinstance(emb, nn.Embedding) else None
    head_name = _module_name(model, head) if type(head) is nn.Linear else None
    tied = head_name and emb_name and f"{head_name}.weight" not in file_of
    if tied and f"{emb_name}.weight" in file_of:
        file_of[f"{head_name}.weight"] = file_of[f"{emb_name}.weight"]

    def in_block(key: str) -> int | None:
        if not key.startswith(list_name + "."):
            return None
        return int(key[len(list_name) + 1 :].split(".", 1)[0])

    block_keys: list[list[str]] = [[] for _ in blocks]
    block_q: list[list[str]] = [[] for _ in blocks]
    rest_keys: list[str] = []
    for key in targets:
        if key.startswith(tuple(f"{q}." for q in qweights)):
            continue  # quantized weights' buffers: filled through their weight
        b = in_block(key)
        if b is not None:
            block_keys[b].append(key)
        elif head_name and key == f"{head_name}.weight":
            pass
        else:
            rest_keys.append(key)
    rest_q: list[str] = []
    for qkey in qweights:
        b = in_block(qkey)
        (rest_q if b is None else block_q[b]).append(qkey)
    head_float = bool(head_name) and f"{head_name}.weight" in file_of
    if head_name and not head_float:
        rest_keys.append(f"{head_name}.weight")
    # A memopt folder's quantized head and embedding (SmolLM2 int4: one tied 15.9 MB weight, 21 %
    # of the model) are planned as the float ones are: under a budget the head streams in row
    # chunks unless pinned, and the embedding is read by rows. Sparse (pruned) formats stay resident.
    qhead_name = qhead_key = qemb_name = qemb_key = None
    if manifest is not None:

        def rowwise(module: nn.Module | None, cls: type) -> tuple[str | None, str | None]:
            name = _module_name(model, module) if isinstance(module, cls) else None
            key = manifest["modules"].get(name, {}).get("weight") if name else None
            if key in rest_q and qweights[key][1]["format"] in _ROW_FORMATS:
                return name, key
            return None, None

        qhead_name, qhead_key = rowwise(head, QLinear)
        qemb_name, qemb_key = rowwise(emb, QEmbedding)
    resident_q = [q for q in rest_q if q not in (qhead_key, qemb_key)]

    unfilled = [k for keys in block_keys for k in keys if k not in file_of]
    if unfilled:
        raise MemoptError(
            f"{source.name}: {unfilled[0]!r} is computed, not stored; streaming blocks that own "
            "such buffers is not supported"
        )

    def ram(key: str) -> int:
        return reader.ram_bytes(file_of[key]) if key in file_of else 0

    def qram(qkey: str) -> int:
        return sum(reader.ram_bytes(n) for n in qweights[qkey][2])

    emb_key = f"{emb_name}.weight" if emb_name else None
    row_embedding = emb_key is not None and emb_key in file_of and emb_key not in block_keys
    seen_files: set[str] = set()
    rest_bytes = 0
    for key in rest_keys:
        if key in file_of and file_of[key] in seen_files:
            continue  # tied / aliased: one tensor
        if row_embedding and key == emb_key:
            continue  # read by rows: only the rows a lookup needs are ever touched
        seen_files.add(file_of.get(key, key))
        rest_bytes += ram(key)
    rest_bytes += sum(qram(q) for q in resident_q)
    block_bytes = [sum(ram(k) for k in block_keys[i]) + sum(qram(q) for q in block_q[i])
                   for i in range(len(blocks))]  # fmt: skip
    head_bytes = ram(f"{head_name}.weight") if head_float else qram(qhead_key) if qhead_key else 0
    config = loaded.config
    itemsize = 4
    largest_tensor = max(
        [ram(k) for keys in block_keys for k in keys] + [qram(q) for qs in block_q for q in qs],
        default=0,
    )
    kv_size = 1 if kv_int8 else itemsize
    # the full cache plus one layer's K and V again (the cache grows by torch.cat: old and new
    # live for a moment)
    kv = kv_cache_bytes(config, tokens, batch, kv_size, 1) if loaded.task == "causal-lm" else 0
    act = activation_bytes(config, prompt_tokens or tokens, batch, itemsize)
    plan = _plan(
        source.name, max_memory, rest_bytes, block_bytes, head_bytes, kv, act,
        reserve_bytes if max_memory is not None else 0, tokens,
        reader.scratch_bytes(largest_tensor) if max_memory is not None else 0,
    )  # fmt: skip
    if dry:
        return plan
    if max_memory is not None:
        bound_heap()

    # --- from here on, weights are read ------------------------------------------------------
    def float_payload(keys: list[str], resident: bool = False) -> tuple[Payload, list[Span]]:
        payload: Payload = []
        spans: list[Span] = []
        for key in keys:
            if key not in file_of:
                continue
            t, s = reader.tensor(file_of[key])
            if resident and max_memory is not None and t.nbytes < _COPY_BELOW:
                # A resident view of a small tensor (a norm's 2.3 KB) maps its neighbours' pages
                # when first read (fault-around, large page-cache folios), and nothing releases
                # them: SmolLM2 int4 at 76 MB held 11 MB of its pinned blocks' codes mapped so.
                t = t.clone()
                release(s)
                s = []
            owner, attr, kind = _owner(model, key)
            payload.append((owner, attr, kind, t))
            spans += s
        return payload, spans

    def quant_payload(qkeys: list[str]) -> tuple[Payload, list[Span]]:
        payload: Payload = []
        for qkey in qkeys:
            qw, wspec, names = qweights[qkey]
            payload += quant_rows(qw, wspec, names, None)
        return payload, []  # the codes are copies: no mapped pages held

    def quant_rows(
        qw: nn.Module, wspec: dict[str, Any], names: list[str], rows: tuple[int, int] | None
    ) -> Payload:
        """The payload that fills ``qw`` with the weight's rows ``r0:r1`` (None: all of them)."""
        # Own copies, read by pread: used in place, the mapped codes made a 2-thread decode 5x
        # slower (SmolLM2 int4 at 80 MB: 0.6-0.8 tok/s against 3.9 with copies, measured; 1
        # thread: no difference), and ATen's int8 kernel faults on codes that are not 64-byte
        # aligned (folders written before memopt aligned its files).
        tensors = {n.rsplit(".", 1)[1]: reader.copy(n, rows) for n in names}
        tmp = empty_weight(wspec)
        _fill(tmp, wspec, tensors)
        out: Payload = [(qw, a, "buffer", b) for a, b in tmp._buffers.items()]
        if hasattr(tmp, "block_n"):
            out.append((qw, "block_n", "attr", tmp.block_n))
        return out

    def snapshot(keys: list[str], qkeys: list[str]) -> Payload:
        out: Payload = []
        for key in keys:
            owner, attr, kind = _owner(model, key)
            value = owner._parameters[attr] if kind == "param" else owner._buffers[attr]
            out.append((owner, attr, kind, value))
        for qkey in qkeys:
            qw = qweights[qkey][0]
            out += [(qw, a, "buffer", b) for a, b in qw._buffers.items()]
        return out

    with torch.no_grad():
        # the rest, resident
        rest_payload, _ = float_payload(
            [k for k in rest_keys if not (row_embedding and k == emb_key)], resident=True
        )
        _install(rest_payload)
        if resident_q:
            _install(quant_payload(resident_q)[0])
            reader.release_all()  # the quantized bytes are repacked: their pages can go
        if row_embedding:
            assert emb_key is not None and emb_name is not None and isinstance(emb, nn.Embedding)
            tied_and_pinned = (
                plan.head_pinned and file_of.get(f"{head_name}.weight") == (file_of[emb_key])
            )
            if reader.dequantizes or (max_memory is not None and not tied_and_pinned):
                # rows read on lookup (dequantized, or copied by pread: mapping them would map
                # whole page-cache folios, see SafetensorsReader.read_rows)
                _set_module(model, emb_name, _RowEmbedding(reader, file_of[emb_key], emb))
            else:  # resident anyway (no budget, or the pinned tied head's): a view of the mapping
                _install(float_payload([emb_key])[0])
        if qemb_key is not None and not (plan.head_pinned and qemb_key == qhead_key):
            assert qemb_name is not None  # (tied to a pinned head: filled with the head)
            if max_memory is None:
                _install(quant_payload([qemb_key])[0])
            else:
                _, wspec, names = qweights[qemb_key]
                _set_module(model, qemb_name, _QuantRowEmbedding(reader, wspec, names))
        # pinned blocks, resident
        for i in plan.pinned_blocks:
            p1, _ = float_payload(block_keys[i], resident=True)
            p2, _ = quant_payload(block_q[i])
            _install(p1 + p2)
        # Buffers no file holds (rotary tables) are computed for the rest of the model only, the
        # blocks and a quantized head detached: their meta weights (quantized ones are buffers)
        # would be zero-filled (SmolLM2 int4's head: 16 MB).
        detach = [list_name] + ([qhead_name] if qhead_name else [])
        kept = {name: model.get_submodule(name) for name in detach}
        for name in detach:
            _set_module(model, name, nn.Module())
        try:
            materialize_buffers(model)
        finally:
            for name, module in kept.items():
                _set_module(model, name, module)
        # streamed units: the other blocks, then the head's chunks
        streamer = _Streamer([], prefetch)
        units = streamer.units
        for i in range(len(blocks)):
            if i in plan.pinned_blocks:
                continue
            keys, qkeys = block_keys[i], block_q[i]

            def fetch(
                keys: list[str] = keys, qkeys: list[str] = qkeys
            ) -> tuple[Payload, list[Span]]:
                p1, s1 = float_payload(keys)
                p2, s2 = quant_payload(qkeys)
                return p1 + p2, _settle(reader, s1 + s2)

            units.append(_Unit(f"{list_name}.{i}", block_bytes[i], fetch, snapshot(keys, qkeys)))
            _attach(blocks[i], streamer, len(units) - 1)
        if head_float:
            assert head_name is not None and isinstance(head, nn.Linear)
            wname = file_of[f"{head_name}.weight"]
            if plan.head_pinned:
                _install([(head, "weight", "param", reader.tensor(wname)[0])])
            else:
                new = _StreamedHead(streamer, head.bias)
                step = math.ceil(head.out_features / plan.head_chunks)
                for r0 in range(0, head.out_features, step):
                    r1 = min(head.out_features, r0 + step)
                    chunk = _WeightChunk()

                    def fetch_rows(
                        r0: int = r0, r1: int = r1, chunk: nn.Module = chunk
                    ) -> tuple[Payload, list[Span]]:
                        t, spans = reader.rows(wname, r0, r1)  # (r1 - r0, H)
                        return [(chunk, "weight", "param", t)], _settle(reader, spans)

                    nbytes = (r1 - r0) * head.in_features * 4
                    restore: Payload = [(chunk, "weight", "param", None)]
                    units.append(_Unit(f"{head_name}[{r0}:{r1}]", nbytes, fetch_rows, restore))
                    new.add(chunk, len(units) - 1)
                _set_module(model, head_name, new)
        if qhead_key is not None:
            assert qhead_name is not None
            qw, wspec, names = qweights[qhead_key]
            if plan.head_pinned:  # (a tied embedding shares the weight: filled at once)
                _install(quant_payload([qhead_key])[0])
            else:
                new = _StreamedHead(streamer, model.get_submodule(qhead_name).bias)
                n_out, k = qw.shape
                block = int(wspec.get("block_n") or 1)  # int4 rows interleave within blocks
                step = math.ceil(math.ceil(n_out / plan.head_chunks) / block) * block
                for r0 in range(0, n_out, step):
                    r1 = min(n_out, r0 + step)
                    cspec = {**wspec, "shape": [r1 - r0, k]}
                    qchunk = QLinear(empty_weight(cspec), None)

                    def fetch_qrows(
                        r0: int = r0, r1: int = r1, cspec: dict[str, Any] = cspec,
                        qchunk: QLinear = qchunk,
                    ) -> tuple[Payload, list[Span]]:  # fmt: skip
                        return quant_rows(qchunk.qweight, cspec, names, (r0, r1)), []

                    nbytes = sum(
                        reader.ram_bytes(n) * (r1 - r0) // n_out for n in names
                    )  # every disk tensor of the weight has one row per output row
                    restore = [(qchunk.qweight, a, "buffer", b)
                               for a, b in qchunk.qweight._buffers.items()]  # fmt: skip
                    units.append(_Unit(f"{qhead_name}[{r0}:{r1}]", nbytes, fetch_qrows, restore))
                    new.add(qchunk, len(units) - 1)
                _set_module(model, qhead_name, new)
        streamer.prefetch = prefetch and len(units) > 1
        # Loading touched pages that are not needed now (GGUF: quantized bytes already dequantized;
        # mapped safetensors: headers, pinned blocks not yet run): give them all back.
        reader.release_all()
        trim_heap()
    left = [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t is not None
        and t.is_meta
        and not _is_streamed(n, list_name, plan, len(blocks))
        and not (qhead_name and n.startswith(f"{qhead_name}.chunks."))
    ]
    if left:
        raise MemoptError(f"{source.name}: no weight in the file for {left[0]!r}")
    if kv_int8:
        from memopt.weights.kvcache import use_int8_kv_cache

        use_int8_kv_cache(model, config)
    out = StreamedModel(LoadedModel(model.eval(), loaded.task, source.name, config, source), plan)
    out._streamer = streamer if units else None
    if max_memory is not None:  # kernels' first calls: no timing of candidates (kernels._UNTIMED)
        out._untimed_before = set_untimed(True)
    if not units:
        streamer.close()
    return out


def _is_streamed(name: str, list_name: str, plan: StreamPlan, n_blocks: int) -> bool:
    if not name.startswith(list_name + "."):
        return False
    return int(name[len(list_name) + 1 :].split(".", 1)[0]) not in plan.pinned_blocks


_COPY_BELOW = 1 << 20  # resident float tensors smaller than this are copied out of the mapping
# quantized formats whose disk tensors all have one row per output row (streamable by rows)
_ROW_FORMATS = ("int8", "int4", "int2", "int3")
_FILL_ROWS = 4096  # int4 rows repacked at a time: a multiple of every kernel row block (32, 64)


def _fill(qw: nn.Module, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """``memopt.models.saved.fill_weight``, in row chunks for a large int4 weight.

    Repacking int4 codes into the CPU kernel's row-interleaved layout unpacks all codes first: for
    SmolLM2's 49152 × 576 embedding a ~70 MB transient, more than the weight itself. The layout
    interleaves rows only within blocks of 32 or 64, so chunks of 4096 rows give the same bytes
    (``tests/stream`` compares with the whole-tensor fill)."""
    n = int(spec["shape"][0])
    if not isinstance(qw, Int4Weight) or n <= _FILL_ROWS:
        fill_weight(qw, tensors)
        return
    k = int(spec["shape"][1])
    g = int(spec["group_size"])
    packed = torch.empty(n, k // 2, dtype=torch.uint8)  # filled chunk by chunk: no concatenation
    scale_zero = torch.empty(k // g, n, 2, dtype=torch.bfloat16)
    block_n = None
    for r0 in range(0, n, _FILL_ROWS):
        r1 = min(n, r0 + _FILL_ROWS)
        part = empty_weight({**spec, "shape": [r1 - r0, k]})
        fill_weight(part, {name: v[r0:r1] for name, v in tensors.items()})
        packed[r0:r1] = part._buffers["packed"]  # (rows, K/2)
        scale_zero[:, r0:r1] = part._buffers["scale_zero"]  # (K/G, rows, 2)
        block_n = part.block_n
    qw._buffers["packed"] = packed
    qw._buffers["scale_zero"] = scale_zero
    qw.block_n = block_n


def _settle(reader: _Reader, spans: list[Span]) -> list[Span]:
    """After a fetch: dequantized tensors own their memory, so the quantized bytes' pages go back
    now; mapped views need their pages, so those are populated now, off the compute thread."""
    if reader.dequantizes:
        release(spans)
        return []
    populate(spans)
    return spans


def _attach(block: nn.Module, streamer: _Streamer, unit: int) -> None:
    """Install the unit's weights before the block runs and give them back after."""

    def pre(_m: nn.Module, _args: Any) -> None:
        streamer.acquire(unit)

    def post(_m: nn.Module, _args: Any, _out: Any) -> None:
        streamer.release(unit)

    block.register_forward_pre_hook(pre)
    block.register_forward_hook(post)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
