"""``.keras`` files as a MODEL for the command line: checked, loaded, measured.

A ``.keras`` file is a zip archive (``config.json``, ``metadata.json``, ``model.weights.h5``).
Keras's loader is given only an archive that is complete: a missing file, a file that is not a zip
(or a truncated one: its central directory is at the end), an archive without ``config.json`` or
weights, is one :class:`~memopt.core.errors.MemoptError` line. Keras loads with ``safe_mode=True``
(no Python code from the file runs: its lambdas are refused) and weights from HDF5, never pickle.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError, one_line
from memopt.keras.backend import keras_module

__all__ = [
    "check_archive",
    "is_keras_file",
    "load_keras",
    "memory_in_child",
    "memory_report",
    "prune_file",
    "quantize_file",
    "read_config",
]

REQUIRED = ("config.json", "model.weights.h5")


def is_keras_file(model: Any) -> bool:
    return isinstance(model, (str, Path)) and str(model).endswith(".keras")


def check_archive(path: str | Path) -> Path:
    """``path`` as a complete Keras archive, or MemoptError saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise MemoptError(f"{p}: no such file")
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            bad = z.testzip()  # reads every member: a truncated member fails its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise MemoptError(
            f"{p}: not a Keras archive (a .keras file is a zip): {one_line(exc)}"
        ) from exc
    if bad is not None:
        raise MemoptError(f"{p}: the archive's member {bad} is corrupt")
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise MemoptError(f"{p}: not a Keras archive, it lacks {', '.join(missing)}")
    return p


def load_keras(path: str | Path, compile: bool = True) -> Any:
    """The Keras model in ``path`` (torch backend), checked first (see the module doc)."""
    p = check_archive(path)
    keras = keras_module()
    import memopt.keras.layers  # noqa: F401  (memopt's own layers are registered for loading)

    try:
        return keras.saving.load_model(p, compile=compile, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise MemoptError(f"{p}: Keras cannot load it: {one_line(exc)}") from exc


def memory_report(path: str, spec: dict[str, Any], measured: bool) -> dict[str, Any]:
    """The CLI's estimate / profile of a ``.keras`` file: the report as a JSON-ready dict. A
    profile runs in a fresh child (:func:`memory_in_child`) for its peak RSS."""
    from memopt.step.step import StepSpec

    StepSpec(**spec)  # bad options fail here, before a child starts
    check_archive(path)
    if measured:
        from memopt.core.rss import run_in_child

        out = run_in_child(memory_in_child, str(path), spec)
        report = out["report"]
        report["peak_rss_bytes"] = int(out["peak_rss_bytes"])
        report["baseline_rss_bytes"] = int(out["baseline_rss_bytes"])
        report["rss_scope"] = "child"
        return report
    from memopt.keras.measure import estimate_config

    return estimate_config(read_config(path), StepSpec(**spec)).to_dict()


def read_config(path: str | Path) -> dict[str, Any]:
    """The model's config from the archive (no weight read), memopt's layers registered."""
    p = check_archive(path)
    keras_module()
    import memopt.keras.layers  # noqa: F401

    with zipfile.ZipFile(p) as z:
        try:
            return json.loads(z.read("config.json"))
        except ValueError as exc:
            raise MemoptError(f"{p}: its config.json is not JSON: {one_line(exc)}") from exc


def memory_in_child(path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The child's work for a profile: load the file, measure one step."""
    from memopt.keras.measure import profile
    from memopt.step.step import StepSpec

    report = profile(load_keras(path), StepSpec(**spec))
    return {"report": report.to_dict()}


def quantize_file(path: str, mode: str, output: str, group_size: int = 64) -> dict[str, Any]:
    """``memopt quantize MODEL.keras --method int8|int4 -o OUT.keras``, in a fresh child (its
    peak RSS is the quantization's): the CLI's JSON keys, and the layers kept float with why."""
    if mode not in ("int8", "int4"):
        raise MemoptError(f"a .keras model quantizes to int8 or int4, not {mode!r}")
    if not str(output).endswith(".keras"):
        raise MemoptError(f"-o {output}: a Keras model is written as a .keras file")
    check_archive(path)
    from memopt.core.rss import run_in_child

    out = run_in_child(quantize_in_child, str(path), mode, str(output), group_size)
    out["peak_rss_bytes"] = int(out["peak_rss_bytes"]) - int(out["baseline_rss_bytes"])
    return out


def quantize_in_child(path: str, mode: str, output: str, group_size: int) -> dict[str, Any]:
    """The child's work: load, quantize, save through a temporary name (never half a file)."""
    from memopt.core.atomic import atomic_path
    from memopt.keras.quantizing import quantize

    model, report = quantize(load_keras(path), mode, group_size=group_size)
    with atomic_path(output, suffix=".keras") as tmp:
        tmp.unlink()  # Keras refuses to overwrite without asking
        model.save(tmp)
    return {
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "disk_bytes": Path(output).stat().st_size,
        "layers": [r.__dict__ for r in report.layers],
        "skipped": {r.name: r.reason for r in report.skipped},
    }


def prune_file(
    path: str, method: str, sparsity: float, output: str, values: str | None = None
) -> dict[str, Any]:
    """``memopt prune MODEL.keras --method magnitude --sparsity S -o OUT.keras``: one-shot
    magnitude pruning of every Dense / Conv / Embedding kernel, stored sparse (float or int8
    values), in a fresh child."""
    if method != "magnitude":
        raise MemoptError(f"a .keras model is pruned by magnitude, not {method!r}")
    values = values or "float"
    if values not in ("float", "int8"):
        raise MemoptError(f"--values for a .keras model: float or int8, not {values!r}")
    if not 0.0 < sparsity < 1.0:
        raise MemoptError(f"--sparsity must be in (0, 1), got {sparsity}")
    if not str(output).endswith(".keras"):
        raise MemoptError(f"-o {output}: a Keras model is written as a .keras file")
    check_archive(path)
    from memopt.core.rss import run_in_child

    return run_in_child(prune_in_child, str(path), sparsity, str(output), values)


def prune_in_child(path: str, sparsity: float, output: str, values: str) -> dict[str, Any]:
    from memopt.core.atomic import atomic_path
    from memopt.keras.prune import prune_magnitude, strip

    model = load_keras(path)
    prune_magnitude(model, sparsity)
    small, report = strip(model, values=values)
    with atomic_path(output, suffix=".keras") as tmp:
        tmp.unlink()  # Keras refuses to overwrite without asking
        small.save(tmp)
    return {
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "disk_bytes": Path(output).stat().st_size,
        "sparsity": report.sparsity,
        "layers": report.layers,
    }
