"""Bench: SIGKILL at random points of memopt runs, and what is left behind.

Part 1, outputs: ``memopt quantize`` (int8) and ``memopt prune`` (magnitude, 50 %) of a tiny Llama
(bench/fuzz.py's Hugging Face folder) into one output folder, each run SIGKILLed: half at a random
time of the run (uniform over a complete run's duration), half aimed inside the write window (as
soon as the run's temporary folder ``.OUT.tmp-*`` appears, after a random 0-30 ms). After each
kill: is there a partial output under the final name (a folder without a loadable manifest and a
weights file whose header checks out)? Then a complete run into the same output: what is left
beside it (temporary folders, lock files)?

Part 2, children: ``memopt profile`` (which measures in a child process) SIGKILLed while its
child runs; 2 s later, is any memopt process of that run alive?

Part 3, two writers started together into one output; part 4, a disk that fills (tmpfs mounts of a
few sizes, root only). ``--exports N``: part 1 for ``memopt export --format safetensors`` of an
int8 folder (a transformers folder, weights dequantized).

    PYTHONPATH=src .venv/bin/python bench/kill.py [--kills 100] [--parents 20] [--writers 10]
        [--enospc 8,24,40,56,72,88,100] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz  # noqa: E402  (the originals)

__all__ = ["main"]

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TRANSFORMERS_VERBOSITY="error")


def _cmd(kind: str, model: Path, out: Path) -> list[str]:
    base = [sys.executable, "-m", "memopt"]
    if kind == "quantize":
        return [*base, "quantize", str(model), "--method", "int8", "-o", str(out), "--json"]
    if kind == "export":  # model: an int8 memopt folder; out: a transformers folder
        return [*base, "export", str(model), "--format", "safetensors", "-o", str(out), "--json"]
    return [*base, "prune", str(model), "--method", "magnitude", "--sparsity", "0.5",
            "-o", str(out), "--json"]  # fmt: skip


def _partial(out: Path) -> bool:
    """Whether ``out`` exists but is not a complete memopt folder (or an exported one: a config
    and a weights file whose header checks out)."""
    if not out.exists():
        return False
    from memopt.core.errors import MemoptError
    from memopt.formats.manifest import read_manifest
    from memopt.formats.safetensors import read_header

    try:
        if not (out / "memopt.json").exists() and (out / "config.json").is_file():
            read_header(out / "model.safetensors")  # an export for transformers
        else:
            read_manifest(out)
            read_header(out / "model.safetensors")
    except (MemoptError, OSError):
        return True
    return False


def _litter(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _writing(out: Path) -> bool:
    """Whether a run's temporary folder (``.OUT.tmp-*``) exists."""
    return any(out.parent.glob(f".{out.name}.tmp-*"))


def outputs(
    model: Path, kills: int, rng: random.Random, kinds: tuple[str, ...] = ("quantize", "prune")
) -> dict[str, int]:
    counts = dict(trials=0, kills=0, aimed=0, in_window=0, partial=0, litter_after_kill=0,
                  litter_after_next=0, next_failed=0)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="memopt-kill-") as tmp:
        out = Path(tmp) / "out"
        durations = {}
        for kind in kinds:  # one complete run of each: its duration
            t0 = time.perf_counter()
            subprocess.run(_cmd(kind, model, out), env=ENV, capture_output=True, check=True)
            durations[kind] = time.perf_counter() - t0
        trials = 0
        # Trials until ``kills`` runs were killed (a random time can fall after a run has ended),
        # half of the kills aimed at the write window: aimed whenever aimed kills are not ahead.
        while counts["kills"] < kills and trials < 3 * kills:
            kind = kinds[trials % len(kinds)]
            aimed = 2 * counts["aimed"] <= counts["kills"]
            trials += 1
            proc = subprocess.Popen(_cmd(kind, model, out), env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            in_window = False
            if aimed:
                deadline = time.monotonic() + 4 * durations[kind]
                while time.monotonic() < deadline and proc.poll() is None:
                    if _writing(out):
                        in_window = True
                        time.sleep(rng.uniform(0, 0.03))
                        break
                    time.sleep(0.002)
            else:
                time.sleep(rng.uniform(0, durations[kind]))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                counts["kills"] += 1
                counts["aimed"] += aimed
                counts["in_window"] += in_window and _writing(out)
            proc.wait()
            counts["partial"] += _partial(out)
            counts["litter_after_kill"] += bool(_litter(out))
            done = subprocess.run(_cmd(kind, model, out), env=ENV, capture_output=True)
            counts["next_failed"] += done.returncode != 0
            counts["litter_after_next"] += bool(_litter(out))
            counts["partial"] += _partial(out)
            print(f"  trial {trials}, kill {counts['kills']}/{kills} {kind} "
                  f"{'aimed' if aimed else 'random'}: left {_litter(out)}",
                  file=sys.stderr, flush=True)  # fmt: skip
        counts["trials"] = trials
    return counts


def parents(model: Path, trials: int, rng: random.Random) -> dict[str, int]:
    counts = dict(trials=0, child_seen=0, orphans=0)
    # until ``trials`` kills landed while the child ran (a random delay can outlast the child)
    while counts["child_seen"] < trials and counts["trials"] < 3 * trials:
        proc = subprocess.Popen([sys.executable, "-m", "memopt", "profile", str(model), "--json"],
                                env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        children: list[psutil.Process] = []
        deadline = time.monotonic() + 60
        while not children and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(rng.uniform(0, 1.0))  # somewhere in the child's run
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts["trials"] += 1
        counts["child_seen"] += bool(children)
        _, alive = psutil.wait_procs(children, timeout=2)
        counts["orphans"] += len(alive)
        for p in alive:
            p.kill()
    return counts


def writers(model: Path, trials: int) -> dict[str, int]:
    """Two ``memopt quantize`` runs started together into one output: exactly one exits 0, the
    other exits 2 in one line naming the lock; nothing but the output is left beside it."""
    counts = dict(trials=0, one_succeeded=0, other_named_lock=0, litter=0)
    for _ in range(trials):
        with tempfile.TemporaryDirectory(prefix="memopt-writers-") as tmp:
            out = Path(tmp) / "out"
            procs = [subprocess.Popen(_cmd("quantize", model, out), env=ENV, text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for _ in range(2)]  # fmt: skip
            errs = [p.communicate(timeout=300)[1] for p in procs]
            codes = sorted(p.returncode for p in procs)
            counts["trials"] += 1
            counts["one_succeeded"] += codes == [0, 2]
            for p, err in zip(procs, errs, strict=True):
                lines = err.strip().splitlines()
                counts["other_named_lock"] += (
                    p.returncode == 2 and len(lines) == 1 and ".out.lock" in lines[0]
                )
            counts["litter"] += sorted(q.name for q in Path(tmp).iterdir()) != ["out"]
    return counts


def disk_full(model: Path, sizes_kib: list[int]) -> dict[str, int] | None:
    """``memopt quantize`` into a tmpfs too small for its output (106 KiB: ``sizes_kib`` below
    that), one run per size (the disk fills at different points of the write): exit 2, one line
    on stderr, an empty tmpfs after. None when a tmpfs cannot be mounted (not root)."""
    counts = dict(runs=0, exit2=0, one_line=0, no_space_named=0, left_behind=0)
    for kib in sizes_kib:
        with tempfile.TemporaryDirectory(prefix="memopt-enospc-") as tmp:
            mnt = Path(tmp)
            mount = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)]
            if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
                return None
            try:
                done = subprocess.run(_cmd("quantize", model, mnt / "out"), env=ENV, text=True,
                                      capture_output=True, timeout=300)  # fmt: skip
                lines = done.stderr.strip().splitlines()
                counts["runs"] += 1
                counts["exit2"] += done.returncode == 2
                counts["one_line"] += len(lines) == 1
                counts["no_space_named"] += "No space left on device" in done.stderr
                counts["left_behind"] += bool(list(mnt.iterdir()))
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--parents", type=int, default=20)
    ap.add_argument("--exports", type=int, default=0, help="kills of `memopt export` runs")
    ap.add_argument("--writers", type=int, default=10, help="trials of two concurrent writers")
    ap.add_argument(
        "--enospc", default="8,24,40,56,72,88,100", help="tmpfs sizes (KiB), one run each"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "memopt-fuzz-originals"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    originals = fuzz.build_originals(Path(args.root))
    model = originals["hf"]
    result = {}
    if args.kills:
        result["outputs"] = outputs(model, args.kills, rng)
    if args.parents:
        result["children"] = parents(model, args.parents, rng)
    if args.exports:
        result["exports"] = outputs(originals["int8"], args.exports, rng, ("export",))
    if args.writers:
        result["writers"] = writers(model, args.writers)
    if args.enospc:
        result["disk_full"] = disk_full(model, [int(k) for k in args.enospc.split(",")])
    o = result.get("outputs")
    if o:
        print(f"SIGKILLs of quantize/prune runs: {o['kills']} in {o['trials']} trials "
              f"({o['aimed']} aimed at the write window, {o['in_window']} landed in it)")  # fmt: skip
        print(f"  partial outputs under the final name: {o['partial']}")
        print(f"  runs that left temporaries or a lock when killed: {o['litter_after_kill']}")
        print(f"  ... still there after the next (complete) run: {o['litter_after_next']}")
        print(f"  next runs that failed: {o['next_failed']}")
    e = result.get("exports")
    if e:
        print(f"SIGKILLs of `memopt export --format safetensors` runs: {e['kills']} in {e['trials']} "
              f"trials ({e['aimed']} aimed, {e['in_window']} landed in the write window); partial "
              f"outputs: {e['partial']}; left when killed: {e['litter_after_kill']}, after the "
              f"next run: {e['litter_after_next']}; next runs that failed: {e['next_failed']}")  # fmt: skip
    c = result.get("children")
    if c:
        print(f"SIGKILLs of `memopt profile`: {c['trials']}, {c['child_seen']} of them while its "
              f"child ran; processes alive 2 s later: {c['orphans']}")  # fmt: skip
    w = result.get("writers")
    if w:
        print(f"Two writers into one output: {w['trials']} trials; exactly one succeeded in "
              f"{w['one_succeeded']}, the other exited 2 naming the lock in "
              f"{w['other_named_lock']}; trials that left anything beside the output: "
              f"{w['litter']}")  # fmt: skip
    if "disk_full" in result:
        d = result["disk_full"]
        if d is None:
            print("Disk full: not run (mounting a tmpfs needs root)")
        else:
            print(f"Disk full (tmpfs of {args.enospc} KiB): {d['runs']} runs, exit 2 in "
                  f"{d['exit2']}, one line in {d['one_line']} (naming ENOSPC in "
                  f"{d['no_space_named']}), anything left behind in {d['left_behind']}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
