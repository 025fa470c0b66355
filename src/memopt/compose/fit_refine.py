"""Refinement of a generation fit's plan by measuring whole plans (:func:`refine`).

The knapsack (:func:`memopt.compose.fit.choose`) adds single-unit costs, each measured with only
that unit rounded; near the uniform recipes the sum misranks plans (the units interact, and the
applied GPTQ is not the round to nearest the costs were measured with). So after the knapsack, a
few dozen whole plans are measured: the mean KL divergence of the next-token distribution of the
whole quantized model from the float model's on held-in calibration windows, and the best plan
measured within the budget is kept. The candidates: the knapsack's plan, the largest uniform
recipe of the plan's menu that fits (int4 g64 everywhere, when its bytes fit), then local moves
from the best one measured, greedily (first improvement): one unit one format up, paid for by the fewest units
one format down (least predicted cost first), the moves tried in the order of their predicted
cost.

A plan is an assembly: each unit's weights in each format are computed once, from the float
model's activations (int4: GPTQ with the Hessian of the float model's inputs of that Linear,
round to nearest where that makes the smaller output error, as the applied GPTQ does; the output
projection by GPTQ from the float final hidden states; int8 / int3 / int2: round to nearest, as
applied), so a plan's KL is one forward pass of the calibration windows, from the first block
that the plan changes (the hidden states entering every block are kept for the plan last
measured). The applied model differs a little (memopt's GPTQ calibrates each block on the
outputs of the blocks already quantized): the assembly ranks plans, it does not predict the
applied model's perplexity.

Each result is cached on this machine like the sensitivities (:func:`memopt.compose.fit.costs`),
by the model's files, the windows, the units' menus and costs, the knapsack's plan and the budget.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memopt.compose.fit import (
    REFINE_EVALS,
    REFINE_SEQUENCES,
    Calibrated,
    Unit,
    accumulate_h,
    format_bytes,
    parse_format,
)

__all__ = ["REFINE_EVALS", "REFINE_SEQUENCES", "PlanKL", "Refined", "refine", "refine_cached"]

CHUNK = 4  # windows per output-head pass: (4, T, vocab) float32 logits at a time

Progress = Callable[[int, int], None]


@dataclass
class Refined:
    """The refinement's answer: the best plan measured, its KL and the knapsack plan's."""

    formats: dict[str, str]
    kl: float  # mean KL (nats a token) of the kept plan, on the refinement's windows
    knapsack_kl: float  # the knapsack plan's
    evaluations: int  # whole plans measured
    chosen_from: str  # "knapsack", "uniform int4-g64", "local moves"
    measured: list[dict[str, Any]] = field(default_factory=list)  # label, kl, bytes of each


class PlanKL:
    """KL of whole plans on ``ids (N, T)``: the float model ``loaded`` (its weights swapped for
    each plan's, restored by :meth:`close`) and each (unit, format)'s weights made once."""

    def __init__(self, loaded: Any, units: list[Unit], ids: torch.Tensor) -> None:
        self.model = loaded.model.eval()
        self.units = {u.name: u for u in units}
        self.ids = ids
        self.cal = Calibrated.of(self.model, ids)  # float inputs of every block, one chunk
        self.blocks = self.cal.blocks
        modules = dict(self.model.named_modules())
        self.modules = {p: modules[p] for u in units for p in u.patterns}
        self.floats = {p: m.weight.data for p, m in self.modules.items()}  # the float weights
        self.embedding_units = {u.name for u in units
                                if any(isinstance(self.modules[p], nn.Embedding)
                                       for p in u.patterns)}  # fmt: skip
        from memopt.quant.calibrate import output_projection

        head = output_projection(self.model)
        self.head_name = next((p for p, m in self.modules.items() if m is head), None)
        self.current = {u.name: "float32" for u in units}
        self.states = list(self.cal.inputs)  # states[i]: block i's inputs under ``current``
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}  # (unit, fmt) -> pattern -> qw
        self.hessians: dict[str, torch.Tensor] = {}  # Linear -> (K, K) of the float inputs
        self.head_h: torch.Tensor | None = None
        self.ref = [lp for lp in self._head_pass(self.states[-1], capture_head=True)]

    # ---- the weights of a (unit, format) ----

    @torch.no_grad()
    def _weights(self, unit: Unit, fmt: str) -> dict[str, Any]:
        """pattern -> quantized weight (or the float tensor) of ``unit`` in ``fmt``; a tied
        weight once (under its first pattern)."""
        key = (unit.name, fmt)
        if key in self.cache:
            return self.cache[key]
        from memopt.quant.calibrate import DEFAULT_SETTINGS, gptq_rows, output_error
        from memopt.quant.config import Int4WeightOnly
        from memopt.weights.quantized import Int4Weight, Int8Weight, IntNWeight

        bits, g = parse_format(fmt)
        out: dict[str, Any] = {}
        seen: set[int] = set()
        for p in unit.patterns:
            w = self.floats[p]
            if id(w) in seen:
                continue
            seen.add(id(w))
            if fmt == "float32":
                out[p] = w
            elif fmt == "int8":
                out[p] = Int8Weight(w)
            elif bits != 4:
                out[p] = IntNWeight(w, bits, g, symmetric=False)  # int3 / int2: RTN, as applied
            else:
                assert g is not None
                cfg = Int4WeightOnly(group_size=g, algo="gptq")
                h = self._hessian(unit, p)
                if h is None:  # an embedding that is not the head: round to nearest, as applied
                    out[p] = Int4Weight(w, g)
                    continue
                qw = gptq_rows(lambda a, b, w=w: w[a:b], w.shape[0], h, cfg, DEFAULT_SETTINGS)
                if unit.block is not None and DEFAULT_SETTINGS.rtn_when_better:
                    rtn = Int4Weight(w, g)
                    if output_error(w, rtn, h) < output_error(w, qw, h):
                        qw = rtn
                out[p] = qw
        self.cache[key] = out
        return out

    def _hessian(self, unit: Unit, pattern: str) -> torch.Tensor | None:
        """(K, K) sum of x x^T of the float model's inputs of ``pattern``'s Linear (a block's, or
        the output projection's); None for a weight that only an embedding reads."""
        if unit.block is None:
            tied_head = self.head_name is not None and (
                self.floats[self.head_name] is self.floats[pattern]
            )
            return self.head_h if tied_head else None
        if pattern not in self.hessians:
            i = unit.block
            lins = {p: m for p, m in self.modules.items()
                    if self.units_block(p) == i and isinstance(m, nn.Linear)}  # fmt: skip
            hs: dict[str, torch.Tensor] = {}
            handles = [m.register_forward_pre_hook(accumulate_h(p, hs)) for p, m in lins.items()]
            saved = {p: (m.weight.data) for p, m in lins.items()}
            try:  # the float block on its float inputs
                for p, m in lins.items():
                    m.weight.data = self.floats[p]
                with torch.no_grad():
                    for a, k in self.cal.inputs[i]:
                        self.blocks[i](*a, **k)
            finally:
                for h in handles:
                    h.remove()
                for p, m in lins.items():
                    m.weight.data = saved[p]
            self.hessians.update(hs)
        return self.hessians[pattern]

    def units_block(self, pattern: str) -> int | None:
        return next((u.block for u in self.units.values() if pattern in u.patterns), None)

    # ---- measuring a plan ----

    @torch.no_grad()
    def kl(self, formats: dict[str, str]) -> float:
        """Mean KL(float || plan) a token on the windows (nats)."""
        from memopt.quant.calibrate import capture_inputs, next_inputs

        changed = [n for n, f in formats.items() if self.current[n] != f]
        for n in changed:
            unit = self.units[n]
            for p, qw in self._weights(unit, formats[n]).items():
                w = qw if isinstance(qw, torch.Tensor) else qw.dequantize(torch.float32)
                self.modules[p].weight.data = w  # a tied weight: one Parameter, every module
            self.current[n] = formats[n]
        starts = [len(self.blocks)]
        for n in changed:
            b = self.units[n].block
            starts.append(-1 if n in self.embedding_units else len(self.blocks) if b is None else b)
        start = min(starts)
        if start < 0:  # the embedding changed: block 0's inputs again
            self.states[0] = capture_inputs(self.model, self.blocks[0], self.ids, self.ids.shape[0])
            start = 0
        for i in range(start, len(self.blocks)):
            cur = self.states[i]
            self.states[i + 1] = next_inputs(cur, [self.blocks[i](*a, **k) for a, k in cur])
        total, count = 0.0, 0
        for ref, out in zip(self.ref, self._head_pass(self.states[-1]), strict=True):
            total += float((ref.exp() * (ref - out)).sum())  # sum over (B, T, V)
            count += ref.shape[0] * ref.shape[1]
        return max(0.0, total / count)

    def _head_pass(self, final: list[tuple[tuple, dict]], capture_head: bool = False) -> Any:
        """log-softmax (b, T, V) of the logits, CHUNK windows at a time, from the final hidden
        states (the blocks replayed, not run); ``capture_head``: the output projection's
        Hessian of these inputs too (the float model's: GPTQ of the head)."""
        from memopt.quant.calibrate import Replay

        hidden = torch.cat([a[0] if a else kw["hidden_states"] for a, kw in final])  # (N, T, C)
        head = self.modules.get(self.head_name) if self.head_name else None
        handle = None
        if capture_head and isinstance(head, nn.Linear):
            hs: dict[str, torch.Tensor] = {}
            handle = head.register_forward_pre_hook(accumulate_h("head", hs))
        outs = []
        saved = list(self.blocks)
        try:
            for a in range(0, hidden.shape[0], CHUNK):
                for j in range(len(self.blocks)):
                    self.blocks[j] = Replay([hidden[a : a + CHUNK]] if j == 0 else None,
                                            self.cal.as_tuple)  # fmt: skip
                with torch.no_grad():
                    logits = self.model(input_ids=self.ids[a : a + CHUNK], use_cache=False).logits
                outs.append(torch.log_softmax(logits.float(), -1))  # (b, T, V)
        finally:
            for j, blk in enumerate(saved):
                self.blocks[j] = blk
            if handle is not None:
                handle.remove()
                self.head_h = hs["head"]
        return outs

    def close(self) -> None:
        """The float weights back in place."""
        for p, m in self.modules.items():
            m.weight.data = self.floats[p]


# --------------------------------------------------------------------------------------------------
# The search


def _held(units: list[Unit], formats: dict[str, str]) -> int:
    return sum(u.held(formats[u.name]) for u in units)


def _nominal(fmt: str) -> float:
    """Bytes a weight of ``fmt`` for a 4096 x 4096 weight: the formats' order by size."""
    return format_bytes(fmt, 4096, 4096) / 4096**2


def uniform(units: list[Unit], fmt: str, menu: tuple[str, ...]) -> dict[str, str]:
    """Every unit in ``fmt``; a unit that does not offer it in the least format of ``menu`` it
    offers that is at least as large (per weight)."""
    out = {}
    for u in units:
        if fmt in u.bytes:
            out[u.name] = fmt
            continue
        larger = [f for f in u.bytes if f in menu and _nominal(f) >= _nominal(fmt)]
        out[u.name] = min(larger or [f for f in u.bytes if f in menu], key=_nominal)
    return out


def _moves(
    units: list[Unit], formats: dict[str, str], budget: int, menu: tuple[str, ...]
) -> list[tuple[float, dict[str, str]]]:
    """The local moves from ``formats`` within ``budget``, by predicted cost (least first): each
    unit one format up (the next larger of its menu), paid for by the fewest units one format
    down, those of least predicted cost a byte saved first."""
    ladder = {u.name: sorted((f for f in u.bytes if f in menu), key=u.held) for u in units}
    slack = budget - _held(units, formats)
    downs = []  # (predicted cost a byte saved, unit, format, bytes saved, cost)
    for u in units:
        lad, i = ladder[u.name], ladder[u.name].index(formats[u.name])
        if i > 0:
            f = lad[i - 1]
            saved = u.held(formats[u.name]) - u.held(f)
            dc = u.cost[f] - u.cost[formats[u.name]]
            if saved > 0:
                downs.append((dc / saved, u, f, saved, dc))
    downs.sort(key=lambda d: d[0])
    out = []
    for u in units:
        lad, i = ladder[u.name], ladder[u.name].index(formats[u.name])
        if i + 1 >= len(lad):
            continue
        f = lad[i + 1]
        need = u.held(f) - u.held(formats[u.name]) - slack
        cand, pred = {**formats, u.name: f}, u.cost[f] - u.cost[formats[u.name]]
        for _, v, fv, saved, dc in downs:
            if need <= 0:
                break
            if v.name == u.name:
                continue
            cand[v.name], pred, need = fv, pred + dc, need - saved
        if need <= 0:
            out.append((pred, cand))
    out.sort(key=lambda m: m[0])
    return out


def refine(
    evaluator: PlanKL,
    units: list[Unit],
    start: dict[str, str],
    budget: int,
    menu: tuple[str, ...],
    max_evals: int = REFINE_EVALS,
    progress: Progress | None = None,
) -> Refined:
    """The plan of least measured KL among at most ``max_evals`` whole plans within ``budget``
    held bytes (:meth:`Unit.held`), each unit's format from ``menu``: ``start`` (the knapsack's
    plan, within the budget), the largest uniform recipe of ``menu`` that fits, then local moves
    (:func:`_moves`) from the best measured, first improvement, until none improves or the
    evaluations run out. A ``start`` whose KL is 0 is kept as it is."""
    seen: dict[tuple, float] = {}
    measured: list[dict[str, Any]] = []

    def measure(formats: dict[str, str], label: str) -> float:
        key = tuple(sorted(formats.items()))
        if key not in seen:
            seen[key] = evaluator.kl(formats)
            measured.append({"label": label, "kl": seen[key], "bytes": _held(units, formats)})
            if progress is not None:
                progress(len(seen), max_evals)
        return seen[key]

    best, best_kl, origin = start, measure(start, "knapsack"), "knapsack"
    knapsack_kl = best_kl
    if best_kl == 0.0:  # nothing measures better (the float model's own plan)
        return Refined(best, best_kl, knapsack_kl, len(seen), origin, measured)
    # the largest uniform recipe of the menu that fits (the smaller ones hold less of the budget)
    fitting = [c for c in (uniform(units, f, menu) for f in menu) if _held(units, c) <= budget]
    if fitting and len(seen) < max_evals:
        cand = max(fitting, key=lambda c: _held(units, c))
        fmt = max(set(cand.values()), key=list(cand.values()).count)
        if cand != start:
            kl = measure(cand, f"uniform {fmt}")
            if kl < best_kl:
                best, best_kl, origin = cand, kl, f"uniform {fmt}"
    improved = True
    while improved and len(seen) < max_evals:
        improved = False
        for _, cand in _moves(units, best, budget, menu):
            if len(seen) >= max_evals:
                break
            if tuple(sorted(cand.items())) in seen:
                continue
            kl = measure(cand, "local move")
            if kl < best_kl:
                best, best_kl, improved = cand, kl, True
                origin = origin if origin.endswith("local moves") else f"{origin} + local moves"
                break
    return Refined(best, best_kl, knapsack_kl, len(seen), origin, measured)


def refine_cached(
    source: Any,
    units: list[Unit],
    start: dict[str, str],
    budget: int,
    menu: tuple[str, ...],
    ids: torch.Tensor,
    max_evals: int = REFINE_EVALS,
    progress: Callable[[str, int, int], None] | None = None,
) -> Refined:
    """:func:`refine` of the model ``source`` (its float weights loaded for the call), from this
    machine's cache when the same question was answered before."""
    from memopt.core.atomic import atomic_write_text
    from memopt.core.cbuild import cache_dir
    from memopt.models import load_model

    tops = {u.name: max((f for f in u.bytes if f in menu), key=u.held) for u in units}
    if start == tops:  # every unit in its largest format: no plan within the budget is better
        return Refined(start, 0.0, 0.0, 0, "knapsack (every unit in its largest format)")
    files = [source.path] if source.path.is_file() else sorted(source.path.iterdir())
    h = hashlib.sha256(b"refine-2")
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(ids.numpy().tobytes())
    h.update(json.dumps([[u.name, u.bytes, u.cost, u.transient] for u in units]).encode())
    h.update(json.dumps([sorted(start.items()), budget, list(menu), max_evals]).encode())
    path = cache_dir() / f"fit-refine-{h.hexdigest()[:16]}.json"
    if path.is_file():
        return Refined(**json.loads(path.read_text()))
    cb = (lambda i, n: progress("refining: whole plans measured", i, n)) if progress else None
    loaded = load_model(source, dtype=torch.float32)
    evaluator = PlanKL(loaded, units, ids)
    try:
        out = refine(evaluator, units, start, budget, menu, max_evals, cb)
    finally:
        evaluator.close()
        del evaluator, loaded
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out.__dict__))
    return out
