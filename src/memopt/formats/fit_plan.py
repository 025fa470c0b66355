"""The run plan that ``memopt fit`` saves beside a fitted model (``fit.json``), read without
importing the fit itself: ``memopt run`` checks every model folder for one before it starts, and
the fit (memopt.compose) imports PyTorch's memory tools, seconds a run does not need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["fitted_run"]


def fitted_run(model: str | Path) -> dict[str, Any] | None:
    """The run plan that ``memopt fit`` saved with a generation model (``max_memory_bytes``: the
    budget over the import baseline, ``positions``: prompt + new tokens it was measured at,
    ``engine``, ``kv_int8``: its KV cache int8), or None for any other model. A fit.json that is
    not a fit's is ignored."""
    path = Path(model) / "fit.json"
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text()).get("run")
        budget, positions = int(run["max_memory_bytes"]), int(run["positions"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if budget <= 0 or positions <= 0:
        return None
    return {"max_memory_bytes": budget, "positions": positions, "engine": bool(run.get("engine")),
            "kv_int8": run.get("kv_int8") is True}  # fmt: skip
