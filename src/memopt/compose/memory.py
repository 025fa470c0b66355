"""The memory of a run, estimated or measured: one call behind ``memopt estimate`` and ``profile``.

:func:`memory_report` takes the options as the command line has them and picks the path: one step
(infer or train) on the meta device or measured in a child; generation with its KV cache; a run
streamed under ``--max-memory``. :func:`step_spec` holds the policy that turns the options into a
:class:`~memopt.step.step.StepSpec`:

* the dtype is the checkpoint's own unless one is asked for (:func:`memopt.models.stored_dtype`);
* a checkpoint stored quantized (a GGUF file's Q4_1 / Q8_0 ... blocks) runs inference in those
  blocks, counted as they are; an explicit dtype means dequantized to it, and a training step
  dequantizes (to float32 unless a dtype is asked for): blocks have no gradients;
* a 16-bit training step keeps float32 master weights (without them round-to-nearest loses the
  small updates: memopt.step.precision);
* ``generate`` sizes its step as the prefill over the ``seq``-token prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError
from memopt.formats.safetensors import dtype_name
from memopt.measure.estimate import estimate
from memopt.measure.generation import estimate_generation, profile_generation
from memopt.measure.profile import profile
from memopt.models import keeps_blocks, stored_dtype
from memopt.step.step import StepSpec
from memopt.stream.memory import estimate_streamed, profile_streamed

__all__ = ["TASKS", "memory_report", "step_spec"]

TASKS = ("infer", "train", "generate")


def step_spec(
    model: str | Path,
    task: str = "infer",
    *,
    batch: int = 1,
    seq: int = 128,
    dtype: str | None = None,
    optimizer: str = "adamw",
    checkpointing: bool = False,
    ranks: int = 1,
    grad_accum: int = 1,
) -> StepSpec:
    """The step that ``memopt estimate`` / ``profile`` run for these options (the policy above)."""
    if task not in TASKS:
        raise MemoptError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    dequantize = task == "train" or dtype is not None
    dtype = dtype or dtype_name(stored_dtype(model))
    return StepSpec(
        task="infer" if task == "generate" else task,  # generate: the prefill-sized step
        batch=batch,
        seq=seq,
        dtype=dtype,
        optimizer=optimizer,
        checkpointing=checkpointing,
        ranks=ranks,
        grad_accum=grad_accum,
        master_weights=task == "train" and dtype != "float32",
        dequantize=dequantize,
    )


def memory_report(
    model: str | Path,
    *,
    measured: bool = False,
    task: str = "infer",
    batch: int = 1,
    seq: int = 128,
    dtype: str | None = None,
    optimizer: str = "adamw",
    checkpointing: bool = False,
    ranks: int = 1,
    grad_accum: int = 1,
    max_new_tokens: int = 32,
    kv_int8: bool = False,
    max_memory: int | str | None = None,
) -> dict[str, Any]:
    """The memory of the run these options describe, as ``memopt estimate`` (``measured=False``:
    the meta device, no weight read) or ``memopt profile`` (``measured=True``: the real run in a
    fresh child process) report it: ``peak_bytes``, ``breakdown``, ``spec`` and, measured,
    ``peak_rss_bytes`` and ``baseline_rss_bytes``; ``weights`` says when a GGUF's quantized blocks
    were kept as stored (not under ``max_memory``: the streamed run dequantizes)."""
    stored = dtype_name(stored_dtype(model))
    if max_memory is not None and dtype not in (None, stored):
        raise MemoptError(
            f"--max-memory runs the model's stored dtype ({stored}): drop --dtype (quantize first)"
        )
    spec = step_spec(
        model, task, batch=batch, seq=seq, dtype=dtype, optimizer=optimizer,
        checkpointing=checkpointing, ranks=ranks, grad_accum=grad_accum,
    )  # fmt: skip
    generate = task == "generate"
    if max_memory is not None:
        streamed = profile_streamed if measured else estimate_streamed
        return streamed(
            model, spec, max_memory, generate=generate, max_new_tokens=max_new_tokens,
            kv_int8=kv_int8,
        )  # fmt: skip
    if generate:
        of_generation = profile_generation if measured else estimate_generation
        report = of_generation(model, spec, max_new_tokens, kv_int8)
    else:
        report = (profile(model, spec) if measured else estimate(model, spec)).to_dict()
    if keeps_blocks(model, dequantize=spec.dequantize):
        report["weights"] = "GGUF blocks as stored"
    return report
