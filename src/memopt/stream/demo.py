"""The streaming row of ``memopt demo``: a model run at a quarter of its float32 bytes, measured.

:func:`demo_row` generates greedily twice, each in a fresh child process
(:func:`memopt.stream.run.run_measured`): in memory (no budget) and streamed within ``share`` of
the float32 weights' bytes. It returns the budget, both peaks of RSS over the child's import
baseline, both decode speeds and their ratio, and whether the tokens are identical.

A GGUF model (the bundled smollm2) is first written as a float32 Hugging Face folder in execution
order (:func:`memopt.stream.layout.save_float_folder`) under ``out_dir``: streaming that folder
maps its pages, where streaming the GGUF would dequantize every block again for every token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from memopt.models import LoadedModel

__all__ = ["demo_row"]

PROMPT = "The capital of France is"


def demo_row(
    model: str | Path = "smollm2",
    out_dir: str | Path = "memopt-demo",
    *,
    share: float = 0.25,
    max_new_tokens: int = 16,
    loaded: LoadedModel | None = None,
    timeout: float | None = 600,
) -> dict[str, Any]:
    """Streamed vs in-memory generation of ``model`` at ``share`` of its float32 bytes.

    ``loaded``: the model already in memory (the demo has it), used to write the float folder of a
    GGUF without loading it again. Returns ``budget_bytes``, ``float32_bytes``,
    ``peak_over_baseline_bytes`` (streamed), ``within_budget``, ``in_memory_peak_over_baseline_bytes``,
    ``tokens_per_s`` and ``in_memory_tokens_per_s``, ``tokens_per_s_ratio``, ``same_tokens``,
    ``source`` (what was streamed) and ``seconds``. Raises :class:`~memopt.errors.MemoptError` if
    the budget is below the smallest that works.
    """
    from memopt.models import resolve
    from memopt.stream.executor import plan_budget
    from memopt.stream.run import run_measured

    start = time.perf_counter()
    source: str | Path = model
    if resolve(model).kind == "gguf":
        source = _float_folder(model, Path(out_dir) / "stream-float32", loaded)
    float_bytes = plan_budget(source, None).model_bytes  # every weight as float32, in RAM
    budget = int(float_bytes * share)
    # no end token: both runs generate exactly max_new_tokens, so the speeds compare like for like
    mem = run_measured(source, PROMPT, max_new_tokens, None, eos_token_id=-1, timeout=timeout)
    streamed = run_measured(
        source, PROMPT, max_new_tokens, budget, eos_token_id=-1, timeout=timeout
    )
    ratio = None
    if streamed.get("tokens_per_s") and mem.get("tokens_per_s"):
        ratio = streamed["tokens_per_s"] / mem["tokens_per_s"]
    peak = int(streamed["peak_over_baseline_bytes"])
    return {
        "model": str(model),
        "source": str(source),
        "share": share,
        "float32_bytes": float_bytes,
        "budget_bytes": budget,
        "peak_over_baseline_bytes": peak,
        "within_budget": peak <= budget,
        "in_memory_peak_over_baseline_bytes": int(mem["peak_over_baseline_bytes"]),
        "tokens_per_s": streamed.get("tokens_per_s"),
        "in_memory_tokens_per_s": mem.get("tokens_per_s"),
        "tokens_per_s_ratio": ratio,
        "same_tokens": streamed["tokens"] == mem["tokens"],
        "tokens": len(streamed["tokens"]),
        "text": streamed.get("text"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _float_folder(model: str | Path, folder: Path, loaded: LoadedModel | None) -> Path:
    """The float32 folder of a GGUF model, written once (reused when already complete)."""
    from memopt.stream.layout import save_float_folder

    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    if loaded is None:
        from memopt.models import load_model

        loaded = load_model(model)
    tmp = folder.with_name(folder.name + ".partial")  # never a half-written folder under its name
    save_float_folder(loaded, tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
