"""Process memory (resident set size): this process's, and a fresh child's for one piece of work.

Live tensor bytes (the tracker) and RSS answer different questions: RSS also holds the interpreter,
imported libraries, allocator slack and memory-mapped weights that were touched. A process's peak RSS
(``VmHWM``, ``ru_maxrss``) only ever grows, so the honest way to attribute a peak to one piece of work is to run
that work alone in a fresh process and subtract the peak that process had already reached after its
imports: :func:`run_in_child` does exactly that.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import psutil

from memopt.core.errors import MemoptError

__all__ = [
    "ChildProcessFailed",
    "current_rss_bytes",
    "import_baseline",
    "peak_rss_bytes",
    "run_in_child",
]

_SIGNALS = {int(s) for s in signal.Signals}

# ru_maxrss is in KiB on Linux and the BSDs, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss_bytes() -> int:
    """The highest resident set size this process has had so far, in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: the kernel carries
    ``ru_maxrss`` over ``exec`` from the process image that was replaced, so a child started by a
    large parent (Python's subprocess forks or vforks the parent) reports the parent's size as its
    own peak before it has done anything. ``VmHWM`` belongs to the running image only. Elsewhere
    ``ru_maxrss`` is used.
    """
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def import_baseline() -> int:
    """Import what any measured piece of work needs before it starts (torch, transformers' auto
    classes and the Llama / Qwen2 modeling code, tokenizers, gguf), then return this process's peak
    RSS: the one baseline every child's work is measured from.

    The work's own modules are imported by :func:`run_in_child` before the call (the target
    function's module and what it imports at its top), so they are in the baseline as well: a
    measured step imports PyTorch's module tracker there, a streamed run does not (importing it,
    and dynamo with it, adds to a run's own peak even when nothing of it runs)."""
    import importlib

    for name in (
        "torch",
        "gguf",
        "tokenizers",
        "transformers",
        "transformers.models.auto.modeling_auto",
        "transformers.models.auto.tokenization_auto",
        "transformers.models.llama.modeling_llama",
        "transformers.models.qwen2.modeling_qwen2",
    ):
        importlib.import_module(name)
    return peak_rss_bytes()


class ChildProcessFailed(RuntimeError):
    """The work in the child process raised (other than MemoptError) or the child died.

    ``exc_type`` is the child's exception class name ("" when the child died without reporting);
    the message is the child's one-line message.
    """

    def __init__(self, message: str, exc_type: str = "", stderr: str = "") -> None:
        super().__init__(f"{exc_type}: {message}" if exc_type else message)
        self.exc_type = exc_type
        self.message = message
        self.stderr = stderr


# The child's program. It is kept free of memopt and torch imports so that the baseline is only what
# the target function's own module pulls in; it reports through a file, not stdout, because the work
# may print. It repeats _vm_hwm_bytes() rather than importing memopt for it.
_CHILD_CODE = r"""
import ctypes, importlib, json, os, resource, signal, sys, time, traceback
# die with the parent, however it ends (Linux: prctl PR_SET_PDEATHSIG), and now if it is gone
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
def maxrss():  # as peak_rss_bytes(): VmHWM where there is one, ru_maxrss otherwise
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
job = json.load(sys.stdin)
sys.path[:] = job["sys_path"]
try:
    module_name, _, qualname = job["target"].partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    try:  # Linux: restart the high-water mark at the RSS now, so import-time transients are gone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    baseline = maxrss()
    start = time.perf_counter()
    result = obj(*job["args"], **job["kwargs"])
    seconds = time.perf_counter() - start
    peak = maxrss()
    report = dict(result) if isinstance(result, dict) else {"result": result}
    report.update(seconds=seconds, peak_rss_bytes=peak, baseline_rss_bytes=baseline)
    text = json.dumps({"ok": report})
except BaseException as e:
    names = {(c.__module__, c.__qualname__) for c in type(e).__mro__}
    lines = str(e).strip().splitlines()
    text = json.dumps({"error": {
        "type": type(e).__qualname__,
        "memopt": ("memopt.core.errors", "MemoptError") in names,
        "message": lines[0] if lines else "",
        "traceback": traceback.format_exc(),
        "errno": getattr(e, "errno", None) if isinstance(e, OSError) else None,
        "strerror": getattr(e, "strerror", None) if isinstance(e, OSError) else None,
        "filename": str(getattr(e, "filename", "") or "") if isinstance(e, OSError) else "",
    }})
with open(job["out"], "w") as f:
    f.write(text)
"""


def run_in_child(
    fn: str | Callable[..., Any],
    *args: Any,
    kwargs: dict[str, Any] | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` in a fresh Python process and measure that process's peak RSS.

    ``fn`` is an importable function, given as ``"package.module:function"`` (or
    ``"package.module.function"``) or as the function itself (it must be defined at a module's top
    level, not in ``__main__``). ``args``, ``kwargs`` and the return value must be
    JSON-serialisable. The child sees the same ``sys.path`` as this process.

    Returns the function's result (a dict; any other value is put under ``"result"``) with three
    keys added: ``peak_rss_bytes``, ``baseline_rss_bytes`` and ``seconds`` (the call's duration).
    The baseline is the child's RSS after importing ``fn``'s module, just before the call, so
    ``peak_rss_bytes - baseline_rss_bytes`` is what the call itself added. On Linux the child resets
    its high-water mark there (``/proc/self/clear_refs``), so a transient peak during the imports
    cannot hide part of the call's own peak; elsewhere the baseline is the peak so far.

    A :class:`~memopt.core.errors.MemoptError` raised in the child is raised here as ``MemoptError`` with
    the child's one-line message; any other failure raises :class:`ChildProcessFailed`.
    """
    target = _target_name(fn)
    with tempfile.TemporaryDirectory(prefix="memopt-child-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        job = {
            "target": target,
            "args": list(args),
            "kwargs": kwargs or {},
            "sys_path": sys.path,
            "out": out_path,
        }
        try:
            payload = json.dumps(job)
        except TypeError as e:
            raise TypeError(f"run_in_child: arguments must be JSON-serialisable ({e})") from None
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD_CODE, str(os.getpid())],
                input=payload,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ChildProcessFailed(f"{target} did not finish within {timeout} s") from None
        try:
            with open(out_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = None
    if report is None:
        tail = proc.stderr.strip().splitlines()
        last = tail[-1] if tail else "no output"
        how = f"exited with code {proc.returncode}"
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name if -proc.returncode in _SIGNALS else ""
            how = f"was killed by signal {name or -proc.returncode}"
            if proc.returncode == -signal.SIGKILL:
                how += " (out of memory?)"
        raise ChildProcessFailed(f"child process for {target} {how}: {last}", stderr=proc.stderr)
    error = report.get("error")
    if error is not None:
        if error["memopt"]:
            raise MemoptError(error["message"])
        if error.get("errno") is not None:  # the file system's answer: re-raised as it was
            raise OSError(error["errno"], error.get("strerror") or error["message"],
                          error.get("filename") or None)  # fmt: skip
        raise ChildProcessFailed(
            error["message"], exc_type=error["type"], stderr=error["traceback"]
        )
    return report["ok"]


def _target_name(fn: str | Callable[..., Any]) -> str:
    if isinstance(fn, str):
        if ":" in fn:
            return fn
        module, _, name = fn.rpartition(".")
        if not module:
            raise ValueError(f"run_in_child needs 'module:function', got {fn!r}")
        return f"{module}:{name}"
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname:
        raise ValueError(
            f"run_in_child needs a function importable by name; {fn!r} is not "
            "(define it at the top level of a module other than __main__)"
        )
    return f"{module}:{qualname}"
