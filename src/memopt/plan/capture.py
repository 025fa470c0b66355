"""Capture a model's inference graph with ``torch.export``, or say in one line why it cannot be done.

What captures (torch 2.13, transformers 5.24, measured): all-MiniLM-L6-v2 (BERT), Llama (SmolLM2-shaped,
``use_cache=False``), GPT-2, OPT, Qwen2, Mistral and plain CNN/MLP modules. Inputs are fed *without* an
``attention_mask``: transformers' mask code inspects the mask's values (data-dependent control flow).

What does not: any forward whose Python control flow or shapes depend on tensor *values*. Those reach
the dispatcher as one of :data:`DATA_DEPENDENT_OPS` (``bool(t)`` and ``t.item()`` end in
``aten._local_scalar_dense`` or ``aten.is_nonzero``; ``nonzero``/``unique``/``masked_select`` have
data-dependent output shapes), and a static plan needs every size known ahead. When export fails we
run the model once eagerly under a dispatch mode to find the first such op and name it in a
:class:`~memopt.core.errors.MemoptError`; a graph that exported but holds unbacked (data-dependent) sizes is
refused the same way, naming the op that produced them.

The graph is then lowered to core ATen (``run_decompositions``): composite ops such as ``linear``,
``reshape``, ``dropout`` and ``scaled_dot_product_attention`` become ops with ``out=`` variants
(``addmm``, ``view``/``clone``, ``bmm``/``_softmax``), which is what the arena executor needs.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from memopt.core.errors import MemoptError

__all__ = ["DATA_DEPENDENT_OPS", "capture", "example_inputs", "find_data_dependent_op"]

# aten ops whose result depends on values a static graph cannot know (a Python bool, a shape).
DATA_DEPENDENT_OPS = frozenset(
    {
        "_local_scalar_dense",  # t.item(), int(t), float(t), bool(t) on a number
        "is_nonzero",  # if t: ...
        "nonzero",
        "nonzero_static",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "masked_select",
        "equal",  # returns a Python bool
        "allclose",
    }
)


def example_inputs(loaded: Any, batch: int = 1, seq: int = 128) -> dict[str, torch.Tensor]:
    """Keyword inputs for one inference step of a :class:`~memopt.models.LoadedModel`.

    Transformers: ``input_ids`` (batch, seq) only (no attention mask, see the module docstring), plus
    ``use_cache=False`` for causal LMs. Plain modules: their stored ``example_inputs``.
    """
    if getattr(loaded, "task", None) == "module" or getattr(loaded, "config", None) is None:
        inputs = getattr(loaded, "example_inputs", None)
        if not inputs:
            raise MemoptError(f"{getattr(loaded, 'name', 'model')}: no example inputs to plan with")
        return dict(inputs)
    if batch < 1 or seq < 1:
        raise MemoptError(f"batch and seq must be positive, got batch={batch} seq={seq}")
    limit = getattr(loaded.config, "max_position_embeddings", None) or getattr(
        loaded.config, "n_positions", None
    )
    if limit is not None and seq > limit:
        raise MemoptError(f"{loaded.name}: --seq {seq} exceeds the model's {limit} positions")
    vocab = getattr(loaded.config, "vocab_size", None) or 1000
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids}


def _call_kwargs(loaded: Any) -> dict[str, Any]:
    # Causal LMs: no KV cache (a DynamicCache object is state the plan does not own).
    return {"use_cache": False} if getattr(loaded, "task", None) == "causal-lm" else {}


class _FirstDataDependent(TorchDispatchMode):
    """Remembers the first data-dependent aten op seen while the model runs eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.op: str | None = None
        self.where: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.op is None and func.__name__.split(".")[0] in DATA_DEPENDENT_OPS:
            self.op = f"aten.{func.__name__}"
            self.where = _user_frame(traceback.extract_stack())
        return func(*args, **(kwargs or {}))


def _user_frame(stack: traceback.StackSummary) -> str | None:
    """The innermost frame outside torch and memopt: the line of model code that asked."""
    for frame in reversed(stack):
        name = frame.filename.replace("\\", "/")
        if "/torch/" in name or "/memopt/plan/" in name or "/_python_dispatch" in name:
            continue
        return f"{name.rsplit('/', 1)[-1]}:{frame.lineno} ({(frame.line or '').strip()})"
    return None


def find_data_dependent_op(
    model: nn.Module, inputs: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """Run ``model(**inputs)`` once eagerly; the first data-dependent op and the model line using it."""
    spy = _FirstDataDependent()
    try:
        with torch.no_grad(), spy:
            model(**inputs)
    except Exception:  # noqa: BLE001 - diagnosis only; the export error is what we report
        pass
    return spy.op, spy.where


def capture(
    model: nn.Module | Any,
    inputs: Mapping[str, Any] | None = None,
    *,
    batch: int = 1,
    seq: int = 128,
    decompose: bool = True,
) -> torch.export.ExportedProgram:
    """Export ``model`` (an ``nn.Module`` or a ``LoadedModel``) for one inference step, static shapes.

    Returns the exported program lowered to core ATen (``decompose=True``). Raises
    :class:`MemoptError` naming the op when the model cannot be captured.
    """
    name = getattr(model, "name", None)
    if hasattr(model, "model") and hasattr(model, "task"):  # a LoadedModel
        loaded = model
        module = loaded.model
        kwargs = dict(inputs) if inputs is not None else example_inputs(loaded, batch, seq)
        kwargs.update(_call_kwargs(loaded))
    else:
        module = model
        if inputs is None:
            raise MemoptError("capture(nn.Module) needs its keyword inputs")
        kwargs = dict(inputs)
    name = name or type(module).__name__
    module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, (), kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - any export failure becomes one line naming the op
        op, where = find_data_dependent_op(module, kwargs)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if op is not None:
            at = f" at {where}" if where else ""
            raise MemoptError(
                f"cannot plan {name}: torch.export cannot capture data-dependent op {op}{at} "
                "(a static plan needs control flow and shapes that do not depend on tensor values)"
            ) from None
        raise MemoptError(f"cannot plan {name}: torch.export failed: {first}") from None
    if decompose:
        _mark_causal_attention(program)
        program = program.run_decompositions(decompositions())
    _refuse_unbacked(program, name)
    return program


def _layer_norm(
    x: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``native_layer_norm`` from ops whose ``out=`` kernels allocate nothing.

    ``native_layer_norm.out`` is generated as "compute, then copy" (a full-size temporary per call)
    and ``var_mean.out`` allocates too; sum, sub, mul, rsqrt do not. Two-pass variance, as PyTorch's
    own decomposition; results match the fused kernel to float32 rounding (~1e-6), not bit for bit.
    """
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    n = 1
    for d in normalized_shape:
        n *= d
    mean = x.sum(dims, keepdim=True) / n  # (..., 1, ...)
    centered = x - mean
    var = (centered * centered).sum(dims, keepdim=True) / n
    rstd = torch.rsqrt(var + eps)
    out = centered * rstd
    if weight is not None and bias is not None:
        out = torch.addcmul(bias, out, weight)  # one pass for out * weight + bias
    elif weight is not None:
        out = out * weight
    elif bias is not None:
        out = out + bias
    return out, mean, rstd


# Rows of queries per attention chunk: a chunk's scores (kv heads, 128, keys) stay in the L2 cache
# (3 x 128 x 512 float32 = 0.75 MiB for smollm2 at seq 512), and a causal chunk reads only the keys
# it can see (up to its last row), which skips the masked upper triangle's work as flash attention
# does: at 4 chunks, 62.5% of the full score matrix.
_ATTENTION_CHUNK = 128


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Inference attention from ``baddbmm``/``bmm`` + ``_softmax`` (all with allocation-free out=).

    q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) -> (B, H, L, Ev). The fused CPU kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has no ``out=`` overload, and core ATen's own
    decomposition adds a NaN guard (eq/any/logical_not/where over the scores, 5 extra passes) for
    rows where every key is masked, and copies K and V once per query head for grouped-query
    attention. Here:

    - grouped-query attention reads K/V in place: query head ``j`` of every group (``q[:, j::g]``)
      is one batched product against the Hk shared heads, no ``repeat_interleave`` copies;
    - causal attention without a mask runs in chunks of query rows, each against only the keys it
      can see (see ``_ATTENTION_CHUNK``); the planner gives each chunk's scores a short lifetime,
      so they reuse one small, cache-resident stretch of the arena.

    A fully masked row gives NaN, as ``softmax`` does; plans are made without padding masks, where
    no row is fully masked. Dropout is ignored (inference). Results match the fused kernel to float
    rounding (~1e-6), not bit for bit.
    """
    b, h, length, e = q.shape
    hk, s_len, ev = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk  # query heads per K/V head (1 without grouped-query attention)
    factor = scale if scale is not None else 1.0 / math.sqrt(e)
    bias = None
    if is_causal:
        keep = torch.ones(length, s_len, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(length, s_len, dtype=q.dtype, device=q.device).masked_fill(
            ~keep, float("-inf")
        )
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf"))
        if m.dim() > 2 and any(d != 1 for d in m.shape[:-2]):  # per batch/head: one (B*H, L, S)
            m = m.expand(b, h, length, s_len).reshape(b * h, length, s_len)
            if g != 1:  # a per-head mask with shared K/V: give each query head its own K/V
                k = k.repeat_interleave(g, dim=1)
                v = v.repeat_interleave(g, dim=1)
                hk, g = h, 1
        else:
            m = m.reshape(length, s_len)  # broadcasts over B*H
        bias = m if bias is None else bias + m
    # only a causal mask known to be lower-triangular lets a chunk skip the keys after its rows
    causal_only = is_causal and attn_mask is None
    chunk = _ATTENTION_CHUNK if causal_only and length == s_len else length
    k3 = k.reshape(b * hk, s_len, e)  # (B*Hk, S, E)
    v3 = v.reshape(b * hk, s_len, ev)
    if bias is None:
        q = q * factor  # (L, E) scaling instead of (L, S): cheaper whenever S > E
    rows = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        seen = stop if causal_only and length == s_len else s_len  # keys this chunk can see
        kt = k3[:, :seen].transpose(1, 2)  # (B*Hk, E, seen)
        heads = []
        for j in range(g):
            qj = q[:, j::g, start:stop].reshape(b * hk, stop - start, e)  # (B*Hk, c, E)
            if bias is None:
                scores = torch.bmm(qj, kt)  # (B*Hk, c, seen)
            else:
                part = bias[..., start:stop, :seen]
                scores = torch.baddbmm(part, qj, kt, alpha=factor)  # part + factor * q @ k^T
            probs = torch.softmax(scores, dim=-1)
            heads.append(torch.bmm(probs, v3[:, :seen]))  # (B*Hk, c, Ev)
        rows.append(torch.stack(heads, dim=1) if g > 1 else heads[0].unsqueeze(1))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)  # (B*Hk, g, L, Ev)
    return out.view(b, h, length, ev)


def _conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
) -> Any:
    """2-D convolution as im2col + ``addmm`` (``convolution.out`` is "compute, then copy").

    x (B, C, H, W), weight (O, C, kh, kw) -> (B, O, Ho, Wo), returned as a channels-last view of
    the (B·Ho·Wo, O) product (no extra copy). The column buffer (B·Ho·Wo, C·kh·kw) becomes an
    ordinary planned tensor. Only groups=1, dilation 1, not transposed; anything else is left as
    ``aten.convolution`` (called with a copy into its slot: one temporary per call).
    """
    if transposed or groups != 1 or x.dim() != 4 or any(d != 1 for d in dilation):
        return NotImplemented
    kh, kw = weight.shape[2], weight.shape[3]
    if any(padding):
        x = torch.constant_pad_nd(x, [padding[1], padding[1], padding[0], padding[0]], 0.0)
    b, c = x.shape[0], x.shape[1]
    patches = x.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # (B, C, Ho, Wo, kh, kw) view
    ho, wo = patches.shape[2], patches.shape[3]
    cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)  # the one copy
    w2 = weight.reshape(weight.shape[0], c * kh * kw).t()  # (C·kh·kw, O) view
    y = torch.addmm(bias, cols, w2) if bias is not None else torch.mm(cols, w2)
    return y.view(b, ho, wo, weight.shape[0]).permute(0, 3, 1, 2)  # (B, O, Ho, Wo)


def decompositions() -> dict[Any, Any]:
    """Core ATen's decomposition table, with our own layer norm, attention and convolution."""
    table = dict(torch.export.default_decompositions())
    # silu has a native out= kernel; core ATen's x * sigmoid(x) makes two passes and a temporary
    table.pop(torch.ops.aten.silu.default, None)
    # baddbmm.out is native (one BLAS call with alpha/beta); core ATen splits it into bmm, mul, add:
    # two extra passes over the (B*H, L, S) scores, which the attention below relies on avoiding
    table.pop(torch.ops.aten.baddbmm.default, None)
    table[torch.ops.aten.native_layer_norm.default] = _layer_norm
    table[torch.ops.aten.scaled_dot_product_attention.default] = _sdpa
    table[torch.ops.aten.convolution.default] = _conv
    return table


def _constant_value(program: torch.export.ExportedProgram, target: fx.Node) -> Any:
    """The value of ``target`` when it depends on no user input (e.g. a mask built from positions).

    Evaluates only ``target``'s ancestors, on the program's parameters, buffers and constants.
    None when a user input is upstream (the value changes from step to step).
    """
    sig = program.graph_signature
    user = set(sig.user_inputs)
    values = {**program.state_dict, **program.constants}
    lifted = {
        spec.arg.name: values[spec.target]
        for spec in sig.input_specs
        if spec.target is not None and spec.target in values
    }
    needed: dict[str, fx.Node] = {}
    stack = [target]
    while stack:
        node = stack.pop()
        if node.name in needed:
            continue
        if node.op == "placeholder" and (node.name in user or node.name not in lifted):
            return None
        needed[node.name] = node
        stack.extend(node.all_input_nodes)
    env: dict[str, Any] = {}
    with torch.no_grad():
        for node in program.graph.nodes:  # topological order
            if node.name not in needed:
                continue
            if node.op == "placeholder":
                env[node.name] = lifted[node.name]
            elif node.op == "get_attr":
                env[node.name] = getattr(program.graph_module, str(node.target))
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n.name])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
                env[node.name] = node.target(*args, **kwargs)
    return env[target.name]


def _is_causal_mask(mask: Any, length: int, s_len: int) -> bool:
    """True when ``mask`` is exactly SDPA's ``is_causal`` mask (lower triangle), shared by all heads."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or mask.shape[-2:] != (length, s_len):
        return False
    if any(d != 1 for d in mask.shape[:-2]):
        return False
    keep = torch.ones(length, s_len, dtype=torch.bool).tril()
    m = mask.reshape(length, s_len)
    if m.dtype == torch.bool:
        return bool(torch.equal(m, keep))
    return bool(torch.equal(m, torch.zeros_like(m).masked_fill(~keep, float("-inf"))))


def _mark_causal_attention(program: torch.export.ExportedProgram) -> None:
    """Turn an SDPA call whose mask is a constant causal mask into ``is_causal=True`` (in place).

    Transformers builds the causal mask as a tensor when traced (eager calls SDPA with
    ``is_causal=True`` instead). The mask depends only on positions, so its value is known at plan
    time; when it is exactly the lower triangle the call is the same with ``is_causal=True``, which
    lets :func:`_sdpa` skip the keys each chunk of queries cannot see.
    """
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    cache: dict[str, bool] = {}
    changed = False
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not sdpa:
            continue
        args = list(node.args)
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else node.kwargs.get("is_causal", False)
        if not isinstance(mask, fx.Node) or causal:
            continue
        q, k = (a.meta.get("val") for a in args[:2])
        if q is None or k is None:
            continue
        if mask.name not in cache:
            value = _constant_value(program, mask)
            cache[mask.name] = value is not None and _is_causal_mask(
                value, q.shape[-2], k.shape[-2]
            )
        if not cache[mask.name]:
            continue
        kwargs = dict(node.kwargs)
        if len(args) > 3:
            args[3] = None
        kwargs.pop("attn_mask", None)
        if len(args) > 5:
            args[5] = True
        else:
            kwargs["is_causal"] = True
        node.args, node.kwargs = tuple(args), kwargs
        changed = True
    if changed:
        program.graph.eliminate_dead_code()
        program.graph_module.recompile()


def _refuse_unbacked(program: torch.export.ExportedProgram, name: str) -> None:
    """A node whose output size is symbolic (data-dependent) cannot get a fixed offset."""
    for node in program.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        for v in vals:
            if isinstance(v, torch.Tensor) and any(
                not isinstance(s, int) for s in (*v.shape, *v.stride())
            ):
                op = getattr(node.target, "__name__", str(node.target))
                raise MemoptError(
                    f"cannot plan {name}: op aten.{op} has a data-dependent output shape "
                    f"{tuple(v.shape)} (a static plan needs every size known ahead)"
                )
