"""Matmul kernels for quantized weights on CPU, chosen by measurement on the machine that runs them.

Why several kernels and a chooser: the fastest path depends on the CPU's instruction set and the
batch, not only on the format; bench/matmul_kernels.py prints the timings of every candidate.

int8 weight-only at batch 1 (decode): ``torch._weight_int8pack_mm`` is only vectorised for
reduced-precision activations (with float32 ones it is slower than a float32 ``F.linear``), so we
round the activations to bfloat16 (relative error 2^-9 per element, far below int8's own weight
error) and the per-channel scale is fused. Over many rows that kernel loses to a blocked int8 ->
bfloat16 dequantize (exact: |q| <= 127 fits bf16's significand) + bf16 matmul, scale applied to
the output. On a CPU without native bf16 (AVX2 only) the ratios differ, which is why
:func:`autotune` times the candidates per (kernel family, shape, batch bucket, dtype, threads).
All candidates of a family compute the same function up to rounding (bf16 or float32 activations,
the order of the sums); ``Int8Dynamic`` (per-token int8 activations through ``torch._int_mm``) is
a separate config because it changes the numerics.

The choice survives a busy machine and is the same from run to run:

* timing: interleaved rounds (each round runs every candidate once, in a rotating order), and each
  candidate's *minimum*: load from other processes only ever adds time, so the minimum of many
  rounds is the candidate's own cost, where a median is whatever the load was (measured on the
  project's 2-core machine, busy loops on both cores, int8pack_bf16 at 576x1536, batch 1: median
  13 ms, minimum 36 us);
* a fixed rule: the family's default (the kernel measured fastest on this CPU class) is kept unless
  another candidate is faster by more than ``_MARGIN`` in *both* halves of the rounds; a gain
  within noise, or halves that disagree, keep the default; so does a machine so busy that
  OpenMP's parallel regions stall (a probe timed in each round, see ``_PROBE_NUMEL``), where
  even minima measure the wait for a worker thread, not the kernel;
* a cache on disk, per machine: ``$XDG_CACHE_HOME/memopt/kernels-<hash>.json`` (``~/.cache``),
  the hash of the CPU's identity (model name and flags from /proc/cpuinfo, torch version and CPU
  capability); the thread count is part of every key. A later process (a short ``memopt run``, a
  GPTQ calibration) reuses a choice measured once instead of timing under whatever load it meets,
  and computes with the same kernel (the same rounding) as the run before. Every decision is kept,
  the fixed rule's too (each entry says which rule made it, with the minima it saw).
  ``MEMOPT_KERNEL_CACHE=0`` neither reads nor writes it; :func:`clear_cache` deletes it (to
  measure again, e.g. after a choice made on a busy machine).

``MEMOPT_KERNEL=name`` forces a candidate wherever it exists; :func:`set_untimed` and
:func:`default_kernels` take each family's default without timing and without the disk cache.

int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` takes bfloat16 activations (float32 and
float16 ones take a slow path), scales and zeros as one bfloat16 ``(K/G, N, 2)`` tensor
and the weight in its own row-interleaved layout (:func:`int4_block_n`). We keep the weight in that
layout only (one copy, ``N * K / 2`` bytes); the canonical layout for disk is a cheap reshuffle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memopt.core.atomic import atomic_write_text
from memopt.core.cbuild import cache_dir, kernels_enabled
from memopt.weights.primitives import pack_int4_nblock

__all__ = [
    "INT4_KERNELS",
    "INT8_KERNELS",
    "autotune",
    "cache_path",
    "chosen_kernels",
    "clear_cache",
    "decisions",
    "default_kernels",
    "dequant_linear",
    "ggml_linear",
    "gemv",
    "int4_block_n",
    "int8_dynamic_linear",
    "int8_linear",
    "int4_linear",
    "register_gemv",
    "row_block",
    "set_untimed",
]

Kernel = Callable[..., torch.Tensor]

# (family, N, K, batch bucket, dtype, threads) -> name of the chosen candidate
_CHOSEN: dict[tuple, str] = {}
# how each choice of this process was made (timed / from the disk cache), for reports
_DECISIONS: dict[tuple, dict] = {}
# MEMOPT_KERNEL=name forces a candidate wherever it exists (benchmarks and tests use it)
_FORCED_ENV = "MEMOPT_KERNEL"
# MEMOPT_KERNEL_CACHE=0: the choices on disk are neither read nor written (each process times)
_CACHE_ENV = "MEMOPT_KERNEL_CACHE"
# Untimed (set under a streaming memory budget): a shape's first call takes the family's default
# instead of timing every candidate (or reading a choice from disk, which may name a candidate the
# plan did not count). Timing costs memory, not only time: a bfloat16 matmul candidate initializes
# oneDNN, RSS at its first call that is never given back and that no streaming plan counts,
# enough to push a small model's run over its budget; and timing the candidates of a large
# vocabulary's output head takes a large share of a short run.
_UNTIMED = False

# Timing: at least _ROUNDS_MIN interleaved rounds, then more while under _BUDGET_S seconds, at
# most _ROUNDS_MAX. Another candidate replaces the default only if its minimum is below the
# default's by more than _MARGIN in both halves of the rounds.
_ROUNDS_MIN, _ROUNDS_MAX, _BUDGET_S = 8, 32, 0.25
_MARGIN = 0.15
# The stall probe: a 1 MiB fill, one OpenMP parallel region (about 10 us on the project's machine).
# Each round times it too. With other processes on the cores, a parallel region can wait for a
# sleeping worker thread to be scheduled: measured on the 2-core machine, whole stretches where
# *every* region took 4-8 ms (probe and int8 kernel alike, minima included), so the candidates'
# minima counted their parallel regions, not their work. When the probe took over _STALL_S in two
# rounds or more and in a quarter of them or more, the timings are void: the default is kept
# ("default (busy)"), and the timing stops there (stalled, a blocked dequantize candidate of a
# 1B model's MLP took 20-200 ms a call).
_PROBE_NUMEL, _STALL_S = 1 << 18, 1e-3
_CACHE_VERSION = 1


def row_block(n: int, k: int, multiple: int = 64, temp_bytes: int = 1 << 20) -> int:
    """Rows dequantized at a time: a float32 temporary of about ``temp_bytes`` (fits in L2)."""
    rows = max(multiple, (temp_bytes // (4 * k)) // multiple * multiple)
    return min(n, rows)


def _bucket(m: int) -> int:
    return 1 if m == 1 else 1 << (m - 1).bit_length()  # 1, 2, 4, 8, 16, ...


def set_untimed(on: bool) -> bool:
    """Turn untimed choice on or off (see ``_UNTIMED``); returns the previous setting."""
    global _UNTIMED
    before, _UNTIMED = _UNTIMED, on
    return before


@contextlib.contextmanager
def default_kernels() -> Iterator[None]:
    """Inside, every shape runs its family's default kernel, whatever was chosen before (by
    timing or read from disk, which may pick another valid kernel that rounds differently):
    outputs that do not depend on the machine's measurements."""
    before, saved = set_untimed(True), dict(_CHOSEN)
    _CHOSEN.clear()
    try:
        yield
    finally:
        _CHOSEN.clear()
        _CHOSEN.update(saved)
        set_untimed(before)


# ---- the choices on disk, per machine ----

_IDENTITY: dict[str, str] | None = None
# the parsed cache file of this process: (path, {key string: decision}); reloaded when the path
# changes (another XDG_CACHE_HOME)
_DISK: tuple[Path, dict[str, dict]] | None = None


def _cpu_identity() -> dict[str, str]:
    """What a timing depends on besides the key: the CPU (model name and flags), torch."""
    global _IDENTITY
    if _IDENTITY is None:
        model, flags = "", ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:  # the first processor's block
                    if not line.strip():
                        break
                    field, _, value = line.partition(":")
                    if field.strip() == "model name":
                        model = value.strip()
                    elif field.strip() in ("flags", "Features"):  # x86, arm
                        flags = " ".join(sorted(value.split()))
        except OSError:  # not Linux: platform.processor() is what we have
            pass
        _IDENTITY = {
            "cpu": model or platform.processor(),
            "flags": flags,
            "machine": platform.machine(),
            "system": platform.system(),
            "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(),
        }
    return _IDENTITY


def cache_path() -> Path | None:
    """This machine's file of kernel choices, or None when ``MEMOPT_KERNEL_CACHE=0``."""
    if os.environ.get(_CACHE_ENV, "1").lower() in ("0", "off", "false", "no"):
        return None
    ident = json.dumps(_cpu_identity(), sort_keys=True)
    return cache_dir() / f"kernels-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def _read(path: Path) -> dict[str, dict]:
    """The decisions in ``path``; {} when it is missing, unreadable or for another machine."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = (
        isinstance(data, dict)
        and data.get("version") == _CACHE_VERSION
        and data.get("machine") == _cpu_identity()
        and isinstance(data.get("choices"), dict)
    )
    return data["choices"] if ok else {}


def _disk() -> tuple[Path, dict[str, dict]] | None:
    global _DISK
    path = cache_path()
    if path is None:
        return None
    if _DISK is None or _DISK[0] != path:
        _DISK = (path, _read(path))
    return _DISK


def _key_str(key: tuple) -> str:
    return " ".join(map(str, key))


def _cached(key: tuple, candidates: dict, default: str | None) -> dict | None:
    """The decision on disk for ``key``, if it was made among these very candidates."""
    disk = _disk()
    if disk is None:
        return None
    if _key_str(key) not in disk[1]:  # another process may have decided it since we read
        disk[1].update(_read(disk[0]))
    entry = disk[1].get(_key_str(key))
    if not isinstance(entry, dict):
        return None
    same = entry.get("candidates") == sorted(candidates) and entry.get("default") == default
    return entry if same and entry.get("name") in candidates else None


def _store(key: tuple, decision: dict) -> None:
    """Add one decision to this machine's file: merged with what other processes wrote since we
    read it, written through a temporary name (a reader never sees half a file; two processes
    writing at once may drop one's entry, which is then timed again). A cache that cannot be
    written leaves the choice to this process."""
    disk = _disk()
    if disk is None:
        return
    path, choices = disk
    choices.update(_read(path))
    choices[_key_str(key)] = decision
    data = {"version": _CACHE_VERSION, "machine": _cpu_identity(), "choices": choices}
    with contextlib.suppress(OSError):
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def clear_cache() -> None:
    """Forget every choice: this process's and this machine's file (the next call of each shape
    times its candidates again)."""
    global _DISK
    _CHOSEN.clear()
    _DECISIONS.clear()
    _DISK = None
    path = cache_path()
    if path is not None:
        path.unlink(missing_ok=True)


# ---- the chooser ----


def _busy(probe: list[float]) -> bool:
    stalls = sum(t > _STALL_S for t in probe)
    return stalls >= 2 and 4 * stalls >= len(probe)


def _decide(
    times: dict[str, list[float]], fixed: str, probe: list[float] | None = None
) -> tuple[str, str]:
    """(name, rule) from interleaved timings, ``times[c][r]``: candidate c in round r.

    ``probe``: the stall probe's time in each round (None with one thread: no parallel regions).
    If two or more of its calls and a quarter of them or more stalled (:func:`_busy`), the
    machine is too busy to measure anything:
    ``fixed`` (the family's default). Else each candidate's minimum over the rounds, and over each
    half of them: another candidate replaces ``fixed`` only if it is faster than ``fixed`` by more
    than ``_MARGIN`` in both halves; a gain within the noise, or halves that disagree (the load
    changed while timing), keep the default."""
    if len(times) == 1:
        return fixed, "only"
    if probe and _busy(probe):
        return fixed, "default (busy)"
    rounds = len(times[fixed])
    half = max(1, rounds // 2)
    halves = [
        {c: min(t[:half]) for c, t in times.items()},
        {c: min(t[half:] or t) for c, t in times.items()},
    ]
    whole = {c: min(t) for c, t in times.items()}
    best = min((c for c in times if c != fixed), key=lambda c: whole[c])
    wins = [m[best] * (1 + _MARGIN) < m[fixed] for m in halves]
    if all(wins):
        return best, "faster"
    return fixed, "default (halves disagree)" if any(wins) else "default"


def _time(
    candidates: dict[str, Callable[[], torch.Tensor]], names: list[str]
) -> tuple[dict[str, list[float]], list[float] | None]:
    """Interleaved rounds: each runs every candidate once, the order rotating from round to round
    (no candidate always first, or always after the same one): a burst of load hits all alike.
    With more than one thread the stall probe (see ``_PROBE_NUMEL``) runs in each round too, and
    the rounds stop as soon as it says the machine is busy. Returns the candidates' times and the
    probe's (None with one thread)."""
    threads = torch.get_num_threads() > 1
    buf = torch.empty(_PROBE_NUMEL) if threads else None
    paths = dict(candidates)
    order = list(names)
    if buf is not None:
        paths[" probe"] = lambda: buf.fill_(1.0)
        order.append(" probe")
    times: dict[str, list[float]] = {c: [] for c in order}
    start = time.perf_counter()
    r = 0
    while r < _ROUNDS_MAX and (r < _ROUNDS_MIN or time.perf_counter() - start < _BUDGET_S):
        shift = r % len(order)
        for cand in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            paths[cand]()
            times[cand].append(time.perf_counter() - t0)
        r += 1
        if buf is not None and _busy(times[" probe"]):
            break  # void whatever follows: _decide keeps the default
    probe = times.pop(" probe", None)
    return times, probe


def autotune(
    key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], default: str | None = None
) -> torch.Tensor:
    """Run the chosen candidate for ``key``, choosing on its first call.

    The first call of a key takes this machine's decision on disk if there is one (made among the
    same candidates), else times them (interleaved rounds, minimum per candidate; see
    :func:`_decide` for the rule) and writes the decision to disk. ``default`` is the family's
    default: kept unless another candidate is clearly faster (if it cannot run here, the first
    candidate that can takes its place). A candidate that raises (an unsupported shape or dtype) is
    dropped. Untimed (:func:`set_untimed`), the first call runs ``default`` (else the candidates in
    order) and keeps the first that runs, without the disk.
    """
    forced = os.environ.get(_FORCED_ENV)
    if forced in candidates:
        return candidates[forced]()
    name = _CHOSEN.get(key)
    if name in candidates:
        return candidates[name]()
    if len(candidates) == 1:
        ((name, fn),) = candidates.items()
        _CHOSEN[key] = name
        return fn()
    errors: list[str] = []
    if _UNTIMED:
        order = sorted(candidates, key=lambda c: c != default)  # the default first
        for cand in order:
            try:
                result = candidates[cand]()
            except (RuntimeError, NotImplementedError) as e:
                errors.append(f"{cand}: {e}")
                continue
            _CHOSEN[key] = cand
            return result
        raise RuntimeError(f"no kernel ran for {key}: {'; '.join(errors)}")
    cached = _cached(key, candidates, default)
    if cached is not None:
        try:
            result = candidates[cached["name"]]()
        except (RuntimeError, NotImplementedError):
            pass  # it no longer runs here (torch changed under the same version?): time again
        else:
            _CHOSEN[key] = cached["name"]
            _DECISIONS[key] = {**cached, "source": "disk"}
            return result
    results: dict[str, torch.Tensor] = {}
    for cand, fn in candidates.items():  # warm-up, and drop candidates that cannot run
        try:
            results[cand] = fn()
        except (RuntimeError, NotImplementedError) as e:
            errors.append(f"{cand}: {e}")
    if not results:
        raise RuntimeError(f"no kernel ran for {key}: {'; '.join(errors)}")
    names = list(results)
    fixed = default if default in results else names[0]
    times, probe = _time(candidates, names)
    name, rule = _decide(times, fixed, probe)
    decision = {
        "name": name,
        "rule": rule,
        "default": default,
        "candidates": sorted(candidates),
        "min_us": {c: round(min(t) * 1e6, 2) for c, t in times.items()},
        "rounds": len(times[fixed]),
        "failed": sorted(results.keys() ^ candidates.keys()),
    }
    if probe:
        decision["probe_stalls"] = sum(t > _STALL_S for t in probe)
        decision["probe_min_us"] = round(min(probe) * 1e6, 2)
    _CHOSEN[key] = name
    _DECISIONS[key] = {**decision, "source": "timed"}
    _store(key, decision)
    return results[name]


def chosen_kernels() -> dict[str, str]:
    """What :func:`autotune` picked so far, for reports: ``"family N K batch dtype threads" -> name``."""
    return {_key_str(k): v for k, v in _CHOSEN.items()}


def decisions() -> dict[str, dict]:
    """How this process's choices were made: per key (as :func:`chosen_kernels`), the name, the
    rule, each candidate's minimum time in microseconds and ``source`` ("timed" or "disk")."""
    return {_key_str(k): dict(v) for k, v in _DECISIONS.items()}


def _key(family: str, x: torch.Tensor, n: int, k: int) -> tuple:
    key = (
        family,
        n,
        k,
        _bucket(x.shape[0]),
        str(x.dtype).removeprefix("torch."),
        torch.get_num_threads(),
    )
    # another device's timings never stand for the CPU's (in this process or on disk)
    return key if x.device.type == "cpu" else (*key, x.device.type)


# ---- blocked dequantize + matmul: works for every format, bounded temporary ----


def dequant_linear(
    x: torch.Tensor,
    dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor],
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    multiple: int = 64,
) -> torch.Tensor:
    """``x @ W.T`` with W dequantized ``row_block`` rows at a time: never a full float weight.

    ``dequant_rows(n0, n1, dtype)`` returns rows ``n0:n1`` of W, ``(n1 - n0, K)``.
    """
    xd = x.to(dtype)  # (M, K)
    step = row_block(n, k, multiple)
    if torch.is_grad_enabled() and xd.requires_grad:  # out= refuses autograd: concatenate instead
        blocks = [xd @ dequant_rows(a, min(n, a + step), dtype).t() for a in range(0, n, step)]
        return torch.cat(blocks, 1).to(x.dtype)
    out = torch.empty(x.shape[0], n, dtype=dtype, device=x.device)  # (M, N)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        torch.mm(xd, dequant_rows(n0, n1, dtype).t(), out=out[:, n0:n1])
    return out.to(x.dtype)


# ---- int8, symmetric per output channel: q (N, K) int8, scale (N,) float32 ----


def _int8pack_bf16(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # ATen's fused int8 weight-only kernel, vectorised for bf16 activations only (see module doc)
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scale.to(torch.bfloat16)).to(x.dtype)


def _int8pack_fp32(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.float(), q, scale.float()).to(x.dtype)


def _int8_dequant(dtype: torch.dtype) -> Kernel:
    def run(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # int8 -> dtype is exact (|q| <= 127 fits bf16's 8-bit significand); the per-channel scale
        # is applied to the (M, N) output in float32, not to the weight
        n, k = q.shape
        y = dequant_linear(x, lambda a, b, dt: q[a:b].to(dt), n, k, dtype)
        return (y.float() * scale.float()).to(x.dtype)

    return run


# The candidates do not round alike: int8pack_bf16 rounds the activations, the scale and the output
# to bfloat16; int8_dequant_bf16 the activations and the output (scale in float32);
# int8_dequant_fp32 rounds nothing beyond float32 sums. Which one runs changes the digits of the
# outputs (not their quality at one row, see int8_linear), so the choice is made once per machine
# and kept on disk (module doc), and default_kernels() pins the default.
INT8_KERNELS: dict[str, Kernel] = {
    "int8pack_bf16": _int8pack_bf16,
    "int8_dequant_bf16": _int8_dequant(torch.bfloat16),
    "int8_dequant_fp32": _int8_dequant(torch.float32),
}
_EXACT_INT8 = "int8_dequant_fp32"  # float32 activations: the only one for more than one row
# measured, never chosen: kept for the benchmark table
SLOW_KERNELS: dict[str, Kernel] = {"int8pack_fp32": _int8pack_fp32}


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (M, K) @ (q * scale[:, None]).T`` -> ``(M, N)``, int8 weight-only, fastest path here."""
    n, k = q.shape
    if x.device.type != "cpu":
        return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])
    key = _key("int8", x, n, k)
    name = _CHOSEN.get(key)
    if name is not None and _FORCED_ENV not in os.environ:  # the decode path: no closures
        return INT8_KERNELS[name](x, q, scale)
    # bfloat16 activations only for one row at a time (decode): over many rows (prefill, an
    # encoder's tokens) their rounding compounds through the layers (an encoder's embedding cosine
    # drops visibly), and which kernel the timing picks must not change the model's quality
    kernels = INT8_KERNELS if x.shape[0] == 1 else {_EXACT_INT8: INT8_KERNELS[_EXACT_INT8]}
    if k % 16:
        # torch's _weight_int8pack_mm kills the process (SIGSEGV) on some shapes whose K is not a
        # multiple of 16 (torch 2.13 CPU, measured: N = 10 with K = 24, 27, 33, 100, 200, 7208;
        # fine with K = 32, 48, 7200): no try/except can catch that, so it is not a candidate
        kernels = {name: f for name, f in kernels.items() if not name.startswith("int8pack")}
    cands = {name: (lambda f=f: f(x, q, scale)) for name, f in kernels.items()}
    return autotune(key, cands, default="int8pack_bf16")  # the decode winner with native bf16


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations, int8 x int8 -> int32 (``torch._int_mm``), rescale.

    ``y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] q[n, k]``.
    """
    xf = x.float()
    sx = (xf.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (M, 1)
    xq = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)  # (M, K)
    try:
        acc = torch._int_mm(xq, q.t())  # (M, N) int32; q.t() is a free view, (K, N)
    except RuntimeError:
        # a shape the kernel refuses: the same integer sums in float64 (exact)
        acc = xq.double() @ q.double().t()
    return (acc.float() * sx * scale.float()).to(x.dtype)


# ---- int4, PyTorch's CPU kernel ----

_BLOCK_N: dict[int, int | None] = {}


def int4_block_n(n: int) -> int | None:
    """Row-block size of the CPU int4 kernel's layout for N rows (64 with AVX-512, 32 with AVX2).

    Found by packing a probe with ``_convert_weight_to_int4pack_for_cpu`` and comparing with our own
    packer; None when the kernel is missing or its layout for this N is not one we can write.
    """
    if n in _BLOCK_N:
        return _BLOCK_N[n]
    found = None
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is not None and n % 16 == 0:
        probe = torch.randint(
            0, 16, (n, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
        )
        try:
            ref = op(probe, 1)  # (N, 32) uint8
        except RuntimeError:
            ref = None
        if ref is not None:
            for b in (64, 32, 16):
                if n % b == 0 and torch.equal(pack_int4_nblock(probe, b), ref):
                    found = b
                    break
    _BLOCK_N[n] = found
    return found


def _int4_aten(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, sz)
    return y.to(x.dtype)


INT4_KERNELS: dict[str, Kernel] = {"int4_aten_bf16": _int4_aten}


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    group: int,
    sz: torch.Tensor,
    dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor],
    block_n: int | None,
) -> torch.Tensor:
    """int4 weight-only ``x (M, K) @ W.T``: ATen's kernel when the layout is its own, else blocked."""
    n, k = packed.shape[0], packed.shape[1] * 2
    key = _key("int4", x, n, k)
    fast = block_n is not None and x.device.type == "cpu" and _FORCED_ENV not in os.environ
    if fast and _CHOSEN.get(key) == "int4_aten_bf16":
        return _int4_aten(x, packed, group, sz)  # the decode path: no closures, no timing
    mult = block_n or 64
    # Numerics differ: int4_dequant_fp32 computes in float32; int4_dequant_bf16 and int4_aten_bf16
    # round the activations (and the output) to bfloat16. The default (ATen's kernel, else the
    # first: float32) is kept unless another is clearly faster, and the choice is kept on disk.
    cands: dict[str, Callable[[], torch.Tensor]] = {
        "int4_dequant_fp32": lambda: dequant_linear(x, dequant_rows, n, k, torch.float32, mult),
        # large batches: bf16 weights blocks (AMX / AVX-512 BF16 matmul where the CPU has it)
        "int4_dequant_bf16": lambda: dequant_linear(x, dequant_rows, n, k, torch.bfloat16, mult),
    }
    if block_n is not None and x.device.type == "cpu":
        cands["int4_aten_bf16"] = lambda: _int4_aten(x, packed, group, sz)
    return autotune(key, cands, default="int4_aten_bf16")


# ---- GGML blocks (GGUF's Q8_0, Q4_0, Q4_1, ...): (N, row_bytes) uint8 ----


# A matrix-vector kernel over a weight as it is held (memopt.engine registers its C one when it is
# imported: the engine sits above this layer); used for decode-sized calls (GEMV_ROWS rows or fewer)
# where dequantizing the whole weight for each call costs more than the product.
_GEMV: Callable[[Any, torch.Tensor], torch.Tensor | None] | None = None
GEMV_ROWS = 8


def register_gemv(fn: Callable[[Any, torch.Tensor], torch.Tensor | None]) -> None:
    """Set the kernel :func:`gemv` calls: ``fn(weight, x (M, K) float32) -> (M, N)`` or None."""
    global _GEMV
    _GEMV = fn


def gemv(weight: Any, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ W.T`` by the registered matrix-vector kernel, or None where it does not apply (no
    kernel, more than GEMV_ROWS rows, autograd, not float32 on the CPU): then the caller's path."""
    if (
        _GEMV is None
        or not kernels_enabled()
        or x.dim() != 2
        or x.shape[0] > GEMV_ROWS
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and x.requires_grad)
    ):
        return None
    return _GEMV(weight, x)


def ggml_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    ggml_type: str,
    n: int,
    k: int,
    dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor],
) -> torch.Tensor:
    """``x (M, K) @ W.T`` for a weight held as GGML blocks: blocked dequantize + float32 matmul
    (the dequantized rows are exactly llama.cpp's values)."""
    return dequant_linear(x, dequant_rows, n, k, torch.float32, multiple=1)
