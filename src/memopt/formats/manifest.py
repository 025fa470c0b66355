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

__all__ = ["FORMAT_VERSION", "MANIFEST", "TOKENIZER_FILES", "WEIGHTS", "read_manifest"]

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


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a saved folder, checked for the keys a load needs; MemoptError otherwise."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise MemoptError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MemoptError(f"{path}: corrupt manifest (not JSON: {one_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "memopt":
        raise MemoptError(f"{path}: not a memopt manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
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
    return manifest
