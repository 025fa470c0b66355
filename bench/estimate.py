"""Claim: `memopt estimate` predicts the memory of a step without reading weights, within 10 %.

For each case the estimate (meta device, no weights read, in this process) is set against the real
step on real weights, measured in a fresh child process with the same tracker (`memopt profile`):

    estimated peak | measured peak | estimate / measured | child peak RSS over its import baseline
    | seconds to estimate | seconds to profile

Models: minilm (all-MiniLM-L6-v2), smollm2 (SmolLM2-135M; float weights are its dequantized Q4_1,
which does not change their size) and a small randomly initialised GPT-2 written as a Hugging Face
folder. Inference at batch 1 and 8 × seq 128 and 512, and one AdamW training step (steady state).

    .venv/bin/python bench/estimate.py [--json] [--quick] [--threads N]

Timing: the estimate is timed warm, in this process (after one estimate has imported transformers);
the profile is the wall time of the child (start, imports, load, two steps for training). Both run on
``--threads`` CPU threads (default 1: on a shared 2-core machine OpenMP spinning makes 2 threads far
slower, and the memory figures do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _gpt2_folder(root: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=512)
    path = root / "gpt2-small"
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return path


def _cases(gpt2: Path, quick: bool) -> list[tuple[str, str, Any]]:
    from memopt.step.step import StepSpec

    cases: list[tuple[str, str, Any]] = []
    shapes = [(1, 128), (8, 128)] if quick else [(1, 128), (1, 512), (8, 128), (8, 512)]
    for label, model in (("minilm", "minilm"), ("smollm2", "smollm2")):
        for batch, seq in shapes:  # smollm2: its float32 model (the GGUF dequantized)
            cases.append((label, model, StepSpec(batch=batch, seq=seq, dequantize=True)))
        cases.append((label, model, StepSpec(task="train", batch=1, seq=128)))
    # smollm2 as shipped: inference in the GGUF's own Q4_1 / Q8_0 blocks (memopt's default)
    cases.append(("smollm2 GGUF blocks", "smollm2", StepSpec(batch=1, seq=128)))
    for batch, seq in [(1, 128), (8, 512)]:
        cases.append(("gpt2-small", str(gpt2), StepSpec(batch=batch, seq=seq)))
    cases.append(("gpt2-small", str(gpt2), StepSpec(task="train", batch=8, seq=128)))
    return cases


def _step_name(spec: Any) -> str:
    what = f"{spec.task} {spec.batch}×{spec.seq}"
    return what + (f" {spec.optimizer}" if spec.task == "train" else "")


def _human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run(quick: bool = False) -> list[dict[str, Any]]:
    from memopt.measure.estimate import estimate
    from memopt.measure.profile import profile
    from memopt.step.step import StepSpec

    rows = []
    with tempfile.TemporaryDirectory(prefix="memopt-bench-") as tmp:
        gpt2 = _gpt2_folder(Path(tmp))
        estimate("minilm", StepSpec(seq=8))  # warm-up: imports transformers and the tracker
        for label, model, spec in _cases(gpt2, quick):
            t0 = time.perf_counter()
            est = estimate(model, spec)
            est_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            measured = profile(model, spec)  # a fresh child process
            prof_s = time.perf_counter() - t0
            rss = measured.peak_rss_bytes - measured.baseline_rss_bytes
            rows.append(
                {
                    "model": label,
                    "step": _step_name(spec),
                    "spec": spec.to_dict(),
                    "estimated_peak_bytes": est.peak_bytes,
                    "measured_peak_bytes": measured.peak_bytes,
                    "ratio": est.peak_bytes / measured.peak_bytes,
                    "estimated_breakdown": est.breakdown,
                    "measured_breakdown": measured.breakdown,
                    "peak_rss_over_baseline_bytes": rss,
                    "estimate_seconds": est_s,
                    "profile_seconds": prof_s,
                }
            )
            print(f"  {label}: {_step_name(spec)} done", file=sys.stderr)
    return rows


def _table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="memopt estimate (meta device, no weights read) vs profile (real, child)")
    for col, just in [
        ("model", "left"),
        ("step", "left"),
        ("estimated peak", "right"),
        ("measured peak", "right"),
        ("est / measured", "right"),
        ("RSS over base", "right"),
        ("estimate s", "right"),
        ("profile s", "right"),
        ("speed-up", "right"),
    ]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        ok = abs(r["ratio"] - 1) <= 0.10
        table.add_row(
            r["model"],
            r["step"],
            _human(r["estimated_peak_bytes"]),
            _human(r["measured_peak_bytes"]),
            f"[{'green' if ok else 'red'}]{r['ratio']:.3f}[/]",
            _human(r["peak_rss_over_baseline_bytes"]),
            f"{r['estimate_seconds']:.2f}",
            f"{r['profile_seconds']:.1f}",
            f"{r['profile_seconds'] / max(r['estimate_seconds'], 1e-9):.0f}×",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (no seq 512)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the profile children
    import torch

    torch.set_num_threads(args.threads)
    rows = run(quick=args.quick)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    if args.json:
        out = {"rows": rows, "max_abs_error": worst, "threads": args.threads}
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    from rich.console import Console

    console = Console(width=max(Console().width, 120))  # piped output defaults to 80 columns
    console.print(_table(rows))
    console.print(
        f"largest |estimate / measured − 1| = {worst:.4f}. RSS over base: the profile child's peak "
        "RSS over its baseline after imports (weights, activations, allocator slack). gpt2-small: a "
        "random GPT-2 (2 layers, 128 wide, vocab 1000). smollm2's float weights are dequantized Q4_1."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
