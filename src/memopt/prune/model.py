"""What ``memopt prune`` calls: load, prune, save, measure; one dict with the CLI's JSON keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memopt.core.atomic import releases_outputs
from memopt.models import load_model
from memopt.models.saved import check_output, disk_bytes, save
from memopt.prune.api import prune_
from memopt.prune.config import config_for_method

__all__ = ["prune_model"]


@releases_outputs
def prune_model(
    model: str | Path,
    method: str,
    sparsity: float | None = None,
    out_dir: str | Path | None = None,
    *,
    values: str = "float",
) -> dict[str, Any]:
    """``memopt prune MODEL --method M --sparsity S -o DIR``: returns ``bytes_before``,
    ``bytes_after`` (parameters + buffers in RAM, measured), ``disk_bytes`` (the saved folder; None
    without ``out_dir``), ``sparsity`` (achieved, over the pruned weights), plus ``method``,
    ``config``, ``formats``, ``modules``, ``params_before``, ``params_after``.

    Bad input (unknown method, sparsity outside [0, 1), N:M that does not divide, an output that is
    not a memopt folder) raises MemoptError before any work where it can be checked up front.
    """
    config = config_for_method(method, sparsity)
    if out_dir is not None:
        check_output(out_dir)
    loaded = load_model(model, dequantize=True)  # float weights: a GGUF's blocks dequantized
    report = prune_(loaded, config, values=values)
    out: dict[str, Any] = {
        "method": method,
        "config": report.config,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "disk_bytes": None,
        "sparsity": report.sparsity,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "formats": report.formats,
        "modules": len(report.modules),
    }
    if out_dir is not None:
        save(loaded, out_dir, quant_config={"config": report.config, "values": values})
        out["disk_bytes"] = disk_bytes(out_dir)
    return out
