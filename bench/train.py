"""Claim: checkpointing + AdamW8bit + bf16 (float32 masters) trains SmolLM2 in ≤ 0.35× the peak of
plain float32 AdamW, at the same loss; checkpointing + AdamW8bit costs ≤ 1.4× the step time.

One run, every option set in the same process, ratios against plain float32 AdamW:
- peak (MemoryTracker, steady-state step: the optimizer state exists) and step time (median of
  ``--repeats`` steps after the measured one) of one SmolLM2 training step at ``--batch × --seq``;
- loss after ``--loss-steps`` steps on the same data (windows of pydoc_data.topics text) for each
  option set, on ``--loss-model`` (default: a tiny Llama of SmolLM2's shape with SmolLM2's
  vocabulary, because 50 SmolLM2 steps per option set do not fit a CI budget on 2 CPU cores; pass
  ``--loss-model smollm2`` for the real one).

    .venv/bin/python bench/train.py [--batch 4 --seq 512] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch

from memopt.measure.step import StepSpec, prepare
from memopt.measure.tracker import MemoryTracker
from memopt.models import load_model
from memopt.train.trainer import Trainer

__all__ = ["CONFIGS", "main"]

CONFIGS: dict[str, dict[str, Any]] = {
    "plain fp32 AdamW": {},
    "checkpointing": {"checkpointing": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "bf16 + fp32 masters": {"dtype": "bfloat16", "master_weights": True},
    "ckpt + adamw8bit": {"checkpointing": True, "optimizer": "adamw8bit"},
    "ckpt + adamw8bit + bf16": {
        "checkpointing": True,
        "optimizer": "adamw8bit",
        "dtype": "bfloat16",
        "master_weights": True,
    },
}


def _tokens() -> torch.Tensor:
    import pydoc_data.topics

    from memopt.gguf_loader import gguf_tokenizer
    from memopt.models import resolve

    tok = gguf_tokenizer(resolve("smollm2").path)
    text = "\n".join(pydoc_data.topics.topics.values())
    return tok(text, return_tensors="pt")["input_ids"][0]


def measure_step(
    name: str, opts: dict[str, Any], tokens: torch.Tensor, args: Any
) -> dict[str, Any]:
    spec = StepSpec(task="train", batch=args.batch, seq=args.seq, **opts)
    loaded = load_model("smollm2")
    prepare(loaded, spec)
    trainer = Trainer(loaded, spec, lr=1e-4, prepared=True)
    loaded.model.train()
    from memopt.train.finetune import windows

    def batch(i: int) -> list[dict[str, torch.Tensor]]:
        return [{"input_ids": windows(tokens, i, args.batch, args.seq)}]

    trainer.step(batch(0))  # warm-up: optimizer state
    gc.collect()
    tracker = MemoryTracker(loaded.model, per_module=False, timeline=False)
    trainer.attach(tracker)
    with tracker:
        trainer.step(batch(1))
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        trainer.step(batch(2 + i))
        times.append(time.perf_counter() - t)
    return {"peak_bytes": tracker.peak_bytes, "step_s": statistics.median(times)}


def loss_after(opts: dict[str, Any], tokens: torch.Tensor, args: Any) -> float:
    from memopt.train.finetune import windows

    if args.loss_model == "tiny":
        from memopt.train.toy import tiny_llama

        loaded = tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=192)
    else:
        loaded = load_model(args.loss_model)
    spec = StepSpec(task="train", batch=args.loss_batch, seq=args.loss_seq, **opts)
    trainer = Trainer(loaded, spec, lr=args.lr)
    loaded.model.train()
    loss = float("nan")
    for i in range(args.loss_steps):
        loss = float(trainer.step([{"input_ids": windows(tokens, i, spec.batch, spec.seq)}]))
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loss-steps", type=int, default=50)
    ap.add_argument("--loss-batch", type=int, default=4)
    ap.add_argument("--loss-seq", type=int, default=128)
    ap.add_argument("--loss-model", default="tiny")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--only", default="", help="comma-separated config names")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tokens = _tokens()
    rows = []
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    for name in names:
        row = {"config": name, **measure_step(name, CONFIGS[name], tokens, args)}
        row["loss"] = loss_after(CONFIGS[name], tokens, args)
        rows.append(row)
        if not args.json:
            print(json.dumps(row), flush=True)
    base = rows[0]
    for r in rows:
        r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        r["time_ratio"] = r["step_s"] / base["step_s"]
        r["loss_rel_diff"] = (r["loss"] - base["loss"]) / base["loss"]
    out = {
        "smollm2_step": {"batch": args.batch, "seq": args.seq},
        "loss": {
            "model": args.loss_model,
            "steps": args.loss_steps,
            "batch": args.loss_batch,
            "seq": args.loss_seq,
        },
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"\nSmolLM2 step at batch {args.batch} × seq {args.seq}; loss after {args.loss_steps} "
        f"steps on {args.loss_model} (batch {args.loss_batch} × seq {args.loss_seq})"
    )
    print(f"{'config':28} {'peak MB':>9} {'×':>6} {'step s':>8} {'×':>6} {'loss':>8} {'Δ%':>7}")
    for r in rows:
        print(
            f"{r['config']:28} {r['peak_bytes'] / 1e6:9.1f} {r['peak_ratio']:6.3f} "
            f"{r['step_s']:8.2f} {r['time_ratio']:6.2f} {r['loss']:8.4f} "
            f"{100 * r['loss_rel_diff']:+7.2f}"
        )


if __name__ == "__main__":
    main()
