"""`memopt demo`: the main job end to end on the bundled smollm2, checked on what it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memopt.app.cli import main


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
