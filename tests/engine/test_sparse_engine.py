"""memopt.engine on pruned weights (bitmask + float32 or int8 values, read as stored): the engine's
logits equal its logits over the same weights stored dense, its builds without AVX-512 agree, and
``memopt run`` of a pruned folder takes the engine.

Tolerances: the sparse products sum in another order than the dense ones (16 lanes of the
columns kept, against 32 of all columns), so logits agree to float32 rounding, within 2e-5 of their
scale (a misplaced value or a wrong scale moves them by 1e-2 or more), and the greedy tokens are
the same. The engine's dequantized rows are the weight kind's own values bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from memopt.core.modules import set_module
from memopt.engine import engine_for, llama
from memopt.models.toy import tiny_llama
from memopt.prune import NM, Magnitude, prune_
from memopt.weights import QLinear
from memopt.weights.primitives import sqnr
from memopt.weights.sparse import SparseWeight

pytestmark = pytest.mark.skipif(llama.library() is None, reason="no C compiler with OpenMP here")

IDS = [5, 77, 301, 12, 9, 411, 250, 3, 64, 128, 7, 499]
# K not a multiple of 16 (72, 100: each row's mask starts off a 16-bit boundary), head_dim 18
ODD = {"hidden_size": 72, "intermediate_size": 100, "num_attention_heads": 4,
       "num_key_value_heads": 2}  # fmt: skip
CASES = {
    "50%": (Magnitude(0.5), "float", {}),
    "50%-odd-k": (Magnitude(0.5), "float", ODD),
    "2:4": (NM(2, 4, score="magnitude"), "float", {}),
    "50%-int8": (Magnitude(0.5), "int8", {}),
    "50%-int8-odd-k": (Magnitude(0.5), "int8", ODD),
    "2:4-int4": (NM(2, 4, score="magnitude"), "int4", {}),
    "50%-int4-odd-k": (Magnitude(0.5), "int4", ODD),
}


def _pruned(case: str):
    config, values, shape = CASES[case]
    loaded = tiny_llama(seed=3, **shape)
    prune_(loaded.model, config, values=values)
    return loaded


def _densified(model: nn.Module) -> nn.Module:
    """A copy with every sparse weight stored dense: its dequantized float32 values."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, QLinear) and isinstance(m.qweight, SparseWeight):
            lin = nn.Linear(m.qweight.shape[1], m.qweight.shape[0], bias=m.bias is not None)
            lin.weight.data = m.qweight.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.detach().clone()
            set_module(dense, name, lin)
    return dense


def _logits(eng) -> torch.Tensor:
    return torch.stack([eng.forward(t, p, threads=1).clone() for p, t in enumerate(IDS)])  # (T, V)


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_engine_is_the_dense_engine_on_the_same_weights(case: str) -> None:
    loaded = _pruned(case)
    sparse = [
        m.qweight
        for name, m in loaded.model.named_modules()
        if isinstance(m, QLinear) and name != "lm_head"
    ]
    values = CASES[case][1]
    assert len(sparse) == 7 * 4 and all(
        isinstance(w, SparseWeight) and w.values_fmt == values for w in sparse
    ), "prune_ did not store every projection sparse"
    eng = engine_for(loaded.model, loaded.config, 32)
    assert eng is not None, f"the engine declined {case}"
    held = {t.data_ptr() for t in eng.keep}
    assert sparse[0].mask.data_ptr() in held and sparse[0].values.data_ptr() in held  # as stored
    dense = _densified(loaded.model)
    ref_eng = engine_for(dense, loaded.config, 32)
    got, ref = _logits(eng), _logits(ref_eng)
    with torch.no_grad():  # and transformers' forward of the dense copy: the same function
        tf = dense(input_ids=torch.tensor([IDS])).logits[0]
    if values != "float" and _int8_activations(loaded.config.hidden_size):
        # int8 codes (the sparse int8 values; the tied head, int8 with int8 or int4 values) on
        # int8 activations (VNNI, as the engine's dense int8): the activations' rounding is the
        # error, stated as SQNR (the dense int8 engine's bound)
        assert sqnr(ref, got) > 30.0 and sqnr(tf, got) > 30.0, case
        return
    assert (got - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item()), case
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert (got - tf).abs().max().item() < 2e-5 * max(1.0, tf.abs().max().item()), case


def _int8_activations(k: int) -> bool:
    """The engine multiplies sparse int8 values with int8 activations on this CPU for this K."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(cpu.split())
    return k % 32 == 0 and {"avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi2", "bmi2"} <= flags


def _quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the engine rounds it for int8 products (llama.cpp's Q8_0 form): per block of
    32, codes round(x * 127 / max|x|) (half to even, as lrintf), scale max|x| / 127 stored as a
    float16 value, back to float."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    d = (amax / 127.0).half().float()
    return (torch.round(xb * inv) * d).reshape(x.shape)


def _qmat(w: SparseWeight, keep: list) -> llama._QMat:
    return llama._qmat(w, None, keep)


def _pruned_weight(n: int, k: int, values: str, seed: int, two_four: bool = False) -> SparseWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of other scales
    if two_four:  # 2 of every 4 columns zeroed: 8 values in every run of 16
        drop = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
        w = w.view(n, k // 4, 4).scatter_(-1, drop, 0.0).view(n, k)
    else:
        w[torch.rand(n, k, generator=g) < 0.5] = 0.0
    return SparseWeight(w, "bitmask", values)


@pytest.mark.parametrize("values", ["float", "int8", "int4"])
def test_engine_rows_are_the_weights_values(values: str) -> None:
    """memopt_dequant_rows (the engine's own view of each row) is SparseWeight.dequantize, bit for
    bit: int8 values times their group's scale, int4 (code - 8) x scale + zero, groups running
    across rows."""
    lib = llama.library()
    sw = _pruned_weight(40, 77, values, 1)
    keep: list = []
    qm = _qmat(sw, keep)
    out = torch.empty(40, 77)
    lib.memopt_dequant_rows(ctypes.byref(qm), 0, 40, out.data_ptr())
    assert torch.equal(out, sw.dequantize(torch.float32))


def _variant(flags: list[str]):
    from memopt.core.cbuild import compile_library
    from memopt.engine.source import SOURCE

    lib = compile_library("engine-test", SOURCE, ["-O2", "-fPIC", "-shared", "-fopenmp", *flags],
                          ["-lm"])  # fmt: skip
    if lib is None:
        pytest.skip("no C compiler here")
    lib.memopt_linear.argtypes = [ctypes.POINTER(llama._QMat), ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32]  # fmt: skip
    lib.memopt_dequant_rows.argtypes = [ctypes.POINTER(llama._QMat), ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    lib.memopt_xs_floats.argtypes = [ctypes.c_int64]
    lib.memopt_xs_floats.restype = ctypes.c_int64
    return lib


def _linear(lib, qm: llama._QMat, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    y = torch.empty(x.shape[0], qm.n)
    xs = torch.empty(int(lib.memopt_xs_floats(qm.k)))
    lib.memopt_linear(ctypes.byref(qm), x.data_ptr(), y.data_ptr(), x.shape[0], xs.data_ptr(),
                      threads)  # fmt: skip
    return y


@pytest.mark.parametrize("flags", [["-mavx2", "-mfma", "-mf16c"], []], ids=["avx2", "plain"])
def test_builds_without_avx512_agree(flags: list[str]) -> None:
    """The engine built without AVX-512 (its sparse rows walk the mask bit by bit) and the native
    build give the exact product (float64) of the stored weight within float32 rounding (relative
    error <= 1e-6 of the output's norm: only the order of the sums differs; the native build's
    int8 values on int8 activations, where the CPU has VNNI: of the activations it rounded) and
    the same dequantized rows bit for bit; for float32 and int8 values, K a multiple of 32 and
    not a multiple of 16, 2:4 (the native build's runs-of-8 form), 1, 3 and 8 input rows (the
    multi-row path)."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if flags and not all(f in cpu.split() for f in ("avx2", "fma", "f16c")):
        pytest.skip("this CPU cannot run an AVX2 build")
    lib, native = _variant(flags), llama.library()
    for i, (n, k, two_four) in enumerate([(96, 64, False), (33, 77, False), (64, 200, False),
                                          (40, 112, True)]):  # fmt: skip
        for values in ("float", "int8", "int4"):
            sw = _pruned_weight(n, k, values, 10 + i, two_four)
            assert sw.runs_of_8() == two_four
            keep: list = []
            qm = _qmat(sw, keep)
            for m in (1, 3, 8):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                got, ref = _linear(lib, qm, x), _linear(native, qm, x, threads=2)
                wd = sw.dequantize(torch.float64)
                exact = x.double() @ wd.T
                assert ((got - exact).norm() / exact.norm()).item() < 1e-6, (n, k, values, m)
                if values == "int8" and _int8_activations(k):
                    exact = _quantized_activations(x).double() @ wd.T
                assert ((ref - exact).norm() / exact.norm()).item() < 1e-6, (n, k, values, m)
            out = torch.empty(n, k)
            lib.memopt_dequant_rows(ctypes.byref(qm), 0, n, out.data_ptr())
            assert torch.equal(out, sw.dequantize(torch.float32)), (n, k, values)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_int8_values_on_int8_activations(density: float) -> None:
    """The native build's sparse int8 product (int8 activations where the CPU has VNNI + VBMI2)
    is the exact product of the stored weight with the activations it rounded, within float32
    rounding (relative 1e-6), at every density (empty runs, whole runs, no values at all) and for
    K = 96 and 160 (a last run of 32 columns)."""
    if not _int8_activations(96):
        pytest.skip("no int8-activation path on this CPU")
    native = llama.library()
    for n, k in ((48, 96), (40, 160)):
        g = torch.Generator().manual_seed(n)
        w = torch.randn(n, k, generator=g)
        w[torch.rand(n, k, generator=g) >= density] = 0.0
        sw = SparseWeight(w, "bitmask", "int8")
        keep: list = []
        qm = _qmat(sw, keep)
        x = torch.randn(1, k, generator=g)
        got = _linear(native, qm, x)
        exact = _quantized_activations(x).double() @ sw.dequantize(torch.float64).T
        if density == 0.0:
            assert torch.equal(got, torch.zeros_like(got))
            continue
        assert ((got - exact).norm() / exact.norm()).item() < 1e-6, (n, k, density)


def test_a_mask_that_disagrees_with_its_values_is_refused() -> None:
    """A mask setting more elements than there are values (a corrupt file) would send the kernels
    past the end of the values: refused with memopt's error, before any product."""
    from memopt.core.errors import MemoptError

    loaded = _pruned("50%")
    sw = loaded.model.model.layers[1].mlp.up_proj.qweight
    sw.mask.fill_(255)
    with pytest.raises(MemoptError, match="corrupt sparse weight"):
        engine_for(loaded.model, loaded.config, 32)
    with pytest.raises(MemoptError, match="corrupt sparse weight"):
        sw.linear(torch.randn(1, sw.shape[1]))


def test_what_the_engine_cannot_read_falls_back() -> None:
    """The CSR layout is not the engine's: engine_for declines (generate keeps transformers')."""
    loaded = tiny_llama(seed=3)
    prune_(loaded.model, Magnitude(0.97))  # 3 % kept: CSR is the smaller layout
    assert any(isinstance(m, QLinear) and m.qweight.layout == "csr" for m in loaded.model.modules())
    assert engine_for(loaded.model, loaded.config, 32) is None


@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from memopt.models.saved import save
    from memopt.models.toy import tiny_tokenizer

    tok, out = tiny_tokenizer(), {}
    for case in ("50%", "2:4", "50%-int8", "2:4-int4"):
        folder = tmp_path_factory.mktemp("pruned") / case.replace("%", "")
        save(_pruned(case), folder)
        tok.save_pretrained(str(folder))
        out[case] = folder
    return out


def test_memopt_run_of_a_pruned_folder_takes_the_engine(pruned_folders: dict[str, Path]) -> None:
    """``memopt run DIR --json`` on a pruned folder (50 %, 2:4, 50 % + int8 values, 2:4 + int4)
    reports engine memopt, and its tokens are those of the full load through transformers'
    forward."""
    from memopt.app.cli import main
    from memopt.generate import generate
    from memopt.models import load_model

    for case, folder in pruned_folders.items():
        full = load_model(folder)
        slow = generate(full, "The execution model", 8, stop_at_eos=False, engine=False)
        assert slow["engine"] == "transformers"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["run", str(folder), "--prompt", "The execution model",
                       "--max-new-tokens", "8", "--json"])  # fmt: skip
        assert rc == 0
        result = json.loads(buf.getvalue())
        assert result["engine"] == "memopt", case
        n = len(result["tokens"])  # fewer than 8 where an end token came
        assert n >= 1 and result["tokens"] == slow["tokens"][:n], case
