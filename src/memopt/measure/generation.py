"""The memory of generation (a KV cache), for estimate / profile.

Generation (``--task generate --max-new-tokens N``): a prefill forward over the ``seq`` prompt
positions fills the KV cache, then each of the ``N - 1`` further tokens is one decode forward of a
single position (the last token generated is never fed back). The cache then holds
``seq + N - 1`` positions::

    kv_cache = 2 (K and V) × layers × kv_heads × head_dim × positions × batch × itemsize

(an int8 cache, ``--kv-int8``: 1-byte codes plus a float32 scale per position and head). Decode
activations are tiny (one position), so the peak is bounded by the prefill step's peak plus the
full cache: ``peak_bytes = infer step's peak (seq positions) + kv_cache``. :func:`estimate_generation`
predicts both terms without a weight; :func:`profile_generation` measures both in a child: the
prefill-sized step under the tracker, then a real greedy generation whose cache tensors are counted
(storages once), and the child's peak RSS over the whole generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError

__all__ = [
    "cache_nbytes",
    "causal_lm_config",
    "estimate_generation",
    "kv_cache_bytes",
    "kv_positions",
    "profile_generation",
]


def kv_cache_bytes(
    config: Any, tokens: int, batch: int = 1, itemsize: int = 4, extra_layers: int = 0
) -> int:
    """Bytes of a KV cache holding ``tokens`` positions: ``2 × layers × kv_heads × head_dim ×
    tokens × batch × itemsize``; ``itemsize=1`` is memopt's int8 cache, which adds a float32 scale
    per position, head, K and V (``2 × layers × kv_heads × tokens × batch × 4``).
    ``extra_layers``: that many layers' K and V counted again (a cache that grows by ``torch.cat``
    holds a layer's old and new tensors for a moment)."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0))
    per_position = 2 * kv_heads * head_dim * itemsize + (2 * kv_heads * 4 if itemsize == 1 else 0)
    return (layers + extra_layers) * per_position * tokens * batch


def kv_positions(seq: int, max_new_tokens: int) -> int:
    """Positions in the cache after generating ``max_new_tokens`` from a ``seq``-token prompt."""
    return seq + max_new_tokens - 1


def cache_nbytes(cache: Any) -> int:
    """Bytes of the tensors a transformers ``Cache`` holds, each storage counted once."""
    import torch

    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for layer in getattr(cache, "layers", None) or []:
        for value in vars(layer).values():
            visit(value)
    return sum(seen.values())


def _itemsize(dtype: str, kv_int8: bool) -> int:
    from memopt.step.step import DTYPES

    return 1 if kv_int8 else DTYPES[dtype].itemsize


def _with_kv(report: dict[str, Any], kv: int, max_new_tokens: int, kv_int8: bool) -> dict[str, Any]:
    """A step report (prefill-sized) turned into generation's: the cache added to the peak."""
    report["breakdown"]["kv_cache"] = kv
    report["peak_bytes"] = int(report["peak_bytes"]) + kv
    spec = report["spec"]
    report["generation"] = {
        "task": "generate",
        "prompt_tokens": spec["seq"],
        "max_new_tokens": max_new_tokens,
        "kv_positions": kv_positions(spec["seq"], max_new_tokens),
        "kv_int8": kv_int8,
        "kv_cache_bytes": kv,
    }
    return report


def estimate_generation(
    model: str | Path, spec: Any, max_new_tokens: int, kv_int8: bool = False
) -> dict[str, Any]:
    """``memopt estimate MODEL --task generate``: the prefill step's estimate plus the KV cache."""
    from memopt.measure.estimate import estimate

    config = causal_lm_config(model)
    report = estimate(model, spec).to_dict()
    kv = kv_cache_bytes(
        config, kv_positions(spec.seq, max_new_tokens), spec.batch, _itemsize(spec.dtype, kv_int8)
    )
    return _with_kv(report, kv, max_new_tokens, kv_int8)


def profile_generation(
    model: str | Path, spec: Any, max_new_tokens: int, kv_int8: bool = False
) -> dict[str, Any]:
    """``memopt profile MODEL --task generate``, measured in a fresh child process."""
    from memopt.core.rss import run_in_child
    from memopt.models import resolve

    resolve(model)  # a missing file or unknown name fails here, before a child starts
    out = run_in_child(
        "memopt.measure.generation:_generation_in_child",
        str(model),
        spec.to_dict(),
        max_new_tokens,
        kv_int8,
    )
    report = out["report"]
    report["peak_rss_bytes"] = int(out["peak_rss_bytes"])
    report["baseline_rss_bytes"] = int(out["work_baseline_rss_bytes"])
    report["rss_scope"] = "child"
    report["seconds"] = round(float(out["seconds"]), 3)
    return report


def _generation_in_child(
    model: str, spec: dict[str, Any], max_new_tokens: int, kv_int8: bool
) -> dict[str, Any]:
    """The child's work: the tracked prefill-sized step, then a real greedy generation whose
    cache is counted."""
    import inspect

    import torch

    from memopt.core.rss import import_baseline
    from memopt.measure.profile import profile_loaded
    from memopt.models import load_model
    from memopt.step.step import StepSpec, synthetic_inputs

    baseline = import_baseline()
    step = StepSpec(**spec)
    loaded = load_model(model, **step.load_kwargs())
    if loaded.task != "causal-lm":
        raise MemoptError(f"{loaded.name} is not a causal language model: nothing to generate")
    report = profile_loaded(loaded, step).to_dict()
    if kv_int8:
        from memopt.weights.kvcache import use_int8_kv_cache  # noqa: I001

        use_int8_kv_cache(loaded.model, loaded.config)
    ids = synthetic_inputs(loaded, step)["input_ids"]  # (B, T)
    model = loaded.model
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)  # prefill: the cache holds T positions
        cache = getattr(out, "cache", None) or out.past_key_values
        for _ in range(max_new_tokens - 1):  # each decode step adds one position
            nxt = out.logits[:, -1:].argmax(-1)  # (B, 1)
            out = model(input_ids=nxt, use_cache=True, **{arg: cache})
            cache = getattr(out, "cache", None) or out.past_key_values
        kv = cache_nbytes(cache)
    return {
        "report": _with_kv(report, kv, max_new_tokens, kv_int8),
        "work_baseline_rss_bytes": baseline,
    }


def causal_lm_config(model: str | Path) -> Any:
    """The config of a causal LM, read on the meta device; MemoptError for any other model."""
    from memopt.models import build_meta

    meta = build_meta(model)
    if meta.task != "causal-lm":
        raise MemoptError(f"{meta.name} is not a causal language model: nothing to generate")
    return meta.config
