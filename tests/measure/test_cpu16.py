"""memopt.measure.cpu16: the float16 note follows the CPU's flags and the measured timings."""

from __future__ import annotations

import pytest

from memopt.measure import cpu16


@pytest.fixture(autouse=True)
def _fresh() -> None:
    cpu16.float16_note.cache_clear()
    yield
    cpu16.float16_note.cache_clear()


def _timings(f32: float, f16: float, bf16: float):  # noqa: ANN202
    return lambda: {"float32": f32, "float16": f16, "bfloat16": bf16}


def test_slow_float16_gets_a_note_naming_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu16, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(cpu16, "float16_timings", _timings(1.0, 2.08, 0.40))
    note = cpu16.float16_note()
    assert note is not None and "\n" not in note
    assert "2.08x float32" in note and "bfloat16 0.40x" in note


@pytest.mark.parametrize(
    "flags, timings",
    [
        ({"avx512_fp16"}, (1.0, 3.0, 0.4)),  # native float16: never noted
        ({"avx512f"}, (1.0, 1.1, 0.4)),  # within 1.2x of float32
        ({"avx512f"}, (1.0, 1.5, 1.4)),  # bfloat16 no faster
    ],
)
def test_no_note_where_float16_is_not_slow(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], timings: tuple[float, float, float]
) -> None:
    monkeypatch.setattr(cpu16, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu16, "float16_timings", _timings(*timings))
    assert cpu16.float16_note() is None


def test_timings_measure_each_dtype() -> None:
    t = cpu16.float16_timings(rows=4, width=128, rounds=1)
    assert set(t) == {"float32", "float16", "bfloat16"} and all(v > 0 for v in t.values())
