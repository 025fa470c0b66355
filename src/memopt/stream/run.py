"""Entry points for ``memopt run --max-memory`` and ``memopt estimate/profile --max-memory``.

* :func:`run_measured` — what ``memopt run MODEL --prompt P --max-new-tokens N --max-memory SIZE``
  calls: checks the budget here (one-line :class:`MemoptError` naming the smallest budget that
  works, before any weight is read or a process started), then generates in a fresh child process
  (:func:`memopt.core.rss.run_in_child`) and returns ``text``, ``tokens_per_s`` and
  ``peak_rss_bytes`` (the child's peak RSS) with its ``baseline_rss_bytes`` (after the imports) and
  ``peak_over_baseline_bytes`` — the figure the budget bounds.
* :func:`run` — the same generation in this process (no RSS figure of its own).
* :func:`predict` — the streamed run's predicted peak for ``estimate --max-memory``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.core.heap import trim_heap
from memopt.core.rss import run_in_child
from memopt.core.units import parse_size
from memopt.generate import generate, prompt_ids
from memopt.models import LoadedModel, build_meta
from memopt.stream.executor import plan_budget, stream_model

__all__ = [
    "predict",
    "prompt_token_count",
    "run",
    "run_job",
    "run_measured",
]


def prompt_token_count(model: str | Path, prompt: str | list[int], chat: bool = False) -> int:
    """Tokens of ``prompt`` for ``model``, reading its tokenizer only (no weights)."""
    if not isinstance(prompt, str):
        return len(prompt)
    meta: LoadedModel = build_meta(model)
    return int(prompt_ids(meta, prompt, chat).shape[1])


def predict(
    model: str | Path,
    max_memory: int | None,
    prompt_tokens: int = 128,
    max_new_tokens: int = 32,
    batch: int = 1,
    kv_int8: bool = False,
) -> dict[str, Any]:
    """The streamed run's plan and predicted peak RSS over the import baseline (no weights read).

    For ``memopt estimate MODEL --max-memory SIZE [--seq S]``: ``prompt_tokens`` = S. Returns the
    plan's dict: ``predicted_peak_bytes`` = rest + pinned blocks + 2 × largest streamed unit (current
    + prefetch) + ``kv_cache_bytes`` + ``activation_bytes`` + ``reserve_bytes``, and the terms.
    Raises :class:`MemoptError` (one line, naming ``min_budget_bytes``) below the smallest budget.
    ``peak_bytes`` and ``breakdown`` follow ``memopt estimate``'s JSON (``params`` = resident +
    pinned + the two streamed units; ``kv_cache`` and ``runtime`` added).
    """
    plan = plan_budget(
        model, max_memory, tokens=prompt_tokens + max_new_tokens, prompt_tokens=prompt_tokens,
        batch=batch, kv_int8=kv_int8,
    )  # fmt: skip
    out = plan.to_dict()
    out["peak_bytes"] = plan.predicted_peak_bytes
    # the plan's KV term is the full cache plus one layer's K and V again (torch.cat's moment of
    # old + new): the cache itself is kv_cache, the moment goes with the runtime's transients
    layers = len(plan.block_bytes)
    kv = plan.kv_cache_bytes
    if layers and not plan.engine:  # the decode engine's cache is allocated once, at its size
        kv = plan.kv_cache_bytes * layers // (layers + 1)
    out["breakdown"] = {  # estimate's keys, plus the two that streaming adds
        "params": plan.rest_bytes + plan.pinned_bytes + plan.working_bytes,
        "buffers": 0,
        "grads": 0,
        "optimizer": 0,
        "activations": plan.activation_bytes,
        "kv_cache": kv,
        "runtime": plan.reserve_bytes + plan.scratch_bytes + plan.kv_cache_bytes - kv,
    }
    return out


def run(
    model: str | Path,
    prompt: str | list[int],
    max_new_tokens: int = 32,
    max_memory: int | str | None = None,
    *,
    chat: bool = False,
    prefetch: bool = True,
    warmup: bool = True,
    eos_token_id: int | None = None,
    kv_int8: bool = False,
) -> dict[str, Any]:
    """Generate greedily under ``max_memory`` (None: no budget) in this process.

    Returns generate's result (``text``, ``tokens``, ``tokens_per_s``, ``prefill_s``...) with
    ``plan`` (:class:`~memopt.stream.executor.StreamPlan` as a dict) and ``stream`` (prefetch hits,
    waits, bytes streamed). A prompt given as token ids is run without loading the tokenizer at all
    (``eos_token_id`` then says where to stop; ``text`` is None).
    """
    budget = None if max_memory is None else parse_size(max_memory)
    # The tokenizer is needed before (encode) and after (decode), not while the model runs; a
    # fast tokenizer of a large vocabulary holds a sizeable share of a small model's budget (more
    # while loading). So: encode, free it, run on ids, decode with a fresh one.
    meta = build_meta(model)
    ids = prompt_ids(meta, prompt, chat)[0].tolist()  # (T,)
    eos = getattr(meta.tokenizer(), "eos_token_id", None) if isinstance(prompt, str) else None
    eos = eos_token_id if eos_token_id is not None else eos
    meta._tokenizer = None
    trim_heap()
    with stream_model(
        model, budget, tokens=len(ids) + max_new_tokens, prompt_tokens=len(ids), prefetch=prefetch,
        kv_int8=kv_int8,
    ) as streamed:  # fmt: skip
        streamed.loaded._tokenizer = _DeferredTokenizer(eos)
        # eos -1: no end token, exactly max_new_tokens (benchmarks, profile). The decode engine
        # runs the model when the plan counted its terms (everything resident), with its own KV
        # cache (int8 with kv_int8), else when generate() finds it can.
        engine = True if streamed.plan.engine else None
        out = generate(
            streamed.loaded, ids, max_new_tokens, warmup=warmup, stop_at_eos=eos != -1,
            engine=engine, kv_int8=kv_int8,
        )  # fmt: skip
        out["plan"] = streamed.plan.to_dict()
        out["stream"] = streamed.stats()
    del streamed
    trim_heap()
    out["text"] = None
    if isinstance(prompt, str):
        with contextlib.suppress(MemoptError):
            out["text"] = meta.tokenizer().decode(out["tokens"], skip_special_tokens=True)
    return out


class _DeferredTokenizer:
    """Stands in for the tokenizer while the model runs: generate() asks it only for the end
    token and for a decode, which is done afterwards (``text`` is filled in by :func:`run`)."""

    def __init__(self, eos_token_id: int | None) -> None:
        self.eos_token_id = eos_token_id

    def decode(self, *_args: Any, **_kwargs: Any) -> str:
        raise MemoptError("decoded after the run")


def run_job(
    model: str,
    prompt: str | list[int],
    max_new_tokens: int,
    max_memory: int | None,
    chat: bool = False,
    prefetch: bool = True,
    eos_token_id: int | None = None,
    kv_int8: bool = False,
) -> dict[str, Any]:
    """JSON-in, JSON-out :func:`run` for :func:`memopt.core.rss.run_in_child`."""
    return run(
        model, prompt, max_new_tokens, max_memory, chat=chat, prefetch=prefetch,
        eos_token_id=eos_token_id, kv_int8=kv_int8,
    )  # fmt: skip


def run_measured(
    model: str | Path,
    prompt: str | list[int],
    max_new_tokens: int = 32,
    max_memory: int | str | None = None,
    *,
    chat: bool = False,
    prefetch: bool = True,
    timeout: float | None = None,
    kv_int8: bool = False,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """``memopt run``: generate in a fresh child process and measure its peak RSS.

    The budget is checked first, here (no weights read, no child started). Returns ``text``,
    ``tokens``, ``tokens_per_s``, ``peak_rss_bytes``, ``baseline_rss_bytes``,
    ``peak_over_baseline_bytes`` (what ``max_memory`` bounds), ``max_memory_bytes``, ``plan``,
    ``stream`` and ``seconds``. ``eos_token_id`` overrides the tokenizer's end token (``-1``: none,
    generate exactly ``max_new_tokens``).
    """
    budget = None if max_memory is None else parse_size(max_memory)
    # The tokenizer runs here, in the calling process: the child gets token ids and returns token
    # ids, so that its peak RSS is the model's run alone (a large vocabulary's fast tokenizer,
    # while loading, can take more than a small model's whole budget).
    meta = build_meta(model)  # a missing or bad model fails here in one line
    ids = prompt_ids(meta, prompt, chat)[0].tolist()  # (T,)
    tok = meta.tokenizer() if isinstance(prompt, str) else None
    eos = eos_token_id if eos_token_id is not None else getattr(tok, "eos_token_id", None)
    if budget is not None:  # refused here: no weight read, no child started
        plan_budget(
            model, budget, tokens=len(ids) + max_new_tokens, prompt_tokens=len(ids),
            kv_int8=kv_int8,
        )  # fmt: skip
    out = run_in_child(
        "memopt.stream._job:run_job",
        str(model),
        ids,
        max_new_tokens,
        budget,
        False,
        prefetch,
        eos,
        kv_int8,
        timeout=timeout,
    )
    out["text"] = tok.decode(out["tokens"], skip_special_tokens=True) if tok is not None else None
    out["max_memory_bytes"] = budget
    out["peak_over_baseline_bytes"] = int(out["peak_rss_bytes"]) - int(out["baseline_rss_bytes"])
    return out
