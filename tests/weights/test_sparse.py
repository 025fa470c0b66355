"""Sparse storage: exact bytes, exact decoding, outputs equal to the dense masked layer, disk form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memopt.core.errors import MemoptError
from memopt.weights.modules import QLinear
from memopt.weights.primitives import sqnr
from memopt.weights.quantized import disk_tensors, empty_weight, fill_weight, weight_spec
from memopt.weights.sparse import (
    INT4_GROUP,
    INT8_GROUP,
    SparseWeight,
    choose_layout,
    sparse_nbytes,
)


def _pruned(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0.0
    return w


def _pad(x: int, g: int) -> int:
    return -(-x // g) * g


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
@pytest.mark.parametrize("values", ["float", "int8", "int4"])
def test_bytes_exact(layout, values):
    n, k = 48, 200  # N*K not a multiple of 8 * 128: padding paths run
    w = _pruned(n, k, 0.6)
    sw = SparseWeight(w, layout, values)
    nnz = int((w != 0).sum())
    assert sw.nnz == nnz
    index = -(-n * k // 8) if layout == "bitmask" else 2 * nnz + 4 * n
    vals = {
        "float": 4 * nnz,
        "int8": _pad(nnz, INT8_GROUP) + 4 * _pad(nnz, INT8_GROUP) // INT8_GROUP,
        "int4": _pad(nnz, INT4_GROUP) // 2 + 4 * _pad(nnz, INT4_GROUP) // INT4_GROUP,
    }[values]
    assert sw.nbytes == index + vals == sparse_nbytes(n, k, nnz, layout, values)


def test_half_sparse_float32_is_0_53x():
    n, k = 256, 512
    w = torch.randn(n, k)
    w.view(-1)[torch.randperm(n * k)[: n * k // 2]] = 0.0  # exactly 50 %
    sw = SparseWeight(w)
    assert sw.layout == "bitmask"
    assert sw.nbytes / (n * k * 4) == pytest.approx(0.53125, abs=0)  # 1/32 + 1/2


def test_layout_choice_follows_bytes():
    assert choose_layout(100, 1000, 50_000) == "bitmask"  # 50 %
    assert choose_layout(100, 1000, 2_000) == "csr"  # 2 %: 2 bytes a nonzero beat 1 bit an element


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
@pytest.mark.parametrize("values,min_db", [("float", None), ("int8", 38.0), ("int4", 17.0)])
def test_decode(layout, values, min_db):
    w = _pruned(64, 96, 0.5, seed=1)
    d = SparseWeight(w, layout, values).dequantize()
    assert torch.equal(d[w == 0], torch.zeros_like(d[w == 0]))  # pruned stay exactly zero
    if min_db is None:
        assert torch.equal(d, w)  # float values: bit-exact
    else:
        assert sqnr(w[w != 0], d[w != 0]) > min_db


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
def test_sparse_linear_equals_dense_masked(layout):
    w = _pruned(80, 64, 0.7, seed=2)
    b = torch.randn(80)
    x = torch.randn(3, 5, 64)
    lin = QLinear(SparseWeight(w, layout), b)
    with torch.no_grad():
        got = lin(x)
        got2 = lin(x)  # the shared buffer is reused: same answer
    want = F.linear(x.reshape(-1, 64), w, b).reshape(3, 5, 80)
    if layout == "csr":
        assert torch.equal(got, want) and torch.equal(got2, want)  # the same dense weight
    else:  # 15 rows: the sparse kernel, float32 sums in another order (test_sparse_kernel.py)
        assert torch.equal(got, got2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    lin(x).sum().backward()  # with autograd the weight is a fresh tensor, not the shared buffer
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5)


@pytest.mark.parametrize("values", ["float", "int8", "int4"])
def test_disk_form_round_trips_through_the_registry(values):
    w = _pruned(32, 128, 0.5, seed=3)
    sw = SparseWeight(w, values=values)
    spec = weight_spec(sw)
    assert spec["format"] == f"sparse-bitmask-{values}" and spec["nnz"] == sw.nnz
    twin = empty_weight(spec, "cpu")
    fill_weight(twin, {k: v.clone() for k, v in disk_tensors(sw).items()})
    assert torch.equal(twin.dequantize(), sw.dequantize())
    assert twin.nbytes == sw.nbytes
    bad = dict(disk_tensors(sw))
    bad["values"] = bad["values"][:-1]
    with pytest.raises(MemoptError):
        fill_weight(empty_weight(spec, "cpu"), bad)


def test_bad_format_refused():
    with pytest.raises(MemoptError):
        SparseWeight(torch.zeros(4, 4), values="int3")
    with pytest.raises(MemoptError):
        SparseWeight(torch.zeros(4, 4), layout="coo")
