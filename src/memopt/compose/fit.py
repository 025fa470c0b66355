"""``memopt fit``: the best model that fits a memory budget, chosen by measurement, proven by one.

For inference (``generate``: greedy decoding with the KV cache, through the decode engine), the
plan gives every *unit* of the model (in each transformer block, its Linears of one input width;
the embedding and the output head, tied or not) one weight format from a menu (float32, int8 per
channel, int4 in groups of 128, 64 or 32, int3 / int2). Its three parts:

* **bytes**, exact from the shapes (the formats' byte layouts), plus what the run holds besides
  the weights: the KV cache of the asked positions, the engine's scratch, the runtime's own
  (memopt.engine.runtime's measured figures) and an int4 embedding's load transient;
* **quality cost**, measured once per model on calibration text (:func:`sensitivities`): the
  mean KL divergence of the next-token distribution from the float model's when only that unit
  is rounded to nearest (the proxy of the applied GPTQ, which keeps a block Linear's RTN codes
  unless its own make a smaller output error; GPTQ per unit and format would cost an apply's
  calibration several times over), measured in one format per
  block unit and scaled to the others by their output errors on the calibration inputs; costs
  are additive;
* **the choice**: a multiple-choice knapsack over the units, solved exactly by dynamic programming
  over bytes (in steps of :data:`BYTES_STEP`): the least total cost whose bytes fit the budget;
  then refined by measurement (:mod:`memopt.compose.fit_refine`, not for ``--plan-only``): a few
  dozen whole plans within the same bytes (the knapsack's, the uniform recipes that fit, local
  moves), each the KL of the whole quantized model on calibration windows, the best kept.

Then the plan is applied from the source file without the float model (streamed quantization
with a per-module config, GPTQ where int4), saved as a memopt folder, and the run the user asked
for is measured in a fresh process: peak RSS over its import baseline against the budget,
perplexity on held-out text against the float model, tokens/s. A measured peak over the budget
shrinks the weights' share by the excess and plans again (up to :data:`REVISIONS` times); a budget
no plan can meet is refused in one line naming the smallest that would do.

Training (``train``) searches the training options instead (checkpointing, the chunked loss,
8-bit AdamW, bfloat16 with float32 masters, gradient accumulation at the same global batch, FSDP2
ranks when allowed) with the estimator, and trains the fastest predicted set that fits for N steps
against plain float32 AdamW, each in a child: :mod:`memopt.compose.fit_train`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from memopt.core.atomic import releases_outputs
from memopt.core.errors import MemoptError
from memopt.core.modules import find_blocks
from memopt.core.units import parse_size
from memopt.engine.runtime import INT4_EMBEDDING_TRANSIENT, RUNTIME_BYTES, RUNTIME_INT4_BYTES
from memopt.formats.fit_plan import fitted_run

# The refinement after the knapsack (memopt.compose.fit_refine): whole plans measured at most
# (each one forward of the windows from the first block it changes), and the windows of memopt's
# calibration text they are measured on by default (more than the 4 of GPTQ and the
# sensitivities: the plans it chooses among are a few thousandths of a nat apart)
REFINE_EVALS = 32
REFINE_SEQUENCES = 16

__all__ = [
    "BYTES_STEP",
    "FORMATS",
    "ENGINE_FORMATS",
    "INT4_EMBEDDING_TRANSIENT",
    "REFINE_EVALS",
    "REFINE_SEQUENCES",
    "REVISION_MARGIN",
    "RUNTIME_BYTES",
    "RUNTIME_FULL_BYTES",
    "RUNTIME_INT4_BYTES",
    "PATHS",
    "Budget",
    "Plan",
    "Unit",
    "Calibrated",
    "accumulate_h",
    "choose",
    "costs",
    "fit",
    "fitted_run",
    "format_bytes",
    "has_weights",
    "inference_result",
    "kv_int8_cost",
    "kv_int8_kl",
    "mixed_config",
    "other_bytes",
    "parse_format",
    "plan_inference",
    "rtn",
    "sensitivities",
    "smallest_weights",
    "reference_format",
    "too_small",
    "units_of",
]

# The weight formats of the menu, largest first. "int4-gN": int4 in groups of N, calibrated by
# GPTQ; "int3-g32" / "int2-g32": 3 and 2 bits in groups of
# 32, round to nearest with a float16 scale and offset (the smallest plans; their KL costs keep
# them off every layer that matters).
FORMATS = ("float32", "int8", "int4-g32", "int4-g64", "int4-g128", "int3-g32", "int2-g32")
# What memopt's decode engine runs (memopt.engine); a plan with int3 / int2 takes transformers'
# forward instead. Each path has its own runtime (RUNTIME): plan_inference solves each path's menu
# with its runtime and keeps the best plan that fits.
ENGINE_FORMATS = FORMATS[:5]

# What a generation run holds beyond weights, KV cache and scratch, over the run's import
# baseline: memopt.engine.runtime's figures for the engine (float32 / int8: RUNTIME_BYTES; int4:
# RUNTIME_INT4_BYTES, and an int4 embedding's transient counted in that unit's int4 bytes so that
# the knapsack weighs it); transformers' forward (a plan with int3 / int2) holds 160 MB beyond
# weights and KV (bench/fit.py's uniform rows). A run that shows more revises its path's figure.
RUNTIME_FULL_BYTES = 160 << 20
# The paths: (name, formats its plans may use, its default runtime)
PATHS = (
    ("engine", ("float32", "int8"), RUNTIME_BYTES),
    ("engine-int4", ENGINE_FORMATS, RUNTIME_INT4_BYTES),
    ("transformers", FORMATS, RUNTIME_FULL_BYTES),
)
BYTES_STEP = 1 << 12  # the knapsack's resolution: 4 KiB (a unit rounds up by less than that)
REVISIONS = 5
REVISION_MARGIN = 1 << 20  # added to a revision's excess: a run's peak varies by some 100 KB


@dataclass(frozen=True)
class Budget:
    """Bytes the run may add over the runtime's own baseline; or, with ``total``, the whole
    process's peak (the baseline, measured, is then subtracted)."""

    bytes: int
    total: bool = False

    @classmethod
    def parse(cls, text: str | int, total: bool = False) -> Budget:
        return cls(parse_size(text), total)


@dataclass
class Unit:
    """A part of the model that gets one format: a block's Linears of one input width, or an
    embedding / head."""

    name: str  # "model.layers.3 K=576" (a block's Linears of 576 inputs), or a module's name
    patterns: list[str]  # the names of the modules it covers (a tied weight: each of its modules)
    shapes: list[tuple[int, int]]  # (N, K) of each weight it holds (a tied weight once)
    # format -> bytes, for the formats that change this unit (a group that does not divide a
    # weight's K leaves it float: that format is not offered)
    bytes: dict[str, int] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)  # format -> quality cost (0: float)
    block: int | None = None  # the index of the block it lies in (None: outside the blocks)
    # format -> bytes the run holds for a while beyond ``bytes`` (an int4 embedding's load
    # transient): the knapsack counts them, the weights' bytes do not
    transient: dict[str, int] = field(default_factory=dict)

    def held(self, fmt: str) -> int:
        """What the plan must make room for when this unit takes ``fmt``."""
        return self.bytes[fmt] + self.transient.get(fmt, 0)


@dataclass
class Plan:
    """The chosen formats, and what they are predicted to cost."""

    task: str
    formats: dict[str, str]  # unit -> format
    weight_bytes: int
    fixed_bytes: int  # weights outside the units (norms, rotary tables)
    kv_bytes: int
    scratch_bytes: int
    runtime_bytes: int
    predicted_cost: float
    predicted_peak_bytes: int
    options: dict[str, Any] = field(default_factory=dict)  # training: the chosen options
    path: str = "engine"  # generation: the PATHS entry whose menu and runtime the plan took
    transient_bytes: int = 0  # the units' load transients (Unit.transient), in the peak
    kv_int8: bool = False  # generation: the engine's KV cache as int8 (its cost in predicted_cost)

    @property
    def engine(self) -> bool:
        """Every format one that memopt's decode engine runs."""
        return self.path != "transformers"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Bytes


def parse_format(fmt: str) -> tuple[int, int | None]:
    """``(bits, group or None)`` of a menu format: "int4-g64" -> (4, 64), "int8" -> (8, None),
    "float32" -> (32, None). MemoptError for a name not on the menu."""
    if fmt not in FORMATS:
        raise MemoptError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "float32":
        return 32, None
    if fmt == "int8":
        return 8, None
    bits, group = fmt.split("-")
    return int(bits[3:]), int(group[1:])


def format_bytes(fmt: str, n: int, k: int) -> int:
    """Bytes of an (N, K) weight in ``fmt`` as memopt holds it (exact: the weight kinds' layouts)."""
    bits, g = parse_format(fmt)
    if fmt == "float32":
        return 4 * n * k
    if fmt == "int8":
        return n * k + 4 * n  # codes + a float32 scale per output channel
    assert g is not None
    if k % g:
        return 4 * n * k  # the group does not divide: the weight stays float
    # codes + a 2-byte scale and zero / offset per group (bfloat16 for int4, float16 below)
    return n * k * bits // 8 + 2 * 2 * n * (k // g)


def units_of(model: nn.Module, decode_engine: bool = False) -> list[Unit]:
    """The units of a model with a block list: in each block, its Linears of one input width K
    (a group size must divide K: the widths differ in what they allow, e.g. the MLP's down
    projection takes groups of 128 where the others do not), then every Linear or Embedding
    outside the blocks (the embedding and head: one unit when tied). ``decode_engine``: the plan
    runs on memopt's decode engine, which holds an int4 embedding's load transient (counted)."""
    found = find_blocks(model)
    if found is None:
        raise MemoptError(f"{type(model).__name__}: no list of blocks to plan (fit needs one)")
    prefix, blocks = found
    units = []
    for i, block in enumerate(blocks):
        by_k: dict[int, list[tuple[str, nn.Linear]]] = {}
        for nm, m in block.named_modules():
            if isinstance(m, nn.Linear):
                by_k.setdefault(m.in_features, []).append((f"{prefix}.{i}.{nm}", m))
        for k, mods in by_k.items():
            name = f"{prefix}.{i}" + (f" K={k}" if len(by_k) > 1 else "")
            units.append(Unit(name, [nm for nm, _ in mods],
                              [tuple(m.weight.shape) for _, m in mods], block=i))  # fmt: skip
    by_weight: dict[int, Unit] = {}
    for name, m in model.named_modules():
        if name.startswith(prefix + ".") or not isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        key = id(m.weight)
        if key in by_weight:  # tied to a unit already made: one weight, one format
            by_weight[key].patterns.append(name)
            continue
        unit = Unit(name, [name], [tuple(m.weight.shape)])
        by_weight[key] = unit
        units.append(unit)
    embeddings = {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for u in units:
        u.bytes = {}
        for f in FORMATS:
            bits, g = parse_format(f)
            if g is not None and any(k % g for _, k in u.shapes):
                continue  # the group does not divide a weight's K: not offered
            u.bytes[f] = sum(format_bytes(f, n, k) for n, k in u.shapes)
            if decode_engine and bits == 4 and embeddings.intersection(u.patterns):
                u.transient[f] = math.ceil(u.bytes["float32"] * INT4_EMBEDDING_TRANSIENT)
        u.cost = dict.fromkeys(u.bytes, 0.0)
    return units


def other_bytes(model: nn.Module, units: list[Unit]) -> int:
    """Bytes of the parameters and buffers that no unit covers (norms, rotary tables), float."""
    covered = {id(m.weight) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Embedding))}  # fmt: skip
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in covered or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * 4
    return total


# --------------------------------------------------------------------------------------------------
# Quality costs


def rtn(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` (N, K) rounded through ``fmt`` by round-to-nearest (the costs' proxy of GPTQ)."""
    from memopt.weights.quantized import Int4Weight, Int8Weight, IntNWeight

    bits, g = parse_format(fmt)
    if fmt == "float32":
        return w
    if fmt == "int8":
        return Int8Weight(w).dequantize(torch.float32)
    assert g is not None
    if w.shape[1] % g:
        return w
    if bits == 4:
        return Int4Weight(w, g).dequantize(torch.float32)
    return IntNWeight(w, bits, g, symmetric=False).dequantize(torch.float32)


@dataclass
class Calibrated:
    """A float model and its calibration pass: the inputs of every block on ``ids`` (B, T)
    (``inputs[i]``: block i's; ``inputs[-1]``: what the last block's outputs would give a next
    one), what the sensitivities start from."""

    model: nn.Module
    prefix: str
    blocks: nn.ModuleList
    ids: torch.Tensor
    inputs: list[list[tuple[tuple, dict]]]
    as_tuple: bool

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, ids: torch.Tensor) -> Calibrated:
        from memopt.quant.calibrate import capture_inputs, next_inputs

        prefix, blocks = find_blocks(model)
        inputs = [capture_inputs(model, blocks[0], ids, ids.shape[0])]
        for block in blocks:
            outs = [block(*a, **k) for a, k in inputs[-1]]
            inputs.append(next_inputs(inputs[-1], outs))
        return cls(model, prefix, blocks, ids, inputs, isinstance(outs[0], (tuple, list)))

    @contextlib.contextmanager
    def rounded(self, unit: Unit, fmt: str) -> Iterator[None]:
        """The unit's weights rounded through ``fmt`` (round to nearest) inside the block."""
        saved: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        for name, m in self.model.named_modules():
            if name in unit.patterns and id(m.weight) not in saved:
                saved[id(m.weight)] = (m, m.weight.data)
                m.weight.data = rtn(m.weight.data.float(), fmt).to(m.weight.dtype)
        try:
            yield
        finally:
            for m, data in saved.values():
                m.weight.data = data

    @torch.no_grad()
    def output_errors(self, units: list[Unit]) -> dict[str, dict[str, float]]:
        """unit -> format -> the summed squared error its rounded weights make in their Linears'
        outputs on the calibration inputs, ``sum tr(dW H dW^T)`` (H = sum of x x^T of each Linear's
        inputs), for the units inside the blocks. One pass of each block (its H captured by
        hooks, then dropped: one block's at a time)."""
        out: dict[str, dict[str, float]] = {}
        for i, block in enumerate(self.blocks):
            mine = [u for u in units if u.block == i]
            base = f"{self.prefix}.{i}."
            lins = {base + nm: m for nm, m in block.named_modules() if isinstance(m, nn.Linear)}
            hs: dict[str, torch.Tensor] = {}
            handles = [m.register_forward_pre_hook(accumulate_h(n, hs)) for n, m in lins.items()]
            try:
                for a, k in self.inputs[i]:
                    block(*a, **k)
            finally:
                for h in handles:
                    h.remove()
            for u in mine:
                errs = {}
                for f in u.bytes:
                    e = 0.0
                    for name in u.patterns:
                        w = lins[name].weight.detach().float()  # (N, K)
                        d = rtn(w, f) - w
                        e += float(((d @ hs[name]) * d).sum())
                    errs[f] = e
                out[u.name] = errs
        return out


def accumulate_h(name: str, hs: dict[str, torch.Tensor]) -> Callable[..., None]:
    """A forward pre-hook for a Linear that adds ``x^T x`` of its inputs to ``hs[name]`` (K, K):
    the Hessian of its output error that GPTQ and the output errors weigh by."""

    def pre(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, mod.in_features).float()  # (M, K)
        if name not in hs:
            hs[name] = torch.zeros(mod.in_features, mod.in_features)  # (K, K)
        hs[name].addmm_(x.t(), x)

    return pre


@torch.no_grad()
def sensitivities(
    loaded: Any,
    units: list[Unit],
    ids: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill each unit's ``cost``: the mean KL divergence (nats a token) of the model's next-token
    distribution on ``ids (B, T)`` from the float model's when only that unit is rounded to each
    format. The float model is ``loaded`` (changed during the call, restored after).

    A unit outside the blocks (the embedding, the head) is measured in every format. A block's
    unit is measured in one, its *reference*: its int4 format of the largest group (the largest
    error of the engine's menu); its other formats' costs scale that by their output errors
    (:meth:`Calibrated.output_errors`), KL_f = KL_ref x E_f / E_ref. A small perturbation's KL is
    quadratic in it, as E is: the scaling holds while the rounding is small against the weights
    (int8, int4), and is what makes the measure one forward a unit rather than one a format.
    Tried and measured (2026-12-07, bench/fit.py at uniform int4 g64's bytes): scaling instead by
    the output errors of GPTQ, as the fit applies int4, gave 16.328 against uniform GPTQ g64's
    16.272, as far behind as these costs (16.133 against 16.072 on the earlier calibration), for
    3 more minutes of GPTQ on SmolLM2; not kept. What the knapsack then gets wrong (the sum of
    single-unit costs against the whole plan's) is for :mod:`memopt.compose.fit_refine`, which
    measures whole plans after it.

    One float pass stores the hidden states entering every block; a block's KL then runs only
    that block and the ones after it (half the model on average), the output head from the final
    hidden states through a replay of the block list (memopt.quant.calibrate's)."""
    from memopt.quant.calibrate import Replay, next_inputs

    model = loaded.model.eval()
    cal = Calibrated.of(model, ids)
    blocks, inputs = cal.blocks, cal.inputs

    def logits_from(i: int, final: list[tuple[tuple, dict]] | None) -> torch.Tensor:
        """log-softmax of the logits (B, T, V): blocks i.. run on block i's stored input."""
        if final is None:
            cur = inputs[i]
            for block in blocks[i:]:
                cur = next_inputs(cur, [block(*a, **k) for a, k in cur])
            final = cur
        stored = [a[0] if a else kw["hidden_states"] for a, kw in final]
        saved = list(blocks)
        for j in range(len(blocks)):
            blocks[j] = Replay(stored if j == 0 else None, cal.as_tuple)
        try:
            out = model(input_ids=ids, use_cache=False).logits
        finally:
            for j, blk in enumerate(saved):
                blocks[j] = blk
        return torch.log_softmax(out.float(), -1)  # (B, T, V)

    ref = logits_from(len(blocks), inputs[-1])
    errors = cal.output_errors(units)

    def kl(unit: Unit, fmt: str) -> float:
        with cal.rounded(unit, fmt):
            if unit.block is not None:  # a block's Linears: from its stored input on
                out = logits_from(unit.block, None)
            else:  # the embedding or the head: the whole model
                out = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        return max(0.0, (ref.exp() * (ref - out)).sum(-1).mean().item())  # KL(float || rounded)

    todo = [(u, f) for u in units for f in u.bytes if f != "float32"
            if u.block is None or f == reference_format(u)]  # fmt: skip
    for step, (unit, fmt) in enumerate(todo, 1):
        unit.cost[fmt] = kl(unit, fmt)
        if unit.block is not None:
            e = errors[unit.name]
            for f in unit.bytes:
                if f not in ("float32", fmt):
                    unit.cost[f] = unit.cost[fmt] * e[f] / e[fmt] if e[fmt] > 0 else 0.0
        if progress is not None:
            progress(step, len(todo))


def reference_format(unit: Unit) -> str:
    """The format whose KL a block's unit measures: its int4 of the largest group offered (else
    its smallest format)."""
    int4 = [f for f in unit.bytes if f.startswith("int4")]
    if int4:
        return max(int4, key=lambda f: parse_format(f)[1] or 0)
    return min(unit.bytes, key=lambda f: unit.bytes[f])


# --------------------------------------------------------------------------------------------------
# The choice: a multiple-choice knapsack over bytes


def choose(
    units: list[Unit], weight_budget: int, menu: tuple[str, ...] = FORMATS
) -> dict[str, str] | None:
    """The formats of least total cost whose bytes fit ``weight_budget``; None when even the
    smallest formats do not fit.

    Exact up to the resolution: dynamic programming over bytes in steps of BYTES_STEP (coarser
    for budgets over 200 000 steps, so that a 70B-class plan stays a fraction of a second), each
    unit's bytes rounded up to whole steps, so the plan never exceeds the budget. Between formats
    of equal cost the smaller is taken. ``menu``: the formats allowed (of each unit's own)."""
    if weight_budget < 0:
        return None
    step = _step(weight_budget)
    cap = weight_budget // step
    order = sorted(menu, key=lambda f: format_bytes(f, 4096, 4096))  # smallest first
    best = np.zeros(cap + 1)  # best[b]: least cost of the units so far within b steps
    picks = np.zeros((len(units), cap + 1), dtype=np.int8)  # format index (into order)
    for i, u in enumerate(units):
        cand = np.full((len(order), cap + 1), np.inf)
        for j, f in enumerate(order):
            if f not in u.bytes:
                continue
            s = -(-u.held(f) // step)
            if s <= cap:
                cand[j, s:] = best[: cap + 1 - s] + u.cost[f]
        picks[i] = cand.argmin(0)  # the first minimum: the smallest of equal costs
        best = cand.min(0)
    if not np.isfinite(best[cap]):
        return None
    out: dict[str, str] = {}
    b = cap
    for i in range(len(units) - 1, -1, -1):
        f = order[picks[i, b]]
        out[units[i].name] = f
        b -= -(-units[i].held(f) // step)
    return {u.name: out[u.name] for u in units}


def _step(weight_budget: int) -> int:
    """The knapsack's resolution for a budget: BYTES_STEP, doubled until the budget is at most
    200 000 steps (powers of two: a budget a little larger keeps the step, so a plan that fits
    one budget fits every larger one of the same step)."""
    step = BYTES_STEP
    while weight_budget > 200_000 * step:
        step *= 2
    return step


def smallest_weights(units: list[Unit], menu: tuple[str, ...] = FORMATS) -> int:
    """The least weight budget that :func:`choose` accepts: every unit in its smallest format of
    ``menu``, its bytes rounded up to the solver's steps (at the step of that budget itself)."""
    least = [min(u.held(f) for f in u.bytes if f in menu) for u in units]
    need = sum(least)
    for _ in range(4):  # a larger budget may mean a coarser step: settle on a fixed point
        step = _step(need)
        rounded = sum(-(-b // step) * step for b in least)
        if rounded == need:
            break
        need = rounded
    return need


def plan_inference(
    loaded: Any,
    budget: int,
    units: list[Unit],
    positions: int,
    runtimes: dict[str, int] | None = None,
    kv_int8_cost: float | None = None,
) -> Plan:
    """The plan for a generation run of ``positions`` KV positions within ``budget`` bytes over
    the run's baseline: the best of each path's (:data:`PATHS`) plan with that path's runtime
    (``runtimes``: path -> bytes, default each path's figure), and, where ``kv_int8_cost`` is
    given (measured: :func:`kv_int8_kl`), of the engine paths' plans with an int8 KV cache, whose
    bytes go to the weights and whose cost is added to theirs. MemoptError naming the smallest
    budget when nothing fits."""
    from memopt.measure.generation import kv_cache_bytes

    config = loaded.config
    fixed = other_bytes(loaded.model, units)
    # the engine's caches: float32, or int8 with a float32 scale a position and head (exact bytes)
    kvs = [(False, kv_cache_bytes(config, positions), 0.0)]
    if kv_int8_cost is not None:
        kvs.append((True, kv_cache_bytes(config, positions, 1, 1), kv_int8_cost))
    scratch = 4 * (int(config.num_attention_heads) * positions + 8 * int(config.hidden_size)
                   + 3 * int(config.intermediate_size) + int(config.vocab_size))  # fmt: skip
    best: Plan | None = None
    smallest: tuple[int, int, int] | None = None  # (bytes, that plan's runtime, its KV bytes)
    for path, menu, default in PATHS:
        runtime = (runtimes or {}).get(path, default)
        for kv_int8, kv, kv_cost in kvs:
            if kv_int8 and path == "transformers":  # the engine's cache alone is counted exactly
                continue
            overhead = fixed + kv + scratch + runtime
            need = smallest_weights(units, menu) + overhead
            if smallest is None or need < smallest[0]:
                smallest = (need, runtime, kv)
            chosen = choose(units, budget - overhead, menu) if budget > overhead else None
            if chosen is None:
                continue
            weights = sum(u.bytes[chosen[u.name]] for u in units)
            transient = sum(u.held(chosen[u.name]) for u in units) - weights
            cost = sum(u.cost[chosen[u.name]] for u in units) + kv_cost
            if best is None or cost < best.predicted_cost:
                best = Plan("generate", chosen, weights, fixed, kv, scratch, runtime, cost,
                            weights + transient + overhead, path=path,
                            transient_bytes=transient, kv_int8=kv_int8)  # fmt: skip
    if best is None:
        need, runtime, kv = smallest
        raise too_small(loaded.name, budget, need, f"{kv / 1e6:.1f} MB KV cache", runtime)
    return best


def too_small(name: str, budget: int, need: int, held: str, runtime: int) -> MemoptError:
    """The refusal of a budget under the smallest plan, naming that plan's bytes (rounded up to
    0.1 MB: the named budget is accepted) and what it holds beside the weights (``held``)."""
    return MemoptError(
        f"a budget of {budget / 1e6:.1f} MB is too small for {name}: the smallest plan needs "
        f"{math.ceil(need / 1e5) / 10:.1f} MB (every unit in its smallest format, {held}, "
        f"{runtime / 1e6:.0f} MB runtime)"
    )


def mixed_config(units: list[Unit], formats: dict[str, str]) -> Any:
    """The per-module quantization config of a plan (int8 per channel, int4 by the format's
    algorithm, int3 / int2 round to nearest)."""
    from memopt.quant.config import Int4WeightOnly, Int8WeightOnly, IntNWeightOnly, Mixed

    rules = []
    for u in units:
        fmt = formats[u.name]
        if fmt == "float32":
            continue
        bits, g = parse_format(fmt)
        if fmt == "int8":
            cfg = Int8WeightOnly(embedding_group_size=None)
        elif bits == 4:
            cfg = Int4WeightOnly(group_size=g, algo="gptq")
        else:
            cfg = IntNWeightOnly(bits=bits, group_size=g)
        rules += [(p, cfg) for p in u.patterns]
    return Mixed(tuple(rules))


# --------------------------------------------------------------------------------------------------
# Fit: plan, apply, measure


@releases_outputs
def fit(
    model: str | Path,
    budget: Budget | int | str,
    out_dir: str | Path | None = None,
    *,
    task: str = "generate",
    seq: int = 128,
    max_new_tokens: int = 128,
    batch: int = 1,
    plan_only: bool = False,
    max_ppl_ratio: float | None = None,
    max_ppl: float | None = None,
    min_tokens_per_s: float | None = None,
    calib: torch.Tensor | None = None,
    calib_sequences: int = 4,
    calib_seq: int = 128,
    progress: Callable[[str, int, int], None] | None = None,
    train_steps: int = 50,
    ranks: int = 1,
    min_cosine: float | None = None,
    refine_evals: int | None = None,
    refine_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Plan the model that fits ``budget``, apply it to ``out_dir`` and measure the run.

    ``calib``: ``(N, T)`` token ids for the sensitivities and GPTQ (default: ``calib_sequences``
    windows of ``calib_seq`` tokens of memopt's calibration text, through the model's tokenizer).
    ``max_ppl_ratio`` / ``max_ppl`` / ``min_tokens_per_s``: bounds on the measured result; a plan that fits the
    budget but misses one is refused (MemoptError), and nothing is written.

    Returns the CLI's JSON: ``budget_bytes``, ``baseline_rss_bytes``, ``predicted_peak_bytes``,
    ``measured_peak_bytes``, ``within_budget``, ``plan`` (per unit: format, bytes, cost),
    ``quality`` (perplexity on held-out text, the float model's beside it), ``tokens_per_s``.

    ``refine_evals``: whole plans measured after the knapsack (generation with weights to
    measure; default :data:`REFINE_EVALS`, 0: the knapsack's plan as
    it is), on ``refine_ids (N, T)`` (default: ``calib`` when given, else
    :data:`REFINE_SEQUENCES` windows of ``calib_seq`` tokens of
    memopt's calibration text): :mod:`memopt.compose.fit_refine`. Never for ``plan_only``.

    ``task="train"``: ``batch`` is the global batch; ``train_steps`` steps of the chosen options
    and of plain float32 AdamW (which may exceed the budget: it is the comparison) are measured,
    reported under ``training``; ``ranks`` > 1 lets the search shard over that many FSDP2
    processes (per-rank peak); ``out_dir`` is not used. See :mod:`memopt.compose.fit_train`.

    ``task="infer"`` (encoders): one forward of ``batch`` × ``seq`` tokens; quality is the
    embedding cosine against the float model, ``min_cosine`` its bound. See
    :mod:`memopt.compose.fit_infer`.
    """
    from memopt.models import build_meta, resolve

    budget = _as_budget(budget)
    if task not in ("generate", "infer", "train"):
        raise MemoptError(f"fit: unknown task {task!r} (generate, infer or train)")
    other_bounds = (max_ppl_ratio, max_ppl, min_tokens_per_s) != (None, None, None)
    if (task == "infer" and other_bounds) or (task != "infer" and min_cosine is not None):
        raise MemoptError("fit: --task infer takes cosine>=X alone; ppl, ppl_ratio and --speed "
                          "are for generate")  # fmt: skip
    source = resolve(model)
    if not plan_only and out_dir is None and task != "train":
        raise MemoptError("fit: give an output folder (-o DIR), or --plan-only")
    if out_dir is not None:
        from memopt.models.saved import check_output

        check_output(out_dir)
    start = time.perf_counter()
    baseline = _baseline(task)
    limit = budget.bytes - baseline if budget.total else budget.bytes
    if limit <= 0:
        raise MemoptError(
            f"a total budget of {budget.bytes / 1e6:.1f} MB is below the runtime's own baseline "
            f"of {baseline / 1e6:.1f} MB"
        )
    if task == "train":
        from memopt.compose.fit_train import fit_training

        return fit_training(source, limit, budget, baseline, seq=seq, batch=batch,
                            plan_only=plan_only, start=start, steps=train_steps, ranks=ranks,
                            progress=progress)  # fmt: skip
    if task == "infer":
        from memopt.compose.fit_infer import fit_inference

        return fit_inference(source, limit, budget, baseline, out_dir, seq=seq, batch=batch,
                             plan_only=plan_only, min_cosine=min_cosine, calib=calib,
                             calib_sequences=calib_sequences, calib_seq=calib_seq, start=start,
                             progress=progress)  # fmt: skip
    meta = build_meta(source, dequantize=True)
    if meta.task != "causal-lm":
        raise MemoptError(f"{source.name}: fit --task generate needs a causal language model")
    units = units_of(meta.model, decode_engine=True)
    positions = seq + max_new_tokens
    measured_costs = has_weights(source)
    # under the smallest plan (an int8 KV cache counted where its cost will be measured): refused,
    # nothing read
    plan_inference(meta, limit, units, positions, kv_int8_cost=0.0 if measured_costs else None)
    kv_cost = None  # the int8 KV cache is offered where its quality cost is measured
    if measured_costs:
        from memopt.quant.calibrate import calibration_ids

        if refine_ids is None:  # the plans' windows: the caller's calibration, else more of it
            refine_ids = calib if calib is not None else calibration_ids(
                meta.tokenizer(), n=REFINE_SEQUENCES, seq=calib_seq)  # fmt: skip
        if calib is None:  # one calibration for the sensitivities and GPTQ alike
            calib = calibration_ids(meta.tokenizer(), n=calib_sequences, seq=calib_seq)
        costs(source, units, calib, progress)
        if progress is not None:
            progress("measuring an int8 KV cache's cost", 0, 1)
        kv_cost = kv_int8_cost(source, calib)
    else:  # config.json alone: a prior instead of a measurement
        for u in units:
            params = sum(n * k for n, k in u.shapes)
            u.cost = {f: params * PRIOR_COST[f] for f in u.bytes}
    result: dict[str, Any] = {
        "model": source.name, "task": task, "budget_bytes": budget.bytes,
        "budget_is_total": budget.total, "limit_bytes": limit, "baseline_rss_bytes": baseline,
        "seq": seq, "max_new_tokens": max_new_tokens,
        "quality_costs": "measured (KL, calibration text)" if measured_costs
        else "prior (config.json only: no weights to measure)",
    }  # fmt: skip
    plan = plan_inference(meta, limit, units, positions, kv_int8_cost=kv_cost)
    result["kv_int8_cost"] = kv_cost
    if plan_only:
        return inference_result(result, plan, units, start)
    evals = REFINE_EVALS if refine_evals is None else refine_evals
    refine = measured_costs and evals > 0 and refine_ids is not None
    if refine:
        plan = _refined(source, units, plan, limit, refine_ids, evals, progress, result)
    from memopt.models.saved import staged_folder

    runtimes = {path: runtime for path, _, runtime in PATHS}
    attempts: list[dict[str, int]] = []  # each plan applied: predicted and measured peaks
    result["attempts"] = attempts
    with staged_folder(out_dir) as tmp:
        for revision in range(REVISIONS + 1):
            if progress is not None:
                progress(f"applying the plan (revision {revision})", 0, 1)
            _apply(source, units, plan, tmp, calib, progress)
            if progress is not None:
                progress("measuring the run in a fresh process", 0, 1)
            measured = _measure_generation(tmp, seq, max_new_tokens, plan.kv_int8)
            over = measured["peak_over_baseline_bytes"]
            attempts.append({"predicted_peak_bytes": plan.predicted_peak_bytes,
                             "measured_peak_bytes": over, "path": plan.path,
                             "runtime_bytes": plan.runtime_bytes})  # fmt: skip
            inference_result(result, plan, units, start)
            result.update(measured_peak_bytes=over, within_budget=over <= limit,
                          revisions=revision, tokens_per_s=measured.get("tokens_per_s"),
                          engine=measured.get("engine"))  # fmt: skip
            if over <= limit:
                break
            if revision == REVISIONS:
                raise MemoptError(
                    f"{source.name}: the run still peaked at {over / 1e6:.1f} MB over a "
                    f"{limit / 1e6:.1f} MB budget after {REVISIONS} revisions"
                )
            # the run holds more than predicted: that much more runtime on the path it took, the
            # weights that much less, plan again
            excess = over - plan.predicted_peak_bytes + REVISION_MARGIN
            runtimes[plan.path] = plan.runtime_bytes + excess
            try:
                plan = plan_inference(meta, limit, units, positions, runtimes, kv_cost)
                if refine:
                    plan = _refined(source, units, plan, limit, refine_ids, evals, progress,
                                    result)  # fmt: skip
            except MemoptError as exc:  # what the run showed leaves no plan within the budget
                raise MemoptError(
                    f"{source.name}: the planned run peaked at {over / 1e6:.1f} MB, over the "
                    f"{limit / 1e6:.1f} MB budget; with the runtime it showed, "
                    + str(exc).split(": ", 1)[1]
                ) from None
        if progress is not None:
            progress("perplexity on held-out text", 0, 1)
        result["quality"] = _quality(source, tmp)
        _check_bounds(result, max_ppl_ratio, max_ppl, min_tokens_per_s)
        result["seconds"] = time.perf_counter() - start
        _write_plan(tmp, result)
    result["output"] = str(out_dir)
    return result


# Quality cost a weight per parameter when there are no weights to measure (--plan-only on a
# config.json): the order of the formats' measured KL on SmolLM2, per parameter; plans from it
# follow bytes, as a uniform recipe would.
PRIOR_COST = {
    "float32": 0.0,
    "int8": 1e-10,
    "int4-g32": 1e-9,
    "int4-g64": 1.4e-9,
    "int4-g128": 2e-9,
    "int3-g32": 8e-9,
    "int2-g32": 4e-8,
}


def _as_budget(budget: Budget | int | str) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, int):
        return Budget(budget)
    return Budget.parse(budget)


def inference_result(
    result: dict[str, Any], plan: Plan, units: list[Unit], start: float
) -> dict[str, Any]:
    rows = []
    for u in units:
        f = plan.formats[u.name]
        rows.append({"unit": u.name, "format": f, "bytes": u.bytes[f], "cost": u.cost[f],
                     "params": sum(n * k for n, k in u.shapes)})  # fmt: skip
    result.update(
        predicted_peak_bytes=plan.predicted_peak_bytes,
        measured_peak_bytes=result.get("measured_peak_bytes"),
        within_budget=result.get("within_budget"),
        plan={**plan.to_dict(), "units": rows},
        quality=result.get("quality"),
        seconds=time.perf_counter() - start,
    )
    return result


def _check_bounds(
    result: dict[str, Any], max_ratio: float | None, max_ppl: float | None, min_tps: float | None
) -> None:
    q = result["quality"]
    within = f"the best plan within {result['limit_bytes'] / 1e6:.1f} MB"
    if max_ratio is not None and q["ratio"] > max_ratio:
        raise MemoptError(
            f"{within} reaches perplexity {q['ratio']:.4f}× float32's, over the asked "
            f"{max_ratio}× (a larger budget would do better)"
        )
    if max_ppl is not None and q["fitted"] > max_ppl:
        raise MemoptError(
            f"{within} reaches perplexity {q['fitted']:.3f}, over the asked {max_ppl} "
            f"(float32: {q['float32']:.3f})"
        )
    tps = result.get("tokens_per_s")
    if min_tps is not None and (tps is None or tps < min_tps):
        raise MemoptError(
            f"{within} decodes {tps or 0:.1f} tokens/s, under the asked {min_tps} (fewer float units: a smaller "
            "budget decodes faster here)"
        )


def has_weights(source: Any) -> bool:
    return source.kind != "hf" or any(source.path.glob("*.safetensors"))


def costs(
    source: Any,
    units: list[Unit],
    calib: torch.Tensor,
    progress: Callable[[str, int, int], None] | None,
    measure: Callable[..., None] | None = None,
    tag: str = "",
) -> None:
    """Each unit's quality costs: from this machine's cache when the same model file and
    calibration ids were measured before (the demo and the bench fit several budgets), else
    measured (``measure``, default :func:`sensitivities`: its signature) and cached. ``tag``
    names another measure in the cache's key ("": the KL of sensitivities)."""
    from memopt.core.atomic import atomic_write_text
    from memopt.models import load_model

    path = _cost_cache(source, calib, tag)
    if path.is_file():
        cached = json.loads(path.read_text())
        if set(cached) == {u.name for u in units}:
            for u in units:
                u.cost = {f: float(cached[u.name][f]) for f in u.bytes}
            return
    loaded = load_model(source, dtype=torch.float32)
    cb = (lambda i, t: progress("measuring each unit's sensitivity", i, t)) if progress else None
    (measure or sensitivities)(loaded, units, calib, cb)
    del loaded
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({u.name: u.cost for u in units}))


def _cost_cache(source: Any, calib: torch.Tensor, tag: str) -> Path:
    """This machine's cache file of a cost measured on ``source``'s files (by path, size and
    time) and the calibration ids, ``tag`` naming the measure."""
    import hashlib

    from memopt.core.cbuild import cache_dir

    files = [source.path] if source.path.is_file() else sorted(source.path.iterdir())
    h = hashlib.sha256((tag + repr(FORMATS)).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(calib.numpy().tobytes())
    return cache_dir() / f"fit-costs-{h.hexdigest()[:16]}.json"


@torch.no_grad()
def kv_int8_kl(loaded: Any, ids: torch.Tensor) -> float:
    """The mean KL divergence (nats a token) of the float model's next-token distribution on
    ``ids (B, T)`` when its KV cache is int8 (memopt.weights.kvcache: every position's attention
    reads the keys and values as the cache rounds them; the engine's int8 cache rounds alike):
    the quality cost of an int8 KV cache, in the units' cost units. The model keeps the int8
    cache for its later calls with ``use_cache=True``."""
    from memopt.weights.kvcache import use_int8_kv_cache

    model = loaded.model.eval()
    ref = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)  # (B, T, V)
    use_int8_kv_cache(model, loaded.config)
    out = torch.log_softmax(model(input_ids=ids, use_cache=True).logits.float(), -1)
    return max(0.0, (ref.exp() * (ref - out)).sum(-1).mean().item())


def kv_int8_cost(source: Any, calib: torch.Tensor) -> float:
    """:func:`kv_int8_kl` of ``source`` on ``calib``, cached as the units' costs are."""
    from memopt.core.atomic import atomic_write_text
    from memopt.models import load_model

    path = _cost_cache(source, calib, "kv-int8")
    if path.is_file():
        return float(json.loads(path.read_text())["int8"])
    cost = kv_int8_kl(load_model(source, dtype=torch.float32), calib)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"int8": cost}))
    return cost


def _refined(
    source: Any,
    units: list[Unit],
    plan: Plan,
    limit: int,
    ids: torch.Tensor,
    evals: int,
    progress: Callable[[str, int, int], None] | None,
    result: dict[str, Any],
) -> Plan:
    """``plan`` refined by measuring whole plans within the same bytes for its weights (its
    path's menu and runtime): :func:`memopt.compose.fit_refine.refine_cached`; what was measured
    goes in ``result["refinement"]``."""
    from dataclasses import replace

    from memopt.compose.fit_refine import refine_cached

    menu = next(m for p, m, _ in PATHS if p == plan.path)
    overhead = plan.predicted_peak_bytes - plan.weight_bytes - plan.transient_bytes
    r = refine_cached(source, units, plan.formats, limit - overhead, menu, ids, evals, progress)
    weights = sum(u.bytes[r.formats[u.name]] for u in units)
    transient = sum(u.held(r.formats[u.name]) for u in units) - weights
    result["refinement"] = {"windows": list(ids.shape), "evaluations": r.evaluations,
                            "knapsack_kl": r.knapsack_kl, "kl": r.kl,
                            "chosen_from": r.chosen_from, "measured": r.measured}  # fmt: skip
    return replace(plan, formats=r.formats, weight_bytes=weights, transient_bytes=transient,
                   predicted_cost=sum(u.cost[r.formats[u.name]] for u in units),
                   predicted_peak_bytes=weights + transient + overhead)  # fmt: skip


def _baseline(task: str) -> int:
    """The runtime's own RSS: a fresh process that imports what the run imports, nothing else."""
    from memopt.core.rss import run_in_child

    return int(run_in_child("memopt.compose._jobs:baseline_job", task)["baseline_rss_bytes"])


def _apply(
    source: Any,
    units: list[Unit],
    plan: Plan,
    out: Path,
    calib: torch.Tensor | None,
    progress: Callable[[str, int, int], None] | None,
) -> None:
    from memopt.quant.stream import quantize_model

    config = mixed_config(units, plan.formats)
    cb = (
        (lambda i, n: progress("quantizing (streamed, GPTQ where int4)", i, n))
        if progress
        else None
    )
    quantize_model(source, config, out, calib=calib, progress=cb)


def _measure_generation(
    folder: Path, seq: int, max_new_tokens: int, kv_int8: bool = False
) -> dict[str, Any]:
    from memopt.core.rss import run_in_child

    out = run_in_child("memopt.compose._jobs:generation_job", str(folder), seq, max_new_tokens,
                       kv_int8, timeout=1800)  # fmt: skip
    out["peak_over_baseline_bytes"] = int(out["peak_rss_bytes"]) - int(out["baseline_rss_bytes"])
    return out


_FLOAT_PPL: dict[tuple[str, int, int], float] = {}


def _quality(source: Any, folder: Path) -> dict[str, Any]:
    """Perplexity on held-out text (memopt's evaluation excerpt: calibration never reads it), the
    fitted model against the float model."""
    from memopt.evaluate import perplexity
    from memopt.models import load_model

    fitted = perplexity(load_model(folder)).perplexity
    st = source.path.stat()
    key = (str(source.path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FLOAT_PPL:  # once a process: the bench and the demo fit several budgets
        _FLOAT_PPL[key] = perplexity(load_model(source, dtype=torch.float32)).perplexity
    base = _FLOAT_PPL[key]
    return {"metric": "perplexity (memopt's evaluation excerpt, held out)", "fitted": fitted,
            "float32": base, "ratio": fitted / base}  # fmt: skip


def _write_plan(folder: Path, result: dict[str, Any]) -> None:
    """fit.json: the whole result, and ``run``: what ``memopt run`` / ``estimate`` / ``profile``
    on the folder take as their defaults (:func:`fitted_run`) to keep the run within the budget."""
    from memopt.core.atomic import atomic_write_text

    result["run"] = {"max_memory_bytes": result["limit_bytes"],
                     "positions": result["seq"] + result["max_new_tokens"],
                     "engine": result["plan"]["path"] != "transformers",
                     "kv_int8": bool(result["plan"].get("kv_int8"))}  # fmt: skip
    atomic_write_text(folder / "fit.json", json.dumps(result, indent=1, default=str))
