"""``memopt fit --task train``: the training options that fit a budget, chosen with the estimator,
then trained for N steps against plain float32 AdamW on the same data.

The search (:func:`plan_training`) goes over every combination of checkpointing, the chunked LM-head
loss (:mod:`memopt.step.loss`), 8-bit AdamW, bfloat16 weights with float32 masters and gradient
accumulation 2 (half the micro-batch: the same global batch), each estimated on the meta device
(:func:`memopt.measure.estimate.estimate`, no weight read). A set's predicted peak is its estimate
plus :data:`TRAIN_RUNTIME_BYTES` (what a run holds beyond its live tensors); its predicted step time
is :func:`step_factor` × plain's. The set kept is the fastest predicted one that fits (ties: fewer
options on). With ``ranks > 1`` FSDP2 (:mod:`memopt.train.fsdp`) over 2 ..
``ranks`` processes enters the search, the global batch split over the ranks, only when no
single-process set fits (its step time is not in the measured table, and it takes that many
processes); the peak of one rank is then what must fit.

The measurement (:func:`fit_training`): ``steps`` steps of the chosen set and of plain float32
AdamW, each in a fresh child (memopt.compose._train_jobs), from the same weights, seed and windows
of token ids (memopt's calibration text through the model's tokenizer, tokenized once here; a fixed
random stream of ids when the model has none), at the same global batch, under the same heap
policy (glibc's mmap threshold fixed at 4 MiB: memopt.compose._train_jobs says why). Each reports
its peak RSS over the child's own import baseline (per rank under FSDP2: the largest), the median
step time (steps 2 .. N: the first creates the optimizer state) and the loss: the mean training
loss of the last :data:`LOSS_TAIL` steps (each step's loss is its global batch's mean next-token
cross-entropy). The plain run is the comparison and may exceed the budget. A fitted run over the
budget adds its excess to the overhead and plans again (up to REVISIONS times), as the inference
path does.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from memopt.compose.fit import REVISIONS, Plan
from memopt.core.errors import MemoptError

__all__ = [
    "LOSS_TAIL",
    "OPTIONS",
    "SET_FACTOR",
    "STEP_FACTOR",
    "TRAIN_RUNTIME_BYTES",
    "fit_training",
    "plan_training",
    "step_factor",
]

OPTIONS = ("checkpointing", "chunked_loss", "adamw8bit", "bf16", "grad_accum")

# Step time of each option against plain float32 AdamW, from README's training table (bench/train.py,
# smollm2, batch 4 × seq 512, two threads; "step s" over plain's 13.3 s):
#   checkpointing  1.21 = 1.28 / 1.06: its row (17.1 s, 1.28) has the chunked loss on with it
#   chunked_loss   1.06: "chunked LM-head loss alone", 14.1 s
#   adamw8bit      1.14: "AdamW8bit alone", 15.2 s
#   bf16           0.77: "bf16 + fp32 master weights alone", 10.2 s (this CPU has AVX-512 BF16)
#   grad_accum     1.0:  "grad-accum 2", 13.1 s measured (0.99: noise, so it is used only where
#                        memory needs it)
# A set's factor is the product of its options', or the table's own row when it has one
# (SET_FACTOR: the options interact, bf16 also speeds up the recomputation). FSDP2 ranks are not in
# the table: they are not timed here, and enter the search only when nothing else fits.
STEP_FACTOR = {
    "checkpointing": 1.21,
    "chunked_loss": 1.06,
    "adamw8bit": 1.14,
    "bf16": 0.77,
    "grad_accum": 1.0,
}
SET_FACTOR: dict[frozenset[str], float] = {
    frozenset({"checkpointing", "chunked_loss"}): 1.28,
    frozenset({"checkpointing", "chunked_loss", "adamw8bit"}): 1.24,
    frozenset({"checkpointing", "chunked_loss", "adamw8bit", "bf16"}): 0.80,
    frozenset({"checkpointing", "chunked_loss", "adamw8bit", "bf16", "grad_accum"}): 0.84,
}

# What a training run's peak RSS over its child's import baseline holds beyond the tracker's live
# tensors at the peak (the first step's lazy initialisation: thread pools, kernels; the C heap's
# slack; what the load keeps resident): measured 42-46 MB on tiny Llamas and 146 MB on smollm2
# (checkpointing + AdamW8bit + bf16, 1 × 64: its GGUF's load keeps ~77 MB more resident). A run
# that holds more than predicted is planned again with its excess.
TRAIN_RUNTIME_BYTES = 96 << 20
LOSS_TAIL = 5  # the reported loss: the mean of the last 5 steps' losses
LR = 1e-4  # memopt finetune's default
SEED = 0
_MARGIN = 1 << 20  # added to a revision's excess: a run's RSS varies by a few hundred KB


def step_factor(options: dict[str, Any]) -> float:
    """Predicted step time of a set of options (``{option: on}``) against plain float32 AdamW."""
    on = frozenset(k for k in OPTIONS if options.get(k))
    if on in SET_FACTOR:
        return SET_FACTOR[on]
    return math.prod(STEP_FACTOR[k] for k in on)


def _label(options: dict[str, Any]) -> str:
    names = {"checkpointing": "checkpointing", "chunked_loss": "chunked loss",
             "adamw8bit": "AdamW8bit", "bf16": "bf16 + fp32 masters",
             "grad_accum": "grad-accum 2"}  # fmt: skip
    parts = [names[k] for k in OPTIONS if options.get(k)]
    if options.get("ranks", 1) > 1:
        parts.append(f"FSDP2 × {options['ranks']}")
    return " + ".join(parts) or "plain float32 AdamW"


def _step_spec(spec: Any, o: dict[str, Any], chunk: int) -> Any:
    """The StepSpec of option set ``o``: ``spec.batch`` is the global batch, split over
    ``o["ranks"]`` ranks and (grad_accum) two micro-batches."""
    accum = 2 if o["grad_accum"] else 1
    return replace(
        spec, checkpointing=o["checkpointing"], loss_chunk=chunk if o["chunked_loss"] else 0,
        optimizer="adamw8bit" if o["adamw8bit"] else "adamw",
        dtype="bfloat16" if o["bf16"] else "float32", master_weights=o["bf16"],
        grad_accum=accum, batch=spec.batch // (accum * o["ranks"]), ranks=o["ranks"],
        checkpoint_blocks=None,
    )  # fmt: skip


def _candidates(spec: Any, ranks: int, can_chunk: bool) -> list[dict[str, Any]]:
    """Every option set, in the order of the search: single process first, then by predicted
    step time, then by how many options are on."""
    sizes = [1] + [r for r in range(2, ranks + 1) if spec.batch % r == 0]
    if ranks > 1 and len(sizes) == 1:
        raise MemoptError(
            f"--ranks {ranks} splits the global --batch {spec.batch} over the ranks: give a "
            f"--batch divisible by 2 .. {ranks}"
        )
    out = []
    for r in sizes:
        for flags in _product(len(OPTIONS)):
            o = dict(zip(OPTIONS, flags, strict=True))
            if o["chunked_loss"] and not can_chunk:
                continue
            if o["grad_accum"] and (spec.batch // r) % 2:
                continue  # accumulation halves the micro-batch: it must split evenly
            o["ranks"] = r
            o["step_factor"] = step_factor(o)
            out.append(o)
    out.sort(key=lambda o: (o["ranks"], o["step_factor"], sum(o[k] for k in OPTIONS)))
    return out


def _product(n: int) -> list[tuple[bool, ...]]:
    return [tuple(bool(i >> j & 1) for j in range(n)) for i in range(2**n)]


def plan_training(
    model: Any,
    spec: Any,
    budget: int,
    *,
    ranks: int = 1,
    overhead: int = TRAIN_RUNTIME_BYTES,
    cache: dict[tuple, int] | None = None,
) -> Plan:
    """The fastest predicted option set whose estimated peak plus ``overhead`` fits ``budget``
    bytes (per rank under FSDP2). ``model``: a LoadedModel (built on meta when it is not, from a
    name or path); ``spec``: the training step, ``spec.batch`` its global batch. ``cache`` keeps
    estimates between calls (a revision plans again with a larger overhead). MemoptError naming
    the smallest estimated peak when no set fits."""
    from memopt.measure.estimate import estimate
    from memopt.models import LoadedModel, build_meta
    from memopt.step.loss import chunk_tokens, head_of

    loaded = model if isinstance(model, LoadedModel) else build_meta(model, dequantize=True)
    cache = {} if cache is None else cache
    head = head_of(loaded.model) if loaded.task == "causal-lm" else None
    chunk = chunk_tokens(head[1].out_features) if head is not None else 0

    def estimated(o: dict[str, Any]) -> int:
        key = tuple(o[k] for k in (*OPTIONS, "ranks"))
        if key not in cache:
            cache[key] = estimate(loaded, _step_spec(spec, o, chunk)).peak_bytes
        return cache[key]

    plain = dict.fromkeys(OPTIONS, False) | {"ranks": 1}
    plain_bytes = estimated(plain)
    tried: list[dict[str, Any]] = []
    chosen = None
    for o in _candidates(spec, ranks, chunk > 0):
        peak = estimated(o) + overhead
        tried.append({**o, "predicted_peak_bytes": peak})
        if peak <= budget:
            chosen = o
            break
    if chosen is None:
        small = min(tried, key=lambda t: t["predicted_peak_bytes"])
        raise MemoptError(
            f"a training budget of {budget / 1e6:.1f} MB is too small for {loaded.name}: the "
            f"smallest option set ({_label(small)}) needs an estimated "
            f"{math.ceil(small['predicted_peak_bytes'] / 1e5) / 10:.1f} MB per process "
            f"({overhead / 1e6:.0f} MB of it the run's overhead beyond its tensors)"
        )
    s = _step_spec(spec, chosen, chunk)
    peak = estimated(chosen)
    opts = {**{k: chosen[k] for k in OPTIONS}, "label": _label(chosen), "ranks": s.ranks,
            "loss_chunk": s.loss_chunk, "optimizer": s.optimizer, "dtype": s.dtype,
            "master_weights": s.master_weights, "grad_accum": s.grad_accum, "batch": s.batch,
            "global_batch": spec.batch, "seq": spec.seq, "step_factor": chosen["step_factor"],
            "estimate_bytes": peak, "plain_estimate_bytes": plain_bytes,
            "spec": s.to_dict(), "tried": tried}  # fmt: skip
    return Plan("train", {}, 0, 0, 0, 0, overhead, 0.0, peak + overhead, opts)


# --------------------------------------------------------------------------------------------------
# Measuring: the chosen set and plain float32 AdamW, N steps each in a child


def fit_training(
    source: Any,
    limit: int,
    budget: Any,
    baseline: int,
    *,
    seq: int = 128,
    batch: int = 1,
    plan_only: bool = False,
    start: float | None = None,
    steps: int = 50,
    ranks: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """``fit --task train`` of ``source`` (a resolved model) within ``limit`` bytes over the run's
    baseline: plan, then (unless ``plan_only``) ``steps`` steps of the plan and of plain float32
    AdamW, measured (the module docstring). ``batch`` is the global batch of a step.

    Returns the keys of :func:`memopt.compose.fit.fit` (``predicted_peak_bytes``,
    ``measured_peak_bytes``, ``within_budget``: the fitted run's, ``plan``) and ``training``:
    ``steps``, ``fitted`` and ``plain`` (each ``peak_bytes``, ``step_s``, ``loss``),
    ``step_time_ratio`` (fitted / plain) and ``loss_delta`` (fitted − plain, nats a token)."""
    from memopt.compose.memory import step_spec
    from memopt.models import build_meta

    start = time.perf_counter() if start is None else start
    for name, value in (("steps", steps), ("ranks", ranks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MemoptError(f"--{name} must be a whole number ≥ 1, got {value!r}")
    meta = build_meta(source, dequantize=True)
    if meta.task != "causal-lm":
        raise MemoptError(f"{source.name}: fit --task train needs a causal language model")
    spec = step_spec(source.path, "train", batch=batch, seq=seq)
    if progress is not None:
        progress("estimating the training options", 0, 1)
    cache: dict[tuple, int] = {}
    plan = plan_training(meta, spec, limit, ranks=ranks, cache=cache)
    result: dict[str, Any] = {
        "model": source.name, "task": "train", "budget_bytes": budget.bytes,
        "budget_is_total": budget.total, "limit_bytes": limit, "baseline_rss_bytes": baseline,
        "seq": seq, "batch": batch, "predicted_peak_bytes": plan.predicted_peak_bytes,
        "measured_peak_bytes": None, "within_budget": None, "plan": plan.to_dict(),
        "quality": None, "training": None,
    }  # fmt: skip
    if plan_only:
        result["seconds"] = time.perf_counter() - start
        return result
    tokens, data = _tokens(meta, seq)
    job = {"model": str(source.path), "steps": steps, "seed": SEED, "lr": LR, "tokens": tokens,
           "rows": batch}  # fmt: skip
    overhead = plan.runtime_bytes
    for revision in range(REVISIONS + 1):
        if progress is not None:
            progress(f"training {steps} steps: {plan.options['label']} (revision {revision})", 0, 1)
        fitted = _run({**job, "spec": plan.options["spec"]})
        over = fitted["peak_bytes"]
        result.update(predicted_peak_bytes=plan.predicted_peak_bytes, plan=plan.to_dict(),
                      measured_peak_bytes=over, within_budget=over <= limit,
                      revisions=revision)  # fmt: skip
        if over <= limit:
            break
        if revision == REVISIONS:
            raise MemoptError(
                f"{source.name}: training still peaked at {over / 1e6:.1f} MB over a "
                f"{limit / 1e6:.1f} MB budget after {REVISIONS} revisions"
            )
        # the run holds more than predicted: that much more overhead for every set, plan again
        overhead += over - plan.predicted_peak_bytes + _MARGIN
        plan = plan_training(meta, spec, limit, ranks=ranks, overhead=overhead, cache=cache)
    if progress is not None:
        progress(f"training {steps} steps: plain float32 AdamW (the comparison)", 0, 1)
    plain_spec = replace(spec, dtype="float32", optimizer="adamw", checkpointing=False,
                         loss_chunk=0, master_weights=False, grad_accum=1, ranks=1)  # fmt: skip
    plain = _run({**job, "spec": plain_spec.to_dict()})
    result["training"] = {
        "steps": steps, "data": data,
        "loss_is": f"mean training loss of the last {min(LOSS_TAIL, steps)} steps",
        "step_s_is": "median step time, steps 2..N", "peak_is": "peak RSS over the child's baseline",
        "fitted": _summary(fitted), "plain": _summary(plain),
        "plain_within_budget": plain["peak_bytes"] <= limit,
        "step_time_ratio": fitted["step_s"] / plain["step_s"],
        "loss_delta": fitted["loss"] - plain["loss"],
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    return result


def _tokens(meta: Any, seq: int) -> tuple[list[int], str]:
    """The ids both runs train on: memopt's calibration text through the model's tokenizer, or a
    fixed random stream (seed 0) when the model has none; and what they are, in words."""
    from memopt.core.texts import default_calib_text

    try:
        tok = meta.tokenizer()
    except MemoptError:
        tok = None
    if tok is not None:
        ids = tok(default_calib_text())["input_ids"]
        data = f"memopt's calibration text, {len(ids)} tokens"
    else:
        n = max(32_768, 4 * seq)
        gen = torch.Generator().manual_seed(SEED)
        ids = torch.randint(0, int(meta.vocab_size), (n,), generator=gen).tolist()
        data = f"{n} random token ids, seed {SEED} (the model has no tokenizer)"
    if len(ids) < seq + 1:
        raise MemoptError(f"the training text holds {len(ids)} tokens, fewer than --seq {seq} + 1")
    return [int(i) for i in ids], data


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a fresh child: its peak (per rank: the largest), step time, loss."""
    from memopt.core.rss import run_in_child

    out = run_in_child("memopt.compose._train_jobs:training_job", job, timeout=7200)
    if "rank_peak_bytes" in out:
        peak = max(int(p) for p in out["rank_peak_bytes"])
    else:
        peak = int(out["peak_rss_bytes"]) - int(out["baseline_rss_bytes"])
    times = out["step_seconds"][1:] or out["step_seconds"]
    losses = out["losses"]
    tail = losses[-min(LOSS_TAIL, len(losses)) :]
    return {"peak_bytes": peak, "step_s": statistics.median(times),
            "loss": sum(tail) / len(tail), "losses": losses}  # fmt: skip


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    return {"peak_bytes": run["peak_bytes"], "step_s": run["step_s"], "loss": run["loss"]}
