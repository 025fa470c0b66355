"""Child-process entries of memopt.compose.fit (memopt.core.rss.run_in_child imports this module,
then takes the baseline): what a generation run imports is imported here, at the top, so that the
measured peak over the baseline is the run's own (weights, KV cache, tokenizer, runtime)."""

from __future__ import annotations

from typing import Any

import tokenizers  # noqa: F401 (in the baseline: the run's tokenizer library)
import torch

from memopt.engine.lean import open_model

__all__ = ["baseline_job", "generation_job"]


def baseline_job(task: str) -> dict[str, Any]:
    """Nothing: the child's RSS after this module's imports is the runtime's baseline."""
    return {"task": task}


def generation_job(
    folder: str, seq: int, max_new_tokens: int, kv_int8: bool = False
) -> dict[str, Any]:
    """``memopt run`` of ``folder`` on a ``seq``-token prompt (fixed ids) for exactly
    ``max_new_tokens`` tokens, through the engine straight from the files (``kv_int8``: an int8
    KV cache)."""
    lean = open_model(folder, seq + max_new_tokens, kv_int8)
    if lean is None:
        from memopt.generate import generate
        from memopt.models import load_model

        loaded = load_model(folder)
        vocab = int(loaded.config.vocab_size)
        ids = torch.randint(0, vocab, (seq,), generator=torch.Generator().manual_seed(0)).tolist()
        out = generate(loaded, ids, max_new_tokens, stop_at_eos=False, kv_int8=kv_int8)
    else:
        vocab = lean.engine.vocab
        ids = torch.randint(0, vocab, (seq,), generator=torch.Generator().manual_seed(0)).tolist()
        out = lean.generate(ids, max_new_tokens, stop_at_eos=False)
    return {
        "tokens_per_s": out["tokens_per_s"],
        "tokens": len(out["tokens"]),
        "engine": out["engine"],
    }
