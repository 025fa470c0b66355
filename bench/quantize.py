"""Bench: memopt's int8 / int4 against torchao and bitsandbytes on minilm and smollm2, one run.

Per model and variant, two fresh child processes (memopt.core.rss.run_in_child):

1. quantize: memopt streams the source into a saved folder (``memopt quantize``'s path); a peer loads
   the float32 model (as its users must) and quantizes it in place, then saves its state dict with
   torch.save (its own format). Reported: seconds, the child's peak RSS above its import baseline
   (torch + memopt imported in every child alike), bytes in RAM (every tensor of the state, a
   torchao tensor subclass counted by its inner tensors, bitsandbytes' quantization state
   included; shared storages once) and bytes on disk.
2. measure: the quantized model (memopt: loaded from the folder) beside the float32 model in the
   same process. Quality: minilm ``cosine_min`` / ``cosine_mean`` of 64 mean-pooled sentence
   embeddings vs float32; smollm2 perplexity on 2,048 tokens (memopt.evaluate), as a ratio to the
   float32 perplexity measured in the float32 child. Latency at batch 1: minilm one sentence
   encoded; smollm2 decode tokens/s over 32 greedy tokens (memopt.generate, prefill excluded).
   Rounds interleave the quantized and the float32 model, the best of each is kept and the
   reported figure is their ratio (speed-up vs float32, > 1 = faster): the machine is shared,
   absolute times are not results.

smollm2's float weights are dequantized Q4_1 (the GGUF it ships as). memopt int4 is the CLI default
(GPTQ, group 64, calibrated on the mixed default set: docs, code, release notes; none of it a
held-out text); ``--quick`` uses round-to-nearest instead and fewer rounds. smollm2's perplexity
is measured on each held-out text (memopt.core.texts.HELDOUT: ``pydoc`` the Python docs' prose,
``license`` CPython's LICENSE.txt, ``news`` IDLE's release notes, ``code`` the json package's
source), each a ratio to float32's on the same text; ``perplexity`` alone is pydoc's.

    .venv/bin/python bench/quantize.py [--quick] [--threads N] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch  # imported here, so that every child's import baseline holds torch and memopt
from torch import nn

import memopt.quant.stream  # noqa: F401 (same reason)

__all__ = ["main", "measure_job", "quantize_job", "ram_bytes"]

# variant -> (library, description); "memopt:<method>" variants go through memopt quantize
VARIANTS: dict[str, tuple[str, str]] = {
    "float32": ("-", "float32"),
    "memopt int8": ("memopt", "int8: per-channel matmul weights, embeddings in groups of 128"),
    "memopt int4": ("memopt", "int4 GPTQ g64 (rtn g64 on minilm, an encoder)"),
    "memopt int4 rtn": ("memopt", "int4 round-to-nearest g64"),
    "memopt int3": ("memopt", "int3 GPTQ g64 (`--method int3 --group-size 64 --algo gptq`)"),
    "memopt int3 rtn": ("memopt", "int3 round-to-nearest g64"),
    "memopt int2": ("memopt", "int2 GPTQ g64"),
    "torchao int8": ("torchao", "Int8WeightOnlyConfig, every nn.Linear"),
    "torchao int4": ("torchao", "Int4WeightOnlyConfig(group_size=64)"),
    "bnb int8": ("bitsandbytes", "Linear8bitLt (threshold 0), Linears but lm_head"),
    "bnb nf4": ("bitsandbytes", "Linear4bit nf4, Linears but lm_head"),
}
FULL = {
    "minilm": ["float32", "memopt int8", "memopt int4", "torchao int8", "torchao int4",
               "bnb int8", "bnb nf4"],
    "smollm2": ["float32", "memopt int8", "memopt int4", "memopt int4 rtn", "memopt int3",
                "memopt int3 rtn", "memopt int2", "torchao int8", "torchao int4", "bnb int8",
                "bnb nf4"],
}  # fmt: skip
QUICK = {
    "minilm": ["float32", "memopt int8", "torchao int8", "bnb int8"],
    "smollm2": ["float32", "memopt int8", "memopt int4 rtn", "torchao int8"],
}
PROMPT = "The Python language reference describes"


# ---- bytes ----


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a tensor subclass: its inner tensors)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for n in names for leaf in _leaves(getattr(t, n))]


def ram_bytes(model: nn.Module) -> int:
    """Bytes of every tensor of the model's state (parameters, buffers, a peer's extra state),
    each storage once."""
    seen: dict[int, int] = {}
    for t in model.state_dict(keep_vars=True).values():
        if not isinstance(t, torch.Tensor):
            continue
        for leaf in _leaves(t):
            st = leaf.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


# ---- peers ----


def _peer_quantize(loaded: Any, variant: str) -> None:
    """Quantize ``loaded.model`` in place with a peer library (raises if it cannot)."""
    model = loaded.model
    if variant.startswith("torchao"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        cfg = Int8WeightOnlyConfig() if variant == "torchao int8" else Int4WeightOnlyConfig(64)
        quantize_(model, cfg)
        return
    import bitsandbytes as bnb

    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear) or name.endswith("lm_head"):
            continue  # transformers' bitsandbytes integration keeps lm_head in float too
        bias = lin.bias is not None
        w = lin.weight.data.clone()
        if variant == "bnb int8":
            new = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias, has_fp16_weights=False, threshold=0.0
            )
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias, torch.float32, quant_type="nf4"
            )
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        if bias:
            new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        new = new.to("cpu")  # bitsandbytes quantizes on the move to a device
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def _memopt_config(model: str, variant: str) -> Any:
    from memopt.quant import Int4WeightOnly
    from memopt.quant.config import method_config

    if variant == "memopt int8":
        return method_config("int8")
    if variant.startswith(("memopt int3", "memopt int2")):
        bits = variant.split()[1]
        return method_config(bits, 64, "rtn" if variant.endswith("rtn") else "gptq")
    if variant == "memopt int4" and model == "smollm2":
        return method_config("int4")  # GPTQ g64: the CLI's default
    return Int4WeightOnly(group_size=64, algo="rtn")


# ---- child jobs ----


def quantize_job(model: str, variant: str, out: str) -> dict[str, Any]:
    """In a child: quantize (and save) one variant; bytes, seconds."""
    import transformers  # noqa: F401 (imported before any timing, in every variant alike)

    from memopt.models import load_model
    from memopt.models import saved as io

    if variant == "float32":
        loaded = load_model(model, dequantize=True)  # smollm2: the GGUF dequantized to float32
        return {"ram_bytes": ram_bytes(loaded.model), "quant_seconds": None, "disk_bytes": None}
    if variant.startswith("memopt"):
        from memopt.quant.stream import quantize_model

        r = quantize_model(model, _memopt_config(model, variant), out)
        return {
            "ram_bytes": r["bytes_after"],
            "disk_bytes": io.disk_bytes(out),
            "quant_seconds": r["seconds"],
        }
    loaded = load_model(model, dequantize=True)
    t0 = time.perf_counter()
    _peer_quantize(loaded, variant)
    seconds = time.perf_counter() - t0
    path = Path(out) / "state.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(loaded.model.state_dict(), path)
    return {
        "ram_bytes": ram_bytes(loaded.model),
        "disk_bytes": path.stat().st_size,
        "quant_seconds": seconds,
    }


def _best_rate(fns: dict[str, Any], rounds: int, seconds: float = 90.0) -> dict[str, float]:
    """Highest rate (what each ``fn`` returns) per path over interleaved rounds: ``rounds``, or
    fewer (at least 2) once ``seconds`` have passed (bitsandbytes decodes ~16x slower here)."""
    best = {k: 0.0 for k in fns}
    start = time.perf_counter()
    for i in range(rounds):
        if i >= 2 and time.perf_counter() - start > seconds:
            break
        for k, fn in fns.items():
            best[k] = max(best[k], fn())
    return best


def measure_job(model: str, variant: str, out: str, threads: int, rounds: int) -> dict[str, Any]:
    """In a child: quality and batch-1 speed of one variant beside float32, same process."""
    from memopt.evaluate import default_sentences, embedding_cosine, perplexity
    from memopt.generate import generate
    from memopt.models import load_model

    torch.set_num_threads(threads)
    ref = load_model(model, dequantize=True)  # float32 (smollm2: the GGUF dequantized)
    if variant == "float32":
        q = ref
    elif variant.startswith("memopt"):
        q = load_model(out)
    else:
        q = load_model(model, dequantize=True)
        _peer_quantize(q, variant)
    res: dict[str, Any] = {}
    if ref.task == "causal-lm":
        from memopt.evaluate import heldout_perplexities

        # every held-out text (docs, legal, release notes, code: memopt.core.texts.HELDOUT);
        # "perplexity" stays the pydoc text's, as before
        held = heldout_perplexities(q)
        res["heldout"] = {k: r.perplexity for k, r in held.items()}
        res["perplexity"] = (
            held["pydoc"].perplexity if "pydoc" in held else perplexity(q).perplexity
        )

        def decode(m: Any) -> Any:
            return lambda: generate(m, PROMPT, 32, stop_at_eos=False)["tokens_per_s"]

        rate = _best_rate({"q": decode(q), "fp32": decode(ref)}, rounds)
        res["tokens_per_s"] = rate["q"]
        res["fp32_tokens_per_s"] = rate["fp32"]
    else:
        if q is not ref:
            c = embedding_cosine(q, ref)
            res.update(cosine_min=c.cosine_min, cosine_mean=c.cosine_mean)
        enc = ref.tokenizer()(default_sentences(1), return_tensors="pt")

        def encode(m: Any) -> Any:
            def run() -> float:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for _ in range(5):
                        m.model(**enc)
                    return 5 / (time.perf_counter() - t0)

            run()  # warm-up (and the autotuner's choices)
            return run

        rate = _best_rate({"q": encode(q), "fp32": encode(ref)}, rounds * 3)
        res["encodes_per_s"] = rate["q"]
        res["fp32_encodes_per_s"] = rate["fp32"]
    res["speedup"] = (res.get("tokens_per_s") or res["encodes_per_s"]) / (
        res.get("fp32_tokens_per_s") or res["fp32_encodes_per_s"]
    )
    return res


def bound_job() -> dict[str, Any]:
    """In a child: the one import baseline (memopt.core.rss.import_baseline), nothing else."""
    from memopt.core.rss import import_baseline

    import_baseline()
    return {}


# ---- the run ----


def run(
    quick: bool, threads: int, rounds: int, models: list[str] | None, only: list[str] | None
) -> dict[str, Any]:
    from memopt.core.rss import ChildProcessFailed, run_in_child

    plan = {
        m: [v for v in vs if v == "float32" or only is None or v in only]
        for m, vs in (QUICK if quick else FULL).items()
        if models is None or m in models
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="memopt-bench-quant-") as tmp:
        for model, variants in plan.items():
            for variant in variants:
                out = str(Path(tmp) / f"{model}-{variant.replace(' ', '-')}")
                row: dict[str, Any] = {"model": model, "variant": variant}
                try:
                    q = run_in_child("quantize:quantize_job", model, variant, out)
                    row.update(q)
                    row["peak_rss_bytes"] = q["peak_rss_bytes"]
                    row["quant_peak_rss_above_baseline"] = (
                        q["peak_rss_bytes"] - q["baseline_rss_bytes"]
                    )
                    m = run_in_child("quantize:measure_job", model, variant, out, threads, rounds)
                    row.update({k: v for k, v in m.items() if not k.endswith("rss_bytes")})
                except ChildProcessFailed as e:
                    row["error"] = f"{e.exc_type}: {e.message}"[:160]
                rows.append(row)
                print(f"{model} {variant}: {row.get('error') or 'done'}", file=sys.stderr)
    for model in plan:
        base = next(r for r in rows if r["model"] == model and r["variant"] == "float32")
        for r in rows:
            if r["model"] != model or "error" in r:
                continue
            r["ram_ratio"] = r["ram_bytes"] / base["ram_bytes"]
            if "perplexity" in r:
                r["ppl_ratio"] = r["perplexity"] / base["perplexity"]
            if "heldout" in r and "heldout" in base:
                r["heldout_ratio"] = {
                    k: v / base["heldout"][k]
                    for k, v in r["heldout"].items()
                    if k in base["heldout"]
                }
    extra: dict[str, Any] = {}
    int4 = next(
        (r for r in rows if r["variant"] == "memopt int4" and r["model"] == "smollm2"), None
    )
    if int4 is not None and "error" not in int4:
        b = run_in_child("quantize:bound_job")
        largest = 49152 * 576 * 4  # the float32 embedding / tied head
        extra["smollm2_int4_rss_bound"] = {
            "peak_rss_bytes": int4["peak_rss_bytes"],
            "bound_bytes": b["peak_rss_bytes"] + int4["ram_bytes"] + largest,
            "import_baseline_bytes": b["peak_rss_bytes"],
        }
    return {"threads": threads, "rounds": rounds, "rows": rows, **extra}


def _mb(x: Any) -> str:
    return "-" if x is None else f"{x / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a fast subset (int4 by rtn, 2 rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads when timing (default 1)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--save-json", metavar="FILE", help="also write the JSON result to FILE")
    ap.add_argument("--models", nargs="+", choices=list(FULL), help="a subset of the models")
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help="a subset (float32 always runs)"
    )
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # children import this module
    rounds = args.rounds or (2 if args.quick else 5)
    result = run(args.quick, args.threads, rounds, args.models, args.variants)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        result["note_bnb"] = "bitsandbytes is not installed: its rows are errors"
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)  # wide enough for every column, also when piped
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        quality = "cosine min / mean" if model == "minilm" else "perplexity (× fp32)"
        speed = "encode" if model == "minilm" else "decode"
        t = Table(title=f"{model}: batch 1, {args.threads} thread(s), best of {rounds} rounds")
        for col in ("variant", "RAM", "× fp32", "disk", quality, f"{speed} × fp32",
                    "quantize s", "peak RSS quantizing"):  # fmt: skip
            t.add_column(col, justify="left" if col == "variant" else "right")
        for r in result["rows"]:
            if r["model"] != model:
                continue
            if "error" in r:
                t.add_row(r["variant"], f"[dim]{r['error']}[/dim]", *[""] * 6)
                continue
            if model == "minilm":
                q = (
                    f"{r['cosine_min']:.5f} / {r['cosine_mean']:.5f}"
                    if "cosine_min" in r
                    else "(reference)"
                )
            else:
                q = f"{r['perplexity']:.3f} ({r['ppl_ratio']:.4f}×)"
            t.add_row(
                r["variant"],
                _mb(r["ram_bytes"]),
                f"{r['ram_ratio']:.3f}×",
                _mb(r.get("disk_bytes")),
                q,
                f"{r['speedup']:.2f}×",
                "-" if r.get("quant_seconds") is None else f"{r['quant_seconds']:.1f}",
                _mb(r.get("quant_peak_rss_above_baseline")),
            )
        console.print(t)
        held = [r for r in result["rows"] if r["model"] == model and "heldout_ratio" in r]
        if held:
            names = list(held[0]["heldout_ratio"])
            h = Table(title=f"{model}: perplexity × float32 on each held-out text (first 2,048 "
                            "tokens; none is calibration text)")  # fmt: skip
            for col in ("variant", *names, "worst"):
                h.add_column(col, justify="left" if col == "variant" else "right")
            for r in held:
                ratios = [r["heldout_ratio"][k] for k in names]
                h.add_row(r["variant"], *[f"{x:.4f}" for x in ratios], f"{max(ratios):.4f}")
            console.print(h)
    b = result.get("smollm2_int4_rss_bound")
    if b is not None:
        ok = "within" if b["peak_rss_bytes"] <= b["bound_bytes"] else "ABOVE"
        console.print(
            f"smollm2 int4 streamed: peak RSS {_mb(b['peak_rss_bytes'])} {ok} the bound "
            f"{_mb(b['bound_bytes'])} (imports {_mb(b['import_baseline_bytes'])} + output + "
            "113.2 MB largest float32 tensor)"
        )
    console.print(
        "peak RSS quantizing: above the child's torch+memopt import baseline; peers load the "
        "float32 model first, memopt streams the source. quantize s: memopt's whole streamed run "
        "(read, quantize, write), a peer's quantize call. The float32 row's speed is float32 "
        "against itself: the noise of this run. bitsandbytes runs on this CPU (its optional hub "
        "kernels are not fetched)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
