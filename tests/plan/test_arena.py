"""The planner's properties: exact lower bound on a hand-computed graph, no overlaps, bounds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from memopt.plan import STRATEGIES, plan_arena
from memopt.plan.arena import check, place
from memopt.plan.capture import capture
from memopt.plan.lifetimes import TensorLife, lifetimes, live_bytes_per_step


class MLP(nn.Module):
    """x (4, 16) -> fc1 (4, 32) -> relu -> fc2 (4, 16) -> relu -> fc3 (4, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_mlp_lifetimes_by_hand() -> None:
    # Steps after lowering: addmm1 (4x32 = 512 B), relu1 (512 B), addmm2 (4x16 = 256 B),
    # relu2 (256 B), addmm3 (4x8 = 128 B, the output: lives to the end). Weights are transposed by
    # views (not steps), the input is not an arena tensor. Each tensor is read by the next step
    # only, so live bytes per step are: 512 | 512+512 | 512+256 | 256+256 | 256+128.
    program = capture(MLP().eval(), {"x": torch.randn(4, 16)})
    lt = lifetimes(program.graph, varying={"x"})
    got = [(t.size, t.first, t.last) for t in lt.tensors]
    assert got == [(512, 0, 1), (512, 1, 2), (256, 2, 3), (256, 3, 4), (128, 4, 4)]
    assert live_bytes_per_step(lt.tensors, lt.n_steps) == [512, 1024, 768, 512, 384]
    plan = plan_arena(lt.tensors, lt.n_steps)
    assert plan.lower_bound_bytes == 1024
    assert plan.arena_bytes == 1024  # the lower bound is reached
    assert plan.naive_bytes == 512 + 512 + 256 + 256 + 128


def test_alias_extends_base_lifetime() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x * 2  # step 0
            v = a.t()  # a view of a: no step
            b = x + 1  # step 1
            c = b * 3  # step 2
            return c + v.t()  # step 3 reads a through its view: a lives 0..3

    lt = lifetimes(capture(M(), {"x": torch.randn(8, 8)}).graph, varying={"x"})
    by_name = {t.name: t for t in lt.tensors}
    assert (by_name["mul"].first, by_name["mul"].last) == (0, 3)
    assert by_name["add_1"].last == lt.n_steps - 1  # the output lives to the end


def test_offsets_are_64_byte_aligned() -> None:
    ts = [TensorLife(f"t{i}", n, (n + 63) // 64 * 64, i, i + 2) for i, n in enumerate([4, 100, 65])]
    plan = plan_arena(ts, 5)
    assert all(o % 64 == 0 for o in plan.offsets)


intervals = st.lists(
    st.tuples(st.integers(1, 5000), st.integers(0, 40), st.integers(0, 15)),
    min_size=1,
    max_size=60,
)


def _tensors(spec: list[tuple[int, int, int]]) -> list[TensorLife]:
    return [
        TensorLife(f"t{i}", n, (n + 63) // 64 * 64, f, f + d) for i, (n, f, d) in enumerate(spec)
    ]


@settings(max_examples=150, deadline=None)
@given(intervals)
def test_no_overlap_and_bounds(spec: list[tuple[int, int, int]]) -> None:
    ts = _tensors(spec)
    n_steps = max(t.last for t in ts) + 1
    plan = plan_arena(ts, n_steps)
    check(plan.tensors, plan.offsets)  # raises if two live tensors share a byte
    assert plan.lower_bound_bytes <= plan.arena_bytes <= plan.naive_bytes
    for name, order_fn in STRATEGIES.items():  # every strategy on its own is valid too
        offsets = place(ts, order_fn(ts, n_steps))
        check(ts, offsets)
        top = max(o + t.size for o, t in zip(offsets, ts, strict=True))
        assert top >= plan.arena_bytes, name  # the plan keeps the smallest


@settings(max_examples=50, deadline=None)
@given(intervals)
def test_brute_force_overlap_check(spec: list[tuple[int, int, int]]) -> None:
    ts = _tensors(spec)
    plan = plan_arena(ts, max(t.last for t in ts) + 1)
    for i, a in enumerate(ts):
        for j in range(i + 1, len(ts)):
            b = ts[j]
            if a.overlaps(b):
                oa, ob = plan.offsets[i], plan.offsets[j]
                assert oa + a.size <= ob or ob + b.size <= oa


def test_check_catches_overlap() -> None:
    ts = _tensors([(64, 0, 2), (64, 1, 2)])
    with pytest.raises(AssertionError):
        check(ts, [0, 0])
