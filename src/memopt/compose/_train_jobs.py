"""Child-process entries of memopt.compose.fit_train (memopt.core.rss.run_in_child imports this
module, then takes the baseline): what a training run imports is imported here, at the top, so
that the measured peak over the baseline is the run's own (weights, gradients, optimizer state,
activations, the heap's slack), not transformers' modules.

One run: ``steps`` optimizer steps of one :class:`~memopt.step.step.StepSpec` on pre-tokenized
ids (the parent tokenizes once, so both runs it compares see the same ids and neither holds a
tokenizer). Step ``s`` trains on the ``rows`` windows of :func:`memopt.train.finetune.windows`
for ``(seed, s)``: the global batch, split into ``grad_accum`` micro-batches and, under FSDP2,
over the ranks (each rank its slice), as ``memopt finetune`` splits it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from memopt.core.heap import bound_heap
from memopt.core.rss import import_baseline, peak_rss_bytes
from memopt.models import load_model
from memopt.step.step import StepSpec, prepare
from memopt.step.trainer import Trainer
from memopt.train.finetune import windows
from memopt.train.fsdp import launch, shard_model

# torch, transformers' auto classes and Llama / Qwen2 modeling code, tokenizers: in the baseline
# (a tiny model's load would otherwise count ~130 MB of transformers' modules as its own)
import_baseline()

__all__ = ["MMAP_THRESHOLD", "rank_job", "training_job"]

MMAP_THRESHOLD = 4 << 20  # allocations from 4 MiB up: their own mapping, returned on free


def training_job(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg["steps"]`` steps of ``cfg["spec"]`` (see the module docstring); returns each step's
    ``losses`` (the global batch's mean) and ``step_seconds``. With ``spec["ranks"] > 1`` the
    ranks run as spawned processes (:func:`memopt.train.fsdp.launch`) and ``rank_peak_bytes``
    holds each rank's peak RSS over its own baseline: this process only waits for them."""
    ranks = int(cfg["spec"].get("ranks", 1))
    if ranks > 1:
        results = launch(rank_job, ranks, cfg)
        out = dict(results[0])
        out["rank_peak_bytes"] = [r["peak_bytes"] for r in results]
        return out
    return _train(0, 1, cfg)


def rank_job(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One FSDP2 rank of :func:`training_job`, its peak RSS measured from after its imports and
    the process group (the high-water mark restarted there, as run_in_child does)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    baseline = peak_rss_bytes()
    out = _train(rank, world, cfg)
    out["peak_bytes"] = peak_rss_bytes() - baseline
    return out


def _train(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    # glibc's mmap threshold fixed at 4 MiB: left alone, it rises to each freed block's size (up
    # to 32 MB) and blocks under it come from the heaps of the forward's and the backward's
    # threads, which keep them resident (the chunked loss's 33 MB logits chunks: 118 MB of live
    # tensors peaked at 610 MB of RSS on a tiny Llama; 160 MB with this). Given to every run, the
    # plain one too, so the step times compare options, not heap policies.
    bound_heap(MMAP_THRESHOLD)
    torch.manual_seed(int(cfg["seed"]))
    spec = StepSpec(**cfg["spec"])
    loaded = load_model(cfg["model"], **spec.load_kwargs())
    spec.check_model(loaded)
    prepare(loaded, spec)
    if world > 1:
        shard_model(loaded.model)
    trainer = Trainer(loaded, spec, lr=float(cfg["lr"]), prepared=True)
    loaded.model.train()
    tokens = torch.tensor(cfg["tokens"], dtype=torch.long)  # (N,)
    rows, seq = int(cfg["rows"]), spec.seq
    per_rank = rows // world  # = batch × grad_accum
    losses: list[float] = []
    times: list[float] = []
    for step in range(int(cfg["steps"])):
        mine = windows(tokens, step, rows, seq, int(cfg["seed"]))[
            rank * per_rank : (rank + 1) * per_rank
        ]  # (batch × grad_accum, seq)
        micro = [{"input_ids": m} for m in mine.chunk(spec.grad_accum)]
        start = time.perf_counter()
        loss = trainer.step(micro)  # the mean of the micro-batches' mean losses, () float32
        times.append(time.perf_counter() - start)
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss = loss / world
        losses.append(float(loss))
    return {"losses": losses, "step_seconds": times}
