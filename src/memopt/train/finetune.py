"""``memopt finetune MODEL --data FILE``: a real fine-tuning run with every memory option.

The text is tokenized once; step ``s`` trains on ``batch × grad_accum × ranks`` windows of ``seq``
tokens at offsets drawn from a generator seeded by ``(seed, s)``, so the data of a step does not
depend on what ran before it: a run resumed from a checkpoint sees exactly the batches the
uninterrupted run would have seen, and with the model, the masters, the optimizer state and the RNG
restored (:meth:`memopt.step.trainer.Trainer.load`) it continues the same loss curve.

Written into ``out_dir``: ``checkpoint/`` (``trainer-rank{R}.safetensors`` + ``trainer.json``,
every ``save_every`` steps and at the end, each file through a temporary name), ``loss.jsonl``
(one ``{"step", "loss", "seconds"}`` object per step) and ``loss.png`` (written to a temporary
name, then renamed). ``ranks > 1`` starts the processes itself (FSDP2, :mod:`memopt.train.fsdp`);
inside ``torchrun`` it runs as the current rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memopt.core.atomic import atomic_write_text, save_figure
from memopt.core.errors import MemoptError

__all__ = ["finetune", "loss_plot", "windows"]

ProgressFn = Callable[[int, int, float], None]


def windows(tokens: torch.Tensor, step: int, rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    """(rows, seq) token windows of ``step``: offsets from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq + 1, (rows,), generator=gen)
    return torch.stack([tokens[s : s + seq] for s in starts.tolist()])  # (rows, seq)


def _check(data: str | Path, steps: int, batch: int, seq: int, grad_accum: int, ranks: int) -> str:
    for name, value in (
        ("steps", steps),
        ("batch", batch),
        ("seq", seq),
        ("grad-accum", grad_accum),
        ("ranks", ranks),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MemoptError(f"--{name} must be a whole number ≥ 1, got {value!r}")
    path = Path(data)
    if not path.is_file():
        raise MemoptError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MemoptError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise MemoptError(f"{path}: the data file holds no text")
    return text


def finetune(
    model: str | Path,
    data: str | Path,
    *,
    out_dir: str | Path = "finetune-out",
    steps: int = 50,
    batch: int = 1,
    seq: int = 128,
    lr: float = 1e-4,
    optimizer: str = "adamw",
    checkpointing: bool = False,
    dtype: str | None = None,
    grad_accum: int = 1,
    ranks: int = 1,
    save_every: int = 25,
    resume: bool = False,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (a bundled name or a folder) on the text in ``data``.

    Returns ``{"steps", "start_step", "losses", "final_loss", "seconds", "tokens_per_s",
    "checkpoint", "loss_log", "loss_plot", "spec"}``. ``resume=True`` continues from
    ``out_dir/checkpoint`` (same options; a missing checkpoint starts from step 0). ``stop_after``
    ends the run after that many steps of this call, as an interruption would (for tests), after
    saving a checkpoint. ``dtype`` None: the checkpoint's own (16-bit keeps float32 master
    weights). Bad input raises :class:`MemoptError` with a one-line message.
    """
    from memopt.formats.safetensors import dtype_name
    from memopt.models import stored_dtype
    from memopt.step.step import StepSpec

    text = _check(data, steps, batch, seq, grad_accum, ranks)
    dtype = dtype or dtype_name(stored_dtype(model))
    spec = StepSpec(
        task="train",
        batch=batch,
        seq=seq,
        dtype=dtype,
        optimizer=optimizer,  # type: ignore[arg-type]
        checkpointing=bool(checkpointing),
        ranks=ranks,
        grad_accum=grad_accum,
        master_weights=dtype not in ("float32", "fp32"),
    )
    if save_every < 1:
        raise MemoptError(f"--save-every must be ≥ 1, got {save_every}")
    cfg = {
        "model": str(model),
        "text": text,
        "out_dir": str(out_dir),
        "steps": steps,
        "lr": lr,
        "spec": spec.to_dict(),
        "save_every": save_every,
        "resume": resume,
        "seed": seed,
        "stop_after": stop_after,
    }
    from memopt.train.fsdp import in_torchrun, init_from_env, launch

    if ranks > 1 and not in_torchrun():
        return launch(_worker, ranks, cfg)[0]
    if in_torchrun():
        rank, world = init_from_env()
        if world != ranks:
            raise MemoptError(f"--ranks {ranks} but torchrun started {world} processes")
        return _worker(rank, world, cfg, progress)
    return _worker(0, 1, cfg, progress)


def _worker(
    rank: int, world: int, cfg: dict[str, Any], progress: ProgressFn | None = None
) -> dict[str, Any]:
    import torch.distributed as dist

    from memopt.models import load_model
    from memopt.step.step import StepSpec, prepare
    from memopt.step.trainer import Trainer
    from memopt.train.fsdp import shard_model

    spec = StepSpec(**cfg["spec"])
    loaded = load_model(cfg["model"], dequantize=spec.dequantize)  # a GGUF: its float weights
    if loaded.task != "causal-lm":
        raise MemoptError(f"{cfg['model']}: finetune needs a causal language model")
    spec.check_model(loaded)
    tokens = loaded.tokenizer()(cfg["text"], return_tensors="pt")["input_ids"][0]  # (N,)
    seq = spec.seq
    if tokens.numel() < seq + 1:
        raise MemoptError(
            f"the data holds {tokens.numel()} tokens, fewer than --seq {seq} + 1: "
            "use more text or a shorter --seq"
        )
    prepare(loaded, spec)
    if world > 1:
        shard_model(loaded.model)
    trainer = Trainer(loaded, spec, lr=cfg["lr"], prepared=True)
    loaded.model.train()

    out = Path(cfg["out_dir"])
    ckpt = out / "checkpoint"
    log_path = out / "loss.jsonl"
    records: list[dict[str, Any]] = []
    start = 0
    if cfg["resume"] and (ckpt / "trainer.json").is_file():
        meta = trainer.load(ckpt)
        start = int(meta["steps_done"])
        if meta["spec"] != spec.to_dict():
            raise MemoptError(
                f"{ckpt}: saved with other options ({meta['spec']}); resume with them"
            )
        if log_path.is_file():
            records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
            records = [r for r in records if r["step"] <= start]  # steps after the checkpoint rerun
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_log(log_path, records)

    steps = cfg["steps"]
    rows_global = spec.batch * spec.grad_accum * world
    per_rank = spec.batch * spec.grad_accum
    t0 = time.perf_counter()
    done_here = 0
    for step in range(start, steps):
        rows = windows(tokens, step, rows_global, seq, cfg["seed"])[
            rank * per_rank : (rank + 1) * per_rank
        ]  # (batch × grad_accum, seq)
        micro = [{"input_ids": m} for m in rows.chunk(spec.grad_accum)]
        t = time.perf_counter()
        loss = trainer.step(micro)
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss = loss / world
        value = float(loss)
        if not torch.isfinite(loss):
            raise MemoptError(f"the loss became {value} at step {step + 1}: lower --lr")
        record = {"step": step + 1, "loss": value, "seconds": round(time.perf_counter() - t, 4)}
        records.append(record)
        done_here += 1
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(step + 1, steps, value)
        last = step + 1 == steps or (
            cfg["stop_after"] is not None and done_here >= cfg["stop_after"]
        )
        if (step + 1) % cfg["save_every"] == 0 or last:
            trainer.save(ckpt, extra={"seed": cfg["seed"], "model": cfg["model"]})
        if last:
            break
    seconds = time.perf_counter() - t0
    plot = out / "loss.png"
    if rank == 0 and records:
        loss_plot(records, plot, title=f"{cfg['model']} fine-tuning ({_label(spec)})")
    tokens_done = done_here * rows_global * seq
    return {
        "model": cfg["model"],
        "spec": spec.to_dict(),
        "start_step": start,
        "steps": trainer.steps_done,
        "losses": [r["loss"] for r in records],
        "final_loss": records[-1]["loss"] if records else None,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens_done / seconds, 1) if seconds > 0 else None,
        "data_tokens": int(tokens.numel()),
        "checkpoint": str(ckpt),
        "loss_log": str(log_path),
        "loss_plot": str(plot),
    }


def _label(spec: Any) -> str:
    parts = [spec.dtype, spec.optimizer]
    if spec.checkpointing:
        parts.append("checkpointing")
    if spec.grad_accum > 1:
        parts.append(f"grad-accum {spec.grad_accum}")
    if spec.ranks > 1:
        parts.append(f"{spec.ranks} ranks")
    return ", ".join(parts)


def _write_log(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def loss_plot(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss against step as a PNG (matplotlib Agg), written to a temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, format="png")
