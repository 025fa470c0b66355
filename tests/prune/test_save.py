"""prune_model (what `memopt prune` calls) and saving pruned models through memopt.models.saved."""

from __future__ import annotations

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.prune import prune_model


def _io_has_sparse() -> bool:
    """True once memopt.models.saved dispatches sparse formats to memopt.weights.sparse's io_* hooks."""
    import memopt.models.saved as io
    from memopt.weights.sparse import io_weight_spec

    try:
        return io.disk_layout({"format": "sparse-bitmask-float", "shape": [1, 8], "nnz": 0,
                               "layout": "bitmask", "values": "float"}) is not None  # fmt: skip
    except MemoptError:
        return io_weight_spec is None


@pytest.fixture
def io_with_sparse(monkeypatch):
    """memopt.models.saved as it is, or, until it calls the hooks itself, with the five-line dispatch the
    hooks are for patched in (what the lead adds to io.py; see memopt.weights.sparse)."""
    import memopt.models.saved as io
    from memopt.prune import storage as st

    if _io_has_sparse():
        return io
    for name, hook, test in (
        ("weight_spec", st.io_weight_spec, lambda a: isinstance(a, st.SparseWeight)),
        ("disk_layout", st.io_disk_layout, lambda a: st.is_sparse_format(a.get("format"))),
        ("disk_tensors", st.io_disk_tensors, lambda a: isinstance(a, st.SparseWeight)),
        ("empty_weight", st.io_empty_weight, lambda a: st.is_sparse_format(a.get("format"))),
        ("fill_weight", st.io_fill_weight, lambda a: isinstance(a, st.SparseWeight)),
    ):
        orig = getattr(io, name)

        def patched(first, *rest, _o=orig, _h=hook, _t=test):
            return _h(first, *rest) if _t(first) else _o(first, *rest)

        monkeypatch.setattr(io, name, patched)
    return io


def test_prune_model_structured_saves(tiny_folder, tmp_path):
    from memopt.models.saved import load

    out = prune_model(tiny_folder("llama"), "structured", 0.5, tmp_path / "s")
    assert out["bytes_after"] < out["bytes_before"] and out["disk_bytes"] > 0
    assert 0.4 < out["sparsity"] <= 0.5  # FFN and query heads halved; k and v stay
    again = load(tmp_path / "s")
    assert again.model.config.intermediate_size == 64
    assert torch.isfinite(again.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("values", ["float", "int8"])
def test_prune_model_sparse_round_trip(tiny_folder, tmp_path, values, io_with_sparse):
    from memopt.models import load_model

    out = prune_model(tiny_folder("llama"), "magnitude", 0.5, tmp_path / "m", values=values)
    assert out["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert out["disk_bytes"] < 0.75 * out["bytes_before"]
    again = io_with_sparse.load(tmp_path / "m")
    ref = load_model(tiny_folder("llama"))
    from memopt.prune import Magnitude, prune_

    prune_(ref, Magnitude(0.5), values=values)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)


def test_prune_model_bad_input(tiny_folder, tmp_path):
    with pytest.raises(MemoptError):
        prune_model(tiny_folder("llama"), "magnitude", 1.5)
    with pytest.raises(MemoptError):
        prune_model(tiny_folder("llama"), "3:8x")
    with pytest.raises(MemoptError, match="does not divide"):
        prune_model(tiny_folder("llama"), "2:3")  # 64 inputs are not groups of 3
    (tmp_path / "f").write_text("x")
    with pytest.raises(MemoptError):
        prune_model(tiny_folder("llama"), "magnitude", 0.5, tmp_path / "f")


def test_demo_row(minilm):
    import copy

    from memopt.prune import demo_row

    lm = copy.deepcopy(minilm)
    row = demo_row(lm, "magnitude", 0.5)
    assert row["technique"] == "prune magnitude 50%" and row["sparsity"] == pytest.approx(0.5)
    assert row["bytes_after"] < 0.8 * row["bytes_before"]  # the 30522 x 384 embedding stays dense


@pytest.mark.parametrize("values", ["float", "int4"])
def test_estimate_sparse_folder_matches_profile(tiny_folder, tmp_path, values, io_with_sparse):
    """`memopt estimate` on a pruned folder: the sparse weights rebuild on meta from the manifest's
    nnz (no data-dependent op), and the prediction is the measured step's bytes."""
    from memopt.measure.estimate import estimate
    from memopt.measure.profile import profile

    prune_model(tiny_folder("llama"), "magnitude", 0.5, tmp_path / "m", values=values)
    pred = estimate(tmp_path / "m").to_dict()
    got = profile(tmp_path / "m").to_dict()
    assert pred["peak_bytes"] == got["peak_bytes"]
    assert pred["breakdown"] == got["breakdown"]
