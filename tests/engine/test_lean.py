"""memopt.engine.lean: a model for the engine straight from its files gives the same tokens as
the full load, without importing transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt.engine import engine_for
from memopt.engine.lean import open_model
from memopt.generate import generate
from memopt.models import load_model
from memopt.models.saved import save
from memopt.models.toy import tiny_llama
from memopt.quant import Int4WeightOnly, Int8WeightOnly, quantize_

PROMPT = "The execution model of Python names objects"


def _tokenizer_files(folder: Path) -> None:
    """A small byte-level BPE (the toy model's 512 ids) trained on Python's documentation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from memopt.core.texts import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([default_text()], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=["float32", "int8", "int4"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    loaded = tiny_llama(seed=2)
    if request.param == "int8":
        quantize_(loaded.model, Int8WeightOnly())
    elif request.param == "int4":
        quantize_(loaded.model, Int4WeightOnly(group_size=32))
    out = tmp_path_factory.mktemp(request.param) / "model"
    save(loaded, out)
    _tokenizer_files(out)
    return out


def test_lean_gives_the_full_loads_logits_and_tokens(folder: Path) -> None:
    lean = open_model(folder, 64)
    assert lean is not None
    full = load_model(folder)
    eng = engine_for(full.model, full.config, 64)
    ids = lean.encode(PROMPT)
    assert ids == full.tokenizer()(PROMPT)["input_ids"]
    for pos, tok in enumerate(ids):  # the same tensors through the same C: bit for bit
        assert torch.equal(lean.engine.forward(tok, pos), eng.forward(tok, pos))
    a = lean.generate(PROMPT, 12, stop_at_eos=False)
    b = generate(full, PROMPT, 12, stop_at_eos=False)
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]


def test_lean_does_not_import_transformers(folder: Path) -> None:
    code = (
        "import sys; from memopt.engine.lean import open_model; "
        f"m = open_model({str(folder)!r}, 16); m.generate('x y', 2); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_memopt_run_imports_neither_transformers_nor_the_fit(folder: Path) -> None:
    """``memopt run`` of a folder the engine runs: its start-up is the engine's (the fit's check
    for a run plan reads fit.json without importing memopt.compose and PyTorch's memory tools,
    which took 7 s of a 9 s start under load)."""
    code = (
        "import sys; from memopt.app.cli import main; "
        f"rc = main(['run', {str(folder)!r}, '--prompt', 'x y', '--max-new-tokens', '2', "
        "'--json']); print(rc, 'transformers' in sys.modules, 'memopt.compose' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False False"


def test_what_lean_cannot_read_is_none(tmp_path: Path) -> None:
    assert open_model(tmp_path, 16) is None  # no model there
    loaded = tiny_llama(seed=2)
    loaded.model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    _tokenizer_files(tmp_path / "bf16")
    lean = open_model(tmp_path / "bf16", 16)  # bfloat16 weights: read as stored
    assert lean is not None
    assert {t.dtype for t in lean.engine.keep} >= {torch.bfloat16}
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]  # an architecture the engine does not run
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    assert open_model(tmp_path / "bf16", 16) is None
