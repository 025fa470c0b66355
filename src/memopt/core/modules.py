"""Facts about ``nn.Module`` trees that every transform needs: which modules a user selected,
where the transformer blocks are, how to swap a submodule, how many bytes the weights hold."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from memopt.core.errors import MemoptError

__all__ = [
    "FilterFn",
    "Select",
    "find_blocks",
    "iter_chunks",
    "matches",
    "model_bytes",
    "nothing_selected",
    "numel",
    "require_blocks",
    "selector",
    "set_module",
]

FilterFn = Callable[[str, nn.Module], bool]
Select = Callable[[str, nn.Module], bool]


def matches(name: str, patterns: Iterable[str], fold: bool = False) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns`` (``fold``: case-insensitively)."""
    if fold:
        name = name.lower()
        return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def selector(
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> Select:
    """``select(name, module)``: fnmatch ``include`` patterns over fully qualified names (default:
    every module), ``exclude`` patterns (they win), then ``filter_fn(name, module)``."""
    if isinstance(include, str) or isinstance(exclude, str):
        raise MemoptError("include / exclude take a list of patterns, not a string")

    def select(name: str, module: nn.Module) -> bool:
        if include is not None and not matches(name, include):
            return False
        if exclude is not None and matches(name, exclude):
            return False
        return filter_fn is None or bool(filter_fn(name, module))

    return select


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer's block list and its name: of the non-empty ``nn.ModuleList`` whose children
    are all of one type, the one holding the most parameters (``model.layers`` in Llama,
    ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT); None when there is none.

    The one rule that streaming, checkpointing, calibration and distillation all use, so that they
    agree on what a block is. Parameters are counted by ``numel``, so it works on the meta device.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or len({type(c) for c in m}) != 1:
            continue
        size = sum(p.numel() for p in m.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, m)
    return None if best is None else (best[1], best[2])


def require_blocks(model: nn.Module, what: str) -> tuple[str, nn.ModuleList]:
    """:func:`find_blocks`, or MemoptError naming ``what`` needed them."""
    found = find_blocks(model)
    if found is None:
        raise MemoptError(
            f"{what}: {type(model).__name__} has no list of repeated blocks (an nn.ModuleList of "
            "modules of one type)"
        )
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (a dotted path)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (ties, views);
    tensors on the meta device hold none."""
    seen: dict[tuple[str, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def numel(shape: Iterable[int]) -> int:
    """Elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


def iter_chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``step`` rows covering ``0..n``."""
    for a in range(0, n, step):
        yield a, min(n, a + step)


def nothing_selected(
    verb: str,
    model: nn.Module,
    config: object,
    looked_for: str,
    include: list[str] | None,
    exclude: list[str] | None,
    skipped: dict[str, str],
) -> str:
    """The one-line refusal of a transform that found nothing to change (never a silent no-op):
    what it looked for, the selection it was given, and why the first skipped module was left."""
    where = "".join(
        f", {k}={v!r}" for k, v in (("include", include), ("exclude", exclude)) if v is not None
    )
    why = ""
    if skipped:
        name, reason = next(iter(skipped.items()))
        why = f"; {len(skipped)} skipped, e.g. {name}: {reason}"
    return (
        f"{verb}: no module of {type(model).__name__} matched {type(config).__name__}: it looks "
        f"for {looked_for}{where}{why}"
    )
