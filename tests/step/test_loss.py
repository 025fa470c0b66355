"""memopt.step.loss: the chunked LM head + cross-entropy gives the model's own loss and gradients,
lowers the training peak, and its estimate agrees with its profile."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_similar
from memopt.core.errors import MemoptError
from memopt.measure.estimate import estimate
from memopt.measure.profile import profile
from memopt.models.toy import tiny_llama
from memopt.step.loss import (
    causal_lm_hidden,
    chunk_tokens,
    chunked_causal_lm_loss,
    head_of,
)
from memopt.step.step import StepSpec
from memopt.step.trainer import Trainer

SMALL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, vocab_size=512)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _labels(rows: int = 3, seq: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (rows, seq), generator=g)  # (B, T)
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored positions count neither in the sum nor in the mean
    return ids, labels


@pytest.mark.parametrize("chunk", [1, 7, 36, 1000])
def test_chunked_loss_and_gradients_equal_the_models_own(chunk: int) -> None:
    model = tiny_llama(**SMALL).model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    ids, labels = _labels()
    model(input_ids=ids, labels=labels).loss.backward()
    ref_loss = model(input_ids=ids, labels=labels).loss.detach()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    base, head = head_of(model)
    loss = chunked_causal_lm_loss(causal_lm_hidden(base, {"input_ids": ids}), head, labels, chunk)
    loss.backward()
    got = _grads(model)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()  # float32 sum order only
    assert got.keys() == ref.keys()  # the tied weight: one gradient, both uses added in
    for name, g in got.items():
        rel = (g - ref[name]).abs().max() / ref[name].abs().max()
        assert rel < 1e-5, (name, float(rel))


def test_bf16_chunked_loss_matches_the_models_own() -> None:
    model = tiny_llama(**SMALL).model.to(torch.bfloat16)
    ids, labels = _labels()
    ref_loss = model(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    base, head = head_of(model)
    loss = chunked_causal_lm_loss(causal_lm_hidden(base, {"input_ids": ids}), head, labels, 16)
    loss.backward()
    assert loss.dtype == torch.float32  # upcast logits, as transformers' loss
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    for name, g in _grads(model).items():  # bf16 gradients: cosine similarity, not bits
        assert_similar(g.float(), ref[name].float(), min_cosine=0.999, what=name)


def test_trainer_uses_the_chunked_loss_with_checkpointing_by_default() -> None:
    ids, _ = _labels()
    losses = {}
    for name, options in {
        "own": dict(checkpointing=True, loss_chunk=0),
        "chunked": dict(checkpointing=True),
        "chunked, no ckpt": dict(loss_chunk=8),
    }.items():
        spec = StepSpec(task="train", batch=3, seq=37, **options)
        trainer = Trainer(tiny_llama(**SMALL), spec)
        assert bool(trainer.loss_chunk) == (name != "own")
        losses[name] = float(trainer.step([{"input_ids": ids}]))
    assert losses["chunked"] == pytest.approx(losses["own"], rel=1e-6)
    assert losses["chunked, no ckpt"] == pytest.approx(losses["own"], rel=1e-6)
    assert StepSpec(task="train").loss_chunk_for(tiny_llama(**SMALL)) == 0  # off without ckpt
    assert chunk_tokens(49152) == 170  # SmolLM2's default chunk: 32 MiB of float32 logits


def test_models_that_transform_their_logits_keep_their_own_loss() -> None:
    loaded = tiny_llama(**SMALL)
    loaded.model.config.final_logit_softcapping = 30.0
    assert head_of(loaded.model) is None
    assert StepSpec(task="train", loss_chunk=8).loss_chunk_for(loaded) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_loss_chunk_raises(bad: object) -> None:
    with pytest.raises(MemoptError):
        StepSpec(task="train", loss_chunk=bad)  # type: ignore[arg-type]


# A vocabulary large next to the hidden size, as in SmolLM2 (49152 vs 576): the head dominates.
WIDE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=8192)


def test_chunked_loss_lowers_the_training_peak() -> None:
    peaks = {}
    for chunk in (0, 32):
        spec = StepSpec(task="train", batch=2, seq=128, checkpointing=True, loss_chunk=chunk)
        peaks[chunk] = profile(tiny_llama(**WIDE), spec).peak_bytes
    # (2·128, 8192) float32 logits are 8.4 MB; unchunked, the peak holds several of them (logits,
    # log-softmax, gradients), chunked it holds 32 rows' worth: measured 18.8 MB less (2.2×)
    logits = 2 * 128 * 8192 * 4
    assert peaks[32] < peaks[0] - 2 * logits, peaks


@pytest.mark.parametrize(
    "options",
    [
        dict(checkpointing=True, loss_chunk=32),
        dict(checkpointing=True, optimizer="adamw8bit", dtype="bfloat16", loss_chunk=48),
        dict(loss_chunk=100),
    ],
    ids=["ckpt", "ckpt-8bit-bf16", "no-ckpt"],
)
def test_chunked_estimate_agrees_with_profile(options: dict) -> None:
    spec = StepSpec(task="train", batch=2, seq=128, **options)
    est = estimate(tiny_llama(**WIDE), copy.deepcopy(spec))
    got = profile(tiny_llama(**WIDE), copy.deepcopy(spec))
    # measured: equal to the byte (the same step on meta and on real weights)
    assert abs(est.peak_bytes - got.peak_bytes) / got.peak_bytes < 0.01, (
        est.breakdown,
        got.breakdown,
    )
