"""Bench: memopt's runtime against llama.cpp on the same files, one run (the runtime issue).

Parts (``--parts``, default all that can run here):

1. **speed**: greedy decode tokens/s at batch 1 with the KV cache, 1 and 2 threads, memopt against
   llama.cpp (llama-cpp-python, the ``bench`` extra) on the same weights class. Each pair runs in
   one fresh child process (memopt.core.rss.run_in_child), alternated A, B, A, B; the best round of
   each is kept and their ratio reported (the machine is shared: absolute speeds are not results).
   Rows on smollm2: the GGUF as shipped (Q4_1 + a Q8_0 embedding: memopt holds its blocks and runs
   them in its engine), Q8_0 and F32 GGUFs requantized from it by llama.cpp's own quantizer (memopt
   on the same files), memopt's int8 and int4 folders against Q8_0 / Q4_0; ``--big`` adds a
   random-initialised 1.07 B-parameter Llama (hidden 2048, 16 layers), its memopt int8 / int4 g32
   folders against llama.cpp on the same weights exported to GGUF by ``memopt export``.
   Weights in RAM: memopt's storages held (each counted once); llama.cpp's the file's tensors
   (memory-mapped).
2. **startup**: ``memopt run FOLDER --max-new-tokens 1`` of an int4 folder, the whole command's wall
   time, quiet and with one other process busy on one core; llama.cpp's load + one token beside it.

    .venv/bin/python bench/runtime.py [--parts speed startup] [--tokens 32] [--rounds 3]
        [--big] [--json] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "pair_job"]

PROMPT = [1, 504, 3458, 282, 4649, 314, 7042, 30, 198]  # an English prompt, as SmolLM2 ids


# --------------------------------------------------------------------------------------------------
# Child jobs (imported by name in a fresh process: ``runtime:<job>`` with bench/ on sys.path)


def _memopt_runner(path: str, threads: int, n: int) -> tuple[Any, int]:
    """(run() -> (tok/s, tokens), bytes of weights held) for memopt on ``path``."""
    import torch

    from memopt.core.modules import model_bytes

    torch.set_num_threads(threads)
    if Path(path).is_dir():
        from memopt.engine.lean import open_model

        lean = open_model(path, len(PROMPT) + n + 1)
        if lean is not None:

            def run() -> tuple[float, list[int]]:
                out = lean.generate(PROMPT, n, stop_at_eos=False)
                return out["tokens_per_s"], out["tokens"]

            held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for t in lean.engine.keep}.values())  # fmt: skip
            return run, held
    from memopt.generate import generate
    from memopt.models import load_model

    loaded = load_model(path)

    def run() -> tuple[float, list[int]]:  # noqa: F811
        out = generate(loaded, PROMPT, n, stop_at_eos=False)
        return out["tokens_per_s"], out["tokens"]

    return run, model_bytes(loaded.model)


def _llama_runner(path: str, threads: int, n: int) -> tuple[Any, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=256,
                verbose=False)  # fmt: skip

    def run() -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(PROMPT)
        tokens = [int(llm.sample(temp=0.0))]
        start = time.perf_counter()
        while len(tokens) < n:
            llm.eval([tokens[-1]])
            tokens.append(int(llm.sample(temp=0.0)))
        return (n - 1) / (time.perf_counter() - start), tokens

    return run, _gguf_tensor_bytes(path)


def _gguf_tensor_bytes(path: str) -> int:
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(path).tensors))


def pair_job(memopt_path: str, llama_path: str, threads: int, n: int, rounds: int) -> dict:
    """memopt and llama.cpp alternated in this process: the best tok/s of each, bytes, tokens."""
    a, a_bytes = _memopt_runner(memopt_path, threads, n)
    b, b_bytes = _llama_runner(llama_path, threads, n)
    a(), b()  # warm: first page faults, first calls
    best = {"memopt": 0.0, "llama.cpp": 0.0}
    toks: dict[str, list[int]] = {}
    for _ in range(rounds):
        for name, fn in (("memopt", a), ("llama.cpp", b)):
            tps, toks[name] = fn()
            best[name] = max(best[name], tps or 0.0)
    return {
        "threads": threads,
        "memopt_tok_s": best["memopt"],
        "llama_tok_s": best["llama.cpp"],
        "ratio": best["memopt"] / best["llama.cpp"] if best["llama.cpp"] else None,
        "memopt_weight_bytes": a_bytes,
        "llama_weight_bytes": b_bytes,
        "same_tokens": toks["memopt"] == toks["llama.cpp"],
        "first_diff": next(
            (
                i
                for i, (x, y) in enumerate(zip(toks["memopt"], toks["llama.cpp"], strict=False))
                if x != y
            ),
            None,
        ),  # fmt: skip
    }


# --------------------------------------------------------------------------------------------------
# Files


def _requantize(src: Path, dst: Path, ftype: str) -> Path:
    """A GGUF of another type written by llama.cpp's own quantizer (allowing requantization)."""
    import llama_cpp

    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.allow_requantize = True
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not write {dst.name} ({ftype}): {rc}")
    tmp.rename(dst)
    return dst


def _memopt(args: list[str]) -> None:
    exe = Path(sys.executable).with_name("memopt")
    subprocess.run([str(exe), *args], check=True, capture_output=True)


def _files(work: Path) -> dict[str, Path]:
    from memopt.models import resolve

    work.mkdir(parents=True, exist_ok=True)
    gguf = resolve("smollm2").path
    files = {"q4_1": gguf}
    files["q8_0"] = _requantize(gguf, work / "smollm2-q8_0.gguf", "MOSTLY_Q8_0")
    files["f32"] = _requantize(gguf, work / "smollm2-f32.gguf", "ALL_F32")
    files["q4_0"] = _requantize(gguf, work / "smollm2-q4_0.gguf", "MOSTLY_Q4_0")
    for name, method in (("int8", ["--method", "int8"]),
                         ("int4", ["--method", "int4", "--algo", "rtn", "--group-size", "32"])):  # fmt: skip
        out = work / f"smollm2-{name}"
        if not (out / "memopt.json").is_file():
            _memopt(["quantize", "smollm2", *method, "-o", str(out)])
        files[name] = out
    return files


# --------------------------------------------------------------------------------------------------
# Parts


def speed(work: Path, tokens: int, rounds: int, threads: list[int]) -> list[dict]:
    from memopt.core.rss import run_in_child

    files = _files(work)
    pairs = [  # (row, memopt's weights, llama.cpp's file)
        ("GGUF as shipped (Q4_1 + Q8_0 embedding), same file", files["q4_1"], files["q4_1"]),
        ("Q8_0 GGUF (requantized by llama.cpp), same file", files["q8_0"], files["q8_0"]),
        ("F32 GGUF, same file", files["f32"], files["f32"]),
        ("memopt int8 folder vs llama.cpp Q8_0", files["int8"], files["q8_0"]),
        ("memopt int4 g32 folder vs llama.cpp Q4_0", files["int4"], files["q4_0"]),
    ]
    rows = []
    for row, mine, theirs in pairs:
        for t in threads:
            out = run_in_child("runtime:pair_job", str(mine), str(theirs), t, tokens, rounds,
                               timeout=1800)  # fmt: skip
            out["row"] = row
            rows.append(out)
            print(f"  {row}, {t} thread(s): memopt {out['memopt_tok_s']:.1f} tok/s, llama.cpp "
                  f"{out['llama_tok_s']:.1f} ({out['ratio']:.2f}x)", file=sys.stderr)  # fmt: skip
    return rows


def _busy(seconds: float) -> subprocess.Popen:
    code = f"import time\nend=time.time()+{seconds}\nwhile time.time()<end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def startup(work: Path) -> list[dict]:
    files = _files(work)
    exe = str(Path(sys.executable).with_name("memopt"))
    cmd = [exe, "run", str(files["int4"]), "--prompt", "The capital of France is",
           "--max-new-tokens", "1"]  # fmt: skip
    llama = [sys.executable, "-c", "from llama_cpp import Llama; l = Llama(model_path="
             f"{str(files['q4_0'])!r}, n_ctx=64, verbose=False); l('Hi', max_tokens=1)"]  # fmt: skip
    rows = []
    for load in ("quiet", "one core busy"):
        for name, c in (
            ("memopt run int4 folder, 1 token", cmd),
            ("llama.cpp load + 1 token", llama),
        ):
            best = float("inf")
            for _ in range(3):
                busy = _busy(60) if load != "quiet" else None
                try:
                    t0 = time.perf_counter()
                    subprocess.run(c, check=True, capture_output=True)
                    best = min(best, time.perf_counter() - t0)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
            rows.append({"command": name, "load": load, "seconds": best})
            print(f"  {name}, {load}: {best:.2f} s", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--parts", nargs="*", default=["speed", "startup"], choices=["speed", "startup"]
    )
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds per pair")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--work", default="/tmp/memopt-bench-runtime", help="folder for the files")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # children import this as "runtime"
    work = Path(args.work)
    result: dict[str, Any] = {}
    if "speed" in args.parts:
        result["speed"] = speed(work, args.tokens, args.rounds, args.threads)
    if "startup" in args.parts:
        result["startup"] = startup(work)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    from rich.console import Console

    from memopt.report import format_bytes, rich_table

    console = Console()
    if "speed" in result:
        console.print(rich_table(
            "decode tok/s, batch 1, greedy, best of alternated rounds (same process)",
            ("weights", "threads", "memopt", "llama.cpp", "memopt / llama.cpp", "memopt weights",
             "llama.cpp weights", "same tokens"),
            [(r["row"], r["threads"], f"{r['memopt_tok_s']:.1f}", f"{r['llama_tok_s']:.1f}",
              f"{r['ratio']:.2f}x", format_bytes(r["memopt_weight_bytes"]),
              format_bytes(r["llama_weight_bytes"]),
              "yes" if r["same_tokens"] else f"from token {r['first_diff']}")
             for r in result["speed"]],
        ))  # fmt: skip
    if "startup" in result:
        console.print(rich_table(
            "whole command, seconds (best of 3)", ("command", "machine", "seconds"),
            [(r["command"], r["load"], f"{r['seconds']:.2f}") for r in result["startup"]],
        ))  # fmt: skip


if __name__ == "__main__":
    main()
