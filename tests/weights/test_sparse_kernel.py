"""The sparse kernel (bitmask + float32 or int8 values read directly) against the dense matmul.

Tolerance: float32 sums in another order than the dense matmul's, so the kernel is compared with
the float64 product of the stored weight (int8 values: their dequantized float32 values):
SQNR >= 120 dB (float32 rounding of a dot product of <= 1536 terms is about 140 dB; a wrong
value, a misplaced column or a value given its neighbour group's scale is below 60 dB), and
within 1e-5 of torch's float32 ``F.linear`` elementwise (relative to the output's scale).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memopt.weights import _sparse_kernel as sk
from memopt.weights.primitives import sqnr
from memopt.weights.sparse import SparseWeight

pytestmark = pytest.mark.skipif(not sk.available(), reason="no C compiler with OpenMP here")


def _pruned(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0.0
    return w


def _two_four(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // 4, 4, generator=g)
    drop = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]  # 2 of every 4 zeroed
    return w.scatter_(-1, drop, 0.0).reshape(n, k)


def _check(w: torch.Tensor, m: int, bias: bool = False, values: str = "float") -> None:
    n, k = w.shape
    sw = SparseWeight(w, "bitmask", values)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    b = torch.randn(n) if bias else None
    starts = sk.row_starts(sw.mask, n, k)
    assert starts[-1].item() == sw.nnz and starts.diff().min().item() >= 0
    scale = None if values == "float" else sw.scale
    zero = sw.zero if values == "int4" else None
    runs8 = scale is None and sw.runs_of_8()  # 2:4: the runs-of-8 form (what linear() runs)
    got = sk.bitmask_linear(
        sw.mask, sw.values, starts, x, n, b, scale=scale, runs8=runs8, zero=zero
    )
    w = sw.dequantize()  # the stored values (int8: code x scale), dense (N, K)
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert sqnr(ref, got.double()) >= 120.0
    dense = F.linear(x, w, b)
    scale = dense.abs().max().item()
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 16])
@pytest.mark.parametrize("shape", [(96, 64), (64, 200), (33, 77), (7, 5)])
def test_unstructured_random(shape, m):
    # K % 16 != 0 (200, 77, 5) and rows not starting on a byte (77, 5): the unaligned paths run
    _check(_pruned(*shape, 0.5, seed=shape[1]), m)


@pytest.mark.parametrize("m", [1, 3, 8, 9])
@pytest.mark.parametrize("shape", [(96, 64), (64, 200), (33, 77), (7, 5)])
@pytest.mark.parametrize("values", ["int8", "int4"])
def test_quantized_values(shape, m, values):
    """int8 values, a scale per 128 values of the stream; int4, two codes a byte, a scale and a
    zero per 64: runs of 16 columns whose values cross a group's end (two scales in one vector),
    runs starting on a high nibble, the stream's zero padding, K % 16 != 0."""
    _check(_pruned(*shape, 0.5, seed=shape[0]), m, values=values)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 1.0])
def test_densities_and_bias(sparsity):
    _check(_pruned(40, 48, sparsity, seed=3), 4, bias=True)
    _check(_pruned(40, 48, sparsity, seed=3), 4, bias=True, values="int8")
    _check(_pruned(40, 48, sparsity, seed=3), 4, bias=True, values="int4")


@pytest.mark.parametrize("m", [1, 3, 8])
def test_two_four(m):
    """2:4 (8 values in every run of 16 columns: the kernel's runs-of-8 form for float32 values;
    K = 96 and 112: a last run of 16 after whole pairs of runs)."""
    for k in (96, 112):
        w = _two_four(128, k)
        assert SparseWeight(w).runs_of_8()
        _check(w, m)
        _check(w, m, values="int8")
        _check(w, m, values="int4")


def test_runs_of_8_is_detected_exactly():
    assert not SparseWeight(_pruned(64, 96, 0.5)).runs_of_8()  # random 50 %: runs of 5-11
    assert not SparseWeight(_two_four(64, 100)).runs_of_8()  # K % 16 != 0
    w = _two_four(64, 96)
    w[5, 17] = 0.0  # one run with 7 values
    assert not SparseWeight(w).runs_of_8()


def test_empty_rows_and_tail():
    w = _pruned(50, 40, 0.5, seed=5)
    w[::3] = 0.0  # whole rows empty
    w[:, -1] = 1.5  # the last column set: the value stream ends exactly at the buffer's end
    _check(w, 5)


def test_real_layer_shapes():
    """smollm2's projection shapes (576 -> 1536 -> 576) at 50 % and 2:4."""
    _check(_pruned(1536, 576, 0.5, seed=7), 1)
    _check(_two_four(576, 1536, seed=8), 8)
    _check(_pruned(576, 1536, 0.5, seed=9), 1, values="int8")
    _check(_two_four(576, 1536, seed=10), 1, values="int4")


def test_linear_dispatch():
    """SparseWeight.linear uses the kernel for few rows and reconstruction for many; both agree
    with the dense product; gradients still flow through the reconstruction."""
    w = _pruned(64, 48, 0.5, seed=9)
    sw = SparseWeight(w)
    with torch.no_grad():
        few = torch.randn(4, 48)
        many = torch.randn(sk.MAX_ROWS + 1, 48)
        assert sw._kernel_ok(few) and not sw._kernel_ok(many)
        torch.testing.assert_close(sw.linear(few), F.linear(few, w), rtol=0, atol=1e-5)
        assert torch.equal(sw.linear(many), F.linear(many, w))  # reconstructed: bit-exact
    x = torch.randn(2, 48, requires_grad=True)
    assert not sw._kernel_ok(x)
    sw.linear(x).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 48))
    q8 = SparseWeight(w, "bitmask", "int8")
    assert q8._kernel_ok(few)  # int8 values: the kernel too, against their dequantized values
    torch.testing.assert_close(q8.linear(few), F.linear(few, q8.dequantize()), rtol=0, atol=1e-5)
    q4 = SparseWeight(w, "bitmask", "int4")
    assert q4._kernel_ok(few)  # int4 values too
    torch.testing.assert_close(q4.linear(few), F.linear(few, q4.dequantize()), rtol=0, atol=1e-5)
    assert not SparseWeight(w.double())._kernel_ok(few.double())


def test_kernel_on_a_pruned_model():
    """A real pruned layer of a tiny Llama (memopt.prune), kernel vs the dense masked weight."""
    from memopt.models.toy import tiny_llama
    from memopt.prune import SparseGPT, prune_

    loaded = tiny_llama()
    prune_(loaded.model, SparseGPT(0.5), calib=torch.randint(0, 512, (4, 32)))
    layers = [
        m for m in loaded.model.modules() if isinstance(getattr(m, "qweight", None), SparseWeight)
    ]
    assert layers
    for lin in layers[:4]:
        w = lin.qweight.dequantize()
        _check(w, 1)
        _check(w, 8)
