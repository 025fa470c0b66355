"""memopt.generate: greedy decoding with the KV cache, same tokens as transformers, float or saved."""

from __future__ import annotations

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.generate import generate
from memopt.models import load_model
from memopt.models import saved as io
from memopt.quant import Int4WeightOnly, Int8WeightOnly, quantize_

PROMPT = [1, 5, 9, 33, 120, 7]


def _hf_greedy(loaded, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = loaded.model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate(tiny_folder, arch):
    loaded = load_model(tiny_folder(arch))
    res = generate(loaded, PROMPT, max_new_tokens=8, stop_at_eos=False)
    assert res["tokens"] == _hf_greedy(loaded, PROMPT, 8)
    assert res["prompt_tokens"] == len(PROMPT) and res["prefill_s"] > 0
    # decode speed excludes prefill: 7 decode steps (the first token comes from the prefill)
    assert res["tokens_per_s"] == pytest.approx(7 / res["decode_s"])
    assert generate(loaded, PROMPT, max_new_tokens=8, stop_at_eos=False)["tokens"] == res["tokens"]


def test_sampling_is_repeatable_with_a_seed(tiny_folder):
    loaded = load_model(tiny_folder("llama"))
    a = generate(loaded, PROMPT, 12, greedy=False, seed=3, stop_at_eos=False)["tokens"]
    b = generate(loaded, PROMPT, 12, greedy=False, seed=3, stop_at_eos=False)["tokens"]
    c = generate(loaded, PROMPT, 12, greedy=False, seed=4, stop_at_eos=False)["tokens"]
    assert a == b and a != c


@pytest.mark.parametrize("cfg", [Int4WeightOnly(group_size=32), Int8WeightOnly()])
def test_saved_and_loaded_generates_what_the_in_memory_model_did(tiny_folder, tmp_path, cfg):
    loaded = load_model(tiny_folder("llama"))
    quantize_(loaded.model, cfg)
    ref = generate(loaded, PROMPT, max_new_tokens=10, stop_at_eos=False)
    io.save(loaded, tmp_path / "q")
    got = generate(load_model(tmp_path / "q"), PROMPT, max_new_tokens=10, stop_at_eos=False)
    assert got["tokens"] == ref["tokens"]


def test_stops_at_end_of_sequence(tiny_folder):
    loaded = load_model(tiny_folder("llama"))
    first = generate(loaded, PROMPT, 1)["tokens"][0]
    loaded.model.generation_config.eos_token_id = first
    res = generate(loaded, PROMPT, 10)
    assert res["tokens"] == [first] and res["tokens_per_s"] is None


def test_bad_requests_are_one_line_errors(tiny_folder):
    loaded = load_model(tiny_folder("llama"))
    with pytest.raises(MemoptError, match="max_new_tokens"):
        generate(loaded, PROMPT, 0)
    with pytest.raises(MemoptError, match="empty"):
        generate(loaded, [], 3)
    with pytest.raises(MemoptError, match="tokenizer"):
        generate(loaded, "text needs a tokenizer, this folder has none", 3)


def test_encoder_is_refused(minilm):
    with pytest.raises(MemoptError, match="causal"):
        generate(minilm, "hello", 3)


def test_smollm2_chat_template_and_text():
    loaded = load_model("smollm2")
    res = generate(loaded, "What is the capital of France?", 4, chat=True, warmup=False)
    tok = loaded.tokenizer()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert res["prompt_tokens"] == len(ids)
    assert res["tokens"] == _hf_greedy(loaded, ids, len(res["tokens"]))
    assert isinstance(res["text"], str) and res["text"].strip()
    assert res["text"] == tok.decode(res["tokens"], skip_special_tokens=True)
