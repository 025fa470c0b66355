"""The manifest of a memopt folder (``memopt.json``, format version 1): its names and its check.

A saved folder holds::

    memopt.json          the manifest (below)
    model.safetensors    every tensor once, in execution order (blocks in order: streaming reads
                         them front to back); quantized weights in their portable disk form
    config.json          the transformers config (also inside the manifest)
    tokenizer files      copied from the source (a GGUF source: its converted tokenizer)

The manifest records the task, the quantization configs that were applied, and, per quantized
weight, its format, shape, group size and the dtype/shape of each of its tensors, per quantized
module its class and which weight it uses (a tied lm_head names the embedding's weight: stored
once), float tensors shared by several names (``aliases``), the non-persistent buffers that were
saved and the dtype casts at module boundaries (``cast_hooks``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError, one_line

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "TASKS",
    "TOKENIZER_FILES",
    "WEIGHTS",
    "check_manifest",
    "read_manifest",
]

FORMAT_VERSION = 1
MANIFEST = "memopt.json"
WEIGHTS = "model.safetensors"

# Files a tokenizer (and generation defaults) may consist of; copied along when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

_REQUIRED = (
    ("task", str),
    ("tensors", list),
    ("weights", dict),
    ("modules", dict),
    ("aliases", dict),
    ("non_persistent", list),
    ("cast_hooks", dict),
)
TASKS = ("causal-lm", "encoder")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a saved folder, every field a load reads checked (:func:`check_manifest`);
    MemoptError in one line naming the file, the field and what was expected otherwise."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise MemoptError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    except RecursionError:
        raise MemoptError(f"{path}: corrupt manifest (JSON nested too deep)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MemoptError(f"{path}: corrupt manifest (not JSON: {one_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "memopt":
        raise MemoptError(f"{path}: not a memopt manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise MemoptError(f"{path}: corrupt manifest (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise MemoptError(
            f"{path}: format version {version} was written by a newer memopt "
            f"(this one reads up to {FORMAT_VERSION})"
        )
    for key, kind in _REQUIRED:
        if not isinstance(manifest.get(key), kind):
            raise MemoptError(
                f"{path}: corrupt manifest ({key!r} missing or not a {kind.__name__})"
            )
    problem = check_manifest(manifest, Path(folder))
    if problem:
        raise MemoptError(f"{path}: corrupt manifest ({problem})")
    return manifest


def _names(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _dims(v: Any, least: int) -> bool:
    return isinstance(v, list) and all(type(d) is int and d >= least for d in v)


def check_manifest(m: dict[str, Any], folder: Path) -> str:
    """What is wrong with a manifest's fields (``""``: nothing), the schema of format version 1:

    ``task`` one of TASKS; ``tensors`` distinct names; ``weights``: name -> {``format``: str,
    ``shape``: [rows, columns] >= 1, ``dtype``: str, ``group_size``: null or >= 1, ``tensors``:
    suffix -> {``dtype``: str, ``shape``: [>= 0...]}}, each of its tensors listed in ``tensors``;
    ``modules``: name -> {``class``: str, ``weight``: a key of ``weights``}; ``aliases``: name ->
    name in ``tensors``; ``non_persistent``: names; ``cast_hooks``: name -> [inner, outer] dtype
    names; ``files``: ``weights`` and ``config`` the folder's two files, ``tokenizer`` names of
    files in the folder. Checked against the folder and the weights' file by the loader
    (memopt.models.saved), which resolves every name before anything is assigned."""
    if m["task"] not in TASKS:
        return f"task {m['task']!r}, expected one of {', '.join(TASKS)}"
    tensors = m["tensors"]
    if not all(_names(t) for t in tensors):
        return "tensors: not a list of names"
    if len(set(tensors)) != len(tensors):
        return "tensors: a name listed twice"
    listed = set(tensors)
    for key, spec in m["weights"].items():
        where = f"weights[{key!r}]"
        if not isinstance(spec, dict):
            return f"{where} is not an object"
        if not _names(spec.get("format")) or not _names(spec.get("dtype")):
            return f"{where}: format and dtype must be names"
        shape = spec.get("shape")
        if not _dims(shape, 1) or len(shape) != 2:
            return f"{where}: shape {shape!r}, expected [rows, columns] of at least 1"
        group = spec.get("group_size")
        if group is not None and (type(group) is not int or group < 1):
            return f"{where}: group_size {group!r}, expected null or a whole number >= 1"
        parts = spec.get("tensors")
        if not isinstance(parts, dict) or not parts:
            return f"{where}: tensors missing or not an object"
        for suffix, info in parts.items():
            if (
                not isinstance(info, dict)
                or not _names(info.get("dtype"))
                or not _dims(info.get("shape"), 0)
            ):
                return f"{where}.tensors[{suffix!r}]: expected {{dtype, shape}}"
            if f"{key}.{suffix}" not in listed:
                return f"{where}: its tensor {key}.{suffix} is not in tensors"
    for name, info in m["modules"].items():
        if not isinstance(info, dict) or not _names(info.get("class")):
            return f"modules[{name!r}]: expected an object with a class"
        if not isinstance(info.get("weight"), str) or info["weight"] not in m["weights"]:
            return f"modules[{name!r}]: weight {info.get('weight')!r} is not in weights"
    used = {info["weight"] for info in m["modules"].values()}
    unused = [k for k in m["weights"] if k not in used]
    if unused:
        return f"weights[{unused[0]!r}]: no module uses it"
    for alias, first in m["aliases"].items():
        if not _names(alias) or first not in listed:
            return f"aliases[{alias!r}]: {first!r} is not in tensors"
    if not all(_names(n) for n in m["non_persistent"]):
        return "non_persistent: not a list of names"
    quantization = m.get("quantization", [])
    if not isinstance(quantization, list) or not all(isinstance(q, dict) for q in quantization):
        return "quantization: not a list of objects"
    for name, pair in m["cast_hooks"].items():
        if not isinstance(pair, list) or len(pair) != 2 or not all(_names(d) for d in pair):
            return f"cast_hooks[{name!r}]: expected [inner dtype, outer dtype]"
    return _check_files(m.get("files"), folder)  # written by every memopt since the first


def _check_files(files: Any, folder: Path) -> str:
    if not isinstance(files, dict):
        return "files is not an object"
    if files.get("weights") != WEIGHTS or files.get("config") != "config.json":
        return f"files: weights and config must be {WEIGHTS} and config.json"
    tokenizer = files.get("tokenizer", [])
    if not isinstance(tokenizer, list):
        return "files: tokenizer is not a list"
    for name in tokenizer:
        if not _names(name) or "/" in name or name.startswith(".") or not (folder / name).is_file():
            return f"files: tokenizer file {name!r} is not in the folder"
    return ""
