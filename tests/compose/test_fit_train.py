"""``memopt fit --task train``: at 0.35× the plain float32 AdamW estimate the options chosen fit,
measured in a child, and train to plain's loss; plan-only runs nothing; FSDP2 ranks only when one
process cannot fit; a budget too small is refused naming the smallest."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from memopt.compose import fit_train
from memopt.compose.fit import fit
from memopt.compose.fit_train import STEP_FACTOR, plan_training, step_factor
from memopt.core.errors import MemoptError
from memopt.measure.estimate import estimate
from memopt.step.step import StepSpec

# 1280 tokens a step. A Llama of hidden 16 with SmolLM2's tokenizer (49,152 words): its float32
# logits (1280 × 49,152 × 4 B = 252 MB, and the loss's copies of them) are most of plain's peak,
# cheap to compute, and what the chunked loss removes; a plain peak of ~770 MB keeps the run's own
# overhead (~45 MB measured, TRAIN_RUNTIME_BYTES predicted) well inside 0.35× of it.
BATCH, SEQ, STEPS = 4, 320, 10


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from memopt.formats.gguf import gguf_tokenizer
    from memopt.models import resolve
    from memopt.models.toy import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-lm-16")
    tok = gguf_tokenizer(resolve("smollm2").path)
    loaded = tiny_llama(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2
    )
    loaded.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_bytes(lm: Path) -> int:
    """The estimated peak of one plain float32 AdamW step (the tracker's live bytes)."""
    return estimate(str(lm), StepSpec(task="train", batch=BATCH, seq=SEQ)).peak_bytes


@pytest.fixture(scope="module")
def trained(lm: Path, plain_bytes: int) -> dict:
    return fit(lm, int(0.35 * plain_bytes), task="train", batch=BATCH, seq=SEQ, train_steps=STEPS)


def test_chosen_options_fit_measured_in_a_child(trained: dict, plain_bytes: int) -> None:
    budget = int(0.35 * plain_bytes)
    o = trained["plan"]["options"]
    assert o["chunked_loss"]  # the logits are the peak: only the chunked loss brings it down
    assert trained["predicted_peak_bytes"] <= budget
    assert trained["within_budget"] and trained["measured_peak_bytes"] <= budget
    t = trained["training"]
    assert t["steps"] == STEPS and t["fitted"]["peak_bytes"] == trained["measured_peak_bytes"]
    assert t["plain"]["peak_bytes"] > budget  # the comparison, over the budget
    assert not t["plain_within_budget"]
    assert t["fitted"]["step_s"] > 0 and t["plain"]["step_s"] > 0
    assert t["step_time_ratio"] == pytest.approx(t["fitted"]["step_s"] / t["plain"]["step_s"])
    assert "calibration text" in t["data"]


def test_fitted_loss_is_plains(trained: dict) -> None:
    t = trained["training"]
    fitted, plain = t["fitted"]["loss"], t["plain"]["loss"]
    assert math.isfinite(fitted) and math.isfinite(plain)
    # the same windows, weights and seed; bf16 weights and activations and 8-bit moments change
    # the loss by rounding only (README: +0.78 % at step 50 on smollm2): within 1 %
    assert abs(t["loss_delta"]) <= 0.01 * plain, (fitted, plain)
    assert t["loss_delta"] == pytest.approx(fitted - plain)


def test_cli_tables_show_fitted_against_plain(trained: dict) -> None:
    from memopt.app.cli import _fit_tables, build_parser

    tables = _fit_tables(trained)
    assert len(tables) == 3  # the options, fitted vs plain, the budget
    args = build_parser().parse_args(
        ["fit", "m", "--budget", "1MB", "--task", "train", "--steps", "7", "--ranks", "2"]
    )
    assert (args.steps, args.ranks, args.output) == (7, 2, None)


def test_plan_only_runs_nothing(lm: Path, plain_bytes: int, monkeypatch) -> None:
    def no_run(job: dict) -> dict:
        raise AssertionError("plan_only ran a training child")

    monkeypatch.setattr(fit_train, "_run", no_run)
    start = time.perf_counter()
    r = fit(lm, int(0.35 * plain_bytes), task="train", batch=BATCH, seq=SEQ, plan_only=True)
    assert r["training"] is None and r["measured_peak_bytes"] is None
    assert r["predicted_peak_bytes"] <= r["limit_bytes"]
    assert r["plan"]["options"]["plain_estimate_bytes"] == plain_bytes
    assert time.perf_counter() - start < 60


class _Report:
    def __init__(self, peak_bytes: int) -> None:
        self.peak_bytes = peak_bytes


def _fake_estimate(model: object, spec: StepSpec) -> _Report:
    """A stand-in estimator (the real one is the measured fit's): 1000 MB, less 100 MB an option
    on, 50 MB for accumulation; a rank of N holds 1/N."""
    on = spec.checkpointing + (spec.loss_chunk > 0) + (spec.optimizer == "adamw8bit")
    on += spec.dtype == "bfloat16"
    mb = 1000 - 100 * on - 50 * (spec.grad_accum > 1)
    return _Report(mb * 10**6 // spec.ranks)


def test_too_small_budget_names_the_smallest(lm: Path, monkeypatch) -> None:
    monkeypatch.setattr("memopt.measure.estimate.estimate", _fake_estimate)
    with pytest.raises(MemoptError) as info:
        fit(lm, "20MB", task="train", batch=1, seq=16, plan_only=True)
    msg = str(info.value)
    smallest = (600 * 10**6 + fit_train.TRAIN_RUNTIME_BYTES) / 1e6
    assert "\n" not in msg and msg.startswith("a training budget of 20.0 MB is too small")
    assert (
        "the smallest option set (checkpointing + chunked loss + AdamW8bit + bf16 + fp32 "
        f"masters) needs an estimated {math.ceil(smallest * 10) / 10:.1f} MB"
    ) in msg


def test_ranks_only_when_one_process_cannot_fit(lm: Path, monkeypatch) -> None:
    from memopt.models import build_meta

    # the stand-in estimator (the real one's per-rank figures: tests/train/test_fsdp.py)
    monkeypatch.setattr("memopt.measure.estimate.estimate", _fake_estimate)
    meta = build_meta(str(lm))
    spec = StepSpec(task="train", batch=4, seq=16)  # the global batch
    over = fit_train.TRAIN_RUNTIME_BYTES
    # one process: 550 MB at least (every option on); two ranks: bf16 alone is 450 MB a rank
    plan = plan_training(meta, spec, over + 500 * 10**6, ranks=4)
    o = plan.options
    assert (o["ranks"], o["label"]) == (2, "bf16 + fp32 masters + FSDP2 × 2")  # the fastest
    assert o["batch"] * o["grad_accum"] * o["ranks"] == 4  # the same global batch
    assert plan.predicted_peak_bytes == over + 450 * 10**6
    assert plan_training(meta, spec, over + 200 * 10**6, ranks=4).options["ranks"] == 4
    # one process fits: no ranks, though allowed
    assert plan_training(meta, spec, over + 900 * 10**6, ranks=4).options["ranks"] == 1
    with pytest.raises(MemoptError, match="divisible"):
        plan_training(meta, StepSpec(task="train", batch=3, seq=16), 1 << 40, ranks=2)


def test_a_run_over_the_budget_is_planned_again_with_its_excess(lm: Path, monkeypatch) -> None:
    monkeypatch.setattr("memopt.measure.estimate.estimate", _fake_estimate)
    over = fit_train.TRAIN_RUNTIME_BYTES
    limit = over + 800 * 10**6
    runs: list[dict] = []

    def run(job: dict) -> dict:  # the first run 10 MB over the budget, the others within
        runs.append(job["spec"])
        peak = limit + 10**7 if len(runs) == 1 else limit - 10**7
        return {"peak_bytes": peak, "step_s": 1.0, "loss": 5.0, "losses": [5.0]}

    monkeypatch.setattr(fit_train, "_run", run)
    r = fit(lm, limit, task="train", batch=2, seq=16, train_steps=1)
    # every option on (600 MB) first; 210 MB over its prediction, then only accumulation fits
    assert runs[0]["grad_accum"] == 1 and runs[1]["grad_accum"] == 2
    assert runs[2]["optimizer"] == "adamw" and runs[2]["dtype"] == "float32"  # plain, last
    assert r["revisions"] == 1 and r["within_budget"]
    assert r["plan"]["options"]["label"].endswith("grad-accum 2")
    assert r["plan"]["runtime_bytes"] == over + 210 * 10**6 + (1 << 20)
    # over again: nothing left that fits, refused in one line naming the smallest
    runs.clear()
    monkeypatch.setattr(fit_train, "_run", lambda job: run(job) | {"peak_bytes": limit + 1})
    with pytest.raises(MemoptError, match=r"smallest option set \(.*grad-accum 2\)"):
        fit(lm, limit, task="train", batch=2, seq=16, train_steps=1)


def test_step_factors_are_the_readme_table() -> None:
    plain = dict.fromkeys(STEP_FACTOR, False)
    assert step_factor(plain) == 1.0
    assert step_factor({**plain, "bf16": True}) == 0.77  # 10.2 s / 13.3 s
    both = {**plain, "checkpointing": True, "chunked_loss": True}
    assert step_factor(both) == 1.28  # 17.1 / 13.3: the table's row, not the product
    assert step_factor({**both, "adamw8bit": True, "bf16": True}) == 0.80
