"""memopt.train: checkpointing by pattern and by budget, accumulation, mixed precision, saved state;
estimate and profile of each training option set agree."""

from __future__ import annotations

import copy

import pytest
import torch

from memopt.core.errors import MemoptError
from memopt.measure.estimate import estimate
from memopt.measure.profile import profile
from memopt.models.toy import tiny_llama
from memopt.step.checkpoint import checkpoint_blocks
from memopt.step.step import StepSpec
from memopt.step.trainer import Trainer
from memopt.train.checkpoint import choose_checkpointing

SMALL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, vocab_size=512)


def _batches(n: int, rows: int = 2, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Learnable token rows: counting up by 1 or 3 from a random start (mod 512)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 512, (rows, 1), generator=g)
        stride = 1 + 2 * torch.randint(0, 2, (rows, 1), generator=g)
        out.append((start + stride * torch.arange(seq)) % 512)  # (rows, seq)
    return out


def _train(
    spec: StepSpec, steps: int, lr: float = 1e-3, **kw: object
) -> tuple[Trainer, list[float]]:
    loaded = tiny_llama(**SMALL)
    trainer = Trainer(loaded, spec, lr=lr, **kw)
    loaded.model.train()
    losses = []
    for ids in _batches(steps, rows=spec.batch * spec.grad_accum, seq=spec.seq):
        micro = [{"input_ids": m} for m in ids.chunk(spec.grad_accum)]
        losses.append(float(trainer.step(micro)))
    return trainer, losses


def test_checkpointing_a_subset_gives_the_same_gradients_and_less_memory() -> None:
    spec = StepSpec(task="train", batch=2, seq=64)
    peaks = {}
    for blocks in (None, [0, 1], [0, 1, 2, 3]):
        s = StepSpec(task="train", batch=2, seq=64, checkpoint_blocks=blocks)
        peaks[str(blocks)] = estimate(tiny_llama(**SMALL), s).peak_bytes
    assert peaks["None"] > peaks["[0, 1]"] > peaks["[0, 1, 2, 3]"]
    # recomputation does not change the result
    a, b = tiny_llama(**SMALL), tiny_llama(**SMALL)
    checkpoint_blocks(b.model, "model.layers.*")
    ids = _batches(1)[0]
    for m in (a.model, b.model):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert spec.checkpoint_blocks is None


def test_choose_checkpointing_fits_the_budget_with_the_fewest_blocks() -> None:
    spec = StepSpec(task="train", batch=2, seq=64)
    loaded = tiny_llama(**SMALL)
    none = estimate(loaded, spec).peak_bytes
    every = estimate(loaded, StepSpec(task="train", batch=2, seq=64, checkpointing=True)).peak_bytes
    budget = (none + every) // 2
    choice = choose_checkpointing(loaded, spec, budget)
    k = len(choice.blocks)
    assert 0 < k < 4 and choice.blocks == list(range(k))
    assert choice.peak_bytes <= budget
    fewer = StepSpec(task="train", batch=2, seq=64, checkpoint_blocks=list(range(k - 1)) or None)
    assert estimate(loaded, fewer).peak_bytes > budget  # one block fewer does not fit
    assert choose_checkpointing(loaded, spec, none + 1).blocks == []
    with pytest.raises(MemoptError, match="even with every block"):
        choose_checkpointing(loaded, spec, every // 2)


def test_gradient_accumulation_equals_one_big_batch() -> None:
    one, _ = _train(StepSpec(task="train", batch=4, seq=32), steps=2)
    acc, _ = _train(StepSpec(task="train", batch=2, seq=32, grad_accum=2), steps=2)
    for p, q in zip(one.params, acc.params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_bf16_with_master_weights_tracks_float32() -> None:
    _, f32 = _train(StepSpec(task="train", batch=2, seq=32), steps=8, lr=3e-3)
    spec = StepSpec(task="train", batch=2, seq=32, dtype="bfloat16", master_weights=True)
    t, bf16 = _train(spec, steps=8, lr=3e-3)
    assert f32[-1] < f32[0] - 0.05  # it learns
    assert abs(bf16[-1] - f32[-1]) / f32[-1] < 0.02
    assert all(p.dtype == torch.bfloat16 for p in t.params)
    assert t.master is not None and all(m.dtype == torch.float32 for m in t.master.masters)
    # the 16-bit weights are the masters rounded
    for p, m in zip(t.params, t.master.masters, strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_fp16_loss_scaling_keeps_training_finite() -> None:
    t, losses = _train(
        StepSpec(task="train", batch=2, seq=32, dtype="float16", master_weights=True), steps=6
    )
    assert t.master is not None and t.master.scaler is not None
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(optimizer="adamw8bit", dtype="bfloat16", master_weights=True, checkpointing=True),
    ],
    ids=["adamw-fp32", "8bit-bf16-ckpt"],
)
def test_saved_state_resumes_exactly(tmp_path, options: dict) -> None:
    spec = StepSpec(task="train", batch=2, seq=32, **options)
    a, _ = _train(spec, steps=2)
    a.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["trainer-rank0.safetensors", "trainer.json"]  # safetensors + JSON, no pickle
    b = Trainer(tiny_llama(seed=7, **SMALL), copy.deepcopy(spec), lr=1e-3)  # other weights
    meta = b.load(tmp_path)
    assert meta["steps_done"] == 2 and b.steps_done == 2
    for ids in _batches(2, seed=9):
        la = a.step([{"input_ids": ids}])
        lb = b.step([{"input_ids": ids}])
        assert torch.equal(la, lb)
    for p, q in zip(a.params, b.params, strict=True):
        assert torch.equal(p, q)


def test_adamw8bit_state_is_a_quarter_of_adamw_on_smollm2() -> None:
    from memopt.models import build_meta
    from memopt.step.step import make_optimizer

    model = build_meta("smollm2", dequantize=True).model  # meta: the float shapes, no weights
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        params = [p for p in model.parameters()]
        for p in params:
            p.grad = torch.empty_like(p)
        opt = make_optimizer(None, StepSpec(task="train", optimizer=name), params=params)
        opt.step()  # on meta: allocates the state, computes nothing
        sizes[name] = sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
        )
    assert sizes["adamw8bit"] <= 0.26 * sizes["adamw"]


COMBOS = {
    "plain": dict(),
    "checkpointing": dict(checkpointing=True),
    "adamw8bit": dict(optimizer="adamw8bit"),
    "bf16-master": dict(dtype="bfloat16", master_weights=True),
    "grad-accum": dict(grad_accum=2),
    "all": dict(
        checkpointing=True,
        optimizer="adamw8bit",
        dtype="bfloat16",
        master_weights=True,
        grad_accum=2,
    ),
}


@pytest.mark.parametrize("name", list(COMBOS))
def test_estimate_agrees_with_profile_for_each_option_set(name: str) -> None:
    spec = StepSpec(task="train", batch=2, seq=64, **COMBOS[name])
    est = estimate(tiny_llama(**SMALL), copy.deepcopy(spec))
    got = profile(tiny_llama(**SMALL), copy.deepcopy(spec))
    assert abs(est.peak_bytes - got.peak_bytes) / got.peak_bytes < 0.10, (
        est.breakdown,
        got.breakdown,
    )
