"""What memory a model uses: live tensor bytes by category and module (tracker), process RSS (rss).

Names are imported on first use (PEP 562), so that ``memopt.core.rss`` can be used, in a child
process say, without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CATEGORIES",
    "ChildProcessFailed",
    "MemoryTracker",
    "ModuleStats",
    "TimelinePoint",
    "TrackerResult",
    "current_rss_bytes",
    "peak_rss_bytes",
    "run_in_child",
]

_HOME = {
    "CATEGORIES": "tracker",
    "MemoryTracker": "tracker",
    "ModuleStats": "tracker",
    "TimelinePoint": "tracker",
    "TrackerResult": "tracker",
    "ChildProcessFailed": "rss",
    "current_rss_bytes": "rss",
    "peak_rss_bytes": "rss",
    "run_in_child": "rss",
}

if TYPE_CHECKING:
    from memopt.core.rss import (
        ChildProcessFailed,
        current_rss_bytes,
        peak_rss_bytes,
        run_in_child,
    )
    from memopt.measure.tracker import (
        CATEGORIES,
        MemoryTracker,
        ModuleStats,
        TimelinePoint,
        TrackerResult,
    )


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'memopt.measure' has no attribute {name!r}")
    return getattr(importlib.import_module(f"memopt.measure.{home}"), name)
