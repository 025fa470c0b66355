"""Profiling one real step: in a child process for a model by name, in-process for a loaded one."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.measure.profile import profile
from memopt.models import LoadedModel
from memopt.step.step import StepSpec

MB = 2**20


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Two busy cores are shared: OpenMP spinning with 2 threads makes a step 10-20x slower."""
    threads = torch.get_num_threads()
    old = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # for child processes
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def child_report():
    return profile("minilm", StepSpec(batch=2, seq=128))


def test_child_profile_has_the_cli_keys(child_report) -> None:
    out = child_report.to_dict()
    for key in ("peak_bytes", "breakdown", "peak_rss_bytes", "modules"):
        assert key in out
    assert set(out["breakdown"]) == {"params", "buffers", "grads", "optimizer", "activations"}
    assert sum(out["breakdown"].values()) == out["peak_bytes"]
    assert out["rss_scope"] == "child" and out["kind"] == "profile"
    names = {m["name"] for m in out["modules"]}
    assert "encoder" in names and all("forward_peak_bytes" in m for m in out["modules"])
    assert out["timeline"] and {"index", "seconds", "phase", "bytes"} <= set(out["timeline"][0])


def test_child_rss_holds_the_weights(child_report) -> None:
    """The child loaded 87 MB of float32 weights: its RSS grew by at least that over the baseline."""
    params = child_report.breakdown["params"]
    grown = child_report.peak_rss_bytes - child_report.baseline_rss_bytes
    assert params > 80 * MB
    assert params <= grown < params + 400 * MB


@pytest.fixture(scope="module")
def trained_minilm() -> LoadedModel:
    """A copy of its own: these tests take optimizer steps, which change the weights."""
    from memopt.models import load_model

    return load_model("minilm")


def test_in_process_profile_of_a_loaded_model(trained_minilm: LoadedModel) -> None:
    minilm = trained_minilm
    was_training = minilm.model.training
    report = profile(minilm, StepSpec(task="train", batch=1, seq=32))
    assert report.rss_scope == "process" and report.peak_rss_bytes >= report.baseline_rss_bytes
    assert minilm.model.training == was_training
    assert all(p.grad is None for p in minilm.model.parameters())  # gradients dropped afterwards
    b = report.breakdown
    # the steady-state step: AdamW's two moments are live at the peak, with the gradients
    assert b["optimizer"] > 1.9 * b["params"] * 0.98 and b["grads"] > 0.9 * b["params"]


def test_training_peak_is_the_steady_state_step(trained_minilm: LoadedModel) -> None:
    """The measured (second) step's timeline starts with the optimizer state already there."""
    report = profile(trained_minilm, StepSpec(task="train", batch=1, seq=32))
    phases = [p["phase"] for p in report.timeline]
    assert phases.count("optimizer") > 0
    assert report.breakdown["optimizer"] > 0  # a first step's forward would have none


def test_profile_child_error_is_one_line() -> None:
    with pytest.raises(MemoptError, match="no such model"):
        profile("no-such-model", StepSpec())


def test_profile_bad_seq_raises_memopt_error(minilm: LoadedModel) -> None:
    with pytest.raises(MemoptError, match="maximum of 512 positions"):
        profile(minilm, StepSpec(seq=600))
