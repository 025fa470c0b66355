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

Saved state (:meth:`Trainer.save` / :meth:`Trainer.load`): one safetensors file per rank with the
parameters (``param.NAME``), float32 masters (``master.NAME``), every optimizer state tensor
(``optim.NAME.KEY``) and the CPU RNG state, and a JSON file with the step count, the optimizer's
hyperparameters, the loss scaler and the spec. Parameters are keyed by their names, not by position,
and nothing is pickled. Under FSDP2 each rank saves and loads its own shards (same ``ranks`` to
resume).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.models import LoadedModel
from memopt.step.loss import causal_lm_hidden, chunked_causal_lm_loss, head_of
from memopt.step.precision import LossScaler, MasterWeights, autocast_context
from memopt.step.step import StepSpec, loss_of, make_optimizer, prepare

__all__ = ["Trainer", "STATE_JSON"]

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

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resume needs, as named CPU tensors (local shards under FSDP2)."""
        out: dict[str, torch.Tensor] = {}
        opt_params = self.master.masters if self.master is not None else self.params
        for name, p in zip(self.names, self.params, strict=True):
            out[f"param.{name}"] = _local(p).detach()
        if self.master is not None:
            for name, m in zip(self.names, self.master.masters, strict=True):
                out[f"master.{name}"] = _local(m).detach()
        for name, p in zip(self.names, opt_params, strict=True):
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

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``trainer-rank{R}.safetensors`` and (rank 0) ``trainer.json`` into ``directory``,
        each through a temporary name and a rename, so an interrupted save leaves the last one."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rank = _rank()
        path = directory / f"trainer-rank{rank}.safetensors"
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(self.state_tensors(), str(tmp))
        os.replace(tmp, path)
        if rank == 0:
            groups = [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ]
            meta = {
                "format": _FORMAT,
                "steps_done": self.steps_done,
                "spec": self.spec.to_dict(),
                "optimizer": type(self.optimizer).__name__,
                "param_groups": _jsonable(groups),
                "loss_scaler": self.master.scaler.state()
                if self.master and self.master.scaler
                else None,
                "ranks": _world(),
                "extra": extra or {},
            }
            tmp_json = directory / (STATE_JSON + ".tmp")
            tmp_json.write_text(json.dumps(meta, indent=1))
            os.replace(tmp_json, directory / STATE_JSON)
        return path

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote; returns the JSON (with ``extra``). Fails with
        :class:`MemoptError` for a missing or mismatched checkpoint."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / STATE_JSON
        path = directory / f"trainer-rank{_rank()}.safetensors"
        if not meta_path.is_file() or not path.is_file():
            raise MemoptError(f"no training checkpoint in {directory}")
        meta = json.loads(meta_path.read_text())
        if meta.get("ranks", 1) != _world():
            raise MemoptError(
                f"{directory}: saved with {meta.get('ranks')} ranks, resuming with {_world()}"
            )
        if meta.get("optimizer") != type(self.optimizer).__name__:
            raise MemoptError(
                f"{directory}: saved with optimizer {meta.get('optimizer')}, "
                f"resuming with {type(self.optimizer).__name__}"
            )
        tensors = load_file(str(path))
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                _copy_into(p, tensors, f"param.{name}", directory)
            if self.master is not None:
                for name, m in zip(self.names, self.master.masters, strict=True):
                    _copy_into(m, tensors, f"master.{name}", directory)
        opt_params = self.master.masters if self.master is not None else self.params
        from memopt.step.adamw8bit import AdamW8bit

        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, (name, p) in enumerate(zip(self.names, opt_params, strict=True)):
            prefix = f"optim.{name}."
            entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not entry:
                continue
            if _is_dtensor(p) and not isinstance(self.optimizer, AdamW8bit):
                entry = {k: _as_dtensor_like(v, p) if k != "step" else v for k, v in entry.items()}
            state[i] = entry
        groups = []
        index = 0
        for saved, group in zip(meta["param_groups"], self.optimizer.param_groups, strict=True):
            ids = list(range(index, index + len(group["params"])))
            index += len(ids)
            groups.append(
                {**saved, "params": ids, "betas": tuple(saved.get("betas", (0.9, 0.999)))}
            )
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.master is not None and self.master.scaler is not None and meta.get("loss_scaler"):
            self.master.scaler.load(meta["loss_scaler"])
        if "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
        self.steps_done = int(meta["steps_done"])
        return meta


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
