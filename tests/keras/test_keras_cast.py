"""Casts Keras agrees with: case 2 from float64 to float32 halves its bytes in memory, in the
optimizer and on disk; nested LSTMs included; training and save / load go on in the new dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kmodels import keras, text_model

import memopt
from memopt.keras import cast, variable_bytes


def _float_bytes(variables) -> int:  # noqa: ANN001
    return variable_bytes([v for v in variables if "float" in v.dtype])


@pytest.fixture(scope="module")
def trained64():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1000, (32, 12)).astype("int32")
    y = rng.integers(0, 2, (32, 1)).astype("float64")
    model = text_model("float64")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    return model, x, y


def test_float64_to_float32_halves_memory_optimizer_disk(trained64, tmp_path: Path) -> None:
    m64, x, y = trained64
    m32 = cast(m64, "float32")
    assert {v.dtype for v in m64.weights} == {"float64"}
    assert {v.dtype for v in m32.weights} == {"float32"}
    # nested: the Bidirectional's two LSTMs (and their cells) follow the new policy
    bidi = m32.layers[1]
    assert bidi.forward_layer.dtype_policy.name == bidi.backward_layer.dtype_policy.name
    assert bidi.forward_layer.cell.kernel.dtype == "float32"
    # the user's config is kept: only the dtype policies changed
    init = bidi.forward_layer.get_config()["recurrent_initializer"]
    assert init["class_name"] == "Orthogonal", init
    # exact bytes: every float variable halves (the int32 seed states stay)
    assert _float_bytes(m32.variables) * 2 == _float_bytes(m64.variables)
    assert variable_bytes(m64.weights) == 2 * variable_bytes(m32.weights) == 236_808
    # the optimizer's moments were cast, not rebuilt: same values, half the bytes
    o64 = [v for v in m64.optimizer.variables if "float" in v.dtype and len(v.shape)]
    o32 = [v for v in m32.optimizer.variables if "float" in v.dtype and len(v.shape)]
    assert variable_bytes(o64) == 2 * variable_bytes(o32) == 4 * variable_bytes(m32.weights)
    for a, b in zip(o64, o32, strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-6, atol=1e-12)
    # the same function (float32 rounding only)
    p64 = m64.predict(x, verbose=0)
    p32 = m32.predict(x, verbose=0)
    np.testing.assert_allclose(p32, p64, atol=1e-5)
    # on disk: the .keras file's weights halve; the archive (config, HDF5 headers) is under 0.55x
    m64.save(tmp_path / "m64.keras")
    m32.save(tmp_path / "m32.keras")
    ratio = (tmp_path / "m32.keras").stat().st_size / (tmp_path / "m64.keras").stat().st_size
    assert ratio < 0.55, ratio
    loaded = keras.saving.load_model(tmp_path / "m32.keras")
    assert {v.dtype for v in loaded.weights} == {"float32"}
    np.testing.assert_allclose(loaded.predict(x, verbose=0), p32, atol=1e-7)
    # training goes on in float32: Keras builds no float64 state
    m32.fit(x, y.astype("float32"), epochs=1, batch_size=16, verbose=0)
    assert {v.dtype for v in m32.optimizer.variables if len(v.shape)} == {"float32"}
    report = memopt.estimate(m32, memopt.StepSpec(task="train", batch=4))
    assert report.breakdown["params"] == variable_bytes(m32.variables)  # + the seed states


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sixteen_bit_casts(trained64, dtype: str) -> None:
    m64, x, _ = trained64
    m16 = cast(m64, dtype)
    assert {v.dtype for v in m16.weights} == {dtype}
    assert 4 * variable_bytes(m16.weights) == variable_bytes(m64.weights)
    out = m16.predict(x, verbose=0).astype("float64")
    ref = m64.predict(x, verbose=0)
    assert np.abs(out - ref).max() < 0.02  # sigmoid outputs, 16-bit arithmetic


def test_cast_refuses_bad_input(trained64) -> None:
    m64, _, _ = trained64
    with pytest.raises(memopt.MemoptError, match="cast to one of"):
        cast(m64, "int8")
    with pytest.raises(memopt.MemoptError, match="keras.Model"):
        cast(object(), "float32")
