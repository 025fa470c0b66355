"""The fast part of bench/fuzz.py: seeded structured mutations of real safetensors, GGUF, manifest
and config files, run in this process under a 10 s alarm; every one must end in a clean refusal
(MemoptError, one line) or a load of the very same model (every tensor's bytes, every module).

Hypothesis chooses the case numbers (derandomized: the same cases on every run, 130 per format,
520 in all; the long run, bench/fuzz.py, covers 10,000)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fuzz  # noqa: E402  (bench/fuzz.py: the mutators and the oracle)

CASES = 130


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> fuzz.Originals:
    return fuzz.Originals(tmp_path_factory.mktemp("fuzz-originals"))


@pytest.mark.parametrize("fmt", fuzz.FORMATS)
def test_mutated_inputs_are_refused_or_load_the_same_model(
    fmt: str, originals: fuzz.Originals, tmp_path_factory: pytest.TempPathFactory
) -> None:
    scratch = tmp_path_factory.mktemp(f"fuzz-{fmt}")
    seen: dict[str, int] = {}

    @settings(
        max_examples=CASES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(seed=st.integers(0, 10**6))
    def one(seed: int) -> None:
        case = fuzz.make_case(originals, fmt, seed, scratch / "case")
        outcome, detail = fuzz.run_case(originals, case)
        seen[outcome] = seen.get(outcome, 0) + 1
        assert outcome in ("refused", "same"), f"{fmt} case {seed} ({case.place}): {detail}"

    one()
    assert sum(seen.values()) >= CASES
    assert seen.get("refused", 0) > CASES // 2  # the mutations do break the files
