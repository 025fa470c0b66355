"""GGUFSource's public reading interface, as the streamer uses it: rows, gathers, regions."""

from __future__ import annotations

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.formats.gguf import GGUFSource
from memopt.models import resolve


@pytest.fixture(scope="module")
def src() -> GGUFSource:
    s = GGUFSource(resolve("smollm2").path)
    s.drop_metadata()  # tensors stay readable without the key-value metadata
    return s


def test_rows_and_gather_equal_whole_tensor(src: GGUFSource) -> None:
    name = "model.embed_tokens.weight"  # Q4_1 (49152, 576)
    whole = src.read(name)
    assert torch.equal(whole, src.get(name))
    assert torch.equal(src.read(name, slice(100, 164)), whole[100:164])
    idx = torch.tensor([[5, 49151, 0], [7, 7, 300]])  # (2, 3)
    got = src.read(name, idx)  # (2, 3, 576)
    assert got.shape == (2, 3, 576) and torch.equal(got, whole[idx])


def test_permuted_rows_are_refused_but_whole_reads(src: GGUFSource) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"  # llama q: rows permuted in the file
    assert src.read(name).shape == src.shape(name)
    with pytest.raises(MemoptError, match="permuted"):
        src.read(name, slice(0, 8))


def test_regions_lie_in_the_mapping(src: GGUFSource) -> None:
    start, length = src.region()
    for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        a, n = src.region(name)
        assert start <= a and a + n <= start + length and n == src.nbytes(name)
