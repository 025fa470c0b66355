"""Bench: calibrated int4 (GPTQ variants) against round-to-nearest on SmolLM2-135M, same run.

Each variant runs in a fresh Python process (memopt.core.rss.run_in_child): load the bundled
model (its float weights are dequantized Q4_1 from the GGUF file), quantize, measure perplexity on
the first 2,048 tokens of the evaluation text (windows of 512, memopt.evaluate.perplexity).
Reported: perplexity, ratio to float32 (same run), seconds to quantize, the child's peak RSS up to
the end of quantization (load included) and over the whole child.

Evaluation text: memopt.evaluate's default excerpt (its _TOPICS, named in the table). Calibration:
n sequences x seq tokens from memopt.core.texts.CALIB_TOPICS, topics disjoint from those.

    .venv/bin/python bench/calibrate.py [--groups 64 32] [--variants rtn gptq gptq-plain]
                                        [--n 32] [--seq 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "run_variant"]

# name -> GPTQSettings fields (None: round to nearest; "fp32": no quantization)
VARIANTS: dict[str, dict[str, Any] | str | None] = {
    "fp32": "fp32",
    "rtn": None,
    "gptq": {},  # the default: act-order + per-group clipping search + GPTQ'd (tied) lm_head
    "gptq-blocks": {"lm_head": False},  # the blocks' Linears only; lm_head/embedding by RTN
    "gptq-plain": {"act_order": False, "search": False, "lm_head": False},  # the paper's form
    "gptq-actorder": {"search": False},
    "gptq-search": {"act_order": False},
}


def eval_text() -> tuple[str, str]:
    """(text, description) of the evaluation text."""
    from memopt.core.texts import EVAL_TOPICS, default_text

    return default_text(), "+".join(EVAL_TOPICS)


def run_variant(variant: str, group: int, n: int, seq: int) -> dict[str, Any]:
    """In the child: load, quantize, evaluate. Returns JSON-able numbers."""
    import torch

    from memopt.core.modules import model_bytes
    from memopt.core.rss import peak_rss_bytes
    from memopt.evaluate import perplexity
    from memopt.models import load_model
    from memopt.quant import Int4WeightOnly, quantize_
    from memopt.quant.calibrate import GPTQSettings, calibrate_, calibration_ids

    torch.manual_seed(0)
    loaded = load_model("smollm2", dequantize=True)  # the float32 model: the GGUF dequantized
    spec = VARIANTS[variant]
    t0 = time.perf_counter()
    if spec == "fp32":
        pass
    elif spec is None:
        quantize_(loaded.model, Int4WeightOnly(group_size=group))
    else:
        ids = calibration_ids(loaded.tokenizer(), None, n, seq)
        t0 = time.perf_counter()  # tokenizing the calibration text is not quantizing
        calibrate_(
            loaded,
            Int4WeightOnly(group_size=group, algo="gptq"),
            ids,
            settings=GPTQSettings(**spec),
        )
    seconds = time.perf_counter() - t0
    peak_quant = peak_rss_bytes()
    text, _ = eval_text()
    ppl = perplexity(loaded, text, max_tokens=2048)
    return {
        "perplexity": ppl.perplexity,
        "tokens": ppl.tokens,
        "quantize_seconds": seconds,
        "peak_rss_quantize_bytes": peak_quant,
        "model_bytes": model_bytes(loaded.model),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--variants", nargs="+", default=["rtn", "gptq", "gptq-blocks", "gptq-plain"])
    ap.add_argument("--n", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memopt.core.rss import run_in_child

    _, text_name = eval_text()
    rows: list[dict[str, Any]] = []
    jobs = [("fp32", 0)] + [(v, g) for g in args.groups for v in args.variants if v != "fp32"]
    for variant, group in jobs:
        r = run_in_child("calibrate:run_variant", variant, group, args.n, args.seq)
        r.update(variant=variant, group_size=group or None)
        rows.append(r)
        if not args.json:
            print(f"{variant} g{group}: ppl {r['perplexity']:.3f}", file=sys.stderr, flush=True)
    fp32 = rows[0]["perplexity"]
    for r in rows:
        r["ratio"] = r["perplexity"] / fp32
    result = {
        "model": "smollm2 (float weights = dequantized Q4_1)",
        "eval_text": text_name,
        "calibration": {"n": args.n, "seq": args.seq},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"SmolLM2-135M int4, ppl on 2,048 tokens of {text_name}; calib {args.n}x{args.seq}"
    )
    for col in (
        "variant",
        "group",
        "perplexity",
        "× fp32",
        "quantize s",
        "peak RSS (quant)",
        "RAM",
    ):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        t.add_row(
            r["variant"],
            str(r["group_size"] or "-"),
            f"{r['perplexity']:.3f}",
            f"{r['ratio']:.3f}",
            f"{r['quantize_seconds']:.1f}",
            f"{r['peak_rss_quantize_bytes'] / 2**20:.0f} MiB",
            f"{r['model_bytes'] / 2**20:.1f} MiB",
        )
    Console().print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
