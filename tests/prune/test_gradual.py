"""Gradual pruning: the schedule's values, masks on the way, gradients off pruned weights,
and strip() into sparse storage with unchanged outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.prune import PolynomialDecay, SparseWeight, prune_low_magnitude


def test_schedule_values():
    s = PolynomialDecay(0.0, 0.8, begin_step=10, end_step=110, power=3, frequency=25)
    assert s(0) == 0.0 and s(10) == 0.0
    assert s(60) == pytest.approx(0.8 - 0.8 * 0.5**3)  # halfway: 0.7
    assert s(110) == pytest.approx(0.8) and s(1000) == pytest.approx(0.8)
    assert [t for t in range(200) if s.should_update(t)] == [10, 35, 60, 85, 110]
    lin = PolynomialDecay(0.2, 0.6, 0, 4, power=1, frequency=1)
    assert [round(lin(t), 6) for t in range(5)] == [0.2, 0.3, 0.4, 0.5, 0.6]


def test_bad_schedule():
    for kw in ({"final_sparsity": 1.0}, {"begin_step": 5, "end_step": 5}, {"frequency": 0}):
        with pytest.raises(MemoptError):
            PolynomialDecay(**kw)


def test_training_masks_grads_and_strip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    x, y = torch.randn(128, 20), torch.randint(0, 4, (128,))
    sched = PolynomialDecay(0.0, 0.75, begin_step=0, end_step=30, frequency=10)
    pruner = prune_low_magnitude(model, sched)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    seen = []
    for step in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 25:  # gradients of pruned weights are exactly zero
            for name, m in pruner.targets:
                g = m.weight.grad
                assert torch.equal(g[~pruner.masks[name]], torch.zeros_like(g[~pruner.masks[name]]))
        opt.step()
        pruner.step()
        seen.append(pruner.sparsity())
    # sparsity rises on schedule: flat between updates (AdamW's momentum cannot revive a weight)
    assert seen[8] == pytest.approx(sched(0), abs=1e-3)
    assert seen[9] == pytest.approx(sched(10), abs=1e-3)
    assert seen[-1] == pytest.approx(0.75, abs=1e-3)
    assert all(a <= b + 1e-9 for a, b in zip(seen[:-1], seen[1:], strict=True))
    model.eval()
    with torch.no_grad():
        before = model(x)
    state = pruner.state_dict()
    rep = pruner.strip()
    assert rep.sparsity == pytest.approx(0.75, abs=1e-3)
    assert isinstance(model[0].qweight, SparseWeight) and isinstance(model[2].qweight, SparseWeight)
    assert rep.bytes_after < 0.5 * rep.bytes_before
    with torch.no_grad():
        assert torch.equal(model(x), before)  # strip changes storage, not results
    assert set(state["masks"]) == {"0", "2"} and state["global_step"] == 40


def test_global_scope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight.mul_(100)
    pruner = prune_low_magnitude(model, PolynomialDecay(0.5, 0.5, 0, 1), scope="global")
    assert (model[0].weight == 0).float().mean() > 0.5 > (model[2].weight == 0).float().mean()
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-3)
