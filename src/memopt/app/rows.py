"""The measured rows of ``memopt demo`` beyond its quantization table: pruning, streaming, training.

* :func:`prune_row` prunes a loaded model in place and reports bytes and sparsity (the demo
  measures its quality like its other rows).
* :func:`stream_row` generates greedily twice, each in a fresh child process
  (:func:`memopt.stream.run.run_measured`): in memory (no budget) and streamed within ``share`` of
  the float32 weights' bytes, and reports both peaks of RSS over the child's import baseline, both
  decode speeds and whether the tokens are identical. A GGUF model (the bundled smollm2) is first
  written as a float32 Hugging Face folder in execution order
  (:func:`memopt.stream.layout.save_float_folder`): streaming that folder maps its pages, where
  streaming the GGUF would dequantize every block again for every token.
* :func:`train_row`: plain float32 AdamW against every memory option, measured. Both trainers
  start from copies of one loaded model and run the same ``steps`` batches of token windows
  alternately (plain, optimized, plain, ...), so that load from other processes falls on both
  alike, and report ``peak_bytes`` (live tensor bytes at the peak of step 2: steady state, the
  optimizer state exists from step 1), ``step_s`` (the fastest untracked step after the first, wall
  clock) and ``step_cpu_s`` (that step's process CPU time, steadier on a shared machine), and
  ``loss`` (the last step's, same batches for both). The optimized set is activation checkpointing
  + AdamW8bit + bfloat16 weights with float32 master weights; where it is slower, the row says by
  how much rather than hiding it.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from typing import Any

import torch

from memopt.core.atomic import staged_folder
from memopt.core.errors import MemoptError
from memopt.core.texts import topics
from memopt.measure.tracker import MemoryTracker
from memopt.models import LoadedModel, load_model, resolve
from memopt.prune.api import calibration_ids, prune_
from memopt.prune.config import config_for_method
from memopt.step.step import StepSpec
from memopt.step.trainer import Trainer
from memopt.stream.executor import plan_budget
from memopt.stream.layout import save_float_folder
from memopt.stream.run import run_measured

__all__ = ["PROMPT", "TRAIN_OPTIMIZED", "prune_row", "stream_row", "train_row"]

PROMPT = "The capital of France is"


def prune_row(
    loaded: Any, method: str = "wanda", sparsity: float | None = 0.5, n_calib: int = 8
) -> dict[str, Any]:
    """The demo's pruning row: prune ``loaded`` (a LoadedModel; changed in place, pass a copy to
    keep the original) and return ``technique``, ``bytes_before``, ``bytes_after``, ``sparsity``,
    ``seconds``. Calibrated methods use ``n_calib`` x 256 tokens (8: quick enough for a demo;
    ``prune_model`` uses 64). The caller measures quality with
    memopt.evaluate on the returned model, as for its other rows."""
    config = config_for_method(method, sparsity)
    t = time.perf_counter()
    calib = calibration_ids(loaded, n_calib, 256) if config.needs_calibration else None
    report = prune_(loaded, config, calib=calib)
    label = f"prune {method}" + ("" if ":" in method else f" {report.sparsity:.0%}")
    return {
        "technique": label,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "sparsity": report.sparsity,
        "formats": report.formats,
        "seconds": time.perf_counter() - t,
    }


def stream_row(
    model: str | Path = "smollm2",
    out_dir: str | Path = "memopt-demo",
    *,
    share: float = 0.25,
    max_new_tokens: int = 16,
    loaded: LoadedModel | None = None,
    timeout: float | None = 600,
) -> dict[str, Any]:
    """Streamed vs in-memory generation of ``model`` at ``share`` of its float32 bytes.

    ``loaded``: the float model already in memory (the demo has it), used to write the float
    folder of a GGUF without loading it again. Returns ``budget_bytes``, ``float32_bytes``,
    ``peak_over_baseline_bytes`` (streamed), ``within_budget``, ``in_memory_peak_over_baseline_bytes``,
    ``tokens_per_s`` and ``in_memory_tokens_per_s``, ``tokens_per_s_ratio``, ``same_tokens``,
    ``source`` (what was streamed) and ``seconds``. Raises :class:`~memopt.core.errors.MemoptError` if
    the budget is below the smallest that works.
    """
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
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    if loaded is None:
        loaded = load_model(model, dequantize=True)  # the float32 weights, dequantized
    with staged_folder(folder, "model.safetensors") as tmp:  # never a half-written folder
        save_float_folder(loaded, tmp)
    return folder


# The option set the demo compares against plain float32 AdamW.
TRAIN_OPTIMIZED: dict[str, Any] = dict(
    checkpointing=True, optimizer="adamw8bit", dtype="bfloat16", master_weights=True
)


def _batches(loaded: LoadedModel, n: int, batch: int, seq: int) -> list[torch.Tensor]:
    """``n`` (batch, seq) id tensors: pydoc_data.topics text when the model has a tokenizer."""
    try:
        tok = loaded.tokenizer()  # cached on the LoadedModel once the demo has used it
    except (MemoptError, OSError, ValueError):
        tok = None
    vocab = int(loaded.vocab_size or 0)
    if tok is not None:
        text = "\n".join(list(topics().values())[:40])
        ids = tok(text, return_tensors="pt")["input_ids"][0]  # (n_tokens,)
        if ids.numel() >= n * batch * seq:
            return list(ids[: n * batch * seq].view(n, batch, seq))
    gen = torch.Generator().manual_seed(0)  # no tokenizer: fixed random ids
    return [torch.randint(0, max(vocab, 2), (batch, seq), generator=gen) for _ in range(n)]


def train_row(
    model: str | Path | LoadedModel = "smollm2",
    *,
    batch: int = 1,
    seq: int = 128,
    steps: int = 3,
    lr: float = 1e-4,
) -> dict[str, Any]:
    """Measured training comparison for the demo table (see the module docstring).

    ``model``: a name or folder (loaded once here) or an already loaded causal LM (copied, not
    changed). Returns ``{"batch", "seq", "steps", "options", "plain": {...}, "optimized": {...},
    "peak_ratio", "time_ratio", "loss_rel_diff"}``; each side has ``peak_bytes``, ``step_s`` and
    ``loss``. ``steps`` ≥ 3 (warm-up, tracked step, timed steps).
    """
    if steps < 3:
        raise MemoptError(f"the demo training row needs at least 3 steps, got {steps}")
    base = model if isinstance(model, LoadedModel) else load_model(model, dequantize=True)
    if base.task != "causal-lm":
        raise MemoptError(f"{base.name}: the training row needs a causal language model")
    options = {"plain": {}, "optimized": TRAIN_OPTIMIZED}
    trainers = {}
    for side, opts in options.items():
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)  # the caller's model is not touched
        spec = StepSpec(task="train", batch=batch, seq=seq, **opts)
        trainers[side] = Trainer(loaded, spec, lr=lr)
        loaded.model.train()
    batches = _batches(base, steps, batch, seq)
    out: dict[str, Any] = {"batch": batch, "seq": seq, "steps": steps, "options": TRAIN_OPTIMIZED}
    times: dict[str, list[tuple[float, float]]] = {side: [] for side in options}  # (wall, cpu)
    peaks: dict[str, int] = {}
    losses: dict[str, float] = {}
    for i, ids in enumerate(batches):
        for side, trainer in trainers.items():
            gc.collect()
            micro = [{"input_ids": ids}]
            if i == 1:  # tracked: the optimizer state exists since step 0
                tracker = MemoryTracker(trainer.loaded.model, per_module=False, timeline=False)
                trainer.attach(tracker)
                with tracker:
                    losses[side] = float(trainer.step(micro))
                peaks[side] = tracker.peak_bytes
                continue
            t, c = time.perf_counter(), time.process_time()
            losses[side] = float(trainer.step(micro))
            if i >= 2:
                times[side].append((time.perf_counter() - t, time.process_time() - c))
    for side in options:
        wall, cpu = min(times[side])  # the least disturbed step
        out[side] = {
            "peak_bytes": peaks[side],
            "step_s": wall,
            "step_cpu_s": cpu,
            "loss": losses[side],
        }
    p, o = out["plain"], out["optimized"]
    out["peak_ratio"] = o["peak_bytes"] / p["peak_bytes"]
    out["time_ratio"] = o["step_s"] / p["step_s"]
    out["loss_rel_diff"] = (o["loss"] - p["loss"]) / p["loss"]
    return out
