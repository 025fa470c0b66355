"""Memory of one step of a Keras model: predicted on the meta device, measured on its weights.

Both run the same step under the same :class:`~memopt.measure.tracker.MemoryTracker`:

- inference: ``model(x, training=False)`` under ``torch.no_grad()``;
- training: the model's own ``train_step((x, y))`` (what ``model.fit`` runs per batch: forward,
  the compiled loss, backward, the compiled optimizer), twice; the report is the second, steady
  step (the first builds the optimizer's variables).

The estimate rebuilds the model from its config (``serialize_keras_object``) with Keras's device
set to ``meta``: every variable has a shape and a dtype and no data, nothing is copied. Keras runs
layers on a ``"meta"`` device as *symbolic* (shape inference: every variable is replaced by a
fresh stub, so no gradient can flow), so the step itself runs with the device given as a
``torch.device`` object, which Keras's tensor conversions treat as an ordinary device. That reaches
into Keras's global state (``keras.src.backend.common.global_state``, the attribute that
``keras.device()`` sets), the one private name this module uses; tests/keras check it still works.

Inputs are zeros of the model's input shapes and dtypes: ``None`` dimensions take ``spec.batch``
(the first) and ``spec.seq`` (the others); targets are zeros shaped for the compiled loss (integer
class ids for a ``sparse_*`` loss). ``spec.dtype`` and ``spec.optimizer`` do not apply: a Keras
model runs in its layers' dtype policies with its compiled optimizer. Not predicted: the
gradients that ``fit`` leaves on the parameters (Keras's torch trainer does not free them after
the last step; ``profile`` counts them as ``grads``, ``model.zero_grad(set_to_none=True)`` frees
them).

memopt's own int8 / int4 / sparse layers (:mod:`memopt.keras.layers`) count their output on the
meta device, not their kernel's temporaries (a few rows of the output's size, freed before the
next layer); an int4 layer with no CPU int4 kernel layout (fewer than 16 outputs, or not a
multiple of 16) runs its blocked dequantize on meta as on the CPU, so its dequantized rows count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memopt.core.errors import MemoptError
from memopt.core.rss import current_rss_bytes, peak_rss_bytes
from memopt.keras.backend import keras_module
from memopt.measure.estimate import TOP_MODULES, MemoryReport
from memopt.measure.tracker import MemoryTracker
from memopt.step.step import StepSpec

keras = keras_module()

__all__ = ["FitMarker", "estimate", "example_batch", "profile", "run_step"]


class FitMarker(keras.callbacks.Callback):
    """Marks every ``model.fit`` batch in a tracker's timeline: ``with MemoryTracker(model) as t:
    model.fit(..., callbacks=[FitMarker(t)])``; ``steps`` holds (epoch, batch, live bytes at the
    batch's end, the tracker's peak so far)."""

    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.epoch = 0
        self.steps: list[tuple[int, int, int, int]] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.tracker.mark(f"fit epoch {self.epoch} step {batch}")

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.steps.append((self.epoch, batch, self.tracker.current_bytes, self.tracker.peak_bytes))

    def on_test_begin(self, logs: Any = None) -> None:
        self.tracker.mark("fit validation")


def _shape(shape: tuple[Any, ...], spec: StepSpec) -> tuple[int, ...]:
    return tuple(
        (spec.batch if i == 0 else spec.seq) if d is None else int(d) for i, d in enumerate(shape)
    )


def example_batch(model: Any, spec: StepSpec, device: Any = "cpu") -> tuple[Any, Any]:
    """Zeros of the model's input shapes (and, for training, of the loss's targets)."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise MemoptError(
            f"Keras model {model.name!r} has no known inputs: build it with keras.Input(...) "
            "(or call it once) before measuring it"
        )
    xs = [
        torch.zeros(_shape(t.shape, spec), dtype=_torch_dtype(t.dtype), device=device)
        for t in inputs
    ]
    x = xs[0] if len(xs) == 1 else xs
    outputs = model.outputs
    ys = []
    loss = getattr(model, "loss", None)
    sparse = "sparse" in (loss if isinstance(loss, str) else type(loss).__name__.lower())
    for t in outputs:
        shape = _shape(t.shape, spec)
        if sparse:
            ys.append(torch.zeros(shape[:-1], dtype=torch.int64, device=device))
        else:
            ys.append(torch.zeros(shape, dtype=_torch_dtype(t.dtype), device=device))
    y = ys[0] if len(ys) == 1 else ys
    return x, y


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, keras.backend.standardize_dtype(name))


def run_step(model: Any, spec: StepSpec, tracker: MemoryTracker, x: Any, y: Any) -> None:
    """One inference, or two training steps with the peak of the second (see the module doc)."""
    if spec.task == "infer":
        tracker.mark("forward")
        with torch.no_grad():
            model(x, training=False)
        return
    if spec.task != "train":
        raise MemoptError(f"a Keras model measures task infer or train, not {spec.task!r}")
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
        raise MemoptError(
            f"Keras model {model.name!r} is not compiled: model.compile(optimizer=..., loss=...) "
            "before measuring a training step"
        )
    for step in range(2):
        tracker.mark(f"train step {step}")
        if step == 1:
            tracker.reset_peak()
        model.train_step((x, y))
    model.zero_grad(set_to_none=True)  # nn.Module's: the last step's gradients
    tracker.mark("done")


def _report(model: Any, spec: StepSpec, tracker: MemoryTracker, kind: str) -> MemoryReport:
    result = tracker.result().to_dict()
    modules = sorted(
        result["modules"],
        key=lambda m: max(m["forward_peak_bytes"], m["backward_peak_bytes"]),
        reverse=True,
    )[:TOP_MODULES]
    return MemoryReport(
        model=model.name,
        spec=spec,
        param_count=int(sum(int(np.prod(v.shape)) for v in model.weights)),
        peak_bytes=int(result["peak_bytes"]),
        breakdown=dict(result["breakdown"]),
        modules=modules,
        timeline=result["timeline"],
        kind=kind,
    )


class _CpuConvolutionFormat(TorchDispatchMode):
    """Meta convolutions with the memory format the CPU kernel gives (the tracker sees those).

    PyTorch's meta convolution always returns a contiguous tensor (it cannot know the backend); on
    CPU (oneDNN) the output is channels-last when the input or the weight is, which Keras's
    channels-last convolutions are, and the layout decides which later ``contiguous()`` calls copy
    (a copy of the whole activation before pooling). Entered below the tracker, so the tracker
    counts the corrected tensor once."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default and out.dim() == 4 and out.is_meta:
            inp, weight = args[0], args[1]
            last = torch.channels_last
            if (
                inp.is_contiguous(memory_format=last)
                and not inp.is_contiguous()
                or (weight.is_contiguous(memory_format=last) and not weight.is_contiguous())
            ):
                out = torch.empty_like(out, memory_format=last)
        return out


@contextlib.contextmanager
def _meta_device() -> Iterator[None]:
    """Keras's device as ``torch.device("meta")`` (not the string: that means symbolic)."""
    from keras.src.backend.common import global_state

    previous = global_state.get_global_attribute("torch_device", None)
    global_state.set_global_attribute("torch_device", torch.device("meta"))
    try:
        yield
    finally:
        global_state.set_global_attribute("torch_device", previous)


def meta_build(config: dict[str, Any], compile: bool | str = True) -> Any:
    """A model built from its serialized config on the meta device, with no data anywhere;
    compiled as its ``compile_config`` says when ``compile`` (deserializing it also builds the
    optimizer's state); ``compile="unbuilt"``: compiled with its optimizer not built (its
    iteration counter and learning rate only, as a compiled model that never trained holds)."""
    config = dict(config)
    compile_config = config.get("compile_config")
    if compile is not True:
        config.pop("compile_config", None)  # deserializing it compiles and builds the optimizer
    try:
        with keras.device("meta"):
            model = keras.saving.deserialize_keras_object(config)
            if compile == "unbuilt" and compile_config:
                model.compile(**keras.saving.deserialize_keras_object(compile_config))
            return model
    except (ValueError, TypeError, KeyError) as exc:
        raise MemoptError(f"cannot build the Keras model from its config: {exc}") from exc


def meta_clone(model: Any, compile: bool = True) -> Any:
    """``model`` rebuilt from its config on the meta device (no weight read or copied)."""
    return meta_build(keras.saving.serialize_keras_object(model), compile)


def estimate(model: Any, spec: StepSpec | None = None) -> MemoryReport:
    """Predict one step's memory on ``model``'s meta clone (no weight read or copied)."""
    spec = spec or StepSpec()
    config = keras.saving.serialize_keras_object(model)
    opt = getattr(model, "optimizer", None)
    # a trained model holds its optimizer's state through inference too: built alike on meta; a
    # compiled one that never trained, the optimizer's scalars
    held = None if opt is None else "built" if opt.built else "unbuilt"
    return estimate_config(config, spec, with_optimizer=held)


def estimate_config(
    config: dict[str, Any], spec: StepSpec | None = None, with_optimizer: bool | str | None = False
) -> MemoryReport:
    """Predict one step's memory of the model that ``config`` describes (a ``.keras`` file's
    ``config.json``), built on the meta device; ``with_optimizer``: for an inference step, the
    optimizer the model in memory holds: its state built (True or ``"built"``: a trained model),
    its scalars only (``"unbuilt"``: compiled, never trained) or none (False, None)."""
    spec = spec or StepSpec()
    start = time.perf_counter()
    if spec.task == "train" or with_optimizer in (True, "built"):
        compile: bool | str = True
    else:
        compile = "unbuilt" if with_optimizer == "unbuilt" else False
    clone = meta_build(config, compile=compile)
    with _meta_device(), _CpuConvolutionFormat():
        x, y = example_batch(clone, spec, device="meta")
        with MemoryTracker(clone) as tracker:
            run_step(clone, spec, tracker, x, y)
    report = _report(clone, spec, tracker, "estimate")
    report.seconds = time.perf_counter() - start
    return report


def profile(model: Any, spec: StepSpec | None = None) -> MemoryReport:
    """Measure one step on ``model``'s own weights, in this process.

    A training step changes the weights and the optimizer's state: both are put back afterwards
    (held as numpy copies meanwhile, outside the tracked tensors), so profiling leaves the model
    as it was."""
    spec = spec or StepSpec()
    start = time.perf_counter()
    baseline = current_rss_bytes()
    x, y = example_batch(model, spec)
    saved = None
    if spec.task == "train":
        saved = [np.array(v) for v in model.variables]
        opt = getattr(model, "optimizer", None)
        opt_saved = [np.array(v) for v in opt.variables] if opt is not None and opt.built else None
    if spec.task == "infer":
        # a first call is not a steady step: memopt's quantized layers time their kernel
        # candidates on it (memopt.weights.kernels), whose outputs would count
        with torch.no_grad():
            model(x, training=False)
    try:
        with MemoryTracker(model) as tracker:
            run_step(model, spec, tracker, x, y)
    finally:
        if saved is not None:
            for v, value in zip(model.variables, saved, strict=True):
                v.assign(value)
            if opt_saved is not None:
                for v, value in zip(opt.variables, opt_saved, strict=True):
                    v.assign(value)
            elif opt is not None and opt.built:  # built by this profile: back to a fresh state
                for v in opt.variables:
                    if not v.path.endswith("learning_rate"):
                        v.assign(np.zeros(v.shape, dtype=v.dtype))
    report = _report(model, spec, tracker, "profile")
    report.peak_rss_bytes = peak_rss_bytes()
    report.baseline_rss_bytes = baseline
    report.rss_scope = "process"
    report.seconds = time.perf_counter() - start
    return report
