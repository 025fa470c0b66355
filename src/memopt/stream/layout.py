"""Data locality of weight files: tensors in execution order, so that streaming reads front to back.

``safetensors.torch.save_file`` sorts tensors by name, so ``layers.10`` comes before ``layers.2``:
each block is still one contiguous run, but the blocks are out of order and a cold streamed run
seeks. memopt's own folders (:func:`memopt.models.saved.save`) are written in execution order;
:func:`save_float_folder` writes a Hugging Face folder the same way, and :func:`order_report` checks
a file (tests/stream/test_layout.py).

In-memory layout: :func:`channels_last_` for convolutional models, the one change that measured a
gain here (bench/stream.py, part 3); Linear layers have no layout to choose on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.formats.safetensors import SafetensorsReader, SafetensorsWriter
from memopt.models import LoadedModel

__all__ = ["channels_last_", "order_report", "save_float_folder"]


def save_float_folder(
    loaded: LoadedModel, out_dir: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write ``loaded`` as a Hugging Face folder (config.json, model.safetensors, tokenizer), its
    tensors in execution order (module registration order), each tied tensor once."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    tensors: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        own = list(m._parameters.items())
        own += [(a, b) for a, b in m._buffers.items() if a not in m._non_persistent_buffers_set]
        for attr, t in own:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            t = t.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors.append((prefix + attr, t))
    writer = SafetensorsWriter(
        out / "model.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors]
    )
    for n, t in tensors:
        writer.write(n, t)
    writer.close()
    if loaded.config is not None:
        loaded.config.to_json_file(str(out / "config.json"))
    try:
        tok = loaded.tokenizer()
    except (MemoptError, OSError):
        tok = None  # a model without a tokenizer is still a model
    if tok is not None:
        tok.save_pretrained(str(out))
    return out


_BLOCK = re.compile(r"^(.*?)\.(\d+)\.")


def order_report(folder: str | Path) -> dict[str, Any]:
    """How a weight file is laid out: ``blocks_contiguous`` (each block's tensors one run of bytes)
    and ``blocks_in_order`` (block i before block i+1, so a streamed pass reads front to back)."""
    src = SafetensorsReader(folder)
    runs: list[int] = []  # block index of each run of consecutive tensors
    for name in src.names():
        m = _BLOCK.match(name)
        idx = int(m.group(2)) if m else -1
        if not runs or runs[-1] != idx:
            runs.append(idx)
    blocks = [r for r in runs if r >= 0]
    return {
        "tensors": len(src.names()),
        "blocks": len(set(blocks)),
        "blocks_contiguous": len(blocks) == len(set(blocks)),
        "blocks_in_order": blocks == sorted(blocks),
    }


def channels_last_(model: torch.nn.Module) -> bool:
    """Store a model's 4-D weights channels-last (NHWC) in place, if it has 2-D convolutions.

    Returns whether it did. Feed it channels-last inputs too
    (``x.contiguous(memory_format=torch.channels_last)``), or the first convolution converts them.
    On CPU, oneDNN's convolutions run faster on channels-last tensors, for inference and for a
    training step alike (bench/stream.py, part 3, times both against the default layout). A
    model without convolutions is left as it is: its Linear weights are read row by row either way.
    """
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    model.to(memory_format=torch.channels_last)
    return True
