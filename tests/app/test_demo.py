"""`memopt demo`: the main job end to end on the bundled smollm2, checked on what it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memopt.app.cli import main
from memopt.app.demo import DemoRow, _fit_html, _fit_table, _formats_summary, _plot_fit


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo") / "report"
    # --quick: the pruning, streaming and training rows are tested through their own functions
    # (memopt.app.rows: tests/app/test_rows.py)
    assert main(["demo", "--out", str(out), "--json", "--quick"]) == 0
    return json.loads((out / "report.json").read_text()), out


def test_report_folder(demo) -> None:
    summary, out = demo
    for name in ("report.json", "report.html", "profile.png", "techniques.png", "plan.png"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    # Self-contained: every image inlined, nothing fetched.
    assert page.count("data:image/png;base64,") == 3
    # --quick skips the fits (memopt fit to several budgets): no fit section, no fit.png
    assert summary["fit"] is None and not (out / "fit.png").exists()
    assert "http://" not in page and "https://" not in page
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_estimate_agrees_with_measurement(demo) -> None:
    summary, _ = demo
    est = summary["estimate"]["infer"]["peak_bytes"]
    measured = summary["profile"]["peak_bytes"]
    assert abs(est / measured - 1) <= 0.10


def test_rows_are_measured_savings(demo) -> None:
    summary, _ = demo
    rows = {r["technique"].split(" ")[0]: r for r in summary["rows"]}
    base = rows["float32"]
    # smollm2: 134.5 M parameters, tied embedding stored once: 538 MB of float32.
    assert base["ram_bytes"] == pytest.approx(538_060_288, rel=1e-3)
    for name in ("bfloat16", "float16"):
        assert rows[name]["ram_bytes"] / base["ram_bytes"] == pytest.approx(0.5, abs=0.01)
        assert rows[name]["perplexity"] / base["perplexity"] < 1.01
    assert rows["int8"]["ram_bytes"] / base["ram_bytes"] <= 0.27
    assert rows["int8"]["perplexity"] / base["perplexity"] < 1.02
    assert rows["int4"]["ram_bytes"] / base["ram_bytes"] <= 0.16
    # the GGUF as shipped: its Q4_1 / Q8_0 blocks in RAM (96.6 MB), the very values of the float32
    # model (only the order of the sums differs), its disk the file itself
    shipped = rows["GGUF"]
    assert shipped["technique"] == "GGUF as shipped (Q4_1 + Q8_0)"
    assert shipped["ram_bytes"] == pytest.approx(96_577_024, rel=1e-3)
    assert shipped["perplexity"] == pytest.approx(base["perplexity"], rel=1e-4)
    for r in summary["rows"]:
        # disk = safetensors + manifest + tokenizer files (a few MB) over the bytes in RAM; the
        # GGUF: its header (the vocabulary) over its tensors
        assert 0 <= r["disk_bytes"] - r["ram_bytes"] < 8e6


def test_plan_row(demo) -> None:
    plan = demo[0]["plan"]
    assert plan["arena_bytes"] <= 1.05 * plan["lower_bound_bytes"]
    assert plan["steady_state_allocations"] == 0


def _fitted_run(budget_mb: int, formats: dict[str, int], ram_mb: float, ppl: float) -> dict:
    """A fit result as memopt.compose.fit.fit returns it (the keys the demo reads), measured."""
    units = [{"unit": f"u{i}", "format": f} for f, n in formats.items() for i in range(n)]
    return {
        "budget_bytes": budget_mb * 10**6,
        "predicted_peak_bytes": int(0.95 * budget_mb * 10**6),
        "measured_peak_bytes": int(0.9 * budget_mb * 10**6),
        "within_budget": True,
        "plan": {"units": units},
        "tokens_per_s": 50.0,
        "ram_bytes": int(ram_mb * 10**6),
        "perplexity": ppl,
    }


def test_fit_section_table_and_plot(tmp_path: Path) -> None:
    """The fit section's table, HTML and fit.png from synthetic results (the fits themselves:
    tests/compose/test_fit.py; the full demo runs them)."""
    runs = [
        {"budget_bytes": 90 * 10**6, "refused": "a budget of 90.0 MB is too small"},
        _fitted_run(150, {"int4-g32": 30, "int8": 1}, 95.0, 11.0),
        _fitted_run(250, {"int4-g32": 29, "float32": 1, "int4-g128": 1}, 192.0, 10.5),
    ]
    assert _formats_summary(runs[2]["plan"]["units"]) == "int4-g32 ×29, float32 ×1, int4-g128 ×1"
    rows = _fit_table(runs, base_perplexity=10.0)
    assert rows[0][0] == "90.0 MB" and rows[0][3] == "refused"
    assert rows[1] == (
        "150.0 MB",
        "142.5 MB",
        "135.0 MB",
        "yes",
        "95.0 MB",
        "int4-g32 ×30, int8 ×1",
        "11.00",
        "1.100×",
        "50.0",
    )
    assert len({len(r) for r in rows}) == 1
    question = {
        "budget_bytes": 150 * 10**6,
        "baseline_rss_bytes": 314 * 10**6,
        "float32_estimate_bytes": 585 * 10**6,
        "float32_weight_bytes": 538 * 10**6,
        "fits_as_float32": False,
    }
    page = _fit_html({"question": question, "seq": 64, "max_new_tokens": 32, "runs": runs}, rows)
    assert "does not fit as float32" in page and "585.0 MB" in page and "<table" in page
    assert "90.0 MB: refused: a budget of 90.0 MB is too small" in page
    uniform = [
        DemoRow("float32 (baseline)", 538 * 10**6, 0, 0, 0.1, 10.0),
        DemoRow("int4 g64 (RTN)", 80 * 10**6, 0, 0, 0.1, 12.0),
        DemoRow("float16", 269 * 10**6, 0, 0, 0.1, 10.0),  # not a point of the plot
    ]
    _plot_fit(runs, uniform, tmp_path / "fit.png", title="budget vs quality")
    assert (tmp_path / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
