"""The trio and the packers: SQNR per format, exact round trips, exact byte counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memopt.weights import Int4Weight, Int8Weight, IntNWeight
from memopt.weights.kernels import int4_block_n
from memopt.weights.primitives import (
    choose_qparams,
    dequantize,
    pack,
    pack_int4_nblock,
    quantize,
    sqnr,
    unpack,
    unpack_int4_nblock,
)

# Measured on randn(512, 1024), seed 0 (dB): int8 per channel 42.1, g128 43.8; int4 asym g32 22.1,
# g64 21.0, g128 20.0; int4 sym g32 20.7, g64 19.8, g128 19.1; int3 asym g32 15.5, sym g128 11.9;
# int2 asym g32 8.1, asym g128 6.0, sym g32 4.6. Bounds are those minus about 1 dB.
SQNR_CASES = [
    ("int8", lambda w: Int8Weight(w), 41.0),
    ("int8-g128", lambda w: Int8Weight(w, 128), 42.5),
    ("int4-g32", lambda w: Int4Weight(w, 32), 21.0),
    ("int4-g64", lambda w: Int4Weight(w, 64), 20.0),
    ("int4-g128", lambda w: Int4Weight(w, 128), 19.0),
    ("int4-g32-sym", lambda w: Int4Weight(w, 32, True), 19.5),
    ("int4-g128-sym", lambda w: Int4Weight(w, 128, True), 18.0),
    ("int3-g32", lambda w: IntNWeight(w, 3, 32, False), 14.5),
    ("int3-g128-sym", lambda w: IntNWeight(w, 3, 128, True), 11.0),
    ("int2-g32", lambda w: IntNWeight(w, 2, 32, False), 7.0),
    ("int2-g128", lambda w: IntNWeight(w, 2, 128, False), 5.0),
    ("int2-g32-sym", lambda w: IntNWeight(w, 2, 32, True), 3.5),
]


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,make,bound", SQNR_CASES, ids=[c[0] for c in SQNR_CASES])
def test_sqnr_above_bound(weight, name, make, bound):
    q = make(weight)
    assert sqnr(weight, q.dequantize()) > bound


@pytest.mark.parametrize(
    "bits,symmetric", [(8, True), (4, False), (4, True), (3, False), (2, True)]
)
def test_trio_codes_in_range_and_dequantize_is_affine(bits, symmetric):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    scale, offset = choose_qparams(w, bits, 32, symmetric)
    codes = quantize(w, scale, offset, bits, 32)
    if bits == 8:
        assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    else:
        assert codes.dtype == torch.uint8 and codes.max() <= 2**bits - 1
    # error per element is at most half a step (+ float rounding)
    err = (dequantize(codes, scale, offset, bits, 32) - w).abs().reshape(64, 4, 32)
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    n=st.integers(1, 9),
    k8=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_round_trip_exact(bits, n, k8, seed):
    k = 8 * k8
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k * bits // 8)
    assert torch.equal(unpack(packed, bits, k), codes)


@settings(max_examples=20, deadline=None)
@given(block=st.sampled_from([16, 32, 64]), nb=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_int4_nblock_round_trip_exact(block, nb, seed):
    codes = torch.randint(0, 16, (block * nb, 64), generator=torch.Generator().manual_seed(seed))
    packed = pack_int4_nblock(codes, block)
    assert packed.shape == (block * nb, 32)
    assert torch.equal(unpack_int4_nblock(packed, block, 64), codes.to(torch.uint8))


@pytest.mark.parametrize("n", [128, 1536])
def test_our_int4_layout_is_the_cpu_kernels(n):
    block = int4_block_n(n)
    if block is None:
        pytest.skip("no known CPU int4 kernel layout on this build")
    codes = torch.randint(0, 16, (n, 256), dtype=torch.int32)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(pack_int4_nblock(codes, block), ref)


def test_int4_canonical_form_is_the_plain_packing():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    q = Int4Weight(w, 64)
    packed, scale, zero = q.canonical()
    codes = quantize(w, scale, zero, 4, 64)
    assert torch.equal(unpack(packed, 4, 256), codes)
    assert torch.equal(dequantize(codes, scale, zero, 4, 64), q.dequantize())


def test_byte_counts_exact_4096_int4_g128():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(3))
    q = Int4Weight(w, 128)
    assert q.packed.nbytes == 8_388_608  # 4096 * 4096 / 2
    assert q.scale_zero.nbytes == 524_288  # 4096 * (4096 / 128) * 2 (scale, zero) * 2 bytes
    assert q.nbytes == 8_912_896


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda w: Int8Weight(w), 1024 * 2048 + 1024 * 4),
        (lambda w: Int8Weight(w, 128), 1024 * 2048 + 1024 * 16 * 4),
        (lambda w: Int4Weight(w, 32, True), 1024 * 1024 + 64 * 1024 * 2 * 2),
        (lambda w: IntNWeight(w, 3, 64, False), 1024 * 768 + 2 * 1024 * 32 * 2),
        (lambda w: IntNWeight(w, 2, 32, False), 1024 * 512 + 2 * 1024 * 64 * 2),
        (lambda w: IntNWeight(w, 2, 32, True), 1024 * 512 + 1024 * 64 * 2),
    ],
    ids=["int8", "int8-g128", "int4-g32-sym", "int3-g64", "int2-g32", "int2-g32-sym"],
)
def test_byte_counts_exact(make, expected):
    q = make(torch.randn(1024, 2048))
    assert q.nbytes == expected
    assert sum(b.nbytes for b in q.buffers()) == expected


def test_int4_zero_makes_q4_1_m_a_float16() -> None:
    # GGUF's Q4_1 stores m = zero - 8 * scale as a float16: memopt's int4 zeros are chosen so it
    # holds it (and bfloat16 the zero), moving no zero by more than 1 % of its scale
    torch.manual_seed(0)
    for spread in (1e-3, 0.02, 1.0, 50.0):
        w = torch.randn(512, 256) * spread + torch.randn(512, 1) * spread * 3  # (N, K)
        s, z = choose_qparams(w, 4, 32, symmetric=False, scale_dtype=torch.bfloat16)
        s, z = s.float(), z.float()
        m = z - 8 * s
        assert torch.equal(m.to(torch.float16).float(), m)
        assert torch.equal(s.to(torch.float16).float(), s)
        lo = w.reshape(512, 8, 32).amin(-1)
        plain = (lo + 8 * s).to(torch.bfloat16).float()  # the zero before the move
        assert ((z - plain).abs() / s).max() < 0.01
