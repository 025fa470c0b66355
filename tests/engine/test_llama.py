"""memopt.engine: the C decode engine gives transformers' logits for every weight kind it runs,
the same greedy tokens through generate(), and declines what it cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

from memopt.core.modules import set_module
from memopt.engine import engine_for, llama
from memopt.generate import generate
from memopt.models.toy import tiny_llama
from memopt.quant import Int4WeightOnly, Int8WeightOnly, IntNWeightOnly, quantize_
from memopt.weights import GGMLWeight, Int4Weight, Int8Weight, QEmbedding, QLinear, kernels

IDS = [5, 77, 301, 12, 9, 411, 250, 3, 64, 128, 7, 499]


# gguf.quants cannot quantize to the K-quants: their blocks are random bytes (every code and
# scale pattern), with the float16 super-block scales (byte offsets) set so values stay ~0.05
_K_SCALES = {"Q2_K": ((80, 82), 0.05 / 45), "Q3_K": ((108,), 0.05 / 128),
             "Q4_K": ((0, 2), 0.05 / 945), "Q5_K": ((0, 2), 0.05 / 1953),
             "Q6_K": ((208,), 0.05 / 4064)}  # fmt: skip


def _blocks(w: np.ndarray, ggml_type: str, seed: int = 0) -> torch.Tensor:
    """(N, K) float32 as GGML blocks of ``ggml_type``: (N, row bytes) uint8."""
    if ggml_type not in _K_SCALES:
        return torch.from_numpy(quants.quantize(w, GGMLQuantizationType[ggml_type]))
    values, nbytes = quants.GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    n, k = w.shape
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // values, nbytes), dtype=np.uint8)
    offsets, top = _K_SCALES[ggml_type]
    for off in offsets:
        d = rng.uniform(0.2, 1.0, raw.shape[:2]) * top
        raw[..., off : off + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def _ggml_(model: nn.Module, ggml_type: str) -> None:
    """Every Linear and the embedding as GGML blocks of ``ggml_type`` (a tied head shares them)."""
    shared: dict[int, GGMLWeight] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            key = id(m.weight)  # the Parameter: one object for a tied embedding and head
            if key not in shared:
                w = m.weight.detach().numpy().astype(np.float32)
                blocks = _blocks(w, ggml_type, seed=len(shared))
                shared[key] = GGMLWeight(blocks, ggml_type, tuple(w.shape))
            qw = shared[key]
            new = QEmbedding(qw) if isinstance(m, nn.Embedding) else QLinear(qw, m.bias)
            set_module(model, name, new)


# the GGUF block types the engine reads directly; the K-quants need rows of whole 256-value blocks
GGML_KINDS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# the kinds the engine multiplies with int8 activations (VNNI), where the CPU has it
INT8_ACTIVATIONS = {"int8", "int8-g32", "int4", "Q5_0"}
K_WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
          "num_key_value_heads": 2}  # fmt: skip


def _make(kind: str):
    if kind == "qwen2":  # q/k/v biases, untied head
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from memopt.models import LoadedModel

        cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, tie_word_embeddings=False,
                          architectures=["Qwen2ForCausalLM"])  # fmt: skip
        torch.manual_seed(0)
        return LoadedModel(Qwen2ForCausalLM(cfg).eval(), "causal-lm", "tiny-qwen2", cfg)
    loaded = tiny_llama(seed=1, **(K_WIDE if kind.endswith("_K") else {}))
    configs = {
        "int8": Int8WeightOnly(),
        "int8-g32": Int8WeightOnly(group_size=32),
        "int4": Int4WeightOnly(group_size=32),
    }
    if kind in configs:
        quantize_(loaded.model, configs[kind])
    elif kind in GGML_KINDS:
        _ggml_(loaded.model, kind)
    return loaded


@pytest.mark.parametrize("kind", ["float32", "qwen2", "int8", "int8-g32", "int4", *GGML_KINDS])
def test_engine_logits_are_transformers(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _make(kind)
    if kind == "int4":  # the float32 path of the int4 kernels, the exact reference
        monkeypatch.setenv("MEMOPT_KERNEL", "int4_dequant_fp32")
    with torch.no_grad(), kernels.default_kernels():
        ref = loaded.model(input_ids=torch.tensor([IDS])).logits[0].float()  # (T, V)
    eng = engine_for(loaded.model, loaded.config, 32)
    assert eng is not None, f"the engine declined {kind}"
    got = torch.stack([eng.forward(t, p).clone() for p, t in enumerate(IDS)])  # (T, V)
    if kind in INT8_ACTIVATIONS:
        # these run on int8 activations (a block of 32 per scale, as llama.cpp's Q8_0 / Q4 dot
        # products do): an error of the activations' rounding, measured as SQNR
        sqnr = 20 * torch.log10(ref.norm() / (got - ref).norm()).item()
        assert sqnr > 30.0, f"{kind}: SQNR {sqnr:.1f} dB"
        return
    # float32 activations: only the order of float32 sums differs
    assert (got - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item()), kind
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kind", GGML_KINDS)
def test_engine_values_are_gguf_dequantize_bit_for_bit(kind: str) -> None:
    """The engine's own dequantized rows (its embedding lookup) equal gguf.quants.dequantize."""
    import ctypes

    from memopt.engine import llama

    lib = llama.library()
    if lib is None:
        pytest.skip("no C compiler here")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 512)) * rng.uniform(0.01, 2.0, (24, 1))).astype(np.float32)
    blocks = _blocks(w, kind)
    keep: list[torch.Tensor] = []
    qmat = llama._qmat(GGMLWeight(blocks, kind, (24, 512)), None, keep)
    out = torch.empty(24, 512)
    lib.memopt_dequant_rows(ctypes.byref(qmat), 0, 24, out.data_ptr())
    ref = quants.dequantize(blocks.numpy(), GGMLQuantizationType[kind]).reshape(24, 512)
    assert np.array_equal(out.numpy(), ref), kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_reads_16_bit_weights_as_stored(dtype: torch.dtype) -> None:
    """A 16-bit checkpoint runs in the engine without a float32 copy of its matrices: its logits
    are float32 transformers' on the same (16-bit) values, activations in float32."""
    import copy

    loaded = tiny_llama(seed=1)
    half = copy.deepcopy(loaded.model).to(dtype)
    ref_model = half.float()  # the same values, widened
    half = copy.deepcopy(loaded.model).to(dtype)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([IDS])).logits[0].float()  # (T, V)
    eng = engine_for(half, loaded.config, 32)
    assert eng is not None, f"the engine declined {dtype}"
    held = {t.data_ptr() for t in eng.keep}
    assert half.model.layers[0].mlp.up_proj.weight.data_ptr() in held  # read in place
    got = torch.stack([eng.forward(t, p).clone() for p, t in enumerate(IDS)])  # (T, V)
    assert (got - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"])
def test_ggml_linear_at_decode_reads_the_blocks(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF weight's linear for a few rows (a streamed model's decode) runs the engine's
    matrix-vector products over its blocks, not a dequantized copy: the values of the blocked
    dequantize + matmul path within float32 rounding."""
    import memopt.engine.llama  # noqa: F401  (registers the kernel)

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((96, 512)) * 0.05).astype(np.float32)
    qw = GGMLWeight(_blocks(w, kind), kind, (96, 512))
    x = torch.randn(3, 512)
    calls = []
    monkeypatch.setattr(kernels, "ggml_linear", lambda *a: calls.append(a) or None)
    with torch.no_grad():
        got = qw.linear(x)  # (3, 96)
    assert not calls, "the dequantizing path ran"
    ref = x @ qw.dequantize(torch.float32).t()
    if kind in INT8_ACTIVATIONS:
        sqnr = 20 * torch.log10(ref.norm() / (got - ref).norm()).item()
        assert sqnr > 35.0, f"{kind}: SQNR {sqnr:.1f} dB"
    else:
        assert (got - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("flags", [["-mavx2", "-mfma", "-mf16c"], []], ids=["avx2", "plain"])
def test_builds_without_avx512_give_the_same_values(flags: list[str]) -> None:
    """The engine built for a CPU without AVX-512 (AVX2 + F16C, or plain C): every GGUF block kind
    decodes bit for bit as gguf.quants does and its matrix-vector product is the float one (the
    scalar paths of the kinds this CPU runs vectorised)."""
    import ctypes

    from memopt.core.cbuild import compile_library
    from memopt.engine import llama
    from memopt.engine.source import SOURCE

    info = Path("/proc/cpuinfo")
    cpu = info.read_text() if info.is_file() else ""
    if flags and not all(f in cpu.split() for f in ("avx2", "fma", "f16c")):
        pytest.skip("this CPU cannot run an AVX2 build")
    lib = compile_library("engine-test", SOURCE, ["-O2", "-fPIC", "-shared", "-fopenmp", *flags],
                          ["-lm"])  # fmt: skip
    if lib is None:
        pytest.skip("no C compiler here")
    lib.memopt_dequant_rows.argtypes = [ctypes.POINTER(llama._QMat), ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    lib.memopt_linear.argtypes = [ctypes.POINTER(llama._QMat), ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32]  # fmt: skip
    lib.memopt_xs_floats.argtypes = [ctypes.c_int64]
    lib.memopt_xs_floats.restype = ctypes.c_int64
    rng = np.random.default_rng(0)
    x = torch.randn(2, 512)
    for kind in GGML_KINDS:
        w = (rng.standard_normal((24, 512)) * 0.05).astype(np.float32)
        blocks, keep = _blocks(w, kind), []
        qm = llama._qmat(GGMLWeight(blocks, kind, (24, 512)), None, keep)
        out = torch.empty(24, 512)
        lib.memopt_dequant_rows(ctypes.byref(qm), 0, 24, out.data_ptr())
        ref = quants.dequantize(blocks.numpy(), GGMLQuantizationType[kind]).reshape(24, 512)
        assert np.array_equal(out.numpy(), ref), kind
        y, xs = torch.empty(2, 24), torch.empty(int(lib.memopt_xs_floats(512)))
        lib.memopt_linear(ctypes.byref(qm), x.data_ptr(), y.data_ptr(), 2, xs.data_ptr(), 1)
        yr = x @ torch.from_numpy(ref).t()
        assert ((y - yr).norm() / yr.norm()).item() < 1e-5, kind


def test_generate_uses_the_engine_and_gives_transformers_tokens() -> None:
    loaded = _make("Q4_1")
    fast = generate(loaded, IDS, 16, stop_at_eos=False)
    slow = generate(loaded, IDS, 16, stop_at_eos=False, engine=False)
    assert fast["engine"] == "memopt" and slow["engine"] == "transformers"
    assert fast["tokens"] == slow["tokens"]


def test_what_the_engine_cannot_run_falls_back() -> None:
    loaded = tiny_llama(seed=1)
    quantize_(loaded.model, IntNWeightOnly(bits=3, group_size=32))  # int3: no engine kernel
    assert engine_for(loaded.model, loaded.config, 32) is None
    out = generate(loaded, IDS, 4, stop_at_eos=False)
    assert out["engine"] == "transformers"
    with pytest.raises(Exception, match="cannot run this model"):
        generate(loaded, IDS, 4, engine=True)
    meta = tiny_llama(seed=1)
    meta.model.to("meta")  # weights not in memory (a streamed model's blocks)
    assert engine_for(meta.model, meta.config, 32) is None


def test_positions_beyond_the_cache_are_refused() -> None:
    loaded = _make("float32")
    eng = engine_for(loaded.model, loaded.config, 4)
    with pytest.raises(Exception, match="out of range"):
        eng.forward(1, 4)


def _vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(flags)


def _q8_1_form(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's Q8_0 / Q8_1 rounding of activations ``x (M, K)`` per block of 32: codes
    ``(M, K/32, 32)`` = round(x * 127 / amax), scale float16(amax / 127), and Q8_1's sum term
    float16(amax / 127 * sum of codes), each ``(M, K/32)``, as float64."""
    xb = x.reshape(x.shape[0], -1, 32)  # (M, K/32, 32) float32
    amax = xb.abs().amax(-1)  # (M, K/32)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None])  # float32 products, rounded half to even
    d = amax / 127.0
    s = (d * q.sum(-1)).half().double()
    return q.double(), d.half().double(), s


@pytest.mark.skipif(not _vnni(), reason="int8 activations need AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["int8-g32", "int8", "int8-g128", "int4-g32"])
def test_int8_activations_are_llama_cpps(kind: str) -> None:
    """On int8 activations the engine multiplies exactly llama.cpp's rounded activations (Q8_0's
    codes and float16 scale; for int4, Q8_1's float16 sum term with Q4_1's m = zero - 8 * scale),
    so a model and its GGUF export multiply the same numbers: float64 reference, float32 sums."""
    torch.manual_seed(0)
    n, k = 128, 256
    w, x = torch.randn(n, k) * 0.05, torch.randn(3, k) * 2.0
    q, dx, xs = _q8_1_form(x)  # (M, K/32, 32), (M, K/32), (M, K/32)
    if kind.startswith("int8"):  # per channel, groups of 32 and of 128
        group = {"int8-g32": 32, "int8": None, "int8-g128": 128}[kind]
        qw = Int8Weight(w, group)
        codes = qw.qdata.double().reshape(n, -1, 32)  # (N, K/32, 32)
        scale = qw.scale.double().reshape(n, -1).repeat_interleave((group or k) // 32, 1)
        ref = torch.einsum("nbj,mbj,mb,nb->mn", codes, q, dx, scale)  # scale (N, K/32)
    else:
        qw = Int4Weight(w, 32, symmetric=False)
        assert qw.block_n == 64  # the interleaved layout that runs on int8 activations
        codes = qw.codes_rows(0, n).double().reshape(n, -1, 32)  # (N, K/32, 32) 0..15
        s, z = (qw.scale_zero[..., i].t().double() for i in (0, 1))  # (N, K/32)
        ref = torch.einsum("nbj,mbj,mb,nb->mn", codes, q, dx, s)
        ref += torch.einsum("mb,nb->mn", xs, z - 8 * s)
    got = llama.linear(qw, x)  # (M, N)
    assert got is not None
    err = (got.double() - ref).abs().max().item()
    assert err < 1e-5 * ref.abs().max().item(), err


def test_int8_kv_cache_is_the_transformers_int8_cache() -> None:
    """``kv_int8``: the engine's KV cache as int8 codes with a float32 scale a position and head,
    rounded as memopt.weights.kvcache rounds them: the logits of transformers with that cache
    within float32 rounding, a quarter of the float cache's bytes plus the scales."""
    from memopt.generate import _cache_arg, _cache_of
    from memopt.measure.generation import kv_cache_bytes
    from memopt.weights.kvcache import use_int8_kv_cache

    loaded = tiny_llama(seed=1)
    eng = engine_for(loaded.model, loaded.config, 32, kv_int8=True)
    assert eng is not None
    assert eng.cache_bytes == kv_cache_bytes(loaded.config, 32, 1, 1)
    got = torch.stack([eng.forward(t, p).clone() for p, t in enumerate(IDS)])  # (T, V)
    use_int8_kv_cache(loaded.model, loaded.config)
    ref, cache, arg = [], None, _cache_arg(loaded.model)
    with torch.no_grad():
        for t in IDS:  # one position at a time, as the engine: each reads the cache's codes
            past = {} if cache is None else {arg: cache}
            out = loaded.model(input_ids=torch.tensor([[t]]), use_cache=True, **past)
            cache = _cache_of(out)
            ref.append(out.logits[0, -1].float())
    ref = torch.stack(ref)  # (T, V)
    assert (got - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item())
    full = engine_for(loaded.model, loaded.config, 32)
    assert full is not None and full.cache_bytes == kv_cache_bytes(loaded.config, 32, 1, 4)
