"""The decode engine for Llama-family models: memopt's weights as they are, one C call a token.

:func:`engine_for` looks at a loaded causal LM and, when the engine can run it (a Llama, Mistral
or Qwen2 architecture from transformers; every projection float32, GGUF blocks Q4_0/Q4_1/Q8_0,
memopt int8, memopt int4 in the CPU kernel's layout, or memopt's pruned form: bitmask + float32
or int8 values), returns an :class:`Engine` that points at the model's own tensors: no weight is
copied or converted. Anything else returns None, and the caller keeps transformers' forward. The
KV cache is the engine's own: two float32 tensors ``(layers, positions, kv_heads * head_dim)``,
allocated for the positions asked for.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memopt.core.cbuild import compile_library
from memopt.core.errors import MemoptError
from memopt.engine.source import SOURCE
from memopt.weights import kernels
from memopt.weights.ggml import GGMLWeight
from memopt.weights.modules import QEmbedding, QLinear
from memopt.weights.quantized import Int4Weight, Int8Weight, QuantizedWeight
from memopt.weights.sparse import SparseWeight

__all__ = [
    "ARCHITECTURES",
    "PROJECTIONS",
    "Arch",
    "Engine",
    "GGML_TYPES",
    "arch_of",
    "build",
    "default_inv_freq",
    "engine_for",
    "library",
    "linear",
]

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
_KIND = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
         "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30,
         "I8": 100, "I4": 101, "SP_F32": 102, "SP_I8": 103, "SP_I4": 104}  # fmt: skip
_FLOAT_KIND = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# the GGUF tensor types the engine runs as they are stored (GGML's type ids in the C source)
_GGML = ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
         "Q6_K", "BF16")  # fmt: skip
GGML_TYPES = frozenset(k for k in _KIND if k in _GGML)

_lock = threading.Lock()
_lib: Any = False  # False: not built yet; None: cannot be built here


class _QMat(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("block_n", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("data", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),  # sparse: the bitmask
        ("row_start", ctypes.c_void_p),  # sparse: (N + 1,) int64
        ("zero", ctypes.c_void_p),  # sparse int4: bf16 zeros
    ]


class _Layer(ctypes.Structure):
    _fields_ = [(n, _QMat) for n in ("wq", "wk", "wv", "wo", "wg", "wu", "wd")] + [
        ("attn_norm", ctypes.c_void_p),
        ("ffn_norm", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("dim", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("n_layers", ctypes.c_int32),
        ("n_heads", ctypes.c_int32),
        ("n_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("vocab", ctypes.c_int32),
        ("max_seq", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("inv_freq", ctypes.c_void_p),
        ("rope_scale", ctypes.c_float),
        ("pad", ctypes.c_int32),
        ("layers", ctypes.POINTER(_Layer)),
        ("embed", _QMat),
        ("final_norm", ctypes.c_void_p),
        ("head", _QMat),
    ]


def library() -> Any:
    """The compiled engine (ctypes), or None where it cannot be built (no C compiler, no OpenMP,
    ``MEMOPT_KERNELS=0``)."""
    global _lib
    with _lock:
        if _lib is False:
            lib = compile_library("engine", SOURCE, _FLAGS, ["-lm"])
            if lib is not None:
                lib.memopt_forward.argtypes = [ctypes.POINTER(_Model), ctypes.c_int32,
                                               ctypes.c_int32] + [ctypes.c_void_p] * 6 + [
                                               ctypes.c_int32]  # fmt: skip
                lib.memopt_forward.restype = ctypes.c_int
                lib.memopt_scratch_floats.argtypes = [ctypes.POINTER(_Model)]
                lib.memopt_scratch_floats.restype = ctypes.c_int64
                lib.memopt_dequant_rows.argtypes = [ctypes.POINTER(_QMat), ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
                lib.memopt_dequant_rows.restype = None
                lib.memopt_linear.argtypes = [ctypes.POINTER(_QMat), ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_int32]  # fmt: skip
                lib.memopt_linear.restype = None
                lib.memopt_xs_floats.argtypes = [ctypes.c_int64]
                lib.memopt_xs_floats.restype = ctypes.c_int64
            _lib = lib
        return _lib


class _Unsupported(Exception):
    """The model has a part the engine cannot run (the caller falls back to transformers)."""


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` when the engine can point at it: real memory on the CPU, contiguous."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise _Unsupported(f"a tensor on {t.device} or not contiguous")
    return t


def _f32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise _Unsupported(f"a {t.dtype} tensor")
    return _cpu(t)


def _f32_copy(t: torch.Tensor) -> torch.Tensor:
    """A vector (a norm's weight, a bias: ``dim`` values) as float32, copied when it is not: a
    bfloat16 checkpoint's norms cost the engine ``4 x dim`` bytes each, not a fallback."""
    if t.dtype not in _FLOAT_KIND:
        raise _Unsupported(f"a {t.dtype} tensor")
    return _cpu(t.float().contiguous() if t.dtype != torch.float32 else t)


Weight = torch.Tensor | QuantizedWeight  # a float weight (N, K), or a quantized one


def _qmat(weight: Weight, bias: torch.Tensor | None, keep: list[torch.Tensor]) -> _QMat:
    """The engine's view of one projection (or embedding), without copying its weight."""
    if bias is not None:
        bias = _f32_copy(bias.detach())
        keep.append(bias)
    if isinstance(weight, torch.Tensor):  # float32, float16 or bfloat16, read as stored
        w = _cpu(weight.detach())
        if w.dtype not in _FLOAT_KIND:
            raise _Unsupported(f"{w.dtype} weights")
        keep.append(w)
        kind = _KIND[_FLOAT_KIND[w.dtype]]
        return _QMat(kind, 0, 0, 0, w.shape[0], w.shape[1], w.data_ptr(), None, _ptr(bias))
    qw = weight
    n, k = qw.shape
    if isinstance(qw, GGMLWeight) and qw.ggml_type in GGML_TYPES:
        keep.append(_cpu(qw.blocks))
        return _QMat(_KIND[qw.ggml_type], 0, 0, 0, n, k, qw.blocks.data_ptr(), None, _ptr(bias))
    if isinstance(qw, Int8Weight):
        g = qw.group_size or 0
        scale = _f32(qw.scale)
        keep += [_cpu(qw.qdata), scale]
        return _QMat(_KIND["I8"], g, 0, 0, n, k, qw.qdata.data_ptr(), scale.data_ptr(), _ptr(bias))
    if isinstance(qw, Int4Weight):
        if qw.block_n and (qw.block_n > 128 or n % qw.block_n):
            raise _Unsupported(f"int4 rows in blocks of {qw.block_n}")
        keep += [_cpu(qw.packed), _cpu(qw.scale_zero)]
        return _QMat(_KIND["I4"], qw.group_size, qw.block_n or 0, 0, n, k, qw.packed.data_ptr(),
                     qw.scale_zero.data_ptr(), _ptr(bias))  # fmt: skip
    if isinstance(qw, SparseWeight):
        return _sparse_qmat(qw, bias, keep)
    raise _Unsupported(f"{type(qw).__name__} weights")


def _sparse_qmat(qw: SparseWeight, bias: torch.Tensor | None, keep: list[torch.Tensor]) -> _QMat:
    """A pruned weight as stored: bitmask + float32 values; + int8 values with a float32 scale per
    128 values of the stream; + int4 values with a bfloat16 scale and zero per 64 (CSR rows and
    16-bit float values are not read: the caller falls back)."""
    n, k = qw.shape
    if qw.layout != "bitmask":
        raise _Unsupported(f"sparse {qw.layout} weights")
    if qw.values_fmt == "float" and qw.values.dtype != torch.float32:
        raise _Unsupported(f"sparse {qw.values.dtype} values")
    mask, values = _cpu(qw.mask), _cpu(qw.values)
    starts = _cpu(qw.row_starts())  # (N + 1,) int64, built once from the mask
    scale = zero = None
    if qw.values_fmt == "int8":
        scale = _f32(qw.scale)
    elif qw.values_fmt == "int4":
        scale, zero = _cpu(qw.scale), _cpu(qw.zero)  # bf16 (P / 64,) each
    keep += [t for t in (mask, values, starts, scale, zero) if t is not None]
    kind = _KIND[{"float": "SP_F32", "int8": "SP_I8", "int4": "SP_I4"}[qw.values_fmt]]
    runs8 = 8 if scale is None and qw.runs_of_8() else 0  # block_n 8: 8 values in every 16 columns
    group = {"float": 0, "int8": 128, "int4": 64}[qw.values_fmt]
    return _QMat(kind, group, runs8, 0, n, k, values.data_ptr(), _ptr(scale), _ptr(bias),
                 mask.data_ptr(), starts.data_ptr(), _ptr(zero))  # fmt: skip


def _of_module(module: nn.Module) -> tuple[Weight, torch.Tensor | None]:
    """(weight, bias) of a Linear / Embedding or its memopt twin."""
    bias = getattr(module, "bias", None)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return module.weight, bias
    if isinstance(module, QLinear) and not module.dynamic:
        return module.qweight, bias
    if isinstance(module, QEmbedding):
        return module.qweight, None
    raise _Unsupported(type(module).__name__)


@dataclass
class Arch:
    """What the engine needs of a model's config (a Llama-family decoder)."""

    dim: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    inv_freq: torch.Tensor  # (head_dim / 2,) float32
    rope_scale: float = 1.0


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """Rotary frequencies without scaling, computed as transformers computes them."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64).float()
    return 1.0 / (theta ** (steps / head_dim))


# the Hugging Face names of one layer's projections, in the engine's order
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
Provider = Callable[[str], tuple[Weight, torch.Tensor | None]]  # module name -> (weight, bias)


def build(
    arch: Arch,
    get: Provider,
    norm: Callable[[str], torch.Tensor],
    max_seq: int,
    kv_int8: bool = False,
) -> Engine:
    """An engine over the weights ``get(module name)`` and norms ``norm(name)`` return, named as
    in Hugging Face's Llama (``model.layers.3.self_attn.q_proj``, ``model.norm``, ``lm_head``);
    ``kv_int8``: its KV cache int8 (a scale a position and head, as memopt.weights.kvcache)."""
    keep: list[torch.Tensor] = []
    arr = (_Layer * arch.n_layers)()
    for i in range(arch.n_layers):
        pre = f"model.layers.{i}."
        mats = []
        for proj in PROJECTIONS:
            weight, bias = get(pre + proj)
            if proj.endswith(("o_proj", "gate_proj", "up_proj", "down_proj")) and bias is not None:
                raise _Unsupported(f"{proj} bias")
            mats.append(_qmat(weight, bias, keep))
        norms = [
            _f32_copy(norm(pre + n).detach())
            for n in ("input_layernorm", "post_attention_layernorm")
        ]
        keep += norms
        arr[i] = _Layer(*mats, norms[0].data_ptr(), norms[1].data_ptr())
    inv_freq = _f32(arch.inv_freq.detach().float().contiguous())
    if inv_freq.numel() != arch.head_dim // 2:
        raise _Unsupported("rotary embedding")
    final = _f32_copy(norm("model.norm").detach())
    keep += [inv_freq, final]
    embed, _ = get("model.embed_tokens")
    head, head_bias = get("lm_head")
    if head_bias is not None:
        raise _Unsupported("lm_head bias")
    m = _Model(
        arch.dim, arch.hidden, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim,
        arch.vocab, int(max_seq), arch.eps, arch.head_dim**-0.5, inv_freq.data_ptr(),
        float(arch.rope_scale), 0, arr, _qmat(embed, None, keep), final.data_ptr(),
        _qmat(head, None, keep),
    )  # fmt: skip
    return Engine(m, arr, keep, arch.vocab, int(max_seq), arch.n_kv_heads * arch.head_dim,
                  arch.n_layers, arch.n_kv_heads, kv_int8)  # fmt: skip


@dataclass
class Engine:
    """A model ready for the C decode engine, its KV cache sized for ``max_seq`` positions."""

    model: _Model
    layers: Any  # the ctypes array the model points to (kept alive)
    keep: list[torch.Tensor]  # every tensor the model points to (kept alive)
    vocab: int
    max_seq: int
    kv_dim: int
    n_layers: int
    kv_heads: int
    kv_int8: bool = False  # the KV cache as int8 codes + a float32 scale a position and head

    def __post_init__(self) -> None:
        lib = library()
        shape = (self.n_layers, self.max_seq, self.kv_dim)
        dtype = torch.int8 if self.kv_int8 else torch.float32
        self.k_cache = torch.zeros(shape, dtype=dtype)  # (L, T, kv_heads * head_dim)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        scales = (self.n_layers, self.max_seq, self.kv_heads) if self.kv_int8 else (0,)
        self.k_scale, self.v_scale = torch.zeros(scales), torch.zeros(scales)  # (L, T, kv_heads)
        self.scratch = torch.empty(lib.memopt_scratch_floats(ctypes.byref(self.model)))
        self.logits = torch.empty(self.vocab)
        self._lib = lib
        self._threads = _Threads()

    @property
    def cache_bytes(self) -> int:
        tensors = (self.k_cache, self.v_cache, self.k_scale, self.v_scale)
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, token: int, pos: int, threads: int | None = None) -> torch.Tensor:
        """Logits ``(vocab,)`` of ``token`` at position ``pos`` (positions ``< pos`` are in the
        cache). The returned tensor is overwritten by the next call.

        ``threads`` None: torch's thread count or one thread, whichever has been faster lately
        (see :class:`_Threads`)."""
        nt = threads or self._threads.pick()
        start = time.perf_counter()
        scales = (self.k_scale.data_ptr(), self.v_scale.data_ptr()) if self.kv_int8 else (None,) * 2
        rc = self._lib.memopt_forward(
            ctypes.byref(self.model), int(token), int(pos), self.logits.data_ptr(),
            self.k_cache.data_ptr(), self.v_cache.data_ptr(), *scales, self.scratch.data_ptr(), nt,
        )  # fmt: skip
        if threads is None:
            self._threads.record(nt, time.perf_counter() - start)
        if rc != 0:
            raise MemoptError(f"engine: token {token} at position {pos} is out of range")
        return self.logits


class _Threads:
    """How many threads a token runs on: torch's thread count, or one where that is faster.

    Why: a token's threads meet at a barrier after every matrix-vector product, hundreds of times;
    when another process is busy on one of the cores, every barrier waits for a thread that is not
    running, and two threads run many times slower than one (measured here under load, both for
    PyTorch's own parallel sections and this engine's). The choice is made by measurement, as the
    run goes: each count is tried on the first tokens, then the faster recent one is used, and the
    other is tried again now and then, so that a load that comes or goes changes the choice.
    """

    EXPLORE_EVERY = 32  # tokens before the count not in use is tried again (doubles while it loses)
    MAX_EVERY = 4096

    def __init__(self) -> None:
        self.counts = sorted({max(1, torch.get_num_threads()), 1}, reverse=True)
        self.seconds: dict[int, float] = {}  # count -> recent seconds a token (moving average)
        self.every = self.EXPLORE_EVERY
        self.calls = 0
        self.next_try = 0

    def pick(self) -> int:
        self.calls += 1
        untried = [c for c in self.counts if c not in self.seconds]
        if untried:
            return untried[0]
        best = min(self.counts, key=self.seconds.__getitem__)
        if len(self.counts) > 1 and self.calls >= self.next_try:
            # a try of the other count: a slow one costs a token, so a count that keeps losing
            # is tried ever more rarely (under a lasting load, two threads can be 40x slower)
            self.next_try = self.calls + self.every
            self.every = min(self.every * 2, self.MAX_EVERY)
            return next(c for c in self.counts if c != best)
        return best

    def record(self, count: int, seconds: float) -> None:
        old = self.seconds.get(count)
        best = min(self.seconds.values()) if self.seconds else None
        if best is not None and old is not None and seconds < best:
            self.every = self.EXPLORE_EVERY  # the tried count won: watch closely again
        self.seconds[count] = seconds if old is None else 0.7 * old + 0.3 * seconds


def linear(weight: Weight, x: torch.Tensor) -> torch.Tensor | None:
    """``x (M, K) @ W.T`` for a weight as it is held, by the engine's matrix-vector products (the
    kernel memopt.weights.kernels.gemv calls: a streamed model's layers run through transformers'
    forward, whose blocked dequantize + matmul rebuilt every GGUF weight at every token), or None
    where the engine cannot (no compiler, a kind it does not run)."""
    lib = library()
    if lib is None:
        return None
    keep: list[torch.Tensor] = []
    try:
        qm = _qmat(weight, None, keep)
    except _Unsupported:
        return None
    x = x.contiguous()  # (M, K) float32
    y = torch.empty(x.shape[0], qm.n)  # (M, N)
    xs = torch.empty(int(lib.memopt_xs_floats(qm.k)))
    lib.memopt_linear(ctypes.byref(qm), x.data_ptr(), y.data_ptr(), x.shape[0], xs.data_ptr(),
                      torch.get_num_threads())  # fmt: skip
    return y


kernels.register_gemv(linear)


def engine_for(model: nn.Module, config: Any, max_seq: int, kv_int8: bool = False) -> Engine | None:
    """An :class:`Engine` over ``model``'s own tensors for ``max_seq`` positions (``kv_int8``: an
    int8 KV cache), or None when the engine cannot run this model (then use transformers')."""
    if library() is None:
        return None
    try:
        arch = arch_of(config, model)
        return build(arch, lambda name: _of_module(model.get_submodule(name)),
                     lambda name: model.get_submodule(name).weight, max_seq, kv_int8)  # fmt: skip
    except (_Unsupported, AttributeError):
        return None


def arch_of(config: Any, model: nn.Module | None = None) -> Arch:
    """The engine's :class:`Arch` of a transformers config (the rotary frequencies from the
    model's own rotary module when given, else computed for an unscaled rotary embedding)."""
    archs = getattr(config, "architectures", None) or []
    if not any(a in ARCHITECTURES for a in archs) or getattr(config, "model_type", "") not in (
        "llama", "mistral", "qwen2",
    ):  # fmt: skip
        raise _Unsupported(f"architecture {archs}")
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise _Unsupported("MLP")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        raise _Unsupported("sliding window attention")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:
        inv_freq, scale = rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))
    else:
        scaling = getattr(config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type != "default":
            raise _Unsupported(f"rope scaling {rope_type!r}")
        theta = getattr(config, "rope_theta", None) or (
            getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)  # fmt: skip
        inv_freq, scale = default_inv_freq(float(theta), head_dim), 1.0
    return Arch(
        int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers),
        heads, int(getattr(config, "num_key_value_heads", None) or heads), head_dim,
        int(config.vocab_size), float(config.rms_norm_eps), inv_freq, scale,
    )  # fmt: skip
