"""C written for memopt, compiled on first use with the system compiler and cached per machine.

Why by hand: the kernels memopt needs where no library kernel is fast enough (the fused AdamW8bit
update, the decode engine) are small C files with no PyTorch headers, so a build takes about a
second and needs only a C compiler. The library goes under ``$XDG_CACHE_HOME/memopt``
(``~/.cache/memopt``), named by a hash of the source, the flags, the compiler and this CPU's flags
(``-march=native`` code runs only on this kind of CPU), written through a temporary name so that
another process never loads a half-written file. No compiler, or a failed build: None, and the
caller keeps its pure-PyTorch path (``MEMOPT_KERNELS=0`` forces that).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from memopt.core.atomic import atomic_path

__all__ = ["LazyLibrary", "cache_dir", "compile_library", "kernels_enabled"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memopt"


def kernels_enabled() -> bool:
    """False when ``MEMOPT_KERNELS=0`` asks for the pure-PyTorch paths everywhere."""
    return os.environ.get("MEMOPT_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    return ""


def compile_library(
    name: str, source: str, flags: list[str], libs: list[str] = ()
) -> ctypes.CDLL | None:
    """The shared library built from ``source`` (C) with ``flags``, compiled once per machine."""
    if not kernels_enabled():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    parts = [source, cc, *flags, *libs, _cpu_flags(), sys.platform]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    target = cache_dir() / f"{name}-{key[:16]}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / f"{name}.c"
                src.write_text(source)
                out = Path(tmp) / f"{name}.so"
                done = subprocess.run(
                    [cc, *flags, str(src), "-o", str(out), *libs], capture_output=True
                )
                if done.returncode != 0:
                    return None
                with atomic_path(target) as part:
                    shutil.copyfile(out, part)
        return ctypes.CDLL(str(target))
    except OSError:  # a cache folder that cannot be written, a library that cannot load
        return None


class LazyLibrary:
    """A library of :func:`compile_library`, built on the first :meth:`get` (once a process, under a
    lock), its functions given their ctypes signatures: ``signatures[name] = (argtypes, restype)``.
    :meth:`get` returns None where it cannot be built (and with ``MEMOPT_KERNELS=0``)."""

    def __init__(
        self,
        name: str,
        source: str,
        flags: list[str],
        signatures: dict[str, tuple[list[Any], Any]],
        libs: list[str] = (),
    ) -> None:
        self.name, self.source, self.flags, self.libs = name, source, flags, libs
        self.signatures = signatures
        self._lib: ctypes.CDLL | None | bool = False  # False: not tried yet
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        if not kernels_enabled():
            return None
        if self._lib is not False:  # built (or failed) already: no lock on a kernel's call path
            return self._lib
        with self._lock:
            if self._lib is False:
                lib = compile_library(self.name, self.source, self.flags, self.libs)
                for fname, (argtypes, restype) in self.signatures.items() if lib else ():
                    fn = getattr(lib, fname)
                    fn.argtypes, fn.restype = argtypes, restype
                self._lib = lib
            return self._lib
