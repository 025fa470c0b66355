"""Pruning Keras layers during fit with real byte savings: the zeros stay through Adam without a
mask, the stripped model's bytes in memory and on disk are the sparse ones, and the peak of
pruning-aware training is the dense training's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kmodels import cnn, keras

import memopt
from memopt.keras import (
    FitMarker,
    PolynomialDecay,
    PruneDuringFit,
    live_parameter_bytes,
    prune_magnitude,
    sparsity_of,
    strip,
    variable_bytes,
)
from memopt.keras.rebuild import rebuild


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 16, 16, 3), dtype=np.float32), rng.integers(0, 10, n)


def _fit_peak(model: keras.Model, callbacks: list) -> int:
    x, y = _data()
    with memopt.MemoryTracker(model) as tracker:
        model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                  callbacks=[FitMarker(tracker), *callbacks])  # fmt: skip
    return tracker.peak_bytes


@pytest.fixture(scope="module")
def pruned_and_peaks():
    keras.utils.set_random_seed(0)
    dense_peak = _fit_peak(cnn(), [])
    keras.utils.set_random_seed(0)
    model = cnn()
    # 8 steps: the sparsity rises at steps 0, 2, 4 and reaches 80 % at step 4, then stays
    cb = PruneDuringFit(PolynomialDecay(0.0, 0.8, begin_step=0, end_step=4, frequency=2))
    pruned_peak = _fit_peak(model, [cb])
    return model, cb, dense_peak, pruned_peak


def test_zeros_stay_through_adam(pruned_and_peaks) -> None:
    model, cb, _, _ = pruned_and_peaks
    assert cb.step == 8 and cb.sparsity == pytest.approx(0.8)
    s = sparsity_of(model)
    for path, value in s.items():
        # layer_mask removes round(0.8 * numel) per kernel: 0.8 to within one element
        assert value == pytest.approx(0.8, abs=2e-3), path
    # the optimizer's moments of the pruned entries are zero too (nothing to move them)
    kernel = model.layers[-1].kernel
    zero = np.array(kernel) == 0
    slots = [v for v in model.optimizer.variables if tuple(v.shape) == tuple(kernel.shape)]
    assert len(slots) == 2
    for slot in slots:
        assert np.all(np.array(slot)[zero] == 0)


def test_pruning_peak_is_dense_training_peak(pruned_and_peaks) -> None:
    _, _, dense_peak, pruned_peak = pruned_and_peaks
    # no mask and no wrapper: the peak is the dense one's plus at most one kernel's boolean
    # temporary (measured: equal to the byte); tfmot's wrapper holds a mask the size of every kernel
    assert pruned_peak <= 1.1 * dense_peak, (pruned_peak, dense_peak)


@pytest.mark.parametrize("values", ["float", "int8"])
def test_strip_bytes_memory_and_disk(pruned_and_peaks, values: str, tmp_path: Path) -> None:
    model, _, _, _ = pruned_and_peaks
    x, _ = _data(8)
    small, report = strip(model, values=values)
    assert report.sparsity == pytest.approx(0.8, abs=2e-3)
    assert set(report.layers.values()) == {f"sparse-bitmask-{values}"}
    limit = 0.30 if values == "float" else 0.12
    assert report.bytes_after <= limit * report.bytes_before, report
    assert live_parameter_bytes(small) == variable_bytes(small.variables) == report.bytes_after
    ref = model.predict(x, verbose=0)
    out = small.predict(x, verbose=0)
    if values == "float":
        np.testing.assert_allclose(out, ref, atol=1e-6)  # the same weights, stored sparse
    else:
        assert np.abs(out - ref).max() < 2e-2
    dense = rebuild(model, {})  # the dense model without its optimizer's state, as `small` is
    dense.save(tmp_path / "dense.keras")
    small.save(tmp_path / "sparse.keras")
    dense_disk = (tmp_path / "dense.keras").stat().st_size
    sparse_disk = (tmp_path / "sparse.keras").stat().st_size
    # no gzip: the file shrinks by the bytes the variables lost, less the HDF5 headers of the
    # sparse layers' extra datasets (measured: under 2 KB); the archive's fixed part (config,
    # metadata, HDF5 structure, ~20 KB) stays, a large share of this small model's file (the
    # brief's CNN: bench/keras.py)
    saved = report.bytes_before - report.bytes_after
    assert dense_disk - sparse_disk >= saved - 4096, (dense_disk, sparse_disk, saved)
    loaded = keras.saving.load_model(tmp_path / "sparse.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), out)


def test_one_shot_and_bad_input() -> None:
    keras.utils.set_random_seed(0)
    model = cnn()
    assert prune_magnitude(model, 0.5) == pytest.approx(0.5, abs=2e-3)
    with pytest.raises(memopt.MemoptError, match="sparsity"):
        prune_magnitude(model, 1.0)
    with pytest.raises(memopt.MemoptError, match="prune first"):
        strip(cnn())
    with pytest.raises(memopt.MemoptError, match="no prunable layer"):
        cnn().fit(*_data(16), epochs=1, verbose=0,
                  callbacks=[PruneDuringFit(PolynomialDecay(), layers=["nope"])])  # fmt: skip


def test_cli_prune_keras_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from memopt.app.cli import main

    keras.utils.set_random_seed(0)
    model = cnn()
    src = tmp_path / "cnn.keras"
    model.save(src)
    out = tmp_path / "sparse.keras"
    argv = ["prune", str(src), "--method", "magnitude", "--sparsity", "0.8", "-o", str(out)]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert result["bytes_after"] <= 0.30 * result["bytes_before"]
    assert result["disk_bytes"] == out.stat().st_size
    loaded = keras.saving.load_model(out)
    assert variable_bytes(loaded.variables) == result["bytes_after"]
    capsys.readouterr()
    assert main(["prune", str(src), "--method", "wanda", "--sparsity", "0.5", "-o", str(out)]) == 2
    assert "magnitude" in capsys.readouterr().err
