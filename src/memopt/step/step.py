"""One inference or training step, the same code for estimation (meta device) and profiling (real).

``estimate`` runs :func:`run_step` on a model built on the meta device, ``profile`` on the real
weights; both count bytes with the same :class:`~memopt.measure.tracker.MemoryTracker`, so the only
difference between a prediction and a measurement is whether the tensors hold data.

What a step is:

- ``infer``: ``model.eval()``, one forward under ``torch.no_grad()``. Causal LMs run with
  ``use_cache=False`` (a step, not generation), so no KV cache is counted.
- ``train``: ``model.train()``, then ``zero_grad(set_to_none=True)``, forward, loss, backward,
  ``optimizer.step()``. The loss: causal LM, its own next-token cross-entropy (``labels=input_ids``),
  computed with the LM head over chunks of tokens when ``spec.loss_chunk_for`` says so (by default
  with checkpointing; :mod:`memopt.step.loss`: the same value, one chunk's logits at the peak);
  encoder, the mean of the squared last hidden state (a stand-in objective with the same graph as any
  loss on the hidden states); plain module, the mean of its (first) output.

  A training step is measured in its **steady state**: a first warm-up step runs unmeasured (the
  optimizer creates its state there), then the tracker's peak is reset and a second step is measured.
  The peak of every later step includes the optimizer state during the forward and backward, which a
  first step would miss.

Inputs are synthetic: ``batch × seq`` token ids drawn from a fixed generator in ``[0, vocab)``, no
attention mask (all-valid masks take the same path as no mask in transformers, and its mask code calls
``.all()``, which cannot run on meta). Plain modules run on their ``example_inputs``.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from memopt.core.errors import MemoptError
from memopt.models import LoadedModel
from memopt.step.checkpoint import checkpoint_blocks, enable_checkpointing

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "TASKS",
    "StepSpec",
    "loss_of",
    "make_optimizer",
    "max_positions",
    "meta_copy",
    "prepare",
    "run_step",
    "synthetic_inputs",
]

TASKS = ("infer", "train")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
OPTIMIZERS = ("adamw", "sgd", "adamw8bit")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

LR = 1e-4  # the step's learning rate; memory does not depend on it
SGD_MOMENTUM = (
    0.9  # "sgd" is SGD with momentum (one state tensor per parameter), as used in practice
)


@dataclass
class StepSpec:
    """What one step is: task, input shape, dtype, optimizer, checkpointing, ranks.

    ``batch`` and ``seq`` are per rank (data parallel: each rank runs its own batch). Plain modules
    run on their ``example_inputs`` and ignore them. ``ranks > 1`` asks the estimator for the memory
    of one rank under FSDP2 / ZeRO-3 sharding (see :mod:`memopt.measure.estimate`).
    """

    task: Literal["infer", "train"] = "infer"
    batch: int = 1
    seq: int = 128
    dtype: str = "float32"
    optimizer: Literal["adamw", "sgd", "adamw8bit"] = "adamw"
    checkpointing: bool = False
    ranks: int = 1
    # Training options (memopt.train): micro-batches per optimizer step (``batch`` is per
    # micro-batch); float32 master weights for 16-bit parameters (the optimizer updates the
    # masters, the model holds a 16-bit copy); a subset of blocks to checkpoint (indices into the
    # largest ModuleList; None with checkpointing=True means every block).
    grad_accum: int = 1
    master_weights: bool = False
    checkpoint_blocks: list[int] | None = None
    # Causal LMs: the LM head + cross-entropy over chunks of this many tokens, each checkpointed
    # (memopt.step.loss). None: on with checkpointing (the head is then the largest activation
    # left), at the default chunk; 0: off (the model's own loss); n: on, n tokens per chunk.
    loss_chunk: int | None = None
    # A checkpoint stored quantized (a GGUF file's blocks): dequantized to ``dtype`` (True), or run
    # in its stored blocks with its float tensors in ``dtype`` (False). None: dequantized for a
    # training step only (blocks have no gradients). Estimate (meta build) and profile (load)
    # honour it alike (:meth:`load_kwargs`); other checkpoints ignore it.
    dequantize: bool | None = None

    def __post_init__(self) -> None:
        self.dtype = _DTYPE_ALIASES.get(str(self.dtype), str(self.dtype))
        if self.task not in TASKS:
            raise MemoptError(f"unknown task {self.task!r} (choose from {', '.join(TASKS)})")
        if self.dequantize is None:
            self.dequantize = self.task == "train"
        if not isinstance(self.dequantize, bool):
            raise MemoptError(f"dequantize must be true or false, got {self.dequantize!r}")
        if self.checkpoint_blocks is not None:
            blocks = list(self.checkpoint_blocks)
            if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise MemoptError(f"checkpoint_blocks must be block indices ≥ 0, got {blocks!r}")
            self.checkpoint_blocks = sorted(set(blocks))
            if self.checkpoint_blocks and self.checkpointing is False:
                self.checkpointing = True  # a list of blocks asks for checkpointing
        if self.loss_chunk is not None and (
            isinstance(self.loss_chunk, bool)
            or not isinstance(self.loss_chunk, int)
            or self.loss_chunk < 0
        ):
            raise MemoptError(f"loss_chunk must be a whole number ≥ 0, got {self.loss_chunk!r}")
        if not isinstance(self.master_weights, bool):
            raise MemoptError(f"master_weights must be true or false, got {self.master_weights!r}")
        for name in ("batch", "seq", "ranks", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemoptError(f"--{name} must be a whole number ≥ 1, got {value!r}")
        if self.dtype not in DTYPES:
            raise MemoptError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.optimizer not in OPTIMIZERS:
            raise MemoptError(
                f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})"
            )
        if not isinstance(self.checkpointing, bool):
            raise MemoptError(f"checkpointing must be true or false, got {self.checkpointing!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`memopt.models.load_model` (``dtype``, ``dequantize``)
        that give the model this step runs; :func:`memopt.models.build_meta` takes ``dequantize``
        alone (``prepare`` casts its float tensors to ``dtype``, as a load does)."""
        return {"dtype": self.torch_dtype, "dequantize": self.dequantize}

    def check_model(self, loaded: LoadedModel) -> None:
        """Checks that need the model: trainable weights for a training step, ``seq`` within its
        maximum positions when it has one."""
        if self.task == "train":
            from memopt.weights.quantized import QuantizedWeight

            if any(isinstance(m, QuantizedWeight) for m in loaded.model.modules()):
                raise MemoptError(
                    f"{loaded.name} has quantized weights, which have no gradients: train the "
                    "float model (quantize after; a GGUF file: dequantize=True), or estimate "
                    "--task infer"
                )
        if loaded.task == "module":
            return
        limit = max_positions(loaded.config)
        if limit is not None and self.seq > limit:
            raise MemoptError(
                f"--seq {self.seq} is longer than {loaded.name}'s maximum of {limit} positions"
            )

    def loss_chunk_for(self, loaded: LoadedModel) -> int:
        """Tokens per chunk of the chunked LM head + loss for ``loaded``, or 0 for the model's
        own loss (not a causal LM with a plain linear head, or chunking is off)."""
        from memopt.step.loss import chunk_tokens, head_of

        if self.task != "train" or loaded.task != "causal-lm":
            return 0
        if self.loss_chunk == 0 or (self.loss_chunk is None and not self.checkpointing):
            return 0
        found = head_of(loaded.model)
        if found is None:
            return 0
        return self.loss_chunk or chunk_tokens(found[1].out_features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_positions(config: Any) -> int | None:
    """The longest sequence a config allows (absolute position embeddings), or None if unbounded."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# Preparing the model


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device; no data is copied.

    ``deepcopy`` with a memo that maps every parameter and buffer to a meta tensor of the same shape
    and dtype: the module tree, hooks and attributes are copied, the storage never is.
    """
    import copy

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(
            torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
        )
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def prepare(loaded: LoadedModel, spec: StepSpec) -> None:
    """Cast floating parameters and buffers to ``spec.dtype`` and turn on checkpointing, in place."""
    dtype = spec.torch_dtype
    model = loaded.model
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for owner in model.modules():
        for name, b in owner._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                owner._buffers[name] = b.to(dtype)
    if spec.checkpointing and spec.task == "train":
        if spec.checkpoint_blocks is None:
            enable_checkpointing(model)
        else:
            checkpoint_blocks(model, spec.checkpoint_blocks)


# --------------------------------------------------------------------------------------------------
# Inputs, loss, optimizer


def synthetic_inputs(
    loaded: LoadedModel, spec: StepSpec, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The step's keyword arguments: ``batch × seq`` random token ids, or a module's example inputs.

    The ids come from a fixed CPU generator (seed 0), so a profile and an estimate see the same shape
    and a profile sees the same values each run. No attention mask (see the module docstring).
    """
    device = torch.device(device)
    if loaded.task == "module":
        if not loaded.example_inputs:
            raise MemoptError(f"{loaded.name}: a plain module needs example_inputs to run a step")
        return {
            k: (torch.empty_like(v, device="meta") if device.type == "meta" else v.to(device))
            if isinstance(v, torch.Tensor)
            else v
            for k, v in loaded.example_inputs.items()
        }
    vocab = loaded.vocab_size
    if not vocab:
        raise MemoptError(f"{loaded.name}: config has no vocab_size; cannot make token ids")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (spec.batch, spec.seq), generator=gen)  # (B, T) int64
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": ids.to(device)}
    if loaded.task == "causal-lm":
        inputs["use_cache"] = False
    return inputs  # type: ignore[return-value]


def loss_of(loaded: LoadedModel, output: Any) -> torch.Tensor:
    """The scalar a training step differentiates (see the module docstring for each task)."""
    if loaded.task == "causal-lm":
        loss = getattr(output, "loss", None)
        if loss is None:
            raise MemoptError(f"{loaded.name}: the causal LM returned no loss for labels=input_ids")
        return loss
    if loaded.task == "encoder":
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return hidden.pow(2).mean()  # (B, T, C) -> ()
    first = _first_tensor(output)
    if first is None:
        raise MemoptError(f"{loaded.name}: the module's output holds no tensor to take a loss of")
    return first.float().mean() if not first.is_floating_point() else first.mean()


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def make_optimizer(
    model: nn.Module | None,
    spec: StepSpec,
    *,
    params: list[torch.Tensor] | None = None,
    lr: float = LR,
    weight_decay: float = 1e-2,
) -> torch.optim.Optimizer:
    """The optimizer ``spec.optimizer`` names, over ``params`` or the model's trainable parameters."""
    if params is None:
        assert model is not None
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MemoptError("the model has no trainable parameters")
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    from memopt.step.adamw8bit import AdamW8bit

    return AdamW8bit(params, lr=lr, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------------
# The step


def run_step(
    loaded: LoadedModel,
    spec: StepSpec,
    tracker: Any,
    device: torch.device | str = "cpu",
) -> None:
    """Run one step of ``spec`` on ``loaded`` (already :func:`prepare`-d) inside ``tracker``.

    ``tracker`` is an entered :class:`~memopt.measure.tracker.MemoryTracker`. For training this runs
    a warm-up step, calls ``tracker.reset_peak()`` and runs the measured steady-state step, so the
    tracker's peak is that of the second step. Errors from ops that cannot run on the meta device
    become a :class:`MemoptError` naming the op.

    Python's cyclic garbage collector is paused during each step (and run between them), so that
    the figure does not depend on when it happens to run: transformers leaves a few activations
    (a hidden state or two) reachable only through reference cycles, and those count until the
    step ends, an upper bound on what a run with the collector on holds (a small part of the peak).
    """
    model = loaded.model
    inputs = synthetic_inputs(loaded, spec, device)
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if tensors:
        tracker.track_existing(*tensors, category="activations")
    meta = torch.device(device).type == "meta"
    with _on_meta_as_on_cpu(loaded.name) if meta else _nothing(), _gc_paused():
        if spec.task == "infer":
            model.eval()
            tracker.mark("forward")
            with torch.no_grad():
                output = _forward(loaded, inputs)
            del output
            return
        model.train()
        from memopt.step.trainer import Trainer

        # The same training step that memopt.train runs (accumulation, master weights, loss
        # scaling), with the tracker's phase marks.
        trainer = Trainer(loaded, spec, lr=LR, prepared=True)
        trainer.attach(tracker)
        micro = [inputs] * spec.grad_accum
        trainer.step(micro, mark=tracker.mark)  # warm-up: creates the optimizer state
        gc.collect()  # the warm-up's cyclic garbage is not part of the measured step
        tracker.reset_peak()
        trainer.step(micro, mark=tracker.mark)  # measured: the steady state


@contextmanager
def _gc_paused() -> Iterator[None]:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _forward(loaded: LoadedModel, inputs: dict[str, Any], labels: bool = False) -> Any:
    if labels and loaded.task == "causal-lm":
        return loaded.model(**inputs, labels=inputs["input_ids"])
    return loaded.model(**inputs)


# --------------------------------------------------------------------------------------------------
# Running on meta as the CPU would: attention kernels, and naming the op that cannot run


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _on_meta_as_on_cpu(name: str) -> Iterator[None]:
    with _cpu_attention(), _unpacked_sequences(), _name_failing_op(name):
        yield


@contextmanager
def _cpu_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on meta tensors runs the kernel the CPU would choose.

    On meta, PyTorch always takes the math path, which materialises the ``(B, H, T, S)`` attention
    matrix; the CPU takes its fused flash kernel whenever it can, which never does (at long
    sequences that matrix can be most of the activation peak). The choice is made inside the C++
    composite by a dispatch stub that no mode sees, so the Python function ``torch.nn.functional.
    scaled_dot_product_attention`` is replaced for the duration of the step (a function mode would
    not be active when checkpointing recomputes a block in backward): the CPU is asked for its
    choice on stand-ins of the same shapes and dtypes that hold one row of memory, and when it is
    flash attention, that aten op runs on meta. Other devices' tensors pass straight through.
    """
    original = F.scaled_dot_product_attention

    def scaled_dot_product_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        args = (query, key, value, attn_mask, dropout_p, is_causal)
        if query.device.type != "meta":
            return original(*args, scale=scale, enable_gqa=enable_gqa)
        with _disable_current_modes():  # the stand-ins are not part of the step
            choice = torch._fused_sdp_choice(
                *(_stand_in(t) for t in (query, key, value, attn_mask)),
                dropout_p,
                is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        if choice != _FLASH:
            return original(*args, scale=scale, enable_gqa=enable_gqa)
        out, _logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out  # (B, H, T, D), what the CPU's composite returns

    F.scaled_dot_product_attention = scaled_dot_product_attention  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]


_FLASH = 1  # torch.nn.attention.SDPBackend.FLASH_ATTENTION, as _fused_sdp_choice returns it


@contextmanager
def _unpacked_sequences() -> Iterator[None]:
    """Tell transformers' mask code that the synthetic batch packs no sequences, without data.

    With no attention mask and no cache, transformers looks for several sequences packed in one row
    by testing ``(position_diff != 1).cumsum(-1)[:, -1] == 0).all()``: a data-dependent ``.all()``.
    Its position ids are an ``arange`` here, so on real data the answer is always "not packed"
    (``None``); on meta we give that answer directly.
    """
    try:
        import transformers.masking_utils as masking
    except ImportError:
        yield
        return
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
        if position_ids.device.type == "meta":
            return None
        return original(position_ids)

    masking.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


def _stand_in(t: torch.Tensor | None) -> torch.Tensor | None:
    """A CPU tensor of ``t``'s shape and dtype backed by one row: strides 0 except the last dim."""
    if t is None:
        return None
    row = torch.zeros(t.shape[-1] if t.dim() else 1, dtype=t.dtype)
    out = row.expand(t.shape) if t.dim() else row[0]
    return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out


class _LastOp(TorchDispatchMode):
    """Remembers the op that raised, so the error can name it (PyTorch's message often does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: str | None = None

    def __torch_dispatch__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None):
        try:
            return func(*args, **(kwargs or {}))
        except Exception:
            # the last op to raise is the one that propagates (an earlier one may have been caught)
            packet = getattr(func, "overloadpacket", None)
            self.failed = packet.__name__ if packet is not None else str(func)
            raise


_DATA_DEPENDENT = {
    "_local_scalar_dense": "Tensor.item() / bool() / int() of a tensor",
    "nonzero": "torch.nonzero / boolean-mask indexing",
    "_unique2": "torch.unique",
    "repeat_interleave": "torch.repeat_interleave without output_size",
    "masked_select": "torch.masked_select",
}


@contextmanager
def _name_failing_op(name: str) -> Iterator[None]:
    mode = _LastOp()
    try:
        with mode:
            yield
    except MemoptError:
        raise
    except (RuntimeError, NotImplementedError) as exc:
        text = str(exc)
        named = _op_from_message(text)  # the op inside, e.g. nonzero under a boolean index
        op = mode.failed or named
        if not (re.search(r"\bmeta\b", text, re.IGNORECASE) or named in _DATA_DEPENDENT):
            raise  # not about meta tensors: a real error, shown as it is
        label = f"aten::{op}" if op else "an op"
        if named and named != op:
            label += f" (calling aten::{named})"
        what = _DATA_DEPENDENT.get(named or op or "")
        if what:
            label += f", {what},"
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise MemoptError(
            f"cannot estimate {name} on the meta device: {label} depends on tensor data "
            f"({first[:120]}); use `memopt profile` instead"
        ) from None


def _op_from_message(text: str) -> str | None:
    if "Tensor.item()" in text:
        return "_local_scalar_dense"
    m = re.search(r"aten::(\w+)", text) or re.search(r"torch\.(\w+)\(\)", text)
    return m.group(1) if m else None
