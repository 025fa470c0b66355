"""Measuring Keras models: estimate (meta device) against profile (real weights), names, optimizer
state, fit steps in the timeline, the backend check, .keras files on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kmodels import cnn, keras, text_model

import memopt
from memopt.keras import FitMarker
from memopt.keras.casting import variable_bytes

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.parametrize("task", ["infer", "train"])
def test_estimate_equals_profile_cnn(task: str) -> None:
    model = cnn()
    spec = memopt.StepSpec(task=task, batch=8)
    est = memopt.estimate(model, spec)
    prof = memopt.profile(model, spec)
    assert est.kind == "estimate" and prof.kind == "profile"
    # measured: equal to the byte for training; inference differs by the compiled-but-unbuilt
    # optimizer's two scalars (8 bytes), which the meta clone for inference does not compile
    assert abs(est.peak_bytes - prof.peak_bytes) <= 0.01 * prof.peak_bytes
    assert est.breakdown["params"] == prof.breakdown["params"] == variable_bytes(model.weights)
    if task == "train":
        assert est.peak_bytes == prof.peak_bytes
        trainable = variable_bytes(model.trainable_weights)
        assert 0 < prof.breakdown["grads"] <= trainable  # at the peak, during the backward
        # Adam: two moments per trainable weight + iteration (int32) + learning rate (float32)
        assert prof.breakdown["optimizer"] == 2 * trainable + 8


def test_estimate_lstm_within_5_percent() -> None:
    model = text_model()
    for task in ("infer", "train"):
        spec = memopt.StepSpec(task=task, batch=4)
        est = memopt.estimate(model, spec)
        prof = memopt.profile(model, spec)
        assert abs(est.peak_bytes - prof.peak_bytes) <= 0.05 * prof.peak_bytes, task
        names = {m["name"] for m in prof.modules}
        # Keras paths (auto names carry a session counter: embedding_3, bidirectional_2/...)
        assert any(n.startswith("embedding") for n in names), names
        assert any(n.startswith("bidirectional") and "/forward_lstm" in n for n in names), names


def test_estimate_reads_no_weight() -> None:
    """The estimate's clone lives on the meta device: the model's own tensors are not touched."""
    from memopt.keras.measure import meta_clone

    model = cnn()
    clone = meta_clone(model)
    assert all(v.value.device.type == "meta" for v in clone.variables)
    before = [v.value.data_ptr() for v in model.variables]
    memopt.estimate(model, memopt.StepSpec(task="train", batch=2))
    assert [v.value.data_ptr() for v in model.variables] == before


def test_profile_leaves_weights_as_they_were() -> None:
    model = cnn()
    before = [np.array(v) for v in model.variables]
    memopt.profile(model, memopt.StepSpec(task="train", batch=4))
    for v, b in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(np.array(v), b)
    assert all(float(np.abs(np.array(v)).max()) == 0 for v in model.optimizer.variables[2:])


def test_tracker_fit_marker_and_optimizer_category() -> None:
    model = cnn()
    x = np.random.default_rng(0).random((16, 16, 16, 3), dtype=np.float32)
    y = np.arange(16) % 10
    with memopt.MemoryTracker(model) as tracker:
        marker = FitMarker(tracker)
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[marker])
    result = tracker.result()
    phases = {p.phase for p in result.timeline}
    assert {"fit epoch 0 step 0", "fit epoch 1 step 1"} <= phases
    assert [(e, b) for e, b, _, _ in marker.steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    trainable = variable_bytes(model.trainable_weights)
    # the optimizer's variables were created inside the tracked region: still "optimizer"
    assert result.current_breakdown["optimizer"] == 2 * trainable + 8
    assert result.breakdown["params"] == variable_bytes(model.weights)


def test_untrained_model_needs_compile_for_train() -> None:
    model = cnn(compile=False)
    with pytest.raises(memopt.MemoptError, match="not compiled"):
        memopt.estimate(model, memopt.StepSpec(task="train"))


def test_other_backend_is_refused() -> None:
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-c", "import memopt.keras"], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "KERAS_BACKEND='jax'" in proc.stderr and "torch" in proc.stderr


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from memopt.app.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_keras_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    model = cnn()
    path = tmp_path / "cnn.keras"
    model.save(path)
    code, out, err = _cli(
        capsys, "estimate", str(path), "--task", "train", "--batch", "8", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    expected = memopt.estimate(model, memopt.StepSpec(task="train", batch=8))
    assert report["peak_bytes"] == expected.peak_bytes
    assert set(report["breakdown"]) == {"params", "buffers", "grads", "optimizer", "activations"}

    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    for bad in (truncated, junk, tmp_path / "missing.keras"):
        code, out, err = _cli(capsys, "estimate", str(bad))
        assert code == 2, (bad, err)
        assert err.count("\n") == 1 and err.startswith("memopt: error:")
        assert out == ""


def test_torch_params_are_the_variables() -> None:
    """What the tracker counts as params is exactly Keras's variables (each storage once)."""
    model = text_model()
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(seen) == len(model.variables)
    assert sum(
        p.untyped_storage().nbytes() for p in {id(p): p for p in model.parameters()}.values()
    ) >= variable_bytes(model.variables)
    assert isinstance(model, torch.nn.Module) and keras.backend.backend() == "torch"


def test_trained_model_inference_state() -> None:
    """After fit, an inference step's memory holds Adam's state (estimated alike) and the
    gradients Keras's torch trainer leaves on the parameters (measured, not predicted)."""
    model = cnn()
    x = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
    model.fit(x, np.arange(8) % 10, epochs=1, batch_size=8, verbose=0)
    spec = memopt.StepSpec(task="infer", batch=2)
    est = memopt.estimate(model, spec)
    prof = memopt.profile(model, spec)
    trainable = variable_bytes(model.trainable_weights)
    assert est.breakdown["optimizer"] == prof.breakdown["optimizer"] == 2 * trainable + 8
    assert prof.breakdown["grads"] == trainable and est.breakdown["grads"] == 0
    assert prof.peak_bytes - est.peak_bytes == trainable
    model.zero_grad(set_to_none=True)
    assert memopt.profile(model, spec).peak_bytes == est.peak_bytes
