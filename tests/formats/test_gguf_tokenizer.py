"""memopt's GGUF tokenizer gives llama.cpp's ids, exactly.

The reference ids were written by llama.cpp (llama-cpp-python's ``Llama.tokenize``) on the bundled
SmolLM2 GGUF, by ``bench/runtime.py --parts tokenizer``; the fixture holds the text, the ids and the
llama-cpp-python version. llama.cpp itself is not needed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memopt import models
from memopt.formats.gguf import gguf_metadata, gguf_tokenizer

SMOLLM2 = models.resolve("smollm2").path
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/tokenizer/smollm2_llamacpp_ids.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok() -> Any:  # a transformers fast tokenizer
    return gguf_tokenizer(SMOLLM2)


def test_fixture_is_for_this_file(reference: dict) -> None:
    assert SMOLLM2.name in reference["model"]
    assert gguf_metadata(SMOLLM2)["tokenizer.ggml.pre"] == reference["pre_tokenizer"] == "smollm"
    text = reference["text"]
    # what the text is there to exercise: digit runs, code, runs of spaces, tabs and newlines
    for piece in ("12345", "0x1F", "def f():", "    ", "\t\t", "\n\n\n", "\r\n", "\u00a0"):
        assert piece in text
    assert len(reference["ids"]) > 3000


def test_ids_equal_llama_cpp(tok: Any, reference: dict) -> None:
    ids = tok(reference["text"])["input_ids"]
    want = reference["ids"]
    if ids != want:
        i = next(
            (i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b),
            min(len(ids), len(want)),
        )
        pytest.fail(
            f"{len(ids)} ids, llama.cpp {len(want)}; first difference at {i}: memopt "
            f"{ids[i : i + 5]} {tok.decode(ids[i : i + 5])!r}, llama.cpp {want[i : i + 5]} "
            f"{tok.decode(want[i : i + 5])!r}"
        )


def test_special_tokens_parsed_as_llama_cpp_does(tok: Any, reference: dict) -> None:
    # memopt (like transformers) reads special tokens written in the text: llama.cpp's special=True
    assert tok(reference["special_text"])["input_ids"] == reference["special_ids"]


def test_decode_round_trip(tok: Any, reference: dict) -> None:
    text = tok.decode(reference["ids"], clean_up_tokenization_spaces=False)
    assert text == reference["text"]


def test_fixture_needs_the_files_pre_tokenizer(tok: Any, reference: dict) -> None:
    """The fixture catches a lost pre-tokenizer: with GPT-2's split alone (transformers' own GGUF
    conversion) the same vocabulary gives other ids on this text (digits are not split one by one)."""
    from tokenizers import Tokenizer, pre_tokenizers

    plain = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert plain.encode(reference["text"], add_special_tokens=False).ids != reference["ids"]
