"""The int8 x float32 kernel for a few input rows (memopt.weights.int8_gemv) against float64.

Tolerance: float32 sums in another order than a float matmul's, so the kernel is compared with the
float64 product of the same int8 codes and scales: SQNR >= 120 dB (float32 rounding of a dot
product of <= 7200 terms is about 140 dB; one wrong code, a misplaced row or a tail read past the
row is below 60 dB). Shapes cover K below, at and past the 16- and 64-wide steps (the masked tail),
N of 1 and 10, M of 1 to MAX_ROWS, with and without bias.
"""

from __future__ import annotations

import pytest
import torch

from memopt.weights import Int8Weight
from memopt.weights import int8_gemv as g
from memopt.weights.primitives import sqnr

pytestmark = pytest.mark.skipif(not g.available(), reason="no C compiler with OpenMP here")


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 10, 7200), (1, 32, 27), (1, 1, 5), (3, 16, 64), (2, 7, 79), (g.MAX_ROWS, 33, 100)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemv_matches_float64(m: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(n * k + m)
    qw = Int8Weight(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    y = g.int8_gemv(qw.qdata, qw.scale[:, 0], x, b)
    w64 = qw.qdata.double() * qw.scale.double()
    ref = x.double() @ w64.t() + (0 if b is None else b.double())
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert sqnr(ref, y.double()) >= 120.0


def test_int8_gemv_reads_only_its_rows() -> None:
    """A view of rows 2..5 of a larger code matrix: the kernel reads those rows, nothing else."""
    gen = torch.Generator().manual_seed(1)
    qw = Int8Weight(torch.randn(8, 40, generator=gen))
    q, s = qw.qdata[2:6], qw.scale[2:6, 0]
    x = torch.randn(1, 40, generator=gen)
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    assert sqnr(ref, g.int8_gemv(q, s, x).double()) >= 120.0


def test_int8_gemv_strided_inputs() -> None:
    """Strided scale and input views are read by value, not by their storage's layout."""
    gen = torch.Generator().manual_seed(2)
    qw = Int8Weight(torch.randn(6, 48, generator=gen))
    scale = torch.stack([qw.scale[:, 0], torch.zeros(6)], 1)[:, 0]  # stride 2
    x = torch.randn(48, 2, generator=gen).t()  # (2, 48), not contiguous
    ref = x.double() @ (qw.qdata.double() * qw.scale.double()).t()
    assert sqnr(ref, g.int8_gemv(qw.qdata, scale, x).double()) >= 120.0


def test_kernels_off_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MEMOPT_KERNELS=0``: the library is not used (``available`` is False) and memopt's Keras
    Dense takes torch's int8 kernel instead, to the same outputs within int8's rounding."""
    from memopt.keras.layers import _linear

    gen = torch.Generator().manual_seed(3)
    qw = Int8Weight(torch.randn(10, 200, generator=gen))
    x = torch.randn(1, 200, generator=gen)
    ref = x.double() @ (qw.qdata.double() * qw.scale.double()).t()
    fast = _linear(qw, x)
    monkeypatch.setenv("MEMOPT_KERNELS", "0")
    assert not g.available()
    slow = _linear(qw, x)  # torch's kernels (bfloat16 activations at batch 1)
    assert sqnr(ref, fast.double()) >= 120.0
    assert sqnr(ref, slow.double()) >= 35.0
