"""Held-out quality: the texts (other domains, never calibration text) and perplexity on them."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.core.texts import (
    CALIB_TOPICS,
    HELDOUT,
    default_calib_text,
    default_text,
    heldout_text,
    heldout_texts,
    mixed_calib_text,
)


@contextlib.contextmanager
def one_thread():
    """One torch thread: a 64-token forward is too small to split, and on a shared machine two
    threads wait on each other at every operation (measured 6-10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _lines(text: str) -> set[str]:
    """The text's distinct lines of 30 characters or more (stripped): what a copy would share."""
    return {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 30}


def test_heldout_texts_are_other_domains_and_not_calibration():
    texts = heldout_texts()
    assert set(texts) == set(HELDOUT)  # this Python has all four
    assert texts["pydoc"] == default_text()
    assert "LICENSE AGREEMENT" in texts["license"]  # legal
    assert "def " in texts["code"] and "class JSONEncoder" in texts["code"]  # code
    assert "IDLE" in texts["news"]  # release notes
    calib = mixed_calib_text()
    for name, text in texts.items():
        assert len(text) > 10_000, name  # enough for 2,048 tokens (about 4 characters each)
        assert not _lines(text) & _lines(calib), name  # no line of it is calibrated on
    # the mix: documentation, code and prose, in comparable shares
    assert default_calib_text()[:1000] in calib
    assert "def heappush" in calib and "IDLEfork" in calib
    assert 60_000 < len(calib) < 80_000
    assert not set(CALIB_TOPICS) & {"execmodel", "types"}
    with pytest.raises(MemoptError, match="unknown held-out"):
        heldout_text("poetry")


def test_heldout_perplexity(smollm2):
    """smollm2 (float) on 64 tokens of each non-pydoc held-out text: the windows add up, and the
    domains differ in difficulty as measured on 2,048 tokens (code 8.7 < license 12.0 < news
    29.1)."""
    from memopt.evaluate import heldout_perplexities

    names = ["license", "news", "code"]
    with one_thread():
        got = heldout_perplexities(smollm2, names, max_tokens=64)
    assert list(got) == names and all(r.tokens == 63 for r in got.values())
    assert got["code"].perplexity < got["license"].perplexity < got["news"].perplexity


def test_cli_eval_heldout(capsys, monkeypatch, smollm2):
    import memopt.models
    from memopt.app.cli import main

    monkeypatch.setattr(memopt.models, "load_model", lambda *a, **kw: smollm2)  # loaded once
    with one_thread():
        code = main(
            ["eval", "smollm2", "--heldout", "license,code", "--max-tokens", "64", "--json"]
        )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out["heldout"]) == {"license", "code"}
    assert out["text"] == "license" and out["perplexity"] == out["heldout"]["license"]["perplexity"]
    assert out["tokens"] == 63
    code = main(["eval", "smollm2", "--heldout", "poetry", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "poetry" in err
