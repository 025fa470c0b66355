"""SmolLM2 streamed: the bundled GGUF in its stored form (96.6 MB of Q4_1 / Q8_0 blocks) and its
float32 weights as a folder, at 135 MB (25 % of the float32 bytes) and below: the in-memory
tokens, within budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.formats.gguf import GGUFSource
from memopt.generate import generate
from memopt.models import resolve
from memopt.stream import plan_budget, stream_model
from memopt.stream.layout import order_report, save_float_folder
from memopt.stream.run import run_measured

BUDGET = 135_000_000
GGUF_STREAMING = 60_000_000  # below the GGUF's 96.6 MB: some blocks and the head stream
IDS = [1, 504, 3458, 282, 4649, 314]  # "<|im_start|>The capital of France is"-like ids
N = 4


@pytest.fixture(scope="module")
def reference(smollm2) -> list[int]:  # noqa: ANN001 (conftest fixture)
    return generate(smollm2, IDS, N, stop_at_eos=False, warmup=False)["tokens"]


@pytest.fixture(scope="module")
def blocks_reference(smollm2_blocks) -> list[int]:  # noqa: ANN001 (conftest fixture)
    """The GGUF as shipped, in memory, through the decode engine (``memopt run smollm2``)."""
    out = generate(smollm2_blocks, IDS, N, stop_at_eos=False, warmup=False)
    assert out["engine"] == "memopt"
    return out["tokens"]


@pytest.fixture(scope="module")
def f32_folder(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    return save_float_folder(smollm2, tmp_path_factory.mktemp("smollm2-f32"))


def test_gguf_plan_counts_stored_bytes() -> None:
    """The plan holds the file's tensor bytes (96.6 MB), not 538 MB of float32: at 135 MB the whole
    model is resident, run by the decode engine; below its smallest budget it is refused, naming
    that budget."""
    src = GGUFSource(resolve("smollm2").path)
    stored = sum(src.nbytes(n) for n in src.names())
    plan = plan_budget("smollm2", BUDGET, tokens=len(IDS) + N, prompt_tokens=len(IDS))
    assert plan.model_bytes == stored < 100e6
    assert plan.engine and plan.streamed_units == 0 and plan.head_pinned
    assert plan.predicted_peak_bytes <= BUDGET
    with pytest.raises(MemoptError, match=r"smallest budget that works is \d+(\.\d)? MB"):
        plan_budget("smollm2", 20_000_000, tokens=len(IDS) + N, prompt_tokens=len(IDS))


def test_gguf_streamed_blocks_tokens_equal_in_memory(blocks_reference: list[int]) -> None:
    """Below its stored size: blocks and the tied Q8_0 head's row chunks stream as the file's bytes
    (transformers' forward with hooks); the in-memory tokens (tests/stream/test_gguf_stream.py
    compares the logits of the two paths bit for bit on tiny files)."""
    with stream_model("smollm2", GGUF_STREAMING, tokens=len(IDS) + N, prompt_tokens=len(IDS)) as sm:
        assert not sm.plan.engine and 0 < len(sm.plan.pinned_blocks) < 30
        assert sm.plan.head_chunks > 1 and not sm.plan.head_pinned
        out = generate(sm.loaded, IDS, N, stop_at_eos=False, warmup=False)
        assert out["engine"] == "transformers" and sm.stats()["fetches"] > 0
    assert out["tokens"] == blocks_reference


def test_gguf_pinned_whole_runs_the_engine(blocks_reference: list[int]) -> None:
    with stream_model("smollm2", BUDGET, tokens=len(IDS) + N, prompt_tokens=len(IDS)) as sm:
        assert sm.plan.engine and sm.plan.streamed_units == 0
        out = generate(sm.loaded, IDS, N, stop_at_eos=False, warmup=False)
    assert out["engine"] == "memopt" and out["tokens"] == blocks_reference


def test_float32_folder_streamed_logits_bit_exact(smollm2, f32_folder: Path) -> None:  # noqa: ANN001
    assert order_report(f32_folder)["blocks_in_order"]  # written in execution order
    with stream_model(f32_folder, BUDGET, tokens=len(IDS) + N, prompt_tokens=len(IDS)) as sm:
        assert len(sm.plan.pinned_blocks) < 30 and sm.plan.head_chunks > 1
        ids = torch.tensor([IDS])
        with torch.inference_mode():
            want = smollm2.model(input_ids=ids).logits  # (1, T, V)
            got = sm.loaded.model(input_ids=ids).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("budget", [BUDGET, GGUF_STREAMING], ids=["engine", "streamed"])
def test_peak_rss_within_budget_in_child(blocks_reference: list[int], budget: int) -> None:
    """``memopt run smollm2 --max-memory 135MB`` (everything resident, the decode engine) and at
    60 MB (blocks streamed): measured in a fresh process, the peak RSS over its import baseline
    stays within the budget, and the tokens are the in-memory ones."""
    out = run_measured("smollm2", IDS, N, budget, timeout=300)
    assert out["tokens"][:N] == blocks_reference
    assert out["plan"]["engine"] == (budget == BUDGET)
    assert 0 < out["peak_over_baseline_bytes"] <= budget, out["peak_over_baseline_bytes"]


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from memopt.quant.config import method_config
    from memopt.quant.stream import quantize_model

    out = tmp_path_factory.mktemp("smollm2-int4") / "q"
    quantize_model("smollm2", method_config("int4", 64, "rtn"), out)  # streamed, ~6 s
    return out


def test_int4_streamed_at_half_its_bytes_in_child(int4_folder: Path) -> None:
    """The int4 folder at 50 % of its bytes (its tied 16 MB head streamed in row chunks, the
    embedding read by rows): the in-memory model's tokens on the same path (transformers'
    forward: the unbudgeted run goes through the decode engine, whose int4 kernel rounds the
    activations to int8, so its tokens may differ), the peak RSS within the budget."""
    from memopt.models import load_model

    budget = plan_budget(int4_folder, None).model_bytes // 2  # 37.9 MB
    loaded = load_model(int4_folder)
    want = generate(loaded, IDS, N, stop_at_eos=False, warmup=False, engine=False)["tokens"]
    del loaded
    out = run_measured(int4_folder, IDS, N, budget, timeout=300)
    assert out["plan"]["head_chunks"] > 1 and not out["plan"]["head_pinned"]
    assert out["tokens"] == want
    assert 0 < out["peak_over_baseline_bytes"] <= budget, out["peak_over_baseline_bytes"]
