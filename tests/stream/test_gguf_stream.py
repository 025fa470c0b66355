"""A GGUF streamed in its stored form: GGML blocks as the file's bytes, the plan in stored bytes,
the in-memory model's logits and tokens whether blocks stream (transformers' forward with hooks)
or everything is resident (memopt's decode engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from conftest import write_llama_gguf
from memopt.core.errors import MemoptError
from memopt.engine.llama import GGML_TYPES
from memopt.formats.gguf import GGUFSource
from memopt.generate import generate
from memopt.models import load_model
from memopt.stream import plan_budget, stream_model
from memopt.weights import GGMLWeight

IDS = [5, 17, 300, 1000, 12, 9, 77, 1024]
TOKENS, PROMPT = 24, len(IDS)


def _llama(tied: bool) -> torch.nn.Module:
    """A 4-block Llama whose vocabulary (2048 × 64) makes the head several blocks' bytes, so that
    a budget streams it in row chunks; norms away from 1, so that they matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=tied, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(
    scope="module",
    params=[(True, "Q8_0"), (False, "Q4_0"), (True, "Q5_1")],
    ids=["tied-q8_0", "untied-q4_0", "tied-q5_1"],
)
def gguf_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tied, qtype = request.param
    path = tmp_path_factory.mktemp("gguf-stream") / f"tiny-{qtype}-{tied}.gguf"
    # the decode engine computes Q8_0 and Q4_0, not Q5_1 (transformers' forward runs that one)
    write_llama_gguf(path, _llama(tied), getattr(QT, qtype))
    return path


class _NoTokenizer:
    """The tiny files have no vocabulary: generate() decodes nothing (without this it would try to
    convert the file's tokenizer, seconds in a child process, to fail)."""

    eos_token_id = None

    def decode(self, *_a: object, **_k: object) -> str:
        raise MemoptError("no tokenizer")


def _tokens(loaded: Any, **kwargs: Any) -> dict[str, Any]:
    loaded._tokenizer = _NoTokenizer()
    return generate(loaded, IDS, 8, stop_at_eos=False, warmup=False, **kwargs)


def _stored_bytes(path: Path) -> int:
    src = GGUFSource(path)
    return sum(src.nbytes(n) for n in src.names())


def _ggml_engine_types(path: Path) -> bool:
    src = GGUFSource(path)
    return {src.ggml_type(n) for n in src.names()} <= GGML_TYPES


def test_plan_counts_stored_bytes(gguf_file: Path) -> None:
    """The plan's weights are the file's tensor bytes (float tensors are F32 in the file), not
    their float32 dequantization; and every block is its tensors' stored bytes."""
    plan = plan_budget(gguf_file, None, tokens=TOKENS, prompt_tokens=PROMPT)
    src = GGUFSource(gguf_file)
    assert plan.model_bytes == _stored_bytes(gguf_file)
    for i, nbytes in enumerate(plan.block_bytes):
        prefix = f"model.layers.{i}."
        assert nbytes == sum(src.nbytes(n) for n in src.names() if n.startswith(prefix))
    float32 = sum(4 * torch.Size(src.shape(n)).numel() for n in src.names())
    assert plan.model_bytes < float32 or not any(src.ggml_type(n) != "F32" for n in src.names())


def test_refusal_names_the_smallest_budget(gguf_file: Path) -> None:
    with pytest.raises(MemoptError) as err:
        plan_budget(gguf_file, 1000, tokens=TOKENS, prompt_tokens=PROMPT, reserve_bytes=0)
    msg = str(err.value)
    assert "\n" not in msg and "smallest budget that works is" in msg
    named = float(msg.split("smallest budget that works is ")[1].split(" MB")[0]) * 1e6
    smallest = plan_budget(
        gguf_file, 10**12, tokens=TOKENS, prompt_tokens=PROMPT, reserve_bytes=0
    ).min_budget_bytes
    assert smallest <= named < smallest + 100_000  # rounded up to 0.1 MB: enough, and tight
    plan = plan_budget(gguf_file, int(named), tokens=TOKENS, prompt_tokens=PROMPT, reserve_bytes=0)
    assert plan.streamed_units > 0 or plan.engine


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_streamed_blocks_give_the_in_memory_logits_and_tokens(
    gguf_file: Path, share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Budgets that stream blocks and the head's row chunks (GGML rows of the file, installed in
    GGMLWeight modules; the embedding read by rows): the in-memory model's logits bit for bit on
    the same forward, and its greedy tokens. (A model this small fits whole, with the decode
    engine, in less than streaming needs: the engine is left out of the plan here, as it is for a
    model larger than the budget; tests/stream/test_smollm2.py streams the bundled GGUF.)"""
    from memopt.stream import executor

    monkeypatch.setattr(executor, "_engine_runs", lambda *_a: False)
    ref = load_model(gguf_file)  # the blocks as stored, in memory
    plan0 = plan_budget(gguf_file, None, tokens=TOKENS, prompt_tokens=PROMPT, reserve_bytes=0)
    budget = plan_budget(
        gguf_file, 10**12, tokens=TOKENS, prompt_tokens=PROMPT, reserve_bytes=0
    ).min_budget_bytes + int(share * sum(plan0.block_bytes))
    with stream_model(
        gguf_file, budget, tokens=TOKENS, prompt_tokens=PROMPT, reserve_bytes=0
    ) as sm:
        assert not sm.plan.engine and sm.plan.streamed_units > 0
        assert sm.plan.head_chunks > 1 and not sm.plan.head_pinned
        emb = sm.loaded.model.get_input_embeddings()
        assert type(emb).__name__ == "_GGMLRowEmbedding"
        ids = torch.tensor([IDS])
        with torch.inference_mode():
            want = ref.model(input_ids=ids).logits  # (1, T, V)
            got = sm.loaded.model(input_ids=ids).logits
            again = sm.loaded.model(input_ids=ids).logits  # every unit streamed a second time
        assert torch.equal(want, got) and torch.equal(got, again)
        a, b = _tokens(ref, engine=False), _tokens(sm.loaded)
        assert b["engine"] == "transformers" and a["tokens"] == b["tokens"]
        assert sm.stats()["fetches"] > 0
        # after a forward, no streamed block holds its blocks: all back on the meta device
        layers = sm.loaded.model.model.layers
        streamed = [i for i in range(len(layers)) if i not in sm.plan.pinned_blocks]
        assert streamed and all(
            m.blocks.is_meta
            for i in streamed
            for m in layers[i].modules()
            if isinstance(m, GGMLWeight)
        )


def test_everything_resident_runs_the_engine(gguf_file: Path) -> None:
    """A budget that holds the whole stored model: nothing streams and, for the GGML types the
    decode engine computes with, generate() runs it (the plan counted its terms): the in-memory
    model's tokens, through the same engine."""
    ref = load_model(gguf_file)
    total = plan_budget(gguf_file, 10**12, tokens=TOKENS, prompt_tokens=PROMPT)
    assert total.streamed_units == 0 and total.head_pinned
    engine = _ggml_engine_types(gguf_file)
    assert total.engine == engine
    with stream_model(gguf_file, total.predicted_peak_bytes, tokens=TOKENS,
                      prompt_tokens=PROMPT) as sm:  # fmt: skip
        assert sm.plan.streamed_units == 0 and sm.plan.engine == engine
        assert sm.plan.predicted_peak_bytes <= total.predicted_peak_bytes
        emb = sm.loaded.model.get_input_embeddings()
        assert type(emb).__name__ == "QEmbedding" and not emb.qweight.blocks.is_meta
        a, b = _tokens(ref), _tokens(sm.loaded)
        assert a["engine"] == b["engine"] == ("memopt" if engine else "transformers")
        assert a["tokens"] == b["tokens"]
