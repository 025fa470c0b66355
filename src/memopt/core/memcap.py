"""A memory limit of its own for building a model from a file's sizes (on the meta device).

A model built on the meta device costs no tensor memory, but each module is a Python object (a few
KiB: dicts of parameters, buffers, hooks), so a config's counts decide what the build costs. The
formats refuse counts over their bounds before anything is built (memopt.formats.limits); this
guard holds the build itself to a stated bound while it runs, whatever field made it large (a
count no bound names, an architecture heavier per layer than the bounds assume):

- at most ``max_modules`` modules registered (``nn.Module.__setattr__`` / ``add_module``),
- at most ``max_growth`` bytes of resident memory over what the process held when it began,
  read every ``EVERY`` modules registered and once at the end. The heap's free memory is given
  back first (``malloc_trim``): a build would otherwise reuse it unseen, as much as a long-lived
  process left free (measured: 2,047 modules of 64 KiB before an 8 MiB limit tripped in a process
  whose heap held freed blocks, 127 after a trim).

Through torch's global module-registration hook, counted only in the thread that entered the
guard; the refusal is a :class:`MemoptError` raised inside the build, in one line, as soon as a
bound is crossed (no thread, no signal, no child process: the build's own Python frames raise it,
so the half-built model is dropped with them). Resident memory, not address space: torch's threads
reserve large virtual areas that a build never touches (an address-space rlimit would refuse a
plain import). What runs on the built model afterwards (an estimate's meta step: its records grow
with the modules) is bounded through the module count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from torch import nn
from torch.nn.modules import module as _module

from memopt.core.errors import MemoptError
from memopt.core.heap import trim

__all__ = ["EVERY", "BuildLimitExceeded", "build_limits"]

EVERY = 64  # events between two reads of the resident set (a read costs ~20 µs)


class BuildLimitExceeded(MemoptError):
    """A build crossed its module count or its memory limit."""


@contextmanager
def build_limits(what: str, *, max_modules: int, max_growth: int) -> Iterator[None]:
    """Run the body with the module count and the resident-memory growth of this thread's build
    bounded; :class:`BuildLimitExceeded` (one line, naming ``what`` and the bound) when crossed."""
    owner = threading.get_ident()
    proc = psutil.Process()
    trim()  # the heap's free memory back to the system: growth from here on is new memory
    start = proc.memory_info().rss
    state = {"modules": 0}

    def check_memory() -> None:
        grown = proc.memory_info().rss - start
        if grown > max_growth:
            raise BuildLimitExceeded(
                f"{what}: building the model took {grown / 2**20:.0f} MiB, over its memory limit "
                f"of {max_growth / 2**20:.0f} MiB (after {state['modules']} modules; "
                f"MEMOPT_BUILD_MEMORY raises the limit)"
            )

    def on_register(parent: nn.Module, name: str, child: Any) -> None:
        if child is None or threading.get_ident() != owner:
            return
        state["modules"] += 1
        if state["modules"] > max_modules:
            raise BuildLimitExceeded(
                f"{what}: the model has more than {max_modules} modules, the most memopt builds "
                "(a count in its config is far above any published model's)"
            )
        if state["modules"] % EVERY == 0:
            check_memory()

    registered = _module.register_module_module_registration_hook(on_register)
    try:
        yield
        check_memory()
    finally:
        registered.remove()
