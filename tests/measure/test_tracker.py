"""MemoryTracker: exact bytes on models whose memory can be worked out by hand, on CPU and on meta."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from memopt.measure.tracker import CATEGORIES, MemoryTracker

DEVICES = ("cpu", "meta")
F32 = 4  # bytes per float32


def _zero(**nonzero: int) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    out.update(nonzero)
    return out


def _mlp(device: str) -> tuple[nn.Module, torch.Tensor]:
    """Linear(64→256) → ReLU → Linear(256→16) on a (32, 64) float32 batch.

    Parameter bytes: W1 64·256·4 = 65,536; b1 256·4 = 1,024; W2 256·16·4 = 16,384; b2 16·4 = 64;
    total 83,008. Tensors: x (32, 64) = 8,192; h1 = W1 x + b1 and h2 = relu(h1), (32, 256) = 32,768
    each; y (32, 16) = 2,048.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 16)).to(device)
    x = torch.randn(32, 64, device=device)
    return model, x


MLP_PARAMS = 65_536 + 1_024 + 16_384 + 64


@pytest.mark.parametrize("device", DEVICES)
def test_linear_params_exact(device: str) -> None:
    layer = nn.Linear(1024, 4096, device=device)
    with MemoryTracker(layer) as tracker:
        pass
    # (1024·4096 weights + 4096 biases) · 4 bytes
    assert (1024 * 4096 + 4096) * F32 == 16_793_600
    assert tracker.peak_bytes == tracker.current_bytes == 16_793_600
    assert tracker.peak_breakdown() == _zero(params=16_793_600)
    assert tracker.current_breakdown() == _zero(params=16_793_600)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_forward_peak_exact(device: str) -> None:
    model, x = _mlp(device)
    with MemoryTracker(model) as tracker, torch.no_grad():
        tracker.track_existing(x)
        y = model(x)
    # The peak is inside ReLU: x, h1 (its input, still bound in Sequential's loop) and h2 are alive:
    # 8,192 + 32,768 + 32,768 = 73,728 bytes of activations. Weight transposes are views (no bytes).
    result = tracker.result()
    assert result.peak_bytes == MLP_PARAMS + 73_728 == 156_736
    assert result.breakdown == _zero(params=MLP_PARAMS, activations=73_728)
    assert result.peak_phase == "start"
    # At the end h1 and h2 are freed; x and y remain.
    assert result.current_bytes == MLP_PARAMS + 8_192 + 2_048
    assert y.shape == (32, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_forward_backward_peak_exact(device: str) -> None:
    model, x = _mlp(device)
    with MemoryTracker(model) as tracker:
        tracker.track_existing(x)
        tracker.mark("forward")
        loss = model(x).sum()
        tracker.mark("backward")
        loss.backward()
    # Autograd keeps x (for dL/dW1) and h2 (for relu and dL/dW2); h1 and y are freed in the forward.
    # Backward, in order: the seed dL/dloss = ones (4 B; backward() holds it until it returns) and
    # its expand (a view); second Linear: dL/dh2 (32,768), dW2, db2 (16,448 of grads); ReLU:
    # dL/dh1 (32,768), after which h2 and dL/dh2 are released; first Linear: dW1 (65,536) and
    # db1 (1,024). The peak is the moment db1 is written, with every grad alive and dL/dh1 not yet
    # released: activations = x 8,192 + dL/dh1 32,768 + loss 4 + seed 4 = 40,968.
    # (One event earlier, inside ReLU's backward, the total is 1,024 lower: x + h2 + dL/dh2 + dL/dh1
    # + 8 = 106,504 activations with 16,448 grads.)
    result = tracker.result()
    assert result.breakdown == _zero(params=MLP_PARAMS, grads=MLP_PARAMS, activations=40_968)
    assert result.peak_bytes == 2 * MLP_PARAMS + 40_968 == 206_984
    assert result.peak_phase == "backward"
    # dW1 and dW2 are stolen autograd temporaries (mm outputs) that became .grad: still "grads".
    after = tracker.current_breakdown()
    assert after == _zero(params=MLP_PARAMS, grads=MLP_PARAMS, activations=8_192 + 4)


@pytest.mark.parametrize("device", DEVICES)
def test_views_counted_once_and_frees_leave(device: str) -> None:
    with MemoryTracker() as tracker:
        x = torch.empty(64, 32, device=device)  # 8,192 bytes
        views = [x.view(32, 64), x[::2], x.t(), x[1:], x.reshape(-1)]
        assert tracker.current_bytes == 8_192
        y = x * 2  # a new storage
        assert tracker.current_bytes == 16_384
        del x, views
        assert tracker.current_bytes == 8_192
        del y
        assert tracker.current_bytes == 0
    assert tracker.peak_bytes == 16_384


@pytest.mark.parametrize("device", DEVICES)
def test_current_returns_to_start_after_a_step(device: str) -> None:
    model, x = _mlp(device)
    with MemoryTracker(model) as tracker:
        tracker.track_existing(x)
        start = tracker.current_bytes
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)
        assert tracker.current_bytes == start == MLP_PARAMS + 8_192
    assert tracker.peak_bytes > start


def test_factories_resize_out_and_python_data() -> None:
    with MemoryTracker() as tracker:
        a = torch.tensor([1.0, 2.0, 3.0])  # built from Python data, handed over by lift_fresh
        assert tracker.current_bytes == 12
        b = torch.empty(0)
        b.resize_(100)  # the storage grows in place
        assert tracker.current_bytes == 12 + 400
        out = torch.empty(0)
        torch.add(b, 1, out=out)  # out= grows its output to 100 floats
        assert tracker.current_bytes == 12 + 400 + 400
        p = nn.Parameter(torch.zeros(10))  # a subclass sharing the factory's storage
        assert tracker.current_bytes == 12 + 800 + 40
        del a, b, out, p
        assert tracker.current_bytes == 0


def test_preexisting_tensors_only_when_asked() -> None:
    x = torch.zeros(256)  # 1,024 bytes, made before the tracker
    with MemoryTracker() as tracker:
        x.view(16, 16).add_(1)  # a view and an in-place op on it: nothing new
        assert tracker.current_bytes == 0
        tracker.track_existing(x)
        assert tracker.current_breakdown() == _zero(activations=1_024)
        tracker.track_existing(x[::2], category="buffers")  # same storage: recategorised, once
        assert tracker.current_breakdown() == _zero(buffers=1_024)


def test_adamw_state_is_optimizer() -> None:
    model, x = _mlp("cpu")
    with MemoryTracker(model) as tracker:
        tracker.track_existing(x)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # made inside, attached later
        tracker.attach_optimizer(opt)
        model(x).sum().backward()
        opt.step()
        # exp_avg + exp_avg_sq per parameter (2 × 83,008) and a float32 `step` scalar for each of
        # the 4 parameters.
        assert tracker.current_breakdown() == _zero(
            params=MLP_PARAMS,
            grads=MLP_PARAMS,
            optimizer=2 * MLP_PARAMS + 4 * F32,
            activations=8_192,
        )
        opt.zero_grad(set_to_none=True)
        assert tracker.current_breakdown()["grads"] == 0
    # Grads were freed by zero_grad but were grads while alive, at the peak too.
    assert tracker.peak_breakdown()["grads"] == MLP_PARAMS
    assert tracker.peak_breakdown()["optimizer"] == 2 * MLP_PARAMS + 4 * F32


def test_sgd_without_momentum_has_no_optimizer_bytes() -> None:
    model, x = _mlp("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with MemoryTracker(model, optimizer=opt) as tracker:
        tracker.track_existing(x)
        model(x).sum().backward()
        opt.step()
    result = tracker.result()
    assert result.breakdown["optimizer"] == 0
    assert result.current_breakdown == _zero(params=MLP_PARAMS, grads=MLP_PARAMS, activations=8_192)


def _train_step_result(device: str) -> dict:
    model, x = _mlp(device)
    opt = torch.optim.AdamW(model.parameters())
    with MemoryTracker(model, optimizer=opt) as tracker:
        tracker.track_existing(x)
        for _ in range(2):
            tracker.mark("forward")
            # Not F.mse_loss: its CPU kernel returns the scalar in the storage of the unreduced
            # (32, 16) buffer (2,048 bytes, alive as long as the loss), its meta kernel in 4 bytes.
            loss = (model(x) - torch.ones(32, 16, device=device)).square().mean()
            tracker.mark("backward")
            loss.backward()
            tracker.mark("optimizer")
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracker.result().to_dict()


def test_meta_matches_cpu() -> None:
    cpu, meta = _train_step_result("cpu"), _train_step_result("meta")
    assert meta["peak_bytes"] == cpu["peak_bytes"]
    assert meta["breakdown"] == cpu["breakdown"]
    assert meta["current_bytes"] == cpu["current_bytes"]
    assert [p["bytes"] for p in meta["timeline"]] == [p["bytes"] for p in cpu["timeline"]]
    assert meta["modules"] == cpu["modules"]
    assert cpu["breakdown"]["optimizer"] == 2 * MLP_PARAMS + 4 * F32


def test_reset_peak_measures_the_steady_state() -> None:
    model, x = _mlp("cpu")
    opt = torch.optim.AdamW(model.parameters())
    with MemoryTracker(model, optimizer=opt) as tracker:
        tracker.track_existing(x)
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first_peak = tracker.peak_bytes
        tracker.reset_peak()
        assert tracker.peak_bytes == tracker.current_bytes
        assert sum(tracker.peak_breakdown().values()) == tracker.peak_bytes
        with torch.no_grad():
            model(x)
    assert tracker.peak_bytes < first_peak
    # The steady state holds params, optimizer state and x; the no-grad forward adds h1 + h2.
    assert tracker.peak_breakdown() == _zero(
        params=MLP_PARAMS, optimizer=2 * MLP_PARAMS + 4 * F32, activations=8_192 + 2 * 32_768
    )


def _nested(device: str) -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 512), nn.ReLU())
    return nn.Sequential(OrderedDict(block=block, head=nn.Linear(512, 8))).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_per_module_stats(device: str) -> None:
    model = _nested(device)
    x = torch.randn(8, 16, device=device)
    with MemoryTracker(model) as tracker:
        tracker.track_existing(x)
        model(x).sum().backward()
    mods = {m.name: m for m in tracker.result().modules}
    assert list(mods) == ["", "block", "block.0", "block.1", "block.2", "block.3", "head"]
    # In the forward a Linear adds exactly its output; block.2 makes the largest, (8, 512) floats.
    assert mods["block.0"].forward_delta_bytes == 8 * 64 * F32
    assert mods["block.2"].forward_delta_bytes == 8 * 512 * F32
    assert mods["head"].forward_delta_bytes == 8 * 8 * F32
    leaves = [m for name, m in mods.items() if name.startswith("block.") or name == "head"]
    assert max(leaves, key=lambda m: m.forward_delta_bytes).name == "block.2"
    # A container adds at least what its largest child adds.
    assert mods["block"].forward_delta_bytes >= mods["block.2"].forward_delta_bytes
    assert mods[""].forward_peak_bytes == max(m.forward_peak_bytes for m in mods.values())
    assert mods["block.2"].param_bytes == (64 * 512 + 512) * F32
    assert mods["block"].param_bytes == (16 * 64 + 64 + 64 * 512 + 512) * F32
    assert mods["block.1"].param_bytes == 0
    assert all(m.backward_peak_bytes > 0 for m in mods.values())
    # block.2's backward writes dW (64·512·4 = 131,072 bytes) and more.
    assert mods["block.2"].backward_delta_bytes >= (64 * 512) * F32


def test_timeline_phases_indices_and_downsampling() -> None:
    model, x = _mlp("cpu")
    opt = torch.optim.AdamW(model.parameters())
    phases = ["forward", "backward", "optimizer"]
    results = {}
    for points in (2000, 12):
        with MemoryTracker(model, optimizer=opt, max_timeline_points=points) as tracker:
            tracker.track_existing(x)
            for _ in range(3):
                tracker.mark("forward")
                loss = model(x).sum()
                tracker.mark("backward")
                loss.backward()
                tracker.mark("optimizer")
                opt.step()
                opt.zero_grad(set_to_none=True)
        results[points] = tracker.result()
    full, small = results[2000], results[12]
    for result in (full, small):
        idx = [p.index for p in result.timeline]
        assert idx == sorted(set(idx)) and idx[0] >= 0
        assert all(
            b.seconds >= a.seconds
            for a, b in zip(result.timeline[:-1], result.timeline[1:], strict=True)
        )
        at_peak = [p for p in result.timeline if p.index == result.peak_index]
        assert len(at_peak) == 1 and sum(at_peak[0].bytes.values()) == result.peak_bytes
        assert at_peak[0].bytes == result.breakdown
        json.dumps(result.to_dict())
    assert len(small.timeline) <= 12 < len(full.timeline)
    # Phases appear in the order they were marked (the baseline point says "start").
    seen = [p.phase for p in full.timeline]
    order = [ph for i, ph in enumerate(seen) if i == 0 or seen[i - 1] != ph]
    assert order == ["start"] + phases * 3
    # Every point's categories add up to the running total.
    assert full.peak_bytes == max(sum(p.bytes.values()) for p in full.timeline)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_figures() -> None:
    model, x = _mlp("cuda")
    with MemoryTracker(model) as tracker:
        tracker.track_existing(x)
        model(x).sum().backward()
    result = tracker.result()
    assert result.cuda is not None
    assert result.cuda["max_memory_allocated"] >= result.peak_bytes
    assert result.cuda["memory_reserved"] >= result.cuda["memory_allocated"]


def test_cpu_result_has_no_cuda_figures() -> None:
    with MemoryTracker(nn.Linear(2, 2)) as tracker:
        pass
    assert tracker.result().cuda is None
