"""Place tensors with known sizes and lifetimes at offsets in one arena, as small as we can.

Offsets are found by best fit: a tensor goes into the smallest gap, between tensors already placed
whose lifetimes overlap its own, that holds it; if no gap does, it goes above the highest of them.
What decides the result is the order tensors are placed in. We try several and keep the smallest:

- ``greedy_by_size``: largest first (Pisarchyk & Lee 2020, "Efficient Memory Management for Deep
  Neural Net Inference", §4.3 "greedy by size for offset calculation"). Big tensors claim space
  first and small ones fill the holes between them.
- ``greedy_by_breadth``: steps in decreasing order of the bytes live at them (the paper's "operator
  breadth"), and at each step the tensors live there, largest first: the tightest step is packed
  before anything can fragment it.
- ``long_lived_first``: longest lifetime first (ties: larger first): tensors that span many steps
  constrain everything, so they go to the bottom.
- ``by_first_use``: in order of first use, larger first (the order an online allocator sees them).

Each order is tried with two tie-breaks; then, while the best arena is above the lower bound, a few
orderings that move the tensors live at the worst step (the one whose top offset defines the arena)
to the front are tried as well (a small, bounded search). Every plan is checked (:func:`check`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from memopt.plan.lifetimes import TensorLife, live_bytes_per_step

__all__ = ["STRATEGIES", "ArenaPlan", "check", "place", "plan_arena"]

Order = Callable[[Sequence[TensorLife], int], list[int]]


def _by_size(ts: Sequence[TensorLife], n_steps: int) -> list[int]:
    return sorted(range(len(ts)), key=lambda i: (-ts[i].size, ts[i].first))


def _by_breadth(ts: Sequence[TensorLife], n_steps: int) -> list[int]:
    live = live_bytes_per_step(list(ts), n_steps)
    at_step: list[list[int]] = [[] for _ in range(n_steps)]
    for i, t in enumerate(ts):
        for s in range(t.first, t.last + 1):
            at_step[s].append(i)
    seen: set[int] = set()
    order: list[int] = []
    for s in sorted(range(n_steps), key=lambda s: -live[s]):
        for i in sorted(at_step[s], key=lambda i: -ts[i].size):
            if i not in seen:
                seen.add(i)
                order.append(i)
    return order


def _long_first(ts: Sequence[TensorLife], n_steps: int) -> list[int]:
    return sorted(range(len(ts)), key=lambda i: (-(ts[i].last - ts[i].first), -ts[i].size))


def _first_use(ts: Sequence[TensorLife], n_steps: int) -> list[int]:
    return sorted(range(len(ts)), key=lambda i: (ts[i].first, -ts[i].size))


STRATEGIES: dict[str, Order] = {
    "greedy_by_size": _by_size,
    "greedy_by_breadth": _by_breadth,
    "long_lived_first": _long_first,
    "by_first_use": _first_use,
}


def place(tensors: Sequence[TensorLife], order: Sequence[int]) -> list[int]:
    """Best-fit offsets for ``tensors`` placed in ``order``; returns one offset per tensor."""
    n = len(tensors)
    first = np.fromiter((t.first for t in tensors), np.int64, n)
    last = np.fromiter((t.last for t in tensors), np.int64, n)
    size = np.fromiter((t.size for t in tensors), np.int64, n)
    offsets = np.full(n, -1, np.int64)
    placed = np.zeros(n, bool)
    for i in order:
        # placed tensors whose lifetimes overlap tensor i's (inclusive intervals)
        mask = placed & (first <= last[i]) & (last >= first[i])
        idx = np.flatnonzero(mask)
        best, best_gap = -1, None
        top = 0
        if idx.size:
            lo = offsets[idx]
            hi = lo + size[idx]
            order_lo = np.argsort(lo, kind="stable")
            for j in order_lo:  # sweep upwards; `top` is the highest end seen so far
                gap = int(lo[j]) - top
                if gap >= size[i] and (best_gap is None or gap < best_gap):
                    best, best_gap = top, gap
                top = max(top, int(hi[j]))
        offsets[i] = best if best >= 0 else top
        placed[i] = True
    return [int(o) for o in offsets]


def _arena_size(tensors: Sequence[TensorLife], offsets: Sequence[int]) -> int:
    return max((o + t.size for o, t in zip(offsets, tensors, strict=True)), default=0)


def check(tensors: Sequence[TensorLife], offsets: Sequence[int]) -> None:
    """Raise AssertionError if two tensors live at the same step share a byte."""
    events = sorted(range(len(tensors)), key=lambda i: tensors[i].first)
    active: list[int] = []
    for i in events:
        t = tensors[i]
        active = [j for j in active if tensors[j].last >= t.first]
        for j in active:
            u = tensors[j]
            if offsets[i] < offsets[j] + u.size and offsets[j] < offsets[i] + t.size:
                raise AssertionError(f"{t.name} and {u.name} overlap in time and in bytes")
        active.append(i)


@dataclass
class ArenaPlan:
    """Where each tensor lives in the arena and how good that is."""

    tensors: list[TensorLife]
    offsets: list[int]
    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    strategy: str
    n_steps: int
    tried: dict[str, int] = field(default_factory=dict)  # strategy -> arena bytes

    @property
    def ratio_to_lower_bound(self) -> float:
        return self.arena_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0

    def to_dict(self) -> dict[str, object]:
        return {
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "naive_bytes": self.naive_bytes,
            "strategy": self.strategy,
            "tensors": len(self.tensors),
            "steps": self.n_steps,
            "tried": dict(self.tried),
        }


def plan_arena(
    tensors: Sequence[TensorLife],
    n_steps: int,
    strategies: Sequence[str] | None = None,
    search: int = 8,
) -> ArenaPlan:
    """Try every strategy (and up to ``search`` refinements), keep the smallest arena."""
    tensors = list(tensors)
    n_steps = max(n_steps, max((t.last + 1 for t in tensors), default=0))
    live = live_bytes_per_step(tensors, n_steps)
    lower = max(live, default=0)
    naive = sum(t.size for t in tensors)
    tried: dict[str, int] = {}
    best: tuple[int, str, list[int]] | None = None

    def consider(name: str, order: list[int]) -> None:
        nonlocal best
        offsets = place(tensors, order)
        size = _arena_size(tensors, offsets)
        tried[name] = size
        if best is None or size < best[0]:
            best = (size, name, offsets)

    for name in strategies or list(STRATEGIES):
        order = STRATEGIES[name](tensors, n_steps)
        consider(name, order)
        if best is not None and best[0] == lower:
            break
        # tie-break variant: same key, reversed among equal keys (cheap second opinion)
        consider(f"{name}/late_first", _late_ties(tensors, order))
        if best is not None and best[0] == lower:
            break
    # Small search: put the tensors live where the current best plan peaks first, then the rest in
    # the best order so far; repeat from the new plan's peak.
    for k in range(search):
        assert best is not None
        if best[0] == lower:
            break
        size, name, offsets = best
        top_tensor = max(range(len(tensors)), key=lambda i: offsets[i] + tensors[i].size)
        t = tensors[top_tensor]
        crowded = max(range(t.first, t.last + 1), key=lambda s: live[s])
        front = sorted(
            (i for i, u in enumerate(tensors) if u.first <= crowded <= u.last),
            key=lambda i: -tensors[i].size,
        )
        rest = [i for i in _by_size(tensors, n_steps) if i not in set(front)]
        consider(f"search{k}", front + rest)
        if best[1] != f"search{k}":
            break
    assert best is not None
    size, name, offsets = best
    check(tensors, offsets)
    return ArenaPlan(tensors, offsets, size, lower, naive, name, n_steps, tried)


def _late_ties(tensors: Sequence[TensorLife], order: list[int]) -> list[int]:
    """Larger first; among equal sizes the later-starting tensor first, then the original order."""
    rank = {i: r for r, i in enumerate(order)}
    return sorted(order, key=lambda i: (-tensors[i].size, -tensors[i].first, rank[i]))
