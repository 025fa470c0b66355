"""The memory of a streamed run (``--max-memory SIZE``), for ``memopt estimate`` / ``profile``.

:func:`estimate_streamed` is the stream planner's prediction of the peak RSS over the import
baseline (:func:`memopt.stream.run.predict`); :func:`profile_streamed` runs the streamed generation
in a fresh child (:func:`memopt.stream.run.run_measured`) and reports the measured peak RSS over
that child's import baseline as ``peak_bytes``. Both refuse a budget below the smallest that works,
naming it, before any weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.units import parse_size
from memopt.formats.safetensors import dtype_name
from memopt.models import build_meta, stored_dtype
from memopt.step.step import synthetic_inputs
from memopt.stream.run import predict, run_measured

__all__ = ["check_streamable", "estimate_streamed", "profile_streamed"]


def check_streamable(model: str | Path, spec: Any) -> None:
    """Refuse the step options a streamed run cannot honour, in one line."""
    if spec.task != "infer":
        raise MemoptError("--max-memory streams inference and generation: drop --task train")
    if spec.ranks != 1:
        raise MemoptError("--max-memory runs in one process: drop --ranks")
    if spec.batch != 1:
        raise MemoptError("--max-memory runs batch 1 (the streamed generator's): drop --batch")
    stored = dtype_name(stored_dtype(model))
    if spec.dtype != stored:
        raise MemoptError(
            f"--max-memory runs the model's stored dtype ({stored}): drop --dtype (quantize first)"
        )


def _new_tokens(generate: bool, max_new_tokens: int) -> int:
    # an inference step is a prefill: generation of one token (the cache is then the prompt's)
    return max_new_tokens if generate else 1


def estimate_streamed(
    model: str | Path,
    spec: Any,
    max_memory: int | str,
    *,
    generate: bool = False,
    max_new_tokens: int = 32,
    kv_int8: bool = False,
) -> dict[str, Any]:
    """``memopt estimate MODEL --max-memory SIZE``: the streamed run's predicted peak RSS over the
    import baseline (``peak_bytes``) and its terms (``breakdown``), reading no weight."""
    check_streamable(model, spec)
    n = _new_tokens(generate, max_new_tokens)
    out = predict(model, parse_size(max_memory), spec.seq, n, kv_int8=kv_int8)
    return {
        "model": str(model),
        "kind": "estimate",
        "mode": "streamed",
        "spec": spec.to_dict(),
        "max_memory_bytes": parse_size(max_memory),
        "peak_bytes": int(out["peak_bytes"]),
        "breakdown": out["breakdown"],
        "generation": {"prompt_tokens": spec.seq, "max_new_tokens": n, "kv_int8": kv_int8},
        "plan": {k: v for k, v in out.items() if k not in ("peak_bytes", "breakdown")},
        "modules": [],
        "timeline": [],
    }


def profile_streamed(
    model: str | Path,
    spec: Any,
    max_memory: int | str,
    *,
    generate: bool = False,
    max_new_tokens: int = 32,
    kv_int8: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``memopt profile MODEL --max-memory SIZE``: the streamed run measured in a fresh child.

    ``peak_bytes`` is the measured peak RSS over the child's import baseline (what the budget
    bounds); ``peak_rss_bytes`` the child's peak RSS. ``breakdown`` gives the plan's terms (weights
    resident at the peak, KV cache, activations, runtime): a streamed run holds no tracker, so these
    are the planner's, and ``breakdown_source`` says so. The prompt is ``seq`` synthetic token ids
    (the estimator's, seed 0) and exactly ``max_new_tokens`` are generated (no end token).
    """
    check_streamable(model, spec)
    n = _new_tokens(generate, max_new_tokens)
    budget = parse_size(max_memory)
    planned = predict(model, budget, spec.seq, n, kv_int8=kv_int8)  # refuses a budget too small
    ids = synthetic_inputs(build_meta(model), spec)["input_ids"][0].tolist()  # (T,)
    out = run_measured(model, ids, n, budget, kv_int8=kv_int8, eos_token_id=-1, timeout=timeout)
    return {
        "model": str(model),
        "kind": "profile",
        "mode": "streamed",
        "spec": spec.to_dict(),
        "max_memory_bytes": budget,
        "peak_bytes": int(out["peak_over_baseline_bytes"]),
        "peak_rss_bytes": int(out["peak_rss_bytes"]),
        "baseline_rss_bytes": int(out["baseline_rss_bytes"]),
        "rss_scope": "child",
        "predicted_peak_bytes": int(planned["peak_bytes"]),
        "breakdown": planned["breakdown"],
        "breakdown_source": "plan",
        "tokens_per_s": out.get("tokens_per_s"),
        "prefill_s": out.get("prefill_s"),
        "generation": {"prompt_tokens": spec.seq, "max_new_tokens": n, "kv_int8": kv_int8},
        "stream": out.get("stream"),
        "modules": [],  # a streamed run holds no tracker: no per-module figures
        "timeline": [],
        "seconds": round(float(out.get("seconds", 0.0)), 3),
    }
