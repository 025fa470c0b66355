"""``memopt fit --task infer``: the encoder that fits a memory budget for one inference step.

The run is ``memopt profile MODEL --task infer``'s step: one forward of ``batch`` × ``seq`` tokens
under ``torch.no_grad()``, its peak RSS over the child's import baseline
(:func:`memopt.measure.profile.profile`, in a fresh process). The plan is generation's
(:mod:`memopt.compose.fit`): every unit (each block's Linears, each embedding, the pooler) gets
one format of the menu by the same knapsack, with these parts of its own:

* **bytes**: the units' formats (exact), the weights no unit covers, the step's activations from
  the estimator (:func:`step_activations`: the meta-device step's peak less its weights; the
  same for every plan) and what the run holds beyond them, measured: :data:`INFER_RUNTIME_BYTES`,
  or :data:`INFER_RUNTIME_INT8_BYTES` with int8 blocks (the knapsack is solved with and without
  int8 in the blocks, the better plan that fits kept); revised when a run shows more;
* **quality cost** (:func:`cosine_costs`): 1 − the mean cosine of the model's embeddings
  (mean-pooled last hidden state, as :func:`memopt.evaluate.embed`) against the float model's on
  calibration windows, when only that unit is rounded to nearest; cached like generation's KL.

The plan is applied from the source file (streamed; GPTQ where int4: it calibrates an encoder's
blocks as a causal LM's, the embeddings get round-to-nearest; measured on MiniLM, int4 g64
everywhere: cosine 0.981 by GPTQ against 0.958 by RTN), the step measured in a child, and the
quality measured as ``memopt eval FOLDER --reference MODEL`` does: the embedding cosine over
memopt's held-out sentences (:func:`memopt.evaluate.embedding_cosine`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memopt.compose.fit import (
    PRIOR_COST,
    REVISION_MARGIN,
    REVISIONS,
    Budget,
    Calibrated,
    Plan,
    Unit,
    choose,
    costs,
    has_weights,
    inference_result,
    mixed_config,
    other_bytes,
    smallest_weights,
    too_small,
    units_of,
)
from memopt.core.errors import MemoptError

__all__ = [
    "INFER_RUNTIME_BYTES",
    "INFER_RUNTIME_INT8_BYTES",
    "calibration_windows",
    "cosine_costs",
    "fit_inference",
    "int8_blocks",
    "plan_infer",
    "step_activations",
]

# What the profiled step holds over its child's import baseline beyond the weights and the
# estimator's activations (the loader's and the tracker's Python objects, the allocator's slack
# around the step's temporaries); measured on MiniLM, batch 8 × seq 128, 21 runs: 33-50 MB (mean
# 41) for plans whose blocks are float32, int4, int3 or int2, 53-61 MB (mean 57) for plans with
# int8 blocks (their kernel at many rows: float32 chunks of the weight into slices of the
# output, the scale applied to a copy), the same plan's runs some 5 MB apart. Near the means; a
# plan that runs over its budget is revised with what its run showed.
INFER_RUNTIME_BYTES = 40 << 20
INFER_RUNTIME_INT8_BYTES = 56 << 20

Progress = Callable[[str, int, int], None]


def calibration_windows(tokenizer: Any, n: int, seq: int) -> torch.Tensor:
    """``(n, seq)`` token ids of memopt's calibration text (:func:`memopt.quant.calibrate.
    calibration_ids`), each window framed as the tokenizer frames one text: its first id the
    ``[CLS]``, its last the ``[SEP]`` (where the tokenizer has them)."""
    from memopt.quant.calibrate import calibration_ids

    ids = calibration_ids(tokenizer, n=n, seq=seq).clone()  # (N, T)
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and ids.shape[1] > 2:
        ids[:, 0] = cls
    if sep is not None and ids.shape[1] > 2:
        ids[:, -1] = sep
    return ids


def step_activations(meta: Any, batch: int, seq: int) -> int:
    """Bytes of the step's tensors beyond its weights at its peak, from the estimator (the step
    run on the meta device: :func:`memopt.measure.estimate.estimate`). MemoptError for a ``seq``
    over the model's positions."""
    from memopt.measure.estimate import estimate
    from memopt.step.step import StepSpec

    report = estimate(meta, StepSpec(task="infer", batch=batch, seq=seq))
    return report.peak_bytes - report.breakdown["params"] - report.breakdown["buffers"]


# --------------------------------------------------------------------------------------------------
# Quality costs


@torch.no_grad()
def cosine_costs(
    loaded: Any,
    units: list[Unit],
    ids: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill each unit's ``cost``: 1 − the mean cosine between the embeddings of ``ids (N, T)``
    (the last hidden state averaged over the tokens: no padding) and the float model's, when only
    that unit is rounded to nearest in each format. ``loaded`` is the float model (changed during
    the call, restored after).

    One float pass stores the hidden states entering every block; a block's cost runs that block
    and the ones after it, then the rest of the model (a final norm, if any) through a replay of
    the block list (memopt.quant.calibrate's); an embedding's or the pooler's runs the model."""
    from memopt.quant.calibrate import Replay, next_inputs

    model = loaded.model.eval()
    cal = Calibrated.of(model, ids)
    blocks, inputs = cal.blocks, cal.inputs

    def pooled(final: list[tuple[tuple, dict]] | None) -> torch.Tensor:
        """(N, H) mean of the last hidden state; the blocks replay ``final``'s hidden states
        (None: the whole model runs)."""
        if final is None:
            return model(input_ids=ids).last_hidden_state.float().mean(1)
        stored = [a[0] if a else kw["hidden_states"] for a, kw in final]
        saved = list(blocks)
        for j in range(len(blocks)):
            blocks[j] = Replay(stored if j == 0 else None, cal.as_tuple)
        try:
            return model(input_ids=ids).last_hidden_state.float().mean(1)
        finally:
            for j, blk in enumerate(saved):
                blocks[j] = blk

    def from_block(i: int) -> list[tuple[tuple, dict]]:
        cur = inputs[i]
        for block in blocks[i:]:
            cur = next_inputs(cur, [block(*a, **k) for a, k in cur])
        return cur

    ref = pooled(inputs[-1])  # (N, H)
    todo = [(u, f) for u in units for f in u.bytes if f != "float32"]
    for step, (unit, fmt) in enumerate(todo, 1):
        with cal.rounded(unit, fmt):
            out = pooled(from_block(unit.block) if unit.block is not None else None)
        cos = F.cosine_similarity(out, ref, dim=-1).mean().item()
        unit.cost[fmt] = max(0.0, 1.0 - cos)
        if progress is not None:
            progress(step, len(todo))


# --------------------------------------------------------------------------------------------------
# The plan


def plan_infer(
    name: str,
    budget: int,
    units: list[Unit],
    fixed: int,
    activations: int,
    runtime_bytes: int = INFER_RUNTIME_BYTES,
    runtime_int8_bytes: int = INFER_RUNTIME_INT8_BYTES,
) -> Plan:
    """The plan of least summed cost whose step fits ``budget`` bytes over the run's baseline:
    the units' formats + ``fixed`` (weights no unit covers) + ``activations`` + the runtime
    (``runtime_int8_bytes`` when a block is int8, else ``runtime_bytes``). MemoptError naming the
    smallest budget when nothing fits."""
    plain = [replace(u, bytes={f: b for f, b in u.bytes.items() if f != "int8"})
             if _is_block(u) else u for u in units]  # fmt: skip
    best: Plan | None = None
    smallest: tuple[int, int] | None = None  # (bytes, that plan's runtime)
    for menu, runtime in ((plain, runtime_bytes), (units, runtime_int8_bytes)):
        overhead = fixed + activations + runtime
        need = smallest_weights(menu) + overhead
        if smallest is None or need < smallest[0]:
            smallest = (need, runtime)
        chosen = choose(menu, budget - overhead) if budget > overhead else None
        if chosen is None:
            continue
        weights = sum(u.bytes[chosen[u.name]] for u in units)
        cost = sum(u.cost[chosen[u.name]] for u in units)
        if best is None or cost < best.predicted_cost:
            best = Plan("infer", chosen, weights, fixed, 0, activations, runtime, cost,
                        weights + overhead)  # fmt: skip
    if best is None:
        assert smallest is not None
        need, runtime = smallest
        raise too_small(name, budget, need, f"{activations / 1e6:.1f} MB activations", runtime)
    return best


def int8_blocks(units: list[Unit], formats: dict[str, str]) -> bool:
    """Whether a plan puts a block in int8 (the runtime of :data:`INFER_RUNTIME_INT8_BYTES`)."""
    return any(_is_block(u) and formats[u.name] == "int8" for u in units)


def _is_block(u: Unit) -> bool:
    return u.block is not None


# --------------------------------------------------------------------------------------------------
# Fit: plan, apply, measure


def fit_inference(
    source: Any,
    limit: int,
    budget: Budget,
    baseline: int,
    out_dir: str | Path | None,
    *,
    seq: int,
    batch: int,
    plan_only: bool,
    min_cosine: float | None,
    calib: torch.Tensor | None,
    calib_sequences: int,
    calib_seq: int,
    start: float,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """:func:`memopt.compose.fit.fit` for ``task="infer"`` (its checks and baseline done):
    ``limit`` bytes over the run's baseline. Returns generation's JSON, ``quality`` the
    embedding cosine (``fitted``: the mean over the held-out sentences, ``min`` the worst)."""
    from memopt.models import build_meta
    from memopt.models.saved import staged_folder

    meta = build_meta(source, dequantize=True)
    if meta.task != "encoder":
        raise MemoptError(
            f"{source.name}: fit --task infer needs an encoder (causal LMs: generate)"
        )
    units = units_of(meta.model)
    fixed = other_bytes(meta.model, units)
    activations = step_activations(meta, batch, seq)
    plan_infer(source.name, limit, units, fixed, activations)  # under the smallest: refused first
    measured_costs = has_weights(source)
    if measured_costs:
        if calib is None:  # one calibration for the costs and GPTQ alike
            calib = calibration_windows(meta.tokenizer(), calib_sequences, calib_seq)
        costs(source, units, calib, progress, measure=cosine_costs, tag="cosine")
    else:  # config.json alone: generation's prior, which follows bytes
        for u in units:
            params = sum(n * k for n, k in u.shapes)
            u.cost = {f: params * PRIOR_COST[f] for f in u.bytes}
    result: dict[str, Any] = {
        "model": source.name, "task": "infer", "budget_bytes": budget.bytes,
        "budget_is_total": budget.total, "limit_bytes": limit, "baseline_rss_bytes": baseline,
        "batch": batch, "seq": seq,
        "quality_costs": "measured (1 - cosine, calibration text)" if measured_costs
        else "prior (config.json only: no weights to measure)",
    }  # fmt: skip
    plan = plan_infer(source.name, limit, units, fixed, activations)
    if plan_only:
        return inference_result(result, plan, units, start)
    runtime, runtime_int8 = INFER_RUNTIME_BYTES, INFER_RUNTIME_INT8_BYTES
    attempts: list[dict[str, int]] = []  # each plan applied: predicted and measured peaks
    result["attempts"] = attempts
    with staged_folder(out_dir) as tmp:
        for revision in range(REVISIONS + 1):
            _stage(progress, f"applying the plan (revision {revision})")
            _apply(source, units, plan, tmp, calib, progress)
            _stage(progress, "measuring the step in a fresh process")
            over = _measure_step(tmp, batch, seq)
            attempts.append({"predicted_peak_bytes": plan.predicted_peak_bytes,
                             "measured_peak_bytes": over,
                             "runtime_bytes": plan.runtime_bytes})  # fmt: skip
            inference_result(result, plan, units, start)
            result.update(measured_peak_bytes=over, within_budget=over <= limit,
                          revisions=revision)  # fmt: skip
            if over <= limit:
                break
            if revision == REVISIONS:
                raise MemoptError(
                    f"{source.name}: the step still peaked at {over / 1e6:.1f} MB over a "
                    f"{limit / 1e6:.1f} MB budget after {REVISIONS} revisions"
                )
            # the step holds more than predicted: that much more runtime for plans of its kind
            # (int8 blocks or not), the weights that much less, plan again
            more = over - plan.predicted_peak_bytes + REVISION_MARGIN
            if int8_blocks(units, plan.formats):
                runtime_int8 += more
            else:
                runtime += more
            plan = plan_infer(source.name, limit, units, fixed, activations, runtime, runtime_int8)
        _stage(progress, "embedding cosine on held-out sentences")
        result["quality"] = _quality(source, tmp)
        fitted = result["quality"]["fitted"]
        if min_cosine is not None and fitted < min_cosine:
            raise MemoptError(
                f"the best plan within {limit / 1e6:.1f} MB reaches embedding cosine "
                f"{fitted:.4f}, under the asked {min_cosine} (a larger budget would do better)"
            )
        result["seconds"] = time.perf_counter() - start
        from memopt.core.atomic import atomic_write_text

        atomic_write_text(tmp / "fit.json", json.dumps(result, indent=1, default=str))
    result["output"] = str(out_dir)
    return result


def _stage(progress: Progress | None, what: str) -> None:
    if progress is not None:
        progress(what, 0, 1)


def _apply(
    source: Any,
    units: list[Unit],
    plan: Plan,
    out: Path,
    calib: torch.Tensor | None,
    progress: Progress | None,
) -> None:
    from memopt.quant.stream import quantize_model

    cb = (
        (lambda i, n: progress("quantizing (streamed, GPTQ where int4)", i, n))
        if progress
        else None
    )
    quantize_model(source, mixed_config(units, plan.formats), out, calib=calib, progress=cb)


def _measure_step(folder: Path, batch: int, seq: int) -> int:
    """Peak RSS of ``memopt profile FOLDER --task infer`` over its child's import baseline."""
    from memopt.measure.profile import profile
    from memopt.step.step import StepSpec

    report = profile(str(folder), StepSpec(task="infer", batch=batch, seq=seq))
    assert report.peak_rss_bytes is not None and report.baseline_rss_bytes is not None
    return report.peak_rss_bytes - report.baseline_rss_bytes


def _quality(source: Any, folder: Path) -> dict[str, Any]:
    """``memopt eval FOLDER --reference MODEL``: the embedding cosine on held-out sentences."""
    from memopt.evaluate import embedding_cosine
    from memopt.models import load_model

    r = embedding_cosine(load_model(folder), load_model(source, dtype=torch.float32))
    return {"metric": "embedding cosine against float32 (memopt's held-out sentences)",
            "fitted": r.cosine_mean, "min": r.cosine_min, "float32": 1.0,
            "sentences": r.sentences}  # fmt: skip
