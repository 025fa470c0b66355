"""Activation checkpointing per block, by pattern or all of them.

A checkpointed block keeps only its inputs through the forward and recomputes its activations in
the backward (``torch.utils.checkpoint``, non-reentrant), trading one more forward of the block for
its activation memory (Chen et al. 2016).

Blocks are the entries of the model's block list (:func:`memopt.core.modules.find_blocks`: a
transformer's layers); they are selected by index, or by ``fnmatch`` patterns on their fully
qualified names (``"model.layers.*"``, ``"model.layers.1?"``). Choosing how many to checkpoint for
a budget is memopt.train.checkpoint's.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import find_blocks, matches

__all__ = ["checkpoint_blocks", "enable_checkpointing", "select_blocks"]


def select_blocks(
    model: nn.Module, blocks: Sequence[int] | Sequence[str] | str | None
) -> list[int]:
    """Indices into the largest block list for ``blocks``: indices, name patterns, or None (all)."""
    found = find_blocks(model)
    if found is None:
        raise MemoptError(
            f"{type(model).__name__}: no nn.ModuleList of blocks to checkpoint (--checkpointing)"
        )
    prefix, blocklist = found
    n = len(blocklist)
    if blocks is None:
        return list(range(n))
    if isinstance(blocks, str):
        blocks = [blocks]
    out: set[int] = set()
    for item in blocks:
        if isinstance(item, str):
            hits = [i for i in range(n) if matches(f"{prefix}.{i}", [item])]
            if not hits:
                raise MemoptError(
                    f"checkpoint pattern {item!r} matches no block of {prefix}.0-{n - 1}"
                )
            out.update(hits)
        else:
            if not 0 <= int(item) < n:
                raise MemoptError(f"checkpoint block {item} is out of range 0-{n - 1} ({prefix})")
            out.add(int(item))
    return sorted(out)


def checkpoint_blocks(
    model: nn.Module, blocks: Sequence[int] | Sequence[str] | str | None = None
) -> list[str]:
    """Turn on activation checkpointing for the selected blocks, in place; returns their names.

    Each selected block's ``forward`` is replaced on the instance by one that runs the class
    forward under ``torch.utils.checkpoint`` (module names, parameters and hooks are unchanged, so
    it composes with FSDP2's ``fully_shard`` applied afterwards). Calling it twice on a block does
    nothing the second time.
    """
    from torch.utils.checkpoint import checkpoint

    indices = select_blocks(model, blocks)
    found = find_blocks(model)
    assert found is not None
    prefix, blocklist = found
    names: list[str] = []
    for i in indices:
        block = blocklist[i]
        if getattr(block, "_memopt_checkpointed", False):
            names.append(f"{prefix}.{i}")
            continue
        inner = block.forward  # the bound class forward

        def forward(self: nn.Module, *args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = types.MethodType(forward, block)
        block._memopt_checkpointed = True
        names.append(f"{prefix}.{i}")
    # transformers models: the KV cache is of no use while training and checkpointing
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return names


def enable_checkpointing(model: nn.Module) -> str:
    """Activation checkpointing (non-reentrant). Returns how: ``"transformers"`` or ``"blocks"``.

    Transformers models use their own ``gradient_checkpointing_enable``; any other module has each
    block of its largest ``nn.ModuleList`` wrapped in ``torch.utils.checkpoint`` (its forward is
    replaced on the instance, so module names do not change).
    """
    if getattr(model, "supports_gradient_checkpointing", False) and hasattr(
        model, "gradient_checkpointing_enable"
    ):
        import warnings

        with warnings.catch_warnings():  # transformers 5 renames it; the old name still works
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        return "transformers"
    checkpoint_blocks(model, None)
    return "blocks"
