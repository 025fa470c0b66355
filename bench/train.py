"""Claim: checkpointing + AdamW8bit + bf16 (float32 masters) trains SmolLM2 in ≤ 0.35× the peak of
plain float32 AdamW, at the same loss; checkpointing + AdamW8bit costs ≤ 1.4× the step time.

Checkpointing also turns on the chunked LM head + loss (:mod:`memopt.step.loss`: the head and
cross-entropy over 170-token chunks, each recomputed in the backward, so the peak holds one chunk's
logits instead of the batch's (4 × 512 × 49152) float32 logits); "chunked loss" is that option alone.

Every option set runs in its own fresh child process (so its peak RSS is its own) on SmolLM2 with the
same data: windows of ``--batch × --seq`` tokens of pydoc_data.topics (SmolLM2's tokenizer), the
same windows at each step for every option set (seeded by the step), the same initial weights (the
bundled GGUF, dequantized Q4_1). Each child trains ``--steps`` steps and reports:

- ``peak_bytes``: live tensor bytes at the peak of step 2 (MemoryTracker; steady state: the
  optimizer state exists), and its breakdown;
- ``peak_rss_bytes`` / ``base_rss_bytes``: the child's peak RSS (``ru_maxrss``) and its RSS once the
  model and data are loaded, before training;
- ``step_s``: the fastest of steps 3.. (steps 1 and 2 are the warm-up and the tracked step); on a
  shared machine the minimum is the least disturbed; ``step_cpu_s``: the least process CPU time
  of those steps (all threads), steadier than wall time when other processes share the cores;
- ``loss``: the training loss of the last step, and ``eval_loss``: the loss on 4 fixed held-out
  windows after the last step.

Step times measured in separate children are not interleaved; ``--pair`` also runs plain and
checkpointing + AdamW8bit in one process, alternating step by step (A, B, A, B, ...), and reports
the ratio of their minimum step times: the number for the 1.4× target.

    .venv/bin/python bench/train.py [--steps 50] [--batch 4 --seq 512] [--only a,b] [--pair N] [--json]
    .venv/bin/python bench/train.py --quick        # batch 1 × seq 128, 4 steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

__all__ = ["CONFIGS", "main"]

CKPT8 = {"checkpointing": True, "optimizer": "adamw8bit"}
# bfloat16 keeps float32 master weights (+4 B/param). With the chunked loss the masters fit the
# target: ckpt + adamw8bit + bf16 measured 1.464 GB = 0.263× plain at batch 4 × seq 512, so the
# alternative (bfloat16 weights updated in place with stochastic rounding, no master) is not
# needed; "no masters" below shows what round-to-nearest updates cost (50 steps, batch 2 × seq 128:
# loss +4.5 %, held-out loss +10.8 % against plain; with masters +0.0 % and +0.1 %).
BF16 = {"dtype": "bfloat16", "master_weights": True}
# grad-accum splits the same global batch in 2 micro-batches (``--batch`` must be even)
CONFIGS: dict[str, dict[str, Any]] = {
    "plain fp32 AdamW": {},
    "checkpointing": {"checkpointing": True},
    "chunked loss": {"loss_chunk": 170},  # SmolLM2's default chunk (memopt.step.loss)
    "adamw8bit": {"optimizer": "adamw8bit"},
    "bf16 + fp32 masters": BF16,
    "grad-accum 2": {"grad_accum": 2},
    "ckpt + adamw8bit": CKPT8,
    "ckpt + adamw8bit + bf16": {**CKPT8, **BF16},
    "all (+ grad-accum 2)": {**CKPT8, **BF16, "grad_accum": 2},
    # why the masters: the same without them (the optimizer rounds its update into bfloat16)
    "ckpt + adamw8bit + bf16 (no masters)": {**CKPT8, "dtype": "bfloat16"},
}
LR = 1e-4  # SmolLM2 is pretrained: a fine-tuning learning rate


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _tokens() -> torch.Tensor:
    import pydoc_data.topics

    from memopt.formats.gguf import gguf_tokenizer
    from memopt.models import resolve

    tok = gguf_tokenizer(resolve("smollm2").path)
    text = "\n".join(pydoc_data.topics.topics.values())
    return tok(text, return_tensors="pt")["input_ids"][0]  # (n_tokens,)


def _trainer(opts: dict[str, Any], batch: int, seq: int) -> Any:
    from memopt.models import load_model
    from memopt.step.step import StepSpec
    from memopt.step.trainer import Trainer

    accum = opts.get("grad_accum", 1)
    spec = StepSpec(task="train", batch=batch // accum, seq=seq, **opts)
    trainer = Trainer(load_model("smollm2", dequantize=True), spec, lr=LR)
    trainer.loaded.model.train()
    return trainer


def _micro(trainer: Any, tokens: torch.Tensor, step: int, batch: int, seq: int) -> list[dict]:
    from memopt.train.finetune import windows

    ids = windows(tokens, step, batch, seq)  # (batch, seq): the same for every option set
    return [{"input_ids": m} for m in ids.chunk(trainer.spec.grad_accum)]


def _eval_loss(trainer: Any, tokens: torch.Tensor, seq: int) -> float:
    from memopt.train.finetune import windows

    ids = windows(tokens, 0, 4, seq, seed=12345)  # (4, seq) held-out windows (another seed)
    model = trainer.loaded.model
    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    model.train()
    return loss


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One option set in this (fresh) process; see the module docstring."""
    import gc

    from memopt.measure.tracker import MemoryTracker

    torch.manual_seed(0)
    tokens = _tokens()
    trainer = _trainer(CONFIGS[name], args.batch, args.seq)
    gc.collect()
    base_rss = _rss()
    losses, times, cpu = [], [], []  # cpu: process CPU seconds per step (all threads)
    peak = breakdown = None
    for step in range(args.steps):
        batches = _micro(trainer, tokens, step, args.batch, args.seq)
        if step == 1:  # the tracked step: the optimizer state exists from step 0
            tracker = MemoryTracker(trainer.loaded.model, per_module=False, timeline=False)
            trainer.attach(tracker)
            with tracker:
                losses.append(float(trainer.step(batches)))
            peak, breakdown = tracker.peak_bytes, dict(tracker.peak_breakdown())
            del tracker
            continue
        t, c = time.perf_counter(), time.process_time()
        losses.append(float(trainer.step(batches)))
        if step >= 2:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(f"[{name}] step {step + 1}/{args.steps} loss {losses[-1]:.4f}", file=sys.stderr)
    return {
        "config": name,
        "peak_bytes": peak,
        "breakdown": breakdown,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "base_rss_bytes": base_rss,
        "step_s": min(times) if times else None,
        "step_times": times,
        "step_cpu_s": min(cpu) if cpu else None,
        "loss": losses[-1],
        "losses": losses,
        "eval_loss": _eval_loss(trainer, tokens, args.seq),
    }


def pair(rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    """Plain and ckpt + AdamW8bit alternating in one process: min step times and their ratio."""
    tokens = _tokens()
    names = ["plain fp32 AdamW", "ckpt + adamw8bit"]
    trainers = {n: _trainer(CONFIGS[n], args.batch, args.seq) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0: warm-up (optimizer state, allocator)
        for n in names if r % 2 == 0 else names[::-1]:  # ABBA: neither always goes first
            batches = _micro(trainers[n], tokens, r, args.batch, args.seq)
            t = time.perf_counter()
            trainers[n].step(batches)
            if r:
                times[n].append(time.perf_counter() - t)
            print(f"[pair] round {r} {n} {time.perf_counter() - t:.1f} s", file=sys.stderr)
    a, b = (min(times[n]) for n in names)
    return {"rounds": rounds, "times": times, "plain_s": a, "ckpt8_s": b, "ratio": b / a}


def _run_child(extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *extra]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="training steps per option set (≥ 3)")
    ap.add_argument("--only", default="", help="comma-separated option-set names")
    ap.add_argument("--pair", type=int, default=0, help="interleaved timing rounds (0: none)")
    ap.add_argument("--quick", action="store_true", help="batch 1 (2 with accumulation) × seq 128")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--pair-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 2, 128, min(args.steps, 4)
    if args.steps < 3:
        ap.error("--steps must be at least 3 (warm-up, tracked step, timed steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child or args.pair_child:
        result = child(args.child, args) if args.child else pair(args.pair, args)
        print(json.dumps(result))
        return None

    common = [f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}"]
    common += [f"--threads={args.threads}"] if args.threads else []
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    rows = []
    for name in names:
        rows.append(_run_child([*common, f"--child={name}"]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results survive a stop
        if not args.json:
            r = rows[-1]
            print(
                f"{name}: peak {r['peak_bytes'] / 1e6:.0f} MB, rss {r['peak_rss_bytes'] / 1e6:.0f} MB,"
                f" step {r['step_s']:.1f} s, loss {r['loss']:.4f}, eval {r['eval_loss']:.4f}",
                flush=True,
            )
    base = rows[0]
    for r in rows:
        r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        r["rss_ratio"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
        r["time_ratio"] = r["step_s"] / base["step_s"]
        r["loss_rel_diff"] = (r["loss"] - base["loss"]) / base["loss"]
        r["eval_rel_diff"] = (r["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
    out: dict[str, Any] = {
        "model": "smollm2 (GGUF Q4_1, dequantized to float32)",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.pair:
        out["pair"] = _run_child([*common, f"--pair={args.pair}", "--pair-child"])
    if args.json:
        print(json.dumps(out))
        return out
    print(
        f"\nSmolLM2 training step, batch {args.batch} × seq {args.seq}, {args.steps} steps, "
        f"lr {LR}; ratios against plain float32 AdamW"
    )
    head = (
        f"{'option set':36} {'peak MB':>8} {'×':>6} {'RSS MB':>8} {'×':>6} {'step s':>7} "
        f"{'×':>5} {'loss':>7} {'Δ%':>6} {'eval':>7} {'Δ%':>6}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['config']:36} {r['peak_bytes'] / 1e6:8.0f} {r['peak_ratio']:6.3f} "
            f"{r['peak_rss_bytes'] / 1e6:8.0f} {r['rss_ratio']:6.3f} {r['step_s']:7.2f} "
            f"{r['time_ratio']:5.2f} {r['loss']:7.4f} {100 * r['loss_rel_diff']:+6.2f} "
            f"{r['eval_loss']:7.4f} {100 * r['eval_rel_diff']:+6.2f}"
        )
    if args.pair:
        p = out["pair"]
        print(
            f"\ninterleaved ({p['rounds']} rounds): plain {p['plain_s']:.2f} s, "
            f"ckpt + adamw8bit {p['ckpt8_s']:.2f} s: {p['ratio']:.2f}×"
        )
    return out


if __name__ == "__main__":
    main()
