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
saved and the dtype casts at module boundaries (``cast_hooks``). Its JSON Schema, one per format
version, is ``manifest.v<N>.schema.json`` beside this module (package data), checked with the
jsonschema library.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError, one_line

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "SCHEMAS",
    "TASKS",
    "TOKENIZER_FILES",
    "WEIGHTS",
    "check_manifest",
    "read_manifest",
    "schema",
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

# The schema of each format version this memopt reads, shipped beside this module (package data).
SCHEMAS = {1: "manifest.v1.schema.json"}


@functools.cache
def schema(version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a manifest of ``version``."""
    return json.loads(resources.files(__package__).joinpath(SCHEMAS[version]).read_text())


# The head a saved model is built with: the schema's enum, its one home.
TASKS: tuple[str, ...] = tuple(schema()["properties"]["task"]["enum"])


@functools.cache
def _validator(version: int) -> Any:
    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts 1.0 as an integer; a shape or a group size written 1.0 is not one here
    # (type(x) is int also keeps true/false out, as the standard checker does).
    strict = Draft202012Validator.TYPE_CHECKER.redefine("integer", lambda _, x: type(x) is int)
    cls = validators.extend(Draft202012Validator, type_checker=strict)
    return cls(schema(version))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _expected(err: Any) -> str:
    """One schema error as ``got, expected what`` (jsonschema's own message for the rare rest)."""
    kind, want, got = err.validator, err.validator_value, _short(err.instance)
    if kind == "type":
        want = want if isinstance(want, list) else [want]
        return f"{got}, expected {' or '.join(want)}"
    if kind == "enum":
        return f"{got}, expected one of {', '.join(map(str, want))}"
    if kind == "const":
        return f"{got}, expected {json.dumps(want)}"
    if kind in ("minimum", "maximum"):
        return f"{got}, expected {'>=' if kind == 'minimum' else '<='} {want}"
    if kind in ("minItems", "maxItems"):
        count = "at least" if kind == "minItems" else "at most"
        return f"{len(err.instance)} items, expected {count} {want}"
    if kind == "minLength":
        return f"{got}, expected a non-empty name"
    if kind == "minProperties":
        return f"{got}, expected at least {want} entry"
    if kind == "uniqueItems":
        return "an item listed twice, expected distinct items"
    if kind == "pattern":
        return f"{got}, expected a file name inside the folder"
    if kind == "required":
        return "missing (a required field)"
    return one_line(err.message)[:120]


def _path(err: Any) -> str:
    """The failing field as a JSON path: ``$.weights['model.layers.0.mlp.up_proj.qweight'].shape[0]``
    (jsonschema's own ``json_path`` joins keys with dots, and memopt's keys hold dots)."""
    path = "$"
    for part in err.absolute_path:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier():
            path += f".{part}"
        else:
            path += f"[{part!r}]"
    if "propertyNames" in err.schema_path:  # the error points at the object; the key is wrong
        path += f"[{err.instance!r}] (a key)"
    if err.validator == "required":  # the error points at the object; name the missing field
        missing = next(k for k in err.validator_value if k not in err.instance)
        path += f".{missing}" if missing.isidentifier() else f"[{missing!r}]"
    return path


def _seen_valid(path: Path, version: int, mark: bool = False) -> bool:
    """Whether these exact manifest bytes passed the schema of ``version`` on this machine before
    (a marker named by the SHA-256 of the bytes and of the schema, in memopt's cache folder); with
    ``mark``, record that they did. Why: jsonschema walks every weight entry in Python, 0.3 s of
    a 2-3 s ``memopt run`` for SmolLM2's 211 weights, paid again at every start."""
    import hashlib

    from memopt.core.cbuild import cache_dir

    try:
        h = hashlib.sha256(path.read_bytes())
        h.update(resources.files(__package__).joinpath(SCHEMAS[version]).read_bytes())
        marker = cache_dir() / "manifests" / h.hexdigest()
        if mark:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        return marker.is_file()
    except OSError:  # an unwritable cache: validate every time
        return False


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a saved folder, checked against the schema of its format version and by
    :func:`check_manifest`; MemoptError in one line naming the file, the field (a JSON path) and
    what was expected otherwise."""
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
    if type(version) is int and version > FORMAT_VERSION:
        raise MemoptError(
            f"{path}: format version {version} was written by a newer memopt "
            f"(this one reads up to {FORMAT_VERSION})"
        )
    # Any other version (missing, 0, true, "1") fails the schema's const: checked against v1's.
    known = type(version) is int and version in SCHEMAS
    checked = version if known else FORMAT_VERSION
    if not _seen_valid(path, checked):
        from jsonschema.exceptions import best_match

        try:
            err = best_match(_validator(checked).iter_errors(manifest))
        except RecursionError:
            raise MemoptError(f"{path}: corrupt manifest (JSON nested too deep)") from None
        if err is not None:
            raise MemoptError(f"{path}: corrupt manifest ({_path(err)}: {_expected(err)})")
        _seen_valid(path, checked, mark=True)
    problem = check_manifest(manifest, Path(folder))
    if problem:
        raise MemoptError(f"{path}: corrupt manifest ({problem})")
    return manifest


def check_manifest(m: dict[str, Any], folder: Path) -> str:
    """What is wrong in a manifest that passed its schema (``""``: nothing): what a schema cannot
    say, the names that point at other names. Each tensor of a weight listed in ``tensors``;
    each module's weight a key of ``weights``, each weight used by a module; each alias naming a
    tensor; each tokenizer file present in the folder. The loader (memopt.models.saved) then
    checks each weight entry against the layout its class makes and the safetensors header, and
    resolves every module and hook name in the architecture before anything is assigned."""
    listed = set(m["tensors"])
    for key, spec in m["weights"].items():
        for suffix in spec["tensors"]:
            if f"{key}.{suffix}" not in listed:
                return f"$.weights[{key!r}].tensors: its tensor {key}.{suffix} is not in tensors"
    for name, info in m["modules"].items():
        if info["weight"] not in m["weights"]:
            return f"$.modules[{name!r}].weight: {info['weight']!r} is not in weights"
    used = {info["weight"] for info in m["modules"].values()}
    unused = [k for k in m["weights"] if k not in used]
    if unused:
        return f"$.weights[{unused[0]!r}]: no module uses it"
    for alias, first in m["aliases"].items():
        if first not in listed:
            return f"$.aliases[{alias!r}]: {first!r} is not in tensors"
    for name in m["files"].get("tokenizer", []):
        if not (folder / name).is_file():
            return f"$.files.tokenizer: {name!r} is not in the folder"
    return ""
