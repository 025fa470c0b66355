"""One training step with every memory option, and its state saved and loaded (safetensors + JSON).

:class:`Trainer` is the step that ``memopt estimate/profile --task train`` measure (their
:func:`~memopt.step.step.run_step` calls it, on the meta device or on real weights), that
:func:`memopt.train.finetune` runs, and that each rank runs under FSDP2. What a step is:

- ``zero_grad`` (gradients set to None, so no gradient memory lives through the forward of the
  first micro-batch);
- for each of ``grad_accum`` micro-batches: forward, loss (divided by ``grad_accum``, and multiplied
  by the loss scale for float16 master-weight training), backward; gradients add up in ``.grad``;
- the optimizer step: directly, or through :class:`~memopt.step.precision.MasterWeights` one
  parameter at a time when ``spec.master_weights`` and the model is 16-bit.

Saved state, the one checkpoint format of memopt's training loops (:class:`TrainState`, which
:meth:`Trainer.save` / :meth:`Trainer.load` and :class:`memopt.distill.Distiller` use): one
safetensors file per rank, ``trainer-rank{R}.safetensors``, with the parameters (``param.NAME``),
float32 masters (``master.NAME``), buffers training changes (``buffer.NAME``), every optimizer state
tensor (``optim.NAME.KEY``) and the CPU RNG state, its metadata holding the step count; and
``trainer.json`` with the step count, the optimizer's hyperparameters and non-tensor state, the
loss scaler, the spec (None outside a :class:`Trainer`) and the caller's ``extra``. Parameters are
keyed by their names, not by position, and nothing is pickled. Each file is written through a
temporary name and a rename. Under FSDP2 each rank saves and loads its own shards (same ``ranks``
to resume).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.atomic import atomic_path, atomic_write_text
from memopt.core.errors import MemoptError
from memopt.models import LoadedModel
from memopt.step.loss import causal_lm_hidden, chunked_causal_lm_loss, head_of
from memopt.step.precision import LossScaler, MasterWeights, autocast_context
from memopt.step.step import StepSpec, loss_of, make_optimizer, prepare

__all__ = ["STATE_JSON", "TrainState", "Trainer", "has_state"]

STATE_JSON = "trainer.json"
_FORMAT = 1


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of its storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


class Trainer:
    """The training step of ``spec`` on ``loaded`` (see the module docstring).

    ``prepared=True`` when :func:`~memopt.step.step.prepare` (cast, checkpointing) already ran
    on the model, or when the caller did it itself (FSDP2 wraps after preparing). ``autocast``
    runs the forward under ``torch.autocast`` at that dtype (float32 weights, 16-bit compute);
    the estimator does not model it (meta tensors bypass the CPU autocast key).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        spec: StepSpec,
        *,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        prepared: bool = False,
        autocast: torch.dtype | None = None,
    ) -> None:
        if spec.task != "train":
            raise MemoptError("a Trainer needs a training spec (task='train')")
        self.loaded = loaded
        self.spec = spec
        self.autocast = autocast
        if not prepared:
            prepare(loaded, spec)
        model = loaded.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise MemoptError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.master: MasterWeights | None = None
        low = any(p.dtype in (torch.float16, torch.bfloat16) for p in self.params)
        if spec.master_weights and low:
            scaler = LossScaler() if spec.dtype == "float16" else None
            self.master = MasterWeights(self.params, scaler)
            opt_params = self.master.masters
        else:
            opt_params = self.params
        self.optimizer = make_optimizer(
            None, spec, params=opt_params, lr=lr, weight_decay=weight_decay
        )
        self.steps_done = 0
        self.loss_chunk = spec.loss_chunk_for(loaded)  # 0: the model's own loss
        self._head = head_of(model) if self.loss_chunk else None

    # ------------------------------------------------------------------ the step

    def attach(self, tracker: Any) -> None:
        """Let a :class:`~memopt.measure.tracker.MemoryTracker` classify the optimizer's state and
        the float32 masters (counted as ``params``: they are the weights being trained)."""
        tracker.attach_optimizer(self.optimizer)
        lookups = getattr(self.optimizer, "lookup_tensors", None)
        if lookups is not None:
            # constant tables (not per parameter, not state): counted like a model's buffers
            tracker.track_existing(*lookups(), category="buffers")
        if self.master is not None:
            tracker.track_existing(*self.master.masters, category="params")

    def forward_loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The loss of one micro-batch (causal LMs: next-token cross-entropy on ``labels``)."""
        loaded = self.loaded
        with autocast_context(_device_of(self.params[0]), self.autocast):
            if self.loss_chunk:
                # the head + loss chunk by chunk (memopt.step.loss): same value, one chunk's
                # logits at the peak instead of the whole batch's
                base, head = self._head
                labels = inputs.get("labels", inputs["input_ids"])
                hidden = causal_lm_hidden(base, inputs)  # (B, T, C)
                return chunked_causal_lm_loss(hidden, head, labels, self.loss_chunk)
            if loaded.task == "causal-lm":
                labels = inputs.get("labels", inputs["input_ids"])
                rest = {k: v for k, v in inputs.items() if k != "labels"}
                output = loaded.model(**rest, labels=labels)
            else:
                output = loaded.model(**inputs)
            loss = loss_of(loaded, output)
        return loss

    def step(
        self,
        micro_batches: Sequence[dict[str, Any]],
        mark: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` (``grad_accum`` of them, usually); returns
        the mean loss as a detached 0-dim float32 tensor (on meta, a meta tensor)."""
        if not micro_batches:
            raise MemoptError("a training step needs at least one micro-batch")
        mark = mark or _no_mark
        for p in self.loaded.model.parameters():
            p.grad = None  # set_to_none: no gradient memory through the first forward
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        scale = self.master.scaler.scale if self.master and self.master.scaler else 1.0
        total: torch.Tensor | None = None
        for inputs in micro_batches:
            mark("forward")
            loss = self.forward_loss(inputs)
            mark("backward")
            factor = scale / n
            (loss * factor if factor != 1.0 else loss).backward()
            value = loss.detach().float()
            total = value if total is None else total + value
            del loss
        mark("optimizer")
        if self.master is not None:
            self._master_step()
        else:
            self.optimizer.step()
        self.steps_done += 1
        assert total is not None
        return total / n

    def _master_step(self) -> None:
        """Masters for 16-bit parameters; float32 parameters (if any) are their own masters."""
        assert self.master is not None
        self.master.step(self.optimizer)

    # ------------------------------------------------------------------ state

    def train_state(self) -> TrainState:
        """This trainer's parameters, masters, optimizer and loss scaler as a :class:`TrainState`."""
        return TrainState(
            self.names,
            self.params,
            self.optimizer,
            masters=self.master.masters if self.master is not None else None,
            scaler=self.master.scaler if self.master is not None else None,
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resume needs, as named CPU tensors (local shards under FSDP2)."""
        return self.train_state().tensors()

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``trainer-rank{R}.safetensors`` and (rank 0) ``trainer.json`` into ``directory``
        (:meth:`TrainState.save`); ``extra`` (JSON) is saved beside the state."""
        return self.train_state().save(
            directory, self.steps_done, spec=self.spec.to_dict(), extra=extra
        )

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote; returns the JSON (with ``extra``). Fails with
        :class:`MemoptError` for a missing or mismatched checkpoint."""
        meta = self.train_state().load(directory)
        self.steps_done = int(meta["steps_done"])
        return meta


def has_state(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved training state for this rank (``trainer.json`` and
    ``trainer-rank{R}.safetensors``)."""
    directory = Path(directory)
    return (directory / STATE_JSON).is_file() and (directory / _tensor_file(_rank())).is_file()


class TrainState:
    """The state of a training run, saved and loaded in the one checkpoint format (the module
    docstring): any trainable ``params`` with their ``names``, the ``optimizer`` over them (or over
    their float32 ``masters``, same order, and a float16 loss ``scaler``), and ``buffers`` that
    training changes (by name; a batch norm's running statistics). :class:`Trainer` saves through
    it, and so does :class:`memopt.distill.Distiller`, with its own loss and loop.

    The optimizer has its parameters in the order of ``params`` (``masters`` when given): that is
    how its state is keyed by parameter name.
    """

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        masters: Sequence[torch.Tensor] | None = None,
        scaler: LossScaler | None = None,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.names = list(names)
        self.params = list(params)
        self.optimizer = optimizer
        self.masters = list(masters) if masters is not None else None
        self.scaler = scaler
        self.buffers = dict(buffers or {})
        if len(self.names) != len(self.params) or (
            self.masters is not None and len(self.masters) != len(self.params)
        ):
            raise MemoptError("a training state needs one name (and master) per parameter")
        in_optimizer = [id(p) for g in optimizer.param_groups for p in g["params"]]
        if in_optimizer != [id(p) for p in self.opt_params]:
            raise MemoptError("the optimizer's parameters are not the state's, in the same order")

    @property
    def opt_params(self) -> list[torch.Tensor]:
        """What the optimizer steps: the masters when there are any, else the parameters."""
        return self.masters if self.masters is not None else self.params

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resume needs, as named CPU tensors (local shards under FSDP2)."""
        out: dict[str, torch.Tensor] = {}
        for name, p in zip(self.names, self.params, strict=True):
            out[f"param.{name}"] = _local(p).detach()
        if self.masters is not None:
            for name, m in zip(self.names, self.masters, strict=True):
                out[f"master.{name}"] = _local(m).detach()
        for name, b in self.buffers.items():
            out[f"buffer.{name}"] = _local(b).detach()
        for name, p in zip(self.names, self.opt_params, strict=True):
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"optim.{name}.{key}"] = _local(value).detach()
        out["rng.cpu"] = torch.get_rng_state()
        # safetensors wants contiguous tensors that share no storage (a tied weight is listed
        # once by named_parameters, so sharing can only come from views: copy those)
        seen: set[int] = set()
        for key, t in out.items():
            ptr = t.untyped_storage().data_ptr()
            if not t.is_contiguous() or (ptr in seen and t.numel()):
                out[key] = t.contiguous().clone()
            seen.add(ptr)
        return out

    def _optim_scalars(self) -> dict[str, dict[str, Any]]:
        """The optimizer's per-parameter state that is not a tensor (kept in the JSON)."""
        out: dict[str, dict[str, Any]] = {}
        for name, p in zip(self.names, self.opt_params, strict=True):
            rest = {
                k: v for k, v in self.optimizer.state.get(p, {}).items() if not torch.is_tensor(v)
            }
            if rest:
                out[name] = _jsonable(rest)
        return out

    def save(
        self,
        directory: str | Path,
        steps_done: int,
        *,
        spec: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``trainer-rank{R}.safetensors`` and (rank 0) ``trainer.json`` into ``directory``,
        each through a temporary name and a rename, so an interrupted save leaves whole files. The
        tensors come first and carry ``steps_done`` too: :meth:`load` refuses a pair from two
        different steps (a save interrupted between the files)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        rank = _rank()
        path = directory / _tensor_file(rank)
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"steps_done": str(int(steps_done))})
        if rank == 0:
            groups = [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ]
            meta = {
                "format": _FORMAT,
                "steps_done": int(steps_done),
                "spec": spec,
                "optimizer": type(self.optimizer).__name__,
                "param_groups": _jsonable(groups),
                "optim_scalars": self._optim_scalars(),
                "loss_scaler": self.scaler.state() if self.scaler is not None else None,
                "ranks": _world(),
                "extra": extra or {},
            }
            atomic_write_text(directory / STATE_JSON, json.dumps(meta, indent=1))
        return path

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote into the parameters, masters, buffers, optimizer, loss
        scaler and CPU RNG; returns the JSON (``steps_done``, ``extra``, ...). Fails with
        :class:`MemoptError` for a missing, corrupt or mismatched checkpoint."""
        from safetensors import SafetensorError, safe_open

        directory = Path(directory)
        meta_path = directory / STATE_JSON
        path = directory / _tensor_file(_rank())
        if not meta_path.is_file() or not path.is_file():
            raise MemoptError(f"no training checkpoint in {directory}")
        try:
            meta = json.loads(meta_path.read_text())
            with safe_open(str(path), framework="pt") as f:
                saved_step = (f.metadata() or {}).get("steps_done")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            steps_done = int(meta["steps_done"])
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise MemoptError(f"{directory}: corrupt training checkpoint ({exc})") from None
        if saved_step is not None and int(saved_step) != steps_done:
            raise MemoptError(
                f"{directory}: {path.name} is from step {saved_step}, {STATE_JSON} from step "
                f"{steps_done} (a save was interrupted)"
            )
        if meta.get("ranks", 1) != _world():
            raise MemoptError(
                f"{directory}: saved with {meta.get('ranks')} ranks, resuming with {_world()}"
            )
        if meta.get("optimizer") != type(self.optimizer).__name__:
            raise MemoptError(
                f"{directory}: saved with optimizer {meta.get('optimizer')}, "
                f"resuming with {type(self.optimizer).__name__}"
            )
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                _copy_into(p, tensors, f"param.{name}", directory)
            if self.masters is not None:
                for name, m in zip(self.names, self.masters, strict=True):
                    _copy_into(m, tensors, f"master.{name}", directory)
            for name, b in self.buffers.items():
                _copy_into(b, tensors, f"buffer.{name}", directory)
        from memopt.step.adamw8bit import AdamW8bit

        scalars = meta.get("optim_scalars", {})
        state: dict[int, dict[str, Any]] = {}
        for i, (name, p) in enumerate(zip(self.names, self.opt_params, strict=True)):
            prefix = f"optim.{name}."
            entry: dict[str, Any] = {
                k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
            }
            if _is_dtensor(p) and not isinstance(self.optimizer, AdamW8bit):
                entry = {k: _as_dtensor_like(v, p) if k != "step" else v for k, v in entry.items()}
            entry.update(scalars.get(name, {}))
            if entry:
                state[i] = entry
        groups = []
        index = 0
        for saved, group in zip(meta["param_groups"], self.optimizer.param_groups, strict=True):
            ids = list(range(index, index + len(group["params"])))
            index += len(ids)
            restored = {**saved, "params": ids}
            if "betas" in saved:
                restored["betas"] = tuple(saved["betas"])
            groups.append(restored)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.scaler is not None and meta.get("loss_scaler"):
            self.scaler.load(meta["loss_scaler"])
        if "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
        return meta


def _tensor_file(rank: int) -> str:
    return f"trainer-rank{rank}.safetensors"


def _copy_into(
    target: torch.Tensor, tensors: dict[str, torch.Tensor], key: str, where: Path
) -> None:
    if key not in tensors:
        raise MemoptError(f"{where}: the checkpoint has no {key!r}")
    local = _local(target)
    src = tensors[key]
    if tuple(src.shape) != tuple(local.shape):
        raise MemoptError(
            f"{where}: {key} has shape {tuple(src.shape)}, expected {tuple(local.shape)}"
        )
    local.copy_(src)


def _as_dtensor_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t.to(p.device),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device_of(t: torch.Tensor) -> torch.device:
    return t.device


def _no_mark(_: str) -> None:
    return None


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]
