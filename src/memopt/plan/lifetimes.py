"""Sizes and lifetimes of the intermediate tensors of an exported graph.

A *step* is one node that computes (writes new memory); view ops (``view``, ``permute``, ``expand``,
``select``, ``slice``...) compute nothing and get no step. Every computed tensor owns one *buffer*:

- ``first`` is the step that writes it, ``last`` the last step that reads it, directly or through any
  view of it (an alias extends its base's lifetime: ``permute(x)`` read at step 9 keeps ``x`` alive
  until 9). Graph outputs live to the end (``last = n_steps - 1``): the caller reads them after the
  step. An output nobody reads (``native_layer_norm``'s mean and rstd at inference) lives for its own
  step only, but still needs bytes for that step.
- Intervals are inclusive: a step's inputs and its output are live together, so ``out=`` never
  writes over what it reads.
- Parameters, buffers, lifted constants and user inputs are not arena tensors (they live outside the
  step, in the model or the caller); views of them are not either.

``size`` is the byte extent a tensor's strides reach (``1 + Σ (size_i - 1)·stride_i`` elements), rounded
up to :data:`ALIGNMENT` = 64 bytes, the cache line and the widest SIMD load on this CPU (AVX-512 would
also be 64), so every offset is 64-byte aligned. ``lower_bound`` is the maximum over steps of the sum
of aligned sizes live at that step: no placement of these tensors can use fewer bytes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

__all__ = [
    "ALIGNMENT",
    "Lifetimes",
    "TensorLife",
    "align",
    "is_view_op",
    "lifetimes",
    "live_bytes_per_step",
    "tensor_nbytes",
]

ALIGNMENT = 64

# Ops that only check metadata; they return nothing and are not steps.
_SKIP = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range", "_assert_async")


def align(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes from the tensor's first element to its last, following its strides (0 if empty)."""
    if t.numel() == 0:
        return 0
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    return (t.storage_offset() + extent) * t.element_size()


@dataclass(frozen=True)
class TensorLife:
    """One arena tensor: ``size`` aligned bytes, live for steps ``first..last`` inclusive."""

    name: str  # the node that writes it ("native_layer_norm_3" or "native_layer_norm_3#1")
    nbytes: int  # exact bytes
    size: int  # nbytes rounded up to ALIGNMENT
    first: int
    last: int

    def overlaps(self, other: TensorLife) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass
class Lifetimes:
    """The arena tensors of one graph, and how its nodes map to them."""

    tensors: list[TensorLife]
    n_steps: int
    step_nodes: list[str]  # step -> node name
    # node name -> (buffer index, or None for a non-arena root, e.g. a parameter) of each output
    buffers_of: dict[str, list[int | None]] = field(default_factory=dict)
    raw_peak_bytes: int = 0  # the lower bound with exact (unaligned) sizes, for reference
    constants: list[str] = field(default_factory=list)  # folded nodes (see lifetimes(varying=))

    @property
    def lower_bound_bytes(self) -> int:
        return max(live_bytes_per_step(self.tensors, self.n_steps), default=0)

    @property
    def naive_bytes(self) -> int:
        return sum(t.size for t in self.tensors)


def live_bytes_per_step(tensors: list[TensorLife], n_steps: int, exact: bool = False) -> list[int]:
    """Bytes live at each step (a difference array: O(tensors + steps))."""
    diff = [0] * (n_steps + 1)
    for t in tensors:
        b = t.nbytes if exact else t.size
        diff[t.first] += b
        diff[t.last + 1] -= b
    out, run = [], 0
    for d in diff[:n_steps]:
        run += d
        out.append(run)
    return out


def is_view_op(target: object) -> bool:
    """An aten op whose (first) output aliases an input without writing to it."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    info = schema.returns[0].alias_info
    return info is not None and not info.is_write


def _aliased_arg(node: fx.Node) -> fx.Node | None:
    """The input a view node aliases: the argument sharing its return's alias set (usually self)."""
    schema = node.target._schema  # type: ignore[union-attr]
    sets = schema.returns[0].alias_info.before_set
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.before_set & sets:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, fx.Node) else None
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def _vals(node: fx.Node) -> list[object]:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (tuple, list)) else [val]


def lifetimes(graph: fx.Graph, varying: set[str] | None = None) -> Lifetimes:
    """Compute every arena tensor's size and lifetime in ``graph`` (nodes in execution order).

    ``varying``: names of the placeholders that change from step to step (the user inputs). When
    given, nodes that depend on none of them (position ids, causal masks, rotary tables) are
    *constants*: computed once, kept outside the arena like parameters, listed in
    :attr:`Lifetimes.constants`, and not steps. When None, every computing node is a step.
    """
    depends: set[str] = set()  # nodes that depend on a varying input
    constants: list[str] = []
    root: dict[str, int | None] = {}  # node name -> buffer it aliases (single-output nodes)
    buffers_of: dict[str, list[int | None]] = {}
    firsts: list[int] = []
    lasts: list[int] = []
    nbytes: list[int] = []
    names: list[str] = []
    step_nodes: list[str] = []

    def new_buffer(name: str, t: torch.Tensor, step: int) -> int:
        names.append(name)
        nbytes.append(tensor_nbytes(t))
        firsts.append(step)
        lasts.append(step)
        return len(names) - 1

    def read(arg: object, step: int) -> None:
        # every node read at `step` (possibly nested in lists) keeps its buffer alive to `step`
        if isinstance(arg, fx.Node):
            for b in buffers_of.get(arg.name, [root.get(arg.name)]):
                if b is not None:
                    lasts[b] = max(lasts[b], step)
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                read(a, step)
        elif isinstance(arg, dict):
            for a in arg.values():
                read(a, step)

    output_node: fx.Node | None = None
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            root[node.name] = None  # parameters, buffers, constants, user inputs: not in the arena
            if node.op == "placeholder" and (varying is None or node.name in varying):
                depends.add(node.name)
            continue
        if node.op != "output" and any(a.name in depends for a in node.all_input_nodes):
            depends.add(node.name)
        if node.op == "output":
            output_node = node
        elif node.target is operator.getitem:
            src, idx = node.args
            assert isinstance(src, fx.Node)
            if src.name in buffers_of:  # element of a multi-output op: its own buffer
                root[node.name] = buffers_of[src.name][idx]  # type: ignore[index]
            else:  # element of a view-list op (split, unbind): aliases the op's base
                root[node.name] = root.get(src.name)
        elif any(s in str(node.target) for s in _SKIP):
            root[node.name] = None
        elif is_view_op(node.target):
            base = _aliased_arg(node)
            root[node.name] = root.get(base.name) if base is not None else None
        elif node.name not in depends:  # folded: computed once, outside the arena
            constants.append(node.name)
            root[node.name] = None
            if isinstance(node.meta.get("val"), (tuple, list)):
                buffers_of[node.name] = [None] * len(node.meta["val"])
        else:
            step = len(step_nodes)
            step_nodes.append(node.name)
            read((node.args, node.kwargs), step)  # inputs first: they are live during the step
            vals = _vals(node)
            multi = isinstance(node.meta.get("val"), (tuple, list))
            ids: list[int | None] = []
            for i, v in enumerate(vals):
                if isinstance(v, torch.Tensor):
                    ids.append(new_buffer(f"{node.name}#{i}" if multi else node.name, v, step))
                else:
                    ids.append(None)
            if multi:
                buffers_of[node.name] = ids
            else:
                root[node.name] = ids[0]
    n_steps = len(step_nodes)
    if output_node is not None:
        end = max(n_steps - 1, 0)
        read(output_node.args, end)  # outputs live to the end: the caller reads them afterwards
    for name, r in root.items():
        if name not in buffers_of:
            buffers_of[name] = [r]
    tensors = [
        TensorLife(names[i], nbytes[i], align(nbytes[i]), firsts[i], lasts[i])
        for i in range(len(names))
    ]
    lt = Lifetimes(tensors, n_steps, step_nodes, buffers_of, constants=constants)
    lt.raw_peak_bytes = max(live_bytes_per_step(tensors, n_steps, exact=True), default=0)
    return lt
