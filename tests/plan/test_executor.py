"""The arena executor: eager's outputs, zero allocations in steady state, refusals that name the op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.models import LoadedModel
from memopt.plan import count_allocations, plan_model


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(288, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def _check(plan, eager_out, tol: float) -> None:  # noqa: ANN001
    ex = plan.executor()
    got = ex.run(**plan.inputs)
    got = got if isinstance(got, tuple) else (got,)
    for g, r in zip(got, eager_out, strict=False):
        assert g.shape == r.shape
        assert (g - r).abs().max().item() <= tol
    assert ex.fallback_ops == []
    ex.run(**plan.inputs)  # warm-up done: now count a steady-state step
    report = count_allocations(lambda: ex.run(**plan.inputs))
    assert report.count == 0, report.by_op
    assert plan.lower_bound_bytes <= plan.arena_bytes <= 1.05 * plan.lower_bound_bytes


def test_cnn_bit_identical_and_no_allocations() -> None:
    torch.manual_seed(0)
    model, x = CNN().eval(), torch.randn(16, 1, 8, 8)
    plan = plan_model(model, inputs={"x": x})
    with torch.no_grad():
        ref = model(x)
    # im2col + addmm vs eager's convolution: the same products summed in the same order here
    _check(plan, (ref,), tol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_causal_lms(arch: str) -> None:
    from transformers import AutoModelForCausalLM

    from conftest import _tiny_configs

    torch.manual_seed(0)
    config = _tiny_configs()[arch]
    model = AutoModelForCausalLM.from_config(config).eval()
    loaded = LoadedModel(model, "causal-lm", arch, config)
    plan = plan_model(loaded, batch=2, seq=32)
    with torch.no_grad():
        ref = model(**plan.inputs, use_cache=False).logits
    # attention and layer norm are decomposed (baddbmm/softmax/bmm; sum/rsqrt): float rounding
    _check(plan, (ref,), tol=1e-5)


def test_minilm(minilm) -> None:  # noqa: ANN001
    plan = plan_model(minilm, seq=64)
    with torch.no_grad():
        out = minilm.model(**plan.inputs)
    _check(plan, (out.last_hidden_state, out.pooler_output), tol=1e-4)
    assert plan.naive_bytes > 10 * plan.arena_bytes


def test_wrong_input_shape_is_refused() -> None:
    plan = plan_model(CNN().eval(), inputs={"x": torch.randn(4, 1, 8, 8)})
    with pytest.raises(MemoptError, match="plan again"):
        plan.executor().run(x=torch.randn(5, 1, 8, 8))


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python control flow on a value: no static graph
            return x * 2
        return x - 1


class DynamicShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0].sum() + x.nonzero().sum()


def test_uncapturable_names_the_op() -> None:
    with pytest.raises(MemoptError, match=r"aten\.(is_nonzero|_local_scalar_dense)"):
        plan_model(DataDependent(), inputs={"x": torch.randn(4)})


def test_data_dependent_shape_names_the_op() -> None:
    with pytest.raises(MemoptError, match=r"aten\.\w+"):
        plan_model(DynamicShape(), inputs={"x": torch.randn(4)})


def test_plan_png(tmp_path) -> None:  # noqa: ANN001
    from memopt.plan import write_plan_png

    plan = plan_model(CNN().eval(), inputs={"x": torch.randn(4, 1, 8, 8)})
    out = write_plan_png(plan, tmp_path / "plan.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.png"]  # no temporary left behind
    d = plan.to_dict()
    assert {"arena_bytes", "lower_bound_bytes", "naive_bytes"} <= set(d)
