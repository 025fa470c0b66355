"""Bench: calibrated int4 / int3 / int2 (GPTQ variants) against round-to-nearest on SmolLM2-135M.

Each variant runs in a fresh Python process (memopt.core.rss.run_in_child), one torch thread (the
machine is shared: two threads stall on every barrier when other jobs run): load the bundled
model (its float weights are dequantized Q4_1 from the GGUF file), quantize, measure perplexity on
the first 2,048 tokens of every held-out text (memopt.core.texts.HELDOUT: pydoc, license, news,
code; windows of 512, memopt.evaluate.heldout_perplexities). Reported: perplexity over float32's
(same run) per text and the worst of them, seconds to quantize, bytes of the model, the child's
peak RSS up to the end of quantization (load included).

Calibration: n sequences x seq tokens of the mixed default set (memopt.core.texts.mixed_calib_text:
docs, code, release notes; none of it a held-out text), or ``--calib pydoc`` for the pydoc topics
alone (the default before the held-out texts). Variants ending in ``+int8head`` keep the tied
embedding / lm_head in int8 (per channel) and the rest in the variant's format. A variant name
ending in ``@random`` or ``@hadamard`` (e.g. ``gptq@hadamard``, ``gptq+int8emb@random``) rotates the
residual stream first (memopt.quant.rotate.rotate_, that kind, seed 0; in memory: the streamed
``memopt quantize`` does not rotate), which unties the head: ``+int8head`` then keeps both the
embedding and the head in int8, ``+int8emb`` the embedding alone (the head by the variant's format).
``gptq+int8head+int8down`` also keeps every block's ``mlp.down_proj`` in int8 (per channel).

    .venv/bin/python bench/calibrate.py [--bits 4 3] [--group 64] [--variants rtn gptq]
                                        [--n 32] [--seq 256] [--calib mixed|pydoc] [--json]
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
    "gptq+int8head": {},  # GPTQ for the blocks, int8 for the tied embedding / lm_head
    "rtn+int8head": None,
    "gptq+int8emb": {},  # with a rotation (untied head): the embedding int8, the head GPTQ'd
    # the tied embedding / head and every block's mlp.down_proj int8, the rest GPTQ (README:
    # down_proj carries about a third of the legal text's excess)
    "gptq+int8head+int8down": {},
}
ROTATIONS = ("random", "hadamard")


def _split(variant: str) -> tuple[str, str | None]:
    """``"gptq+int8emb@hadamard"`` -> ``("gptq+int8emb", "hadamard")``."""
    base, _, rot = variant.partition("@")
    return base, rot or None


def _config(variant: str, bits: int, group: int) -> Any:
    from memopt.quant import Int4WeightOnly, Int8WeightOnly, IntNWeightOnly
    from memopt.quant.config import Mixed

    variant = _split(variant)[0]
    algo = "rtn" if VARIANTS[variant] is None else "gptq"
    base = (
        Int4WeightOnly(group_size=group, algo=algo)
        if bits == 4
        else IntNWeightOnly(bits=bits, group_size=group, algo=algo)
    )
    if variant.endswith("+int8down"):
        rules = (
            ("model.embed_tokens", Int8WeightOnly()),
            ("lm_head", Int8WeightOnly()),
            ("*.mlp.down_proj", Int8WeightOnly()),
        )
        return Mixed(rules=rules, default=base)
    if variant.endswith("+int8head"):  # tied: one weight; untied (rotated): both in int8
        return Mixed(
            rules=(("model.embed_tokens", Int8WeightOnly()), ("lm_head", Int8WeightOnly())),
            default=base,
        )
    if variant.endswith("+int8emb"):
        return Mixed(rules=(("model.embed_tokens", Int8WeightOnly()),), default=base)
    return base


def run_variant(variant: str, bits: int, group: int, n: int, seq: int, calib: str) -> dict:
    """In the child: load, quantize, evaluate. Returns JSON-able numbers."""
    import torch

    from memopt.core.modules import model_bytes
    from memopt.core.rss import peak_rss_bytes
    from memopt.core.texts import default_calib_text
    from memopt.evaluate import heldout_perplexities
    from memopt.models import load_model
    from memopt.quant import quantize_
    from memopt.quant.calibrate import GPTQSettings, calibrate_, calibration_ids

    torch.manual_seed(0)
    torch.set_num_threads(1)
    loaded = load_model("smollm2", dequantize=True)  # the float32 model: the GGUF dequantized
    name, rot = _split(variant)
    spec = VARIANTS[name]
    if rot is not None:
        from memopt.quant.rotate import rotate_

        rotate_(loaded.model, seed=0, kind=rot)  # exact on the float model: not quantizing time
    t0 = time.perf_counter()
    if spec == "fp32":
        pass
    elif spec is None:
        quantize_(loaded.model, _config(variant, bits, group))
    else:
        text = default_calib_text() if calib == "pydoc" else None
        ids = calibration_ids(loaded.tokenizer(), text, n, seq)
        t0 = time.perf_counter()  # tokenizing the calibration text is not quantizing
        calibrate_(loaded, _config(variant, bits, group), ids, settings=GPTQSettings(**spec))
    seconds = time.perf_counter() - t0
    peak_quant = peak_rss_bytes()
    held = heldout_perplexities(loaded, max_tokens=2048)
    return {
        "perplexity": held["pydoc"].perplexity,
        "heldout": {k: r.perplexity for k, r in held.items()},
        "quantize_seconds": seconds,
        "peak_rss_quantize_bytes": peak_quant,
        "model_bytes": model_bytes(loaded.model),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3], choices=(4, 3, 2))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=["rtn", "gptq", "gptq+int8head"])
    ap.add_argument("--n", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--calib", choices=("mixed", "pydoc"), default="mixed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bad = [
        v
        for v in args.variants
        if _split(v)[0] not in VARIANTS or _split(v)[1] not in (None, *ROTATIONS)
    ]
    if bad:
        ap.error(
            f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}, each optionally with "
            f"@{' or @'.join(ROTATIONS)}"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memopt.core.rss import run_in_child

    rows: list[dict[str, Any]] = []
    jobs = [("fp32", 0)] + [(v, b) for b in args.bits for v in args.variants if v != "fp32"]
    for variant, bits in jobs:
        r = run_in_child(
            "calibrate:run_variant", variant, bits, args.group, args.n, args.seq, args.calib
        )
        r.update(variant=variant, bits=bits or None, group_size=args.group if bits else None)
        rows.append(r)
        if not args.json:
            print(f"{variant} int{bits}: {r['heldout']}", file=sys.stderr, flush=True)
    fp32 = rows[0]["heldout"]
    for r in rows:
        r["ratio"] = {k: v / fp32[k] for k, v in r["heldout"].items()}
        r["worst"] = max(r["ratio"].values())
    result = {
        "model": "smollm2 (float weights = dequantized Q4_1)",
        "eval_texts": list(fp32),
        "calibration": {"n": args.n, "seq": args.seq, "text": args.calib},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    names = result["eval_texts"]
    t = Table(
        title=f"SmolLM2-135M, perplexity × float32 on 2,048 tokens of each held-out text; "
        f"calib {args.n}x{args.seq} ({args.calib})"
    )
    for col in ("variant", "bits", "group", *names, "worst", "quantize s", "peak RSS", "RAM"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        t.add_row(
            r["variant"],
            str(r["bits"] or "-"),
            str(r["group_size"] or "-"),
            *[f"{r['ratio'][k]:.3f}" for k in names],
            f"{r['worst']:.3f}",
            f"{r['quantize_seconds']:.0f}",
            f"{r['peak_rss_quantize_bytes'] / 2**20:.0f} MiB",
            f"{r['model_bytes'] / 1e6:.1f} MB",
        )
    Console(width=150).print(t)  # wide enough for every column, also when piped
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
