"""Bench: memory-mapped loading, streamed generation under a budget, and data layout (issue 7).

Three parts, each child-process measured (``memopt.core.rss.run_in_child``: peak RSS over the
child's import baseline):

1. **load**: the same SmolLM2 float32 weights (538 MB) loaded by memopt's mapping
   (``SafetensorsReader``), ``safetensors.torch.load_file``, and ``torch.load`` of a ``torch.save``
   file of the same tensors (bench only: memopt itself never unpickles), plain and ``mmap=True``.
   Load time, then RSS (anonymous = a copy; file = the page cache's pages, mapped) after the load
   and after reading every byte.
2. **stream**: greedy generation of SmolLM2 float32 (an HF folder in execution order, written once
   from the GGUF: its float weights are dequantized Q4_1), int4 (a memopt folder, group 64) and
   the bundled GGUF in its stored form (``gguf``: Q4_1 / Q8_0 blocks, 96.6 MB) at budgets of
   100 %, 50 % and 25 % of the model's bytes (for the GGUF: of its float32 bytes, 538 MB, and at
   ``--gguf-stored-shares`` of its stored bytes, below which blocks stream), page cache warm, cold
   and evicted after every use, against the unbudgeted in-memory run of the same file
   (``load_model`` + ``generate``: the GGUF's blocks through the decode engine). Cold =
   ``posix_fadvise(DONTNEED)`` on the weight file before the child starts (the table says how much
   of the file was still cached: ``mincore``); evict = the same, and each streamed unit's file range
   again after each use (every pass reads the disk). Same tokens is checked, not assumed.
3. **layout**: channels-last against contiguous for the case-1 CNN on this CPU; and whether each
   weight file is in execution order.

    .venv/bin/python bench/stream.py [--tokens 16] [--threads 1] [--json] [--work DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

IDS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 198]  # a short English prompt, as ids
MB = 1e6


# --------------------------------------------------------------------------------------------------
# Child jobs (imported by name in a fresh process: ``stream:<job>`` with bench/ on sys.path)


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def load_job(kind: str, path: str) -> dict[str, Any]:
    import torch

    r0 = _rss()
    start = time.perf_counter()
    if kind == "memopt-mmap":
        from memopt.formats.safetensors import SafetensorsReader

        src = SafetensorsReader(path)
        tensors = {n: src.get(n) for n in src.names()}
    elif kind == "safetensors.load_file":
        from safetensors.torch import load_file

        tensors = load_file(path)
    elif kind == "torch.load":
        tensors = torch.load(path, weights_only=True)
    elif kind == "torch.load(mmap=True)":
        tensors = torch.load(path, weights_only=True, mmap=True)
    else:
        raise ValueError(kind)
    load_s = time.perf_counter() - start
    r1 = _rss()
    total = sum(float(t.float().sum()) for t in tensors.values())  # read every byte
    touch_s = time.perf_counter() - start - load_s
    r2 = _rss()
    return {
        "load_s": load_s,
        "touch_s": touch_s,
        "anon_after_load": r1["RssAnon"] - r0["RssAnon"],
        "file_after_load": r1["RssFile"] - r0["RssFile"],
        "anon_after_read": r2["RssAnon"] - r0["RssAnon"],
        "file_after_read": r2["RssFile"] - r0["RssFile"],
        "checksum": total,
    }


def inmem_job(
    model: str, ids: list[int], n: int, threads: int, stored: bool = False
) -> dict[str, Any]:
    """``stored``: a GGUF as shipped (its blocks, the form the streamed GGUF runs hold); else
    dequantized (the float model the streamed float32 folder holds; folders ignore it)."""
    import torch

    from memopt.generate import generate
    from memopt.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model) if stored else load_model(model, dequantize=True)
    out = generate(loaded, ids, n, stop_at_eos=False)
    return {k: out[k] for k in ("tokens", "tokens_per_s", "prefill_s", "engine")}


def stream_job(
    model: str,
    ids: list[int],
    n: int,
    budget: int,
    threads: int,
    warmup: bool = True,
    evict: bool = False,
) -> dict[str, Any]:
    """``warmup=False`` for a cold cache: the first forward (prefill_s) is then the one that reads
    the file from disk; later tokens find it cached (released pages stay in the page cache).
    ``evict``: every streamed unit leaves the page cache after use too, so every pass reads it
    from disk again (:func:`_evict_after_use`)."""
    import torch

    from memopt.stream.run import run

    torch.set_num_threads(threads)
    if evict:
        _evict_after_use()
    out = run(model, ids, n, budget, eos_token_id=-1, warmup=warmup)
    keep = ("tokens", "tokens_per_s", "prefill_s", "plan", "stream", "engine")
    return {k: out[k] for k in keep}


def _evict_after_use() -> None:
    """Make each released unit leave the page cache as well as the process: after the streamer's
    ``madvise(MADV_DONTNEED)``, ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the same file range. The
    next pass then reads those blocks from disk again: a page cache too small to hold the model
    (the case of a model larger than RAM), on this machine's disk. Bench only (patched in the
    child): the library keeps released pages cached, which is what a user with room for them wants.
    """
    import memopt.stream.executor as ex
    from memopt.formats import safetensors as st_format

    maps: list[tuple[int, int, int]] = []  # (address of the mapping, its length, an fd of the file)
    init = st_format.SafetensorsReader.__init__

    def patched_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for file, mm in zip(self.files, self._maps, strict=True):
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            maps.append((base, len(mm), os.open(file, os.O_RDONLY)))

    st_format.SafetensorsReader.__init__ = patched_init  # type: ignore[method-assign]
    gguf_init = ex._GGUFReader.__init__

    def patched_gguf_init(self: Any, path: Any) -> None:
        gguf_init(self, path)
        base, size = self.src.region()  # the whole file's mapping
        maps.append((base, size, os.open(path, os.O_RDONLY)))

    ex._GGUFReader.__init__ = patched_gguf_init  # type: ignore[method-assign]
    release = ex.release

    def release_and_evict(spans: list[Any]) -> None:
        release(spans)
        for s in spans:
            for base, size, fd in maps:
                if base <= s.start < base + size:
                    os.posix_fadvise(fd, s.start - base, s.nbytes, os.POSIX_FADV_DONTNEED)

    ex.release = release_and_evict


# --------------------------------------------------------------------------------------------------
# Helpers


def cached_fraction(path: Path) -> float:
    """Share of a file's pages in the page cache (``mincore`` on a fresh mapping)."""
    import numpy as np

    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    arr = np.frombuffer(mm, dtype=np.uint8)  # only for the mapping's address; nothing is read
    rc = libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), vec)
    frac = sum(v & 1 for v in vec) / pages if rc == 0 else float("nan")
    del arr
    mm.close()
    return frac


def make_cold(path: Path) -> str:
    """Evict ``path`` from the page cache; returns how. ``posix_fadvise(DONTNEED)`` on the file
    first (it touches nothing else on this shared machine); the global ``drop_caches`` only if
    that left pages cached."""
    from memopt.core.pages import drop_page_cache

    if drop_page_cache(path) and cached_fraction(path) < 0.01:
        return "posix_fadvise(DONTNEED)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return "drop_caches"
    except OSError:
        return "none (page cache could not be dropped)"


def prepare(work: Path) -> dict[str, Path]:
    """The float32 HF folder (execution order), an int4 memopt folder and a torch.save file."""
    work.mkdir(parents=True, exist_ok=True)
    f32, int4, pt = work / "smollm2-f32", work / "smollm2-int4", work / "smollm2-f32.pt"
    if not (f32 / "model.safetensors").is_file() or not pt.is_file():
        import torch

        from memopt.models import load_model
        from memopt.stream.layout import save_float_folder

        loaded = load_model("smollm2", dequantize=True)
        save_float_folder(loaded, f32)
        seen, state = set(), {}
        for name, t in loaded.model.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                state[name] = t.detach()
        torch.save(state, pt)
        del loaded, state
    if not (int4 / "memopt.json").is_file():
        from memopt.quant import Int4WeightOnly
        from memopt.quant.stream import quantize_model

        # round to nearest: streaming reads the same bytes whatever chose the codes (GPTQ would
        # only add minutes of calibration to the bench)
        quantize_model("smollm2", Int4WeightOnly(group_size=64, algo="rtn"), int4)
    return {"f32": f32, "int4": int4, "pt": pt}


def _child(job: str, *args: Any) -> dict[str, Any]:
    from memopt.core.rss import run_in_child

    out = run_in_child(f"stream:{job}", *args, timeout=1800)
    out["over_baseline"] = int(out["peak_rss_bytes"]) - int(out["baseline_rss_bytes"])
    return out


# --------------------------------------------------------------------------------------------------
# The three parts


def bench_load(paths: dict[str, Path]) -> list[dict[str, Any]]:
    rows = []
    st = str(paths["f32"] / "model.safetensors")
    for kind, path in (
        ("memopt-mmap", st),
        ("safetensors.load_file", st),
        ("torch.load", str(paths["pt"])),
        ("torch.load(mmap=True)", str(paths["pt"])),
    ):
        _child("load_job", kind, path)  # warm the page cache for this file: compare warm loads
        out = _child("load_job", kind, path)
        rows.append({"loader": kind, **{k: out[k] for k in out if k != "result"}})
    return rows


def _sources(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Each model streamed: its source, the file read, the bytes its shares are of, and whether the
    in-memory reference loads it as stored (a GGUF's blocks) or dequantized."""
    from memopt.models import resolve
    from memopt.stream import plan_budget

    gguf = resolve("smollm2").path
    return {
        "float32": {"source": paths["f32"], "file": paths["f32"] / "model.safetensors",
                    "stored": False},
        "int4": {"source": paths["int4"], "file": paths["int4"] / "model.safetensors",
                 "stored": False},
        # shares of its float32 bytes (the f32 folder's: the same weights, dequantized)
        "gguf": {"source": gguf, "file": gguf, "stored": True,
                 "share_of": plan_budget(paths["f32"], None).model_bytes},
    }  # fmt: skip


def bench_stream(
    paths: dict[str, Path],
    tokens: int,
    threads: int,
    repeats: int = 3,
    caches: tuple[str, ...] = ("warm", "cold", "evict"),
    models: tuple[str, ...] = ("float32", "int4", "gguf"),
    shares: tuple[float, ...] = (1.0, 0.5, 0.25),
    gguf_stored_shares: tuple[float, ...] = (0.75, 0.6),
) -> dict[str, Any]:
    """Rows of (model, budget, cache). ``warm``: the file read once before; ``cold``: evicted
    before the child starts (the first pass reads the disk, later passes find the pages cached);
    ``evict``: evicted before, and every streamed unit evicted again after use (every pass reads
    the disk: a page cache that cannot hold the model). ``evict`` runs once (it is slow).

    Budgets are ``shares`` of the model's bytes (the GGUF: of its float32 bytes), and for the GGUF
    also ``gguf_stored_shares`` of its stored bytes (below them, blocks stream)."""
    from memopt.core.errors import MemoptError
    from memopt.stream import plan_budget

    rows: list[dict[str, Any]] = []
    how_cold = None
    for label, src in _sources(paths).items():
        if label not in models:
            continue
        folder, weights = src["source"], src["file"]
        ref = [_child("inmem_job", str(folder), IDS, tokens, threads, src["stored"])
               for _ in range(repeats)]  # fmt: skip
        ref_tps = statistics.median(r["tokens_per_s"] for r in ref)
        model_bytes = plan_budget(folder, None, tokens=len(IDS) + tokens).model_bytes
        rows.append({
            "model": label, "budget": "in-memory", "cache": "warm", "budget_bytes": None,
            "over_baseline": max(r["over_baseline"] for r in ref),
            "tokens_per_s": ref_tps, "ratio": 1.0, "same_tokens": True,
            "prefill_s": statistics.median(r["prefill_s"] for r in ref),
            "pinned": None, "streamed": None, "engine": ref[0]["engine"],
            "model_bytes": model_bytes,
        })  # fmt: skip
        budgets = [(f"{share:.0%}", int(src.get("share_of", model_bytes) * share))
                   for share in shares]  # fmt: skip
        if label == "gguf":
            budgets += [(f"{share:.0%} stored", int(model_bytes * share))
                        for share in gguf_stored_shares]  # fmt: skip
        for name, budget in budgets:
            try:
                plan = plan_budget(folder, budget, tokens=len(IDS) + tokens, prompt_tokens=len(IDS))
            except MemoptError as exc:
                rows.append({
                    "model": label, "budget": name, "cache": "-", "budget_bytes": budget,
                    "refused": str(exc),
                })  # fmt: skip
                continue
            for cache in caches:
                cached = None
                if cache != "warm":
                    how_cold = make_cold(weights)
                    cached = cached_fraction(weights)
                else:
                    _warm(weights)  # read once: its pages in the page cache
                runs = []
                for _ in range(1 if cache == "evict" else repeats):
                    if cache != "warm" and runs:
                        make_cold(weights)
                    warm, evict = cache == "warm", cache == "evict"
                    runs.append(
                        _child("stream_job", str(folder), IDS, tokens, budget, threads, warm, evict)
                    )
                runs.sort(key=lambda r: r["tokens_per_s"])
                out = runs[len(runs) // 2]  # the median run (by speed)
                out["over_baseline"] = max(r["over_baseline"] for r in runs)  # the worst peak
                rows.append({
                    "model": label, "budget": name, "cache": cache,
                    "budget_bytes": budget, "over_baseline": out["over_baseline"],
                    "predicted": plan.predicted_peak_bytes,
                    "tokens_per_s": out["tokens_per_s"],
                    "prefill_s": out["prefill_s"],
                    "ratio": out["tokens_per_s"] / ref_tps,
                    "same_tokens": out["tokens"] == ref[0]["tokens"],
                    "pinned": len(out["plan"]["pinned_blocks"]),
                    "streamed": out["plan"]["streamed_units"],
                    "engine": out["engine"],
                    "prefetch_hits": out["stream"]["prefetch_hits"],
                    "prefetch_waits": out["stream"]["prefetch_waits"],
                    "cached_before": cached,
                    # evict: what the page cache held of the file once the run was over
                    "cached_after": cached_fraction(weights) if cache == "evict" else None,
                })  # fmt: skip
    return {"rows": rows, "cold_method": how_cold, "threads": threads, "tokens": tokens}


def _warm(path: Path) -> None:
    """Read a file once, so that its pages are in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def bench_pairs(
    paths: dict[str, Path],
    tokens: int,
    threads: int,
    pairs: int = 5,
    share: float = 0.25,
    model: str = "float32",
) -> dict[str, Any]:
    """The speed target, measured the way a noisy shared machine allows: in-memory and streamed
    (``model`` at ``share`` of its float32 bytes, warm cache) child runs *alternated* ``pairs``
    times, so that load from other processes hits both alike. Reports each pair's ratio, their
    median, and the ratio of the fastest runs."""
    from memopt.stream import plan_budget

    src = _sources(paths)[model]
    folder = src["source"]
    float_bytes = src.get("share_of") or plan_budget(folder, None).model_bytes
    budget = int(float_bytes * share)
    _warm(src["file"])
    mem, streamed = [], []
    for _ in range(pairs):
        mem.append(_child("inmem_job", str(folder), IDS, tokens, threads, src["stored"]))
        streamed.append(_child("stream_job", str(folder), IDS, tokens, budget, threads))
    ratios = [s["tokens_per_s"] / m["tokens_per_s"] for m, s in zip(mem, streamed, strict=True)]
    return {
        "model": model,
        "budget_bytes": budget,
        "pairs": [
            {"in_memory": m["tokens_per_s"], "streamed": s["tokens_per_s"], "ratio": r}
            for m, s, r in zip(mem, streamed, ratios, strict=True)
        ],
        "median_ratio": statistics.median(ratios),
        "best_ratio": max(s["tokens_per_s"] for s in streamed)
        / max(m["tokens_per_s"] for m in mem),
        "same_tokens": all(s["tokens"] == mem[0]["tokens"] for s in streamed),
        "peak_over_baseline": max(s["over_baseline"] for s in streamed),
        "engine": sorted({s["engine"] for s in streamed}),
    }


def bench_layout(paths: dict[str, Path], reps: int = 20) -> dict[str, Any]:
    import torch
    from torch import nn

    from memopt.stream.layout import order_report

    def cnn(c: int, hw: int) -> nn.Module:
        out = (hw - 2) // 2
        return nn.Sequential(
            nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * out * out, 10),
        )  # fmt: skip

    rows = []
    for c, hw, batch in ((3, 32, 64), (3, 32, 256), (1, 8, 256)):
        fns: dict[str, dict[str, Any]] = {}
        for fmt in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            model = cnn(c, hw)
            x = torch.randn(batch, c, hw, hw)
            y = torch.randint(0, 10, (batch,))
            if fmt == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.Adam(model.parameters())

            def train(model: nn.Module = model, x: Any = x, y: Any = y, opt: Any = opt) -> None:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            def infer(model: nn.Module = model, x: Any = x) -> None:
                with torch.inference_mode():
                    model(x)

            fns[fmt] = {"train": train, "infer": infer}
        # interleaved (contiguous, channels-last, contiguous, ...) so that the machine's load hits
        # both alike; the minimum is the least disturbed run
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(3 + reps):
            for fmt, pair in fns.items():
                for what, fn in pair.items():
                    start = time.perf_counter()
                    fn()
                    times.setdefault((fmt, what), []).append(time.perf_counter() - start)
        for fmt in fns:
            rows.append({
                "input": f"({batch}, {c}, {hw}, {hw})", "format": fmt,
                "train_step_ms": min(times[(fmt, "train")][3:]) * 1e3,
                "infer_ms": min(times[(fmt, "infer")][3:]) * 1e3,
                "train_step_median_ms": statistics.median(times[(fmt, "train")][3:]) * 1e3,
                "infer_median_ms": statistics.median(times[(fmt, "infer")][3:]) * 1e3,
            })  # fmt: skip
    return {
        "cnn": rows,
        "files": {
            "float32 (memopt save_float_folder)": order_report(paths["f32"]),
            "int4 (memopt.models.saved)": order_report(paths["int4"]),
        },
    }


# --------------------------------------------------------------------------------------------------


def _fmt_mb(n: float | None) -> str:
    return "-" if n is None else f"{n / MB:.0f} MB"


def print_tables(result: dict[str, Any]) -> None:
    print("\n1. Loading SmolLM2 float32 (538 MB), warm page cache")
    print(f"{'loader':24} {'load':>8} {'anon+':>8} {'file+':>8} | after reading every byte: "
          f"{'anon+':>8} {'file+':>8}")  # fmt: skip
    for r in result["load"]:
        print(
            f"{r['loader']:24} {r['load_s'] * 1e3:6.0f}ms {_fmt_mb(r['anon_after_load']):>8} "
            f"{_fmt_mb(r['file_after_load']):>8} | {'':26}{_fmt_mb(r['anon_after_read']):>8} "
            f"{_fmt_mb(r['file_after_read']):>8}"
        )
    s = result["stream"]
    print(f"\n2. Streamed generation ({s['tokens']} tokens, {s['threads']} torch thread(s), "
          f"cold = {s['cold_method']})")  # fmt: skip
    print(f"{'model':8} {'budget':>18} {'cache':5} {'peak-base':>10} {'predicted':>10} "
          f"{'tok/s':>6} {'vs mem':>6} {'prefill':>8} {'same':>5} {'pinned':>6} "
          f"{'streamed':>8} {'engine':>12} {'cached':>6}")  # fmt: skip
    for r in s["rows"]:
        budget = r["budget"] + (f" {_fmt_mb(r['budget_bytes'])}" if r["budget_bytes"] else "")
        if "refused" in r:
            print(f"{r['model']:8} {budget:>18} refused: {r['refused']}")
            continue
        cached = "-" if r.get("cached_before") is None else f"{r['cached_before']:.0%}"
        print(
            f"{r['model']:8} {budget:>18} {r['cache']:5} {_fmt_mb(r['over_baseline']):>10} "
            f"{_fmt_mb(r.get('predicted')):>10} {r['tokens_per_s']:6.2f} {r['ratio']:5.2f}x "
            f"{r['prefill_s'] * 1e3:6.0f}ms {'yes' if r['same_tokens'] else 'NO':>5} "
            f"{str(r['pinned']):>6} {str(r['streamed']):>8} {str(r.get('engine')):>12} "
            f"{cached:>6}"
        )
    for pr in result.get("pairs") or []:
        print(f"\n   {pr['model']} at {_fmt_mb(pr['budget_bytes'])}, warm, alternated with "
              f"in-memory: ratios {', '.join(format(p['ratio'], '.2f') for p in pr['pairs'])}; "
              f"median {pr['median_ratio']:.2f}x, fastest/fastest {pr['best_ratio']:.2f}x, same "
              f"tokens {pr['same_tokens']}, peak {_fmt_mb(pr['peak_over_baseline'])} over "
              f"baseline, engine {pr['engine']}")  # fmt: skip
    lay = result["layout"]
    print(
        "\n3. Layout: case-1 CNN (Conv 3x3 32, ReLU, MaxPool, Linear), fastest of 20 interleaved, ms"
    )
    for r in lay["cnn"]:
        print(f"{r['input']:18} {r['format']:14} train step {r['train_step_ms']:7.2f}  "
              f"inference {r['infer_ms']:7.2f}")  # fmt: skip
    for name, rep in lay["files"].items():
        print(f"{name}: blocks contiguous {rep['blocks_contiguous']}, in order "
              f"{rep['blocks_in_order']}")  # fmt: skip


if __name__ != "__main__":
    # Imported by name in a child of run_in_child: import what every job needs now, so that the
    # child's RSS baseline (taken after this import) holds the libraries, not the measured work.
    from memopt.core.rss import import_baseline

    import_baseline()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens generated per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every child")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (the best is kept)")
    ap.add_argument("--work", default="/tmp/memopt-bench-stream", help="folder for the weights")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["load", "stream", "layout"], help="parts to skip"
    )
    ap.add_argument(
        "--caches", nargs="*", default=["warm", "cold", "evict"], help="page-cache states"
    )
    ap.add_argument(
        "--models", nargs="*", default=["float32", "int4", "gguf"], help="weights streamed"
    )
    ap.add_argument(
        "--gguf-stored-shares",
        nargs="*",
        type=float,
        default=[0.75, 0.6],
        help="GGUF budgets as shares of its stored bytes (below them, blocks stream)",
    )
    ap.add_argument(
        "--pair-models",
        nargs="*",
        default=["float32", "gguf"],
        help="models of the alternated speed pairs at 25 %% of their float32 bytes",
    )
    ap.add_argument(
        "--shares",
        nargs="*",
        type=float,
        default=[1.0, 0.5, 0.25],
        help="budgets as shares of the model's bytes",
    )
    ap.add_argument("--pairs", type=int, default=5, help="alternated speed pairs (0: none)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # children import this as "stream"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)  # the layout bench runs here, with the same threads
    paths = prepare(Path(args.work))
    result: dict[str, Any] = {}
    result["load"] = [] if "load" in args.skip else bench_load(paths)
    result["stream"] = (
        {"rows": [], "cold_method": None, "threads": args.threads, "tokens": args.tokens}
        if "stream" in args.skip
        else bench_stream(
            paths,
            args.tokens,
            args.threads,
            args.repeats,
            tuple(args.caches),
            tuple(args.models),
            tuple(args.shares),
            tuple(args.gguf_stored_shares),
        )  # fmt: skip
    )
    result["pairs"] = [
        bench_pairs(paths, args.tokens, args.threads, args.pairs, model=m)
        for m in (args.pair_models if args.pairs else [])
    ]
    result["layout"] = {"cnn": [], "files": {}} if "layout" in args.skip else bench_layout(paths)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_tables(result)


if __name__ == "__main__":
    main()
