"""set_memory_growth: TensorFlow's switch on PyTorch's allocators (CPU here; CUDA where present);
in_place_adam: Keras's Adam without its per-step temporaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kmodels import cnn, keras

from memopt.core.errors import MemoptError
from memopt.keras import in_place_adam, set_memory_growth
from memopt.keras.memory import parse_device
from memopt.plan.alloc import count_allocations


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("GPU:0", "cuda:0"),
        ("/physical_device:GPU:1", "cuda:1"),
        ("cuda", "cuda:0"),
        ("cuda:2", "cuda:2"),
        ("CPU", "cpu"),
        ("/device:CPU:0", "cpu"),
        (torch.device("cpu"), "cpu"),
    ],
)
def test_device_names(name: object, want: str) -> None:
    assert parse_device(name) == want


def test_cpu_growth_and_preallocation(monkeypatch: pytest.MonkeyPatch) -> None:
    grow = set_memory_growth("CPU", True)
    assert grow.growth and grow.reserved_bytes == 0
    with pytest.raises(MemoptError, match="memory_limit"):
        set_memory_growth("CPU", False)
    # the heap reservation itself (memopt.plan.pool.preallocate_cpu_heap, tested with the pools)
    # changes malloc's settings for the whole process: recorded here, not applied to pytest's
    calls: list[int] = []
    monkeypatch.setattr(
        "memopt.keras.memory.preallocate_cpu_heap", lambda n: calls.append(n) or True
    )
    pre = set_memory_growth("CPU", False, memory_limit=8 << 20)
    assert calls == [8 << 20]
    assert not pre.growth and pre.reserved_bytes == 8 << 20


def test_bad_input() -> None:
    with pytest.raises(MemoptError, match="unknown device"):
        set_memory_growth("TPU:0", True)
    with pytest.raises(MemoptError, match="True or False"):
        set_memory_growth("CPU", "yes")  # type: ignore[arg-type]
    with pytest.raises(MemoptError, match="positive"):
        set_memory_growth("CPU", False, memory_limit=-1)
    if not torch.cuda.is_available():
        with pytest.raises(MemoptError, match="no CUDA device"):
            set_memory_growth("GPU:0", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_preallocated_pool() -> None:
    limit = 256 << 20
    pre = set_memory_growth("GPU:0", False, memory_limit=limit)
    assert pre.reserved_bytes >= int(0.9 * limit)
    assert torch.cuda.memory_reserved(0) >= int(0.9 * limit)
    grow = set_memory_growth("GPU:0", True)  # CUDA has started: the cache is emptied
    assert grow.growth and torch.cuda.memory_reserved(0) < int(0.9 * limit)


def _updated(optimizer: object, in_place: bool, steps: int = 20) -> list[np.ndarray]:
    """Weights of the case-1 CNN's shapes after ``steps`` updates with fixed random gradients
    (the same gradients for both updates: a model's own gradients would feed rounding back, and
    Adam turns a near-zero gradient's rounding into a whole step of the learning rate)."""
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 3, 16), (16,), (784, 10), (10,)]
    variables = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in shapes]
    if in_place:
        in_place_adam(optimizer)
    for _ in range(steps):
        grads = [torch.as_tensor(rng.standard_normal(s).astype("float32")) for s in shapes]
        optimizer.apply(grads, variables)
    return [v.value.detach().clone().numpy() for v in variables]


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.optimizers.Adam(1e-2),
        lambda: keras.optimizers.Adam(1e-2, amsgrad=True, epsilon=1e-3),
        lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1, clipnorm=1.0),
    ],
    ids=["adam", "amsgrad", "adamw-clipnorm"],
)
def test_in_place_adam_is_keras_adam(make: object) -> None:
    """20 updates by the fused in-place kernel against Keras's own: the same weights to float32
    rounding (stated: 8 float32 ulps of the largest weight)."""
    ref, new = _updated(make(), False), _updated(make(), True)
    start = _updated(make(), False, steps=0)
    for a, b, a0 in zip(ref, new, start, strict=True):
        assert np.abs(a - b).max() <= 8 * np.spacing(np.abs(a).max())  # measured: 2-3 ulps
        assert np.abs(a - a0).max() > 1e-2  # the updates moved the weights: not a vacuous match


def test_in_place_adam_removes_allocator_calls() -> None:
    """Counted by memopt's allocator counter (the profiler's every c10 CPU allocation): Keras's
    Adam allocates five weight-sized tensors per weight and a dozen scalars each step; the fused
    update none (measured on this CNN: 171 -> 111 calls a step)."""
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.random((8, 16, 16, 3), dtype=np.float32))
    y = torch.as_tensor(rng.integers(0, 10, 8))
    counts = []
    for in_place in (False, True):
        keras.utils.set_random_seed(0)
        model = cnn()
        if in_place:
            in_place_adam(model)
        for _ in range(2):
            model.train_step((x, y))
        counts.append(count_allocations(lambda m=model: m.train_step((x, y)), repeat=2))
    plain, fused = counts
    assert not [op for op in fused.by_op if "foreach" in op]
    assert sum(n for op, (n, _) in plain.by_op.items() if "foreach" in op) >= 5 * 4
    assert fused.count <= plain.count - 40
    # the weight-sized temporaries are gone: at least four weights' bytes fewer a step
    weights = sum(v.value.numel() * 4 for v in model.trainable_variables)
    assert plain.bytes - fused.bytes >= 4 * weights


def test_in_place_adam_refuses_other_optimizers() -> None:
    model = cnn(compile=False)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(MemoptError, match="Adam or AdamW"):
        in_place_adam(model)
    with pytest.raises(MemoptError, match="compile"):
        in_place_adam(cnn(compile=False))
