"""SmolLM2 streamed at 135 MB (25 % of its float32 bytes): the in-memory tokens, within budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memopt.generate import generate
from memopt.stream import stream_model
from memopt.stream.layout import order_report, save_float_folder
from memopt.stream.run import run_measured

BUDGET = 135_000_000
IDS = [1, 504, 3458, 282, 4649, 314]  # "<|im_start|>The capital of France is"-like ids
N = 4


@pytest.fixture(scope="module")
def reference(smollm2) -> list[int]:  # noqa: ANN001 (conftest fixture)
    return generate(smollm2, IDS, N, stop_at_eos=False, warmup=False)["tokens"]


@pytest.fixture(scope="module")
def f32_folder(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    return save_float_folder(smollm2, tmp_path_factory.mktemp("smollm2-f32"))


def test_gguf_streamed_tokens_equal_in_memory(reference: list[int]) -> None:
    """Blocks dequantized from the mapped GGUF on demand: the same greedy tokens."""
    with stream_model("smollm2", BUDGET, tokens=len(IDS) + N, prompt_tokens=len(IDS)) as sm:
        assert sm.plan.streamed_units > 0
        got = generate(sm.loaded, IDS, N, stop_at_eos=False, warmup=False)["tokens"]
    assert got == reference


def test_float32_folder_streamed_logits_bit_exact(smollm2, f32_folder: Path) -> None:  # noqa: ANN001
    assert order_report(f32_folder)["blocks_in_order"]  # written in execution order
    with stream_model(f32_folder, BUDGET, tokens=len(IDS) + N, prompt_tokens=len(IDS)) as sm:
        assert len(sm.plan.pinned_blocks) < 30 and sm.plan.head_chunks > 1
        ids = torch.tensor([IDS])
        with torch.inference_mode():
            want = smollm2.model(input_ids=ids).logits  # (1, T, V)
            got = sm.loaded.model(input_ids=ids).logits
    assert torch.equal(want, got)


def test_peak_rss_within_budget_in_child(reference: list[int]) -> None:
    """``memopt run smollm2 --max-memory 135MB``: measured in a fresh process, the peak RSS over its
    import baseline stays within the budget, and the tokens are the in-memory ones."""
    out = run_measured("smollm2", IDS, N, "135MB", timeout=300)
    assert out["tokens"][:N] == reference
    assert 0 < out["peak_over_baseline_bytes"] <= BUDGET, out["peak_over_baseline_bytes"]


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from memopt.quant.config import method_config
    from memopt.quant.stream import quantize_model

    out = tmp_path_factory.mktemp("smollm2-int4") / "q"
    quantize_model("smollm2", method_config("int4", 64, "rtn"), out)  # streamed, ~6 s
    return out


def test_int4_streamed_at_half_its_bytes_in_child(int4_folder: Path) -> None:
    """The int4 folder at 50 % of its bytes (its tied 16 MB head streamed in row chunks, the
    embedding read by rows): the unbudgeted run's tokens, the peak RSS within the budget."""
    from memopt.stream import plan_budget

    budget = plan_budget(int4_folder, None).model_bytes // 2  # 37.9 MB
    want = run_measured(int4_folder, IDS, N, None, timeout=300)["tokens"]
    out = run_measured(int4_folder, IDS, N, budget, timeout=300)
    assert out["plan"]["head_chunks"] > 1 and not out["plan"]["head_pinned"]
    assert out["tokens"] == want
    assert 0 < out["peak_over_baseline_bytes"] <= budget, out["peak_over_baseline_bytes"]
