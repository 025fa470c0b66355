"""finetune(): a real run on text, resumable to the same loss curve; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memopt.core.errors import MemoptError
from memopt.train.finetune import finetune


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (its vocabulary), as a Hugging Face folder."""
    from memopt.formats.gguf import gguf_tokenizer
    from memopt.models import resolve
    from memopt.models.toy import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-lm")
    tok = gguf_tokenizer(resolve("smollm2").path)
    loaded = tiny_llama(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2
    )
    loaded.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("data") / "python-docs.txt"
    path.write_text("\n".join(list(pydoc_data.topics.topics.values())[:10]))
    return path


OPTS = dict(
    steps=4,
    batch=2,
    seq=32,
    lr=2e-3,
    optimizer="adamw8bit",
    dtype="bfloat16",
    checkpointing=True,
    grad_accum=2,
    save_every=2,
)


def test_interrupted_and_resumed_run_gives_the_same_loss_curve(tiny_lm, text, tmp_path) -> None:
    full = finetune(tiny_lm, text, out_dir=tmp_path / "a", **OPTS)
    assert full["steps"] == 4 and len(full["losses"]) == 4
    part = finetune(tiny_lm, text, out_dir=tmp_path / "b", stop_after=2, **OPTS)
    assert part["steps"] == 2
    rest = finetune(tiny_lm, text, out_dir=tmp_path / "b", resume=True, **OPTS)
    assert rest["start_step"] == 2
    assert rest["losses"] == full["losses"]  # bit for bit
    log = [json.loads(x) for x in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    png = (tmp_path / "b" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted(p.name for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert not [f for f in files if "tmp" in f]  # no half-written file left
    assert "trainer-rank0.safetensors" in files and "trainer.json" in files


def test_bad_input_is_a_one_line_error(tiny_lm, text, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        (dict(data=tmp_path / "missing.txt"), "not found"),
        (dict(data=empty), "no text"),
        (dict(data=text, steps=0), "steps"),
        (dict(data=text, dtype="int3"), "dtype"),
        (dict(data=text, optimizer="lion"), "optimizer"),
    ]
    for kwargs, match in cases:
        data = kwargs.pop("data")
        args = {"out_dir": tmp_path / "o", "steps": 1, **kwargs}
        with pytest.raises(MemoptError, match=match) as info:
            finetune(tiny_lm, data, **args)
        assert "\n" not in str(info.value)
