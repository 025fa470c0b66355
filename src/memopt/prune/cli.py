"""What ``memopt prune`` calls: load, prune, save, measure; one dict with the CLI's JSON keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memopt.prune.api import prune_
from memopt.prune.config import config_for_method

__all__ = ["demo_row", "prune_model"]


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
    from memopt.models import load_model

    config = config_for_method(method, sparsity)
    if out_dir is not None:
        from memopt.io import check_output

        check_output(out_dir)
    loaded = load_model(model)
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
        from memopt.io import disk_bytes, save

        save(loaded, out_dir, quant_config={"config": report.config, "values": values})
        out["disk_bytes"] = disk_bytes(out_dir)
    return out


def demo_row(
    loaded: Any, method: str = "wanda", sparsity: float | None = 0.5, n_calib: int = 8
) -> dict[str, Any]:
    """The demo's pruning row: prune ``loaded`` (a LoadedModel; changed in place, pass a copy to
    keep the original) and return ``technique``, ``bytes_before``, ``bytes_after``, ``sparsity``,
    ``seconds``. Calibrated methods use ``n_calib`` x 256 tokens (8: a few seconds per block on
    2 cores, for a demo; ``prune_model`` uses 64). The caller measures quality with
    memopt.evaluate on the returned model, as for its other rows."""
    import time

    from memopt.prune.api import calibration_ids

    config = config_for_method(method, sparsity)
    t = time.perf_counter()
    calib = calibration_ids(loaded, n_calib, 256) if config.needs_calibration else None
    report = prune_(loaded, config, calib=calib)
    label = f"prune {method}" + ("" if ":" in method else f" {report.sparsity:.0%}")
    return {
        "technique": label,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "sparsity": report.sparsity,
        "formats": report.formats,
        "seconds": time.perf_counter() - t,
    }
