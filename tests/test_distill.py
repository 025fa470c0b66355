"""Distillation: the loss terms, students built from a teacher, training lowers the KL, and a run
interrupted and resumed from its checkpoint ends in exactly the state of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memopt.core.errors import MemoptError
from memopt.distill import (
    DistillConfig,
    Distiller,
    drop_layers,
    hidden_loss,
    kd_loss,
    narrow,
)


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    with torch.no_grad():
        t[4].weight.mul_(20.0)  # confident teacher: soft targets far from uniform
    return t


def _data(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 5, (32,), generator=g))
            for _ in range(n)]  # fmt: skip


def test_kd_loss_terms():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    T = 3.0
    kl = (
        (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1)))
        .sum(-1)
        .mean()
    )
    got = kd_loss(s, t, y, temperature=T, alpha=0.7)
    want = 0.7 * T * T * kl + 0.3 * F.cross_entropy(s, y)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(kd_loss(t, t, None, temperature=T, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    h = [torch.ones(2, 3), torch.zeros(2, 3)]
    assert float(hidden_loss([torch.ones(2, 3)], h, [1])) == pytest.approx(1.0)


def test_distill_lowers_kl_and_resumes_exactly(tmp_path):
    teacher = _teacher()
    data = _data()
    cfg = DistillConfig(temperature=2.0, alpha=0.9, lr=3e-3, steps=40, checkpoint_every=10)

    def kl(student: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(kd_loss(student(x), teacher(x), None, temperature=2.0, alpha=1.0))
                       for x, _ in data) / len(data)  # fmt: skip

    torch.manual_seed(5)
    student_a = narrow(teacher, 0.25)  # 16 hidden units instead of 64 in both hidden layers
    assert student_a[0].out_features == 16 and student_a[2].in_features == 16
    student_b = narrow(teacher, 0.25)
    before = kl(student_a)
    # uninterrupted run
    Distiller(teacher, student_a, cfg, checkpoint_dir=tmp_path / "a").train(data, progress=False)
    assert kl(student_a) < 0.5 * before
    # interrupted after 25 steps (checkpoint at 20), then resumed by a fresh Distiller
    Distiller(teacher, student_b, cfg, checkpoint_dir=tmp_path / "b").train(
        data, progress=False, stop_after=25
    )
    meta = json.loads((tmp_path / "b" / "trainer.json").read_text())  # the Trainer's format
    assert meta["steps_done"] == 20
    student_c = narrow(teacher, 0.25)  # a new process would start from scratch weights
    res = Distiller(teacher, student_c, cfg, checkpoint_dir=tmp_path / "b").train(
        data, progress=False
    )
    assert res.resumed_from == 20 and res.steps == 40
    for (k, va), vc in zip(student_a.state_dict().items(), student_c.state_dict().values(),
                           strict=True):  # fmt: skip
        assert torch.equal(va, vc), k
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_drop_layers_every_other(tiny_folder):
    from memopt.models import load_model

    loaded = load_model(tiny_folder("llama"))  # 2 blocks
    student = drop_layers(loaded.model)
    assert len(student.model.layers) == 1 and student.config.num_hidden_layers == 1
    assert student.memopt_keep == [1]
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight,
                       loaded.model.model.layers[1].mlp.up_proj.weight)  # fmt: skip
    assert student.model.layers[0].self_attn.layer_idx == 0
    ids = torch.randint(0, 512, (2, 12))
    assert student(input_ids=ids).logits.shape == (2, 12, 512)
    # the teacher is untouched
    assert len(loaded.model.model.layers) == 2


def test_hidden_matching_runs(tiny_folder):
    from memopt.models import load_model

    teacher = load_model(tiny_folder("llama")).model
    student = drop_layers(teacher)
    ids = torch.randint(0, 512, (2, 16))
    cfg = DistillConfig(steps=3, hidden_weight=1.0, lr=1e-3)
    d = Distiller(teacher, student, cfg)
    _, parts = d.loss({"input_ids": ids, "labels": ids})
    assert parts["hidden"] > 0 and parts["kd"] > 0
    d.train([{"input_ids": ids}], progress=False)


def test_bad_inputs():
    with pytest.raises(MemoptError):
        DistillConfig(temperature=0)
    with pytest.raises(MemoptError):
        DistillConfig(alpha=1.5)
    with pytest.raises(MemoptError):
        drop_layers(_teacher(), keep=[0, 9])
    with pytest.raises(MemoptError):
        narrow(_teacher(), 0.0)


class _ByteTokenizer:
    """Bytes as token ids (the tiny test models have 512 ids): enough for distill_model's text."""

    def __call__(self, text, return_tensors=None, **kw):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_distill_model_causal_lm(tiny_folder, tmp_path):
    from memopt.distill import distill_model
    from memopt.models import load_model

    teacher = load_model(tiny_folder("llama"))
    teacher._tokenizer = _ByteTokenizer()
    out = distill_model(teacher, steps=6, batch=2, seq=32, lr=1e-3, progress=False,
                        checkpoint_dir=tmp_path / "ck")  # fmt: skip
    assert out["teacher_layers"] == 2 and out["student_layers"] == 1
    assert out["student_bytes"] < out["teacher_bytes"]
    assert out["steps"] == 6 and out["retained"] > 0
    assert (tmp_path / "ck" / "trainer-rank0.safetensors").is_file()
    assert len(teacher.model.model.layers) == 2  # the teacher is untouched


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from memopt.app.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_distill_checkpoints_resumes_and_refuses(tmp_path, monkeypatch, capsys):
    """`memopt distill minilm` end to end, kept small: 8 held-out pairs to score, a few steps."""
    import memopt.distill as distill

    few = distill.paragraph_pairs()[:8]
    monkeypatch.setattr(distill, "paragraph_pairs", lambda *a, **k: few)
    out = tmp_path / "student"
    common = ("--batch", "2", "--seq", "16", "--save-every", "2", "-o", str(out), "--json")
    code, stdout, err = _cli(capsys, "distill", "minilm", "--steps", "4", *common)
    assert code == 0, err
    r = json.loads(stdout)  # stdout holds the JSON object and nothing else
    assert r["teacher_layers"] == 6 and r["student_layers"] == 3 and r["kept_blocks"] == [1, 3, 5]
    assert r["student_bytes"] < r["teacher_bytes"] and r["disk_bytes"] > 0
    assert r["steps"] == 4 and r["resumed_from"] == 0 and r["retained"] > 0
    ck = tmp_path / "student.checkpoints"
    assert json.loads((ck / "trainer.json").read_text())["steps_done"] == 4
    # a longer run resumed from the checkpoint does only the steps left
    code, stdout, err = _cli(capsys, "distill", "minilm", "--steps", "6", "--resume", *common)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["resumed_from"] == 4 and r["steps"] == 6
    from memopt.models.saved import load

    assert len(load(out).model.encoder.layer) == 3  # the saved student loads on its own
    # bad input: one line on stderr, exit 2, nothing written
    for bad, needle in (
        (("--student", "width=2"), "unknown student"),
        (("--temperature", "0"), "temperature"),
        (("--resume", "--checkpoints", str(tmp_path / "none")), "no checkpoint"),
    ):
        code, stdout, err = _cli(capsys, "distill", "minilm", *bad, "-o", str(tmp_path / "x"))
        assert code == 2 and stdout == "" and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
