"""Scale-out on a real engine: FSDP2 (``torch.distributed.fsdp.fully_shard``) per block.

memopt does not shard anything itself: :func:`shard_model` calls ``fully_shard`` on each block of
the model's largest ``nn.ModuleList`` and then on the root (embeddings, final norm, head), which is
how FSDP2 is meant to be applied to a transformer. Each rank then holds ``1/N`` of every parameter,
gradient and optimizer state tensor (dim-0 shards), gathers one block's parameters at a time in the
forward and backward, and reduce-scatters (averages) the gradients.

Processes: :func:`launch` starts ``ranks`` processes on this machine with
``torch.multiprocessing`` (spawn) and a process group over localhost, gloo on CPU and NCCL on
CUDA, and collects each rank's JSON-able result; under ``torchrun`` (``WORLD_SIZE`` set in the
environment) :func:`in_torchrun` is true and the caller runs its worker in the current process
instead (:func:`init_from_env`). Each spawned rank gets ``cores // ranks`` threads so two ranks do
not fight over the same cores.

Measuring a rank: FSDP2 allocates and frees its unsharded parameters and gradients by resizing
storages (``UntypedStorage.resize_``), which no dispatch mode sees; :func:`count_storage_resizes`
wraps ``resize_`` for the duration of a measurement so that the tracker counts those bytes too.

:func:`check_against_single` is the property the tests and the bench check: a few steps of the same
model and data on ``ranks`` processes and on one, the loss of each step compared, and each rank's
measured peak compared with ``estimate(..., StepSpec(ranks=N))``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import find_blocks
from memopt.step.step import StepSpec, prepare

__all__ = [
    "check_against_single",
    "count_storage_resizes",
    "in_torchrun",
    "init_from_env",
    "launch",
    "shard_model",
    "train_worker",
]


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True) -> list[str]:
    """``fully_shard`` each block of the largest ``nn.ModuleList``, then the root; in place.

    Returns the names of the FSDP units (blocks, then ``""`` for the root). Needs an initialised
    default process group. Checkpointing, if any, must already be on (it wraps the block's
    forward; FSDP2's hooks sit outside it and regather the block for the recomputation).
    """
    from torch.distributed.fsdp import fully_shard

    found = find_blocks(model)
    names: list[str] = []
    if found is not None:
        prefix, blocks = found
        for i, block in enumerate(blocks):
            fully_shard(block, reshard_after_forward=reshard_after_forward)
            names.append(f"{prefix}.{i}")
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    names.append("")
    return names


# --------------------------------------------------------------------------------------------------
# Processes


def in_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher that sets WORLD_SIZE/RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def init_from_env() -> tuple[int, int]:
    """Initialise the default process group from the environment (torchrun); (rank, world)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(fn: Callable[..., Any], ranks: int, *args: Any, backend: str | None = None) -> list[Any]:
    """Run ``fn(rank, ranks, *args)`` in ``ranks`` spawned processes in one process group.

    ``fn`` must be importable (a module-level function) and return something JSON-able; the list
    of the ranks' results is returned. A :class:`MemoptError` in a rank is raised here with its
    message; any other exception is raised as a RuntimeError carrying the rank's traceback.
    """
    import torch.multiprocessing as mp

    if ranks < 1:
        raise MemoptError(f"--ranks must be ≥ 1, got {ranks}")
    with tempfile.TemporaryDirectory(prefix="memopt-ranks-") as tmp:
        port = _free_port()
        ctx = mp.start_processes(
            _entry,
            args=(fn, ranks, port, backend, tmp, args),
            nprocs=ranks,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join():
                pass
        except mp.ProcessExitedException:
            if not all((Path(tmp) / f"rank{r}.json").exists() for r in range(ranks)):
                raise
            for p in ctx.processes:  # a rank died in teardown after writing its result
                p.join()
        results = []
        for r in range(ranks):
            out = json.loads((Path(tmp) / f"rank{r}.json").read_text())
            if "error" in out:
                if out.get("memopt"):
                    raise MemoptError(out["error"])
                raise RuntimeError(f"rank {r} failed:\n{out['traceback']}")
            results.append(out["result"])
    return results


def _entry(
    rank: int,
    fn: Callable[..., Any],
    ranks: int,
    port: int,
    backend: str | None,
    tmp: str,
    args: tuple[Any, ...],
) -> None:
    import torch.distributed as dist

    from memopt.core.libc import die_with_parent

    die_with_parent()  # a rank never outlives the process that launched it
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(ranks),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    out: dict[str, Any]
    initialized = False
    try:
        dist.init_process_group(backend, rank=rank, world_size=ranks)
        initialized = True
        out = {"result": fn(rank, ranks, *args)}
    except MemoptError as exc:
        out = {"error": str(exc), "memopt": True}
    except Exception as exc:  # noqa: BLE001 - reported to the parent with its traceback
        out = {"error": str(exc), "traceback": traceback.format_exc()}
    # The result is written before the process group is torn down: gloo's teardown has aborted
    # a rank now and then ("terminate called without an active exception") after its work was
    # done; launch() accepts such an exit when every rank's result is on disk.
    path = Path(tmp) / f"rank{rank}.json"
    part = path.with_suffix(".part")
    part.write_text(json.dumps(out))
    part.replace(path)
    if initialized:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Measuring a rank


@contextmanager
def count_storage_resizes(tracker: Any) -> Iterator[None]:
    """Let ``tracker`` (an entered MemoryTracker) see storages grown or shrunk by ``resize_``.

    FSDP2 frees an unsharded parameter with ``storage.resize_(0)`` and reallocates it with
    ``storage.resize_(n)``; the C++ call passes no aten op. ``UntypedStorage.resize_`` is wrapped on
    the class for the duration (every storage object is a ``torch.UntypedStorage``), and each
    resize becomes an event of the tracker: a known storage's bytes change by the difference, an
    unknown one that grows from nothing is a new allocation (counted as activations).
    """
    from memopt.measure import tracker as tracker_module

    original = torch.UntypedStorage.resize_

    def resize_(self: torch.UntypedStorage, size: int) -> Any:
        out = original(self, size)
        with tracker._lock:
            if tracker._active:
                ref = tracker._live.get(id(self))
                nbytes = self.nbytes()
                if ref is None:
                    if nbytes:
                        tracker._register(self, tracker_module._ACTIVATIONS, initial=False)
                elif nbytes != ref.nbytes:
                    delta = nbytes - ref.nbytes
                    ref.nbytes = nbytes
                    tracker._append_event(ref.sid, delta)
        return out

    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------
# The check: N ranks against one process


def _rows(cfg: dict[str, Any], step: int) -> torch.Tensor:
    """The global batch of ``step``: (batch × ranks, seq) token ids from a seeded generator."""
    gen = torch.Generator().manual_seed(1000 + step)
    rows = cfg["batch"] * cfg["ranks"] * cfg["spec"].get("grad_accum", 1)
    return torch.randint(0, cfg["vocab"], (rows, cfg["seq"]), generator=gen)


def _build(cfg: dict[str, Any]) -> Any:
    if cfg.get("model"):
        from memopt.models import load_model

        return load_model(cfg["model"], dequantize=True)  # trained: a GGUF's float weights
    from memopt.models.toy import tiny_llama

    return tiny_llama(seed=cfg.get("seed", 0), **cfg.get("overrides", {}))


def train_worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg["steps"]`` steps on this rank's rows of each global batch; the last step is
    measured by a MemoryTracker (steady state: the optimizer state exists). Returns the global mean
    loss of each step (averaged over ranks), the rank's peak and breakdown, and the step times."""
    import torch.distributed as dist

    from memopt.measure.tracker import MemoryTracker
    from memopt.step.trainer import Trainer

    spec = StepSpec(**{**cfg["spec"], "task": "train", "ranks": world})
    loaded = _build(cfg)
    prepare(loaded, spec)
    if world > 1:
        shard_model(loaded.model)
    trainer = Trainer(loaded, spec, lr=cfg.get("lr", 1e-3), prepared=True)
    loaded.model.train()
    # rows this rank takes from a global batch: ``batch`` per micro-batch, grad_accum micro-batches
    per_rank = cfg["batch"] * cfg["ranks"] * spec.grad_accum // world
    losses: list[float] = []
    times: list[float] = []
    result: dict[str, Any] = {}
    for step in range(cfg["steps"]):
        rows = _rows(cfg, step)[rank * per_rank : (rank + 1) * per_rank]  # (B, T)
        micro = [{"input_ids": m} for m in rows.chunk(spec.grad_accum)]
        measure = step == cfg["steps"] - 1
        start = time.perf_counter()
        if measure:
            tracker = MemoryTracker(loaded.model, per_module=False, timeline=False)
            trainer.attach(tracker)
            with tracker, count_storage_resizes(tracker):
                tracker.track_existing(rows, category="activations")
                loss = trainer.step(micro, mark=tracker.mark)
            res = tracker.result()
            result = {"peak_bytes": res.peak_bytes, "breakdown": res.breakdown}
        else:
            loss = trainer.step(micro)
        times.append(time.perf_counter() - start)
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss = loss / world
        losses.append(float(loss))
    return {"rank": rank, "losses": losses, "step_seconds": times, **result}


def check_against_single(
    *,
    ranks: int = 2,
    steps: int = 3,
    batch: int = 2,
    seq: int = 64,
    spec: dict[str, Any] | None = None,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """Train the same model on the same data with ``ranks`` FSDP2 processes and with one process,
    and estimate one rank's peak. ``batch`` is per rank (the single process takes
    ``batch × ranks`` rows per step, the same global batch). ``model``: a name or path, else the
    tiny Llama with ``overrides``.

    Returns ``losses_sharded``, ``losses_single`` (per step), ``max_loss_rel_diff``,
    ``rank_peaks`` (each rank's measured peak), ``estimate_peak``, ``estimate_rel_err`` (worst
    rank), ``single_peak`` and the step times.
    """
    from memopt.measure.estimate import estimate

    spec = dict(spec or {})
    cfg: dict[str, Any] = {
        "spec": {**spec, "batch": batch, "seq": seq},
        "batch": batch,
        "ranks": ranks,
        "seq": seq,
        "steps": steps,
        "lr": lr,
        "model": model,
        "overrides": overrides or {},
    }
    loaded = _build(cfg)
    cfg["vocab"] = int(loaded.vocab_size)
    est = estimate(
        loaded, StepSpec(**{**spec, "task": "train", "batch": batch, "seq": seq, "ranks": ranks})
    )
    del loaded
    sharded = launch(train_worker, ranks, cfg)
    single_cfg = {**cfg, "spec": {**cfg["spec"], "batch": batch * ranks}}
    single = launch(train_worker, 1, single_cfg)[0]
    losses_n = sharded[0]["losses"]
    losses_1 = single["losses"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses_n, losses_1, strict=True))
    peaks = [r["peak_bytes"] for r in sharded]
    errs = [abs(est.peak_bytes - p) / p for p in peaks]
    return {
        "ranks": ranks,
        "losses_sharded": losses_n,
        "losses_single": losses_1,
        "max_loss_rel_diff": rel,
        "rank_peaks": peaks,
        "rank_breakdowns": [r["breakdown"] for r in sharded],
        "estimate_peak": est.peak_bytes,
        "estimate_breakdown": est.breakdown,
        "estimate_sharding": est.sharding,
        "estimate_rel_err": max(errs),
        "single_peak": single["peak_bytes"],
        "step_seconds_sharded": sharded[0]["step_seconds"],
        "step_seconds_single": single["step_seconds"],
    }
