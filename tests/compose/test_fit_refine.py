"""The fit's refinement (memopt.compose.fit_refine): whole plans measured, the best kept within
the budget; the assembly's KL is the model's; never run for --plan-only."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

from memopt.compose import fit_refine
from memopt.compose.fit import (
    ENGINE_FORMATS,
    RUNTIME_BYTES,
    choose,
    fit,
    sensitivities,
    units_of,
)
from memopt.compose.fit_refine import PlanKL, refine, uniform

fit_mod = importlib.import_module("memopt.compose.fit")  # the module (the package exports fit)


@pytest.fixture(scope="module")
def tiny() -> Any:
    from memopt.models.toy import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))


def _held(units: list, formats: dict[str, str]) -> int:
    return sum(u.held(formats[u.name]) for u in units)


def _direct_kl(model: torch.nn.Module, ids: torch.Tensor, ref: torch.Tensor) -> float:
    with torch.no_grad():
        out = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return (ref.exp() * (ref - out)).sum(-1).mean().item()


def test_refined_plan_measures_no_worse_than_the_knapsacks_within_budget(
    tiny: Any, ids: torch.Tensor
) -> None:
    """At uniform int4 g64's bytes (+ the knapsack's rounding, one 4 KiB step a unit), the kept
    plan's measured KL is at most the knapsack plan's and its bytes within the budget; both KLs
    are the whole model's (a forward of the assembled weights, from scratch: within 1e-6
    relative), and the float weights are back after ``close``."""
    units = units_of(tiny.model, decode_engine=True)
    sensitivities(tiny, units, ids)
    budget = _held(units, uniform(units, "int4-g64", ENGINE_FORMATS)) + 4096 * len(units)
    start = choose(units, budget, ENGINE_FORMATS)
    assert start is not None and _held(units, start) <= budget
    with torch.no_grad():
        ref = torch.log_softmax(tiny.model(input_ids=ids).logits.float(), -1)  # (B, T, V)
    ev = PlanKL(tiny, units, ids)
    try:
        r = refine(ev, units, start, budget, ENGINE_FORMATS, max_evals=12)
        assert r.kl <= r.knapsack_kl and 1 < r.evaluations <= 12
        assert _held(units, r.formats) <= budget
        assert all(m["bytes"] <= budget for m in r.measured)
        assert min(m["kl"] for m in r.measured) == r.kl
        for formats, kl in ((start, r.knapsack_kl), (r.formats, r.kl)):
            ev.kl(formats)  # the model now holds the plan's weights
            assert _direct_kl(tiny.model, ids, ref) == pytest.approx(kl, rel=1e-6)
    finally:
        ev.close()
    assert _direct_kl(tiny.model, ids, ref) == 0.0


def test_assembled_int4_is_gptq(tiny: Any, ids: torch.Tensor) -> None:
    """A block unit's int4 weights in the assembly make no larger output error than round to
    nearest on the float model's inputs (GPTQ, RTN where RTN's is smaller, as applied), and a
    clearly smaller one summed over the unit's Linears."""
    from memopt.quant.calibrate import output_error
    from memopt.weights.quantized import Int4Weight

    units = units_of(tiny.model, decode_engine=True)
    ev = PlanKL(tiny, units, ids)
    try:
        unit = units[0]
        got = ev._weights(unit, "int4-g32")
        gptq = rtn = 0.0
        for p, qw in got.items():
            w, h = ev.floats[p], ev._hessian(unit, p)
            e_q, e_r = output_error(w, qw, h), output_error(w, Int4Weight(w, 32), h)
            assert e_q <= e_r * (1 + 1e-6), (p, e_q, e_r)
            gptq, rtn = gptq + e_q, rtn + e_r
        assert gptq < 0.9 * rtn, (gptq, rtn)
    finally:
        ev.close()


@pytest.fixture(scope="module")
def folder(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from memopt.models.toy import tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tiny.model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def test_plan_only_never_refines(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--plan-only answers from the knapsack (the costs measured: the folder has weights), the
    refinement never called."""

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the refinement ran for --plan-only")

    monkeypatch.setattr(fit_refine, "refine_cached", boom)
    monkeypatch.setattr(fit_mod, "_baseline", lambda task: 0)  # a child's imports: not the point
    r = fit(folder, 10**9, plan_only=True, seq=16, max_new_tokens=16)
    assert "refinement" not in r and r["quality_costs"].startswith("measured")


def test_fit_applies_the_refined_plan(
    folder: Path, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A fit between the int8 and float32 sizes (the engine path's menu) refines its plan: the
    plan applied is the refined one, its KL no more than the knapsack's, its predicted peak
    within the budget (the apply, the run and the perplexity stubbed: their own tests measure
    them)."""
    applied: list[dict[str, str]] = []
    monkeypatch.setattr(fit_mod, "_baseline", lambda task: 0)
    monkeypatch.setattr(fit_mod, "_apply", lambda s, u, plan, *a: applied.append(plan.formats))
    monkeypatch.setattr(fit_mod, "_measure_generation",
                        lambda *a: {"peak_over_baseline_bytes": 1, "tokens_per_s": 1.0})  # fmt: skip
    monkeypatch.setattr(fit_mod, "_quality",
                        lambda *a: {"fitted": 1.0, "float32": 1.0, "ratio": 1.0})  # fmt: skip
    big = fit(folder, 10**9, plan_only=True, seq=16, max_new_tokens=16, calib=ids)
    f32 = big["predicted_peak_bytes"]
    overhead = f32 - big["plan"]["weight_bytes"]
    budget = overhead + int(0.6 * big["plan"]["weight_bytes"])  # int8 is ~0.25x, float32 1x
    r = fit(folder, budget, tmp_path / "out", seq=16, max_new_tokens=16, calib=ids,
            refine_evals=10)  # fmt: skip
    ref = r["refinement"]
    assert 1 < ref["evaluations"] <= 10 and ref["kl"] <= ref["knapsack_kl"]
    assert applied == [r["plan"]["formats"]]
    assert r["predicted_peak_bytes"] <= r["limit_bytes"] == budget
    assert r["plan"]["runtime_bytes"] == RUNTIME_BYTES
    assert {u["format"] for u in r["plan"]["units"]} <= {"float32", "int8"}
    assert (tmp_path / "out" / "fit.json").is_file()


def test_every_unit_at_its_largest_format_is_kept_unmeasured(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan with every unit in its largest format of the menu (float32: KL 0) comes back as it
    is, the model never loaded (a fit with room for float32 spends no time refining)."""

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("memopt.models.load_model", boom)
    units = units_of(tiny.model, decode_engine=True)
    start = {u.name: "float32" for u in units}
    r = fit_refine.refine_cached(None, units, start, 10**9, ENGINE_FORMATS, torch.zeros(1, 2))
    assert r.formats == start and r.evaluations == 0 and r.kl == 0.0
