"""Bench: loading the bundled SmolLM2 GGUF (Q4_1) with memopt against transformers, same run.

Each load runs in a fresh Python process, so that neither warms the other (imports, page cache of
the interpreter's modules, allocator state); the imports that both need (torch, transformers, and
memopt.models for memopt, and transformers' Llama modeling code, which both build the model from) are
timed separately from the load itself. memopt's load is repeated and
the median taken; transformers' (~15 s) once unless asked. Both children compute the logits of one
short prompt, and the table ends with their largest absolute difference.

transformers' ``from_pretrained(folder, gguf_file=...)`` requires the ``accelerate`` package; without
it, the bench runs what from_pretrained does for a llama GGUF by hand: the config from the file,
``load_gguf_checkpoint`` (its conversion: reader, dequantization, q/k un-permutation) and
``load_state_dict``; the table says which.

    .venv/bin/python bench/load.py [--repeats 3] [--transformers-repeats 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["main"]

PROMPT_IDS = [1, 504, 3458, 5250, 11, 359, 253, 1345, 42, 29, 37, 64]

# Runs in the child. argv: loader ("memopt" | "transformers"), path to write the logits (.npy).
CHILD = r"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
import numpy as np
import torch, transformers
import transformers.models.llama.modeling_llama  # library code both loaders need: an import
import memopt.models as mm
imports = time.perf_counter() - t0
loader, out = sys.argv[1], sys.argv[2]
path = mm.resolve("smollm2").path
ids = torch.tensor([[PROMPT_IDS]])
w0, c0 = time.perf_counter(), time.process_time()
if loader == "memopt":
    model = mm.load_model("smollm2", dtype=torch.float32).model  # dequantized, as transformers
    method = "load_model"
elif importlib.util.find_spec("accelerate") is not None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    method = "from_pretrained"
else:
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta)["tensors"]
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    method = "load_gguf_checkpoint*"
load_s, load_cpu_s = time.perf_counter() - w0, time.process_time() - c0
with torch.no_grad():
    logits = model.eval()(ids).logits
np.save(out, logits.numpy())
print(json.dumps({"imports_s": imports, "load_s": load_s, "load_cpu_s": load_cpu_s, "method": method}))
""".replace("PROMPT_IDS", ", ".join(map(str, PROMPT_IDS)))


def _run(loader: str, logits_file: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, loader, str(logits_file)],
        capture_output=True,
        text=True,
        env=None,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"bench/load.py: the {loader} child failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(loader: str, repeats: int, tmp: Path) -> tuple[dict[str, Any], Path]:
    runs = []
    logits_file = tmp / f"{loader}.npy"
    for _ in range(repeats):
        runs.append(_run(loader, logits_file))
    return {
        "loader": loader,
        "method": runs[0]["method"],
        "runs": len(runs),
        "imports_s": statistics.median(r["imports_s"] for r in runs),
        "load_s": statistics.median(r["load_s"] for r in runs),
        "load_cpu_s": statistics.median(r["load_cpu_s"] for r in runs),
        "load_s_all": [round(r["load_s"], 3) for r in runs],
    }, logits_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="memopt loads (median taken)")
    parser.add_argument("--transformers-repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.transformers_repeats < 1:
        parser.error("repeats must be at least 1")

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="memopt-bench-") as tmpdir:
        tmp = Path(tmpdir)
        ours, ours_logits = _measure("memopt", args.repeats, tmp)
        theirs, their_logits = _measure("transformers", args.transformers_repeats, tmp)
        diff = float(np.abs(np.load(ours_logits) - np.load(their_logits)).max())

    result = {
        "model": "smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1, dequantized to float32)",
        "memopt": ours,
        "transformers": theirs,
        "speedup": theirs["load_s"] / ours["load_s"],
        "max_abs_logits_diff": diff,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    _table(result)
    return 0


def _table(result: dict[str, Any]) -> None:
    rows = [result["memopt"], result["transformers"]]
    head = ["loader", "method", "imports s", "load s (median)", "load CPU s", "runs", "vs memopt"]
    body = [
        [
            r["loader"],
            r["method"],
            f"{r['imports_s']:.2f}",
            f"{r['load_s']:.2f}",
            f"{r['load_cpu_s']:.2f}",
            str(r["runs"]),
            f"{r['load_s'] / rows[0]['load_s']:.1f}x",
        ]
        for r in rows
    ]
    title = f"Load {result['model']}"
    foot = (
        "* from_pretrained(gguf_file=) needs accelerate (not installed): its steps for a llama GGUF,"
        " run by hand: AutoConfig from the file, load_gguf_checkpoint, load_state_dict.\n"
        if rows[1]["method"].endswith("*")
        else ""
    ) + (
        f"transformers / memopt load time: {result['speedup']:.1f}x; "
        f"max |logits difference| on a {len(PROMPT_IDS)}-token prompt: {result['max_abs_logits_diff']:.3g}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
        print(title)
        for line in [head, *body]:
            print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)))
        print(foot)
        return
    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 2 else "right")
    for line in body:
        table.add_row(*line)
    console = Console(width=max(100, Console().width))
    console.print(table)
    console.print(foot)


if __name__ == "__main__":
    raise SystemExit(main())
