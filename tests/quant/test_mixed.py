"""Mixed: a format per module (first matching rule), in memory and streamed, RTN and GPTQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import model_bytes
from memopt.formats.manifest import read_manifest
from memopt.models import load_model
from memopt.models.saved import save
from memopt.models.toy import tiny_llama
from memopt.quant import (
    Cast,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    IntNWeightOnly,
    QuantConfig,
    quantize_,
)
from memopt.quant.api import lookup_only_weights
from memopt.quant.calibrate import CALIB_BATCH, calibrate_, capture_inputs, quantize_block_
from memopt.quant.config import Mixed, is_calibrated
from memopt.quant.stream import quantize_model
from memopt.weights import Int4Weight, Int8Weight, IntNWeight, QLinear

GPTQ32 = Int4WeightOnly(group_size=32, algo="gptq")

# Round to nearest only: a float block, int8 (per channel, grouped, dynamic), int4, int3
RTN_MIX = Mixed(
    (
        ("model.layers.0.*", None),  # a float block
        ("model.layers.1.mlp.*", Int8WeightOnly()),
        ("model.layers.1.*", Int8Dynamic()),
        ("model.layers.2.self_attn.*", Int4WeightOnly(group_size=64, symmetric=True)),
        ("*.down_proj", Int8WeightOnly(group_size=32)),
        ("lm_head", Int8WeightOnly()),  # tied: the embedding's rule (first of the group) wins
        ("model.embed_tokens", Int4WeightOnly(group_size=32)),
    ),
    default=IntNWeightOnly(bits=3, group_size=32),
)

# GPTQ where the plan says so, with RTN int4 / int8 / int2 and a float block around it
GPTQ_MIX = Mixed(
    (
        ("model.layers.0.*", None),
        ("model.layers.1.mlp.*", Int8WeightOnly()),  # after block 1's GPTQ attention
        ("model.layers.1.*", GPTQ32),
        ("model.layers.2.self_attn.*", Int4WeightOnly(group_size=64)),  # before block 2's GPTQ
        ("model.layers.2.*", Int4WeightOnly(group_size=64, symmetric=True, algo="gptq")),
        ("lm_head", Int8WeightOnly()),
        ("model.embed_tokens", GPTQ32),  # the tied head + embedding by GPTQ
    ),
    default=IntNWeightOnly(bits=2, group_size=32),
)


def _ids(n: int = 4, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(1, 13, seed=2)).logits


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """memopt.models.toy.tiny_llama (4 blocks, tied embedding and head) as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-llama-mixed")
    tiny_llama().model.save_pretrained(path, safe_serialization=True)
    return path


# ---- the config ----


def test_first_matching_rule_wins_then_the_default() -> None:
    assert RTN_MIX.config_for("model.layers.1.mlp.up_proj") == Int8WeightOnly()
    assert RTN_MIX.config_for("model.layers.1.self_attn.q_proj") == Int8Dynamic()
    assert RTN_MIX.config_for("model.layers.1.mlp.down_proj") == Int8WeightOnly()  # rule 1 first
    assert RTN_MIX.config_for("model.layers.3.mlp.down_proj") == Int8WeightOnly(group_size=32)
    assert RTN_MIX.config_for("model.layers.3.mlp.up_proj") == IntNWeightOnly(3, 32)  # default
    assert RTN_MIX.config_for("model.layers.0.mlp.down_proj") is None  # a float rule
    assert RTN_MIX.match("model.layers.0.mlp.down_proj") == 0 and RTN_MIX.match("x") is None
    # patterns are case-sensitive, as include / exclude
    assert RTN_MIX.config_for("Model.layers.0.mlp.up_proj") == IntNWeightOnly(3, 32)

    plan = RTN_MIX.plan_module("model.layers.2.self_attn.q_proj", 64, 64, torch.float32)
    assert plan.spec["format"] == "int4" and plan.spec["symmetric"] is True
    why = RTN_MIX.plan_module("model.layers.0.mlp.up_proj", 8, 64, torch.float32)
    assert why == "Mixed rule 0 ('model.layers.0.*') keeps it float"
    no_default = Mixed((("*.mlp.*", Int8WeightOnly()),))
    assert "no rule" in no_default.plan_module("model.norm", 8, 64, torch.float32)
    # a rule's own limits still apply (group 64 does not divide 96 inputs)
    why = RTN_MIX.plan_module("model.layers.2.self_attn.o_proj", 64, 96, torch.float32)
    assert why == "group size 64 does not divide 96 inputs"
    # per weight only a module's name tells the rule
    with pytest.raises(MemoptError, match="plan_module"):
        RTN_MIX.plan_weight(64, 64, torch.float32)
    assert is_calibrated(GPTQ_MIX) and not is_calibrated(RTN_MIX)
    assert is_calibrated(Mixed(default=GPTQ32)) and not is_calibrated(Mixed())


def test_json_round_trip_nested_configs_as_dicts() -> None:
    for mix in (RTN_MIX, GPTQ_MIX, Mixed(), Mixed(default=Int8WeightOnly(group_size=64))):
        d = json.loads(json.dumps(mix.to_dict()))
        assert QuantConfig.from_dict(d) == mix and Mixed.from_dict(d) == mix
    d = GPTQ_MIX.to_dict()
    assert d["type"] == "Mixed" and d["default"] == IntNWeightOnly(2, 32).to_dict()
    assert d["rules"][0] == ["model.layers.0.*", None]
    assert d["rules"][2] == ["model.layers.1.*", GPTQ32.to_dict()]
    # the pairs may come as lists with dicts (JSON) or as tuples with configs: the same config
    assert Mixed([["*", {"type": "Int8WeightOnly"}]]) == Mixed((("*", Int8WeightOnly()),))
    assert hash(Mixed([["*", {"type": "Int8WeightOnly"}]])) == hash(
        Mixed((("*", Int8WeightOnly()),))
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rules": "*"}, "rules must be a list"),
        ({"rules": [["*"]]}, r"rule 0 must be a \[pattern, config\] pair"),
        ({"rules": [["*", None, None]]}, "pair"),
        ({"rules": [["", None]]}, "pattern must be a non-empty string"),
        ({"rules": [[3, None]]}, "pattern must be a non-empty string"),
        ({"rules": [["a", None], ["*", Cast("bfloat16")]]}, r"rule 1 \('\*'\) must be null.*Cast"),
        ({"rules": [["*", Mixed()]]}, "got Mixed"),
        ({"rules": [["*", "int4"]]}, "got 'int4'"),
        ({"rules": [["*", {"type": "Int4WeightOnly", "group_size": 48}]]}, "group_size"),
        ({"rules": [["*", {"type": "Int5"}]]}, "unknown quantization config type"),
        ({"rules": [["*", {"type": "Cast"}]]}, "got Cast"),
        ({"default": {"type": "Int4WeightOnly", "algo": "awq"}}, "default: Int4WeightOnly: algo"),
        ({"default": {"type": "Mixed"}}, "default must be null"),
    ],
)
def test_validation_errors_are_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(MemoptError, match=match) as err:
        Mixed(**kwargs)
    assert "\n" not in str(err.value)
    as_json = json.loads(json.dumps(kwargs, default=lambda c: c.to_dict()))
    with pytest.raises(MemoptError, match=match):  # the same through JSON
        QuantConfig.from_dict({"type": "Mixed", **as_json})


# ---- in memory ----


def test_each_module_gets_its_rule_and_bytes_are_the_sum_of_the_formats() -> None:
    float_model = tiny_llama().model
    model = tiny_llama().model
    report = quantize_(model, RTN_MIX)
    layers = model.model.layers

    def kind(m: nn.Module) -> tuple:
        qw = m.qweight
        return type(qw).__name__, qw.group_size, getattr(m, "dynamic", False)

    assert kind(layers[1].mlp.down_proj) == ("Int8Weight", None, False)
    assert kind(layers[1].self_attn.o_proj) == ("Int8Weight", None, True)
    assert kind(layers[2].self_attn.k_proj) == ("Int4Weight", 64, False)
    assert layers[2].self_attn.k_proj.qweight.symmetric
    assert kind(layers[2].mlp.down_proj) == ("Int8Weight", 32, False)
    assert kind(layers[3].mlp.up_proj) == ("IntNWeight", 32, False)
    assert kind(model.lm_head) == ("Int4Weight", 32, False)  # the embedding's rule
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    assert all(type(m) is nn.Linear for m in layers[0].modules() if isinstance(m, nn.Linear))
    assert report.formats == {"int8": 5, "int8-dynamic": 4, "int4": 6, "int3": 8}
    assert sorted(report.skipped) == sorted(
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                        "mlp.down_proj")
    )  # fmt: skip

    # bytes: the float model, less each quantized weight (a tied one once), plus that weight made
    # alone by its module's rule
    lookup = lookup_only_weights(float_model)
    expected = model_bytes(float_model)
    for pname, p in float_model.named_parameters():  # a tied weight once, under its first name
        name = pname.removesuffix(".weight")
        if name not in report.modules:
            continue
        plan = RTN_MIX.plan_module(name, *p.shape, p.dtype, id(p) in lookup)
        expected += model_bytes(plan.make(p.detach())) - p.numel() * p.element_size()
    assert report.bytes_before == model_bytes(float_model)
    assert report.bytes_after == expected == model_bytes(model)


def test_rtn_mix_equals_the_uniform_configs_applied_module_by_module() -> None:
    mixed = tiny_llama().model
    quantize_(mixed, RTN_MIX)
    ref = tiny_llama().model
    for include, cfg in [
        (["model.layers.1.mlp.*"], Int8WeightOnly()),
        (["model.layers.1.self_attn.*"], Int8Dynamic()),
        (["model.layers.2.self_attn.*"], Int4WeightOnly(group_size=64, symmetric=True)),
        (["model.layers.[23].mlp.down_proj"], Int8WeightOnly(group_size=32)),
        (["model.embed_tokens", "lm_head"], Int4WeightOnly(group_size=32)),
        (["model.layers.[23].*"], IntNWeightOnly(bits=3, group_size=32)),  # what is left float
    ]:
        quantize_(ref, cfg, include=include)
    _assert_same_state(mixed, ref)
    assert torch.equal(_logits(mixed), _logits(ref))


def test_tied_head_and_embedding_get_one_format_the_first_modules_rule() -> None:
    for rules in [
        (("lm_head", Int8WeightOnly()), ("model.embed_tokens", Int4WeightOnly(group_size=64))),
        (("model.embed_tokens", Int4WeightOnly(group_size=64)), ("lm_head", Int8WeightOnly())),
    ]:
        model = tiny_llama().model
        report = quantize_(model, Mixed(rules))
        assert report.modules == ["model.embed_tokens", "lm_head"]
        assert model.lm_head.qweight is model.model.embed_tokens.qweight
        assert isinstance(model.lm_head.qweight, Int4Weight)
    # the embedding's rule keeps it float: the head stays float too, still tied
    model = tiny_llama().model
    report = quantize_(
        model, Mixed((("model.embed_tokens", None),), default=Int8WeightOnly(group_size=32))
    )
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in report.skipped and isinstance(model.model.norm, nn.Module)
    assert all(isinstance(m.qweight, Int8Weight) for m in model.modules() if isinstance(m, QLinear))


def test_float_blocks_stay_float_and_an_empty_mix_quantizes_nothing() -> None:
    float_model = tiny_llama().model
    model = tiny_llama().model
    mix = Mixed((("model.layers.[02].*", None),), default=Int4WeightOnly(group_size=32))
    report = quantize_(model, mix)
    for b in (0, 2):
        _assert_same_state(model.model.layers[b], float_model.model.layers[b])
        assert not any(isinstance(m, QLinear) for m in model.model.layers[b].modules())
    for b in (1, 3):
        assert all(
            isinstance(m, QLinear) for m in model.model.layers[b].modules() if hasattr(m, "bias")
        )
    assert "keeps it float" in report.skipped["model.layers.0.mlp.up_proj"]
    # no default: only what a rule names
    model = tiny_llama().model
    report = quantize_(model, Mixed((("*.mlp.down_proj", IntNWeightOnly(bits=2)),)))
    assert report.formats == {"int2": 4} and "no rule" in report.skipped["lm_head"]
    assert isinstance(model.model.layers[3].mlp.down_proj.qweight, IntNWeight)
    with pytest.raises(MemoptError, match="no module of LlamaForCausalLM matched Mixed"):
        quantize_(tiny_llama().model, Mixed())


def test_calibrated_rules_need_calibration_data() -> None:
    with pytest.raises(MemoptError, match="Mixed config with calibrated int4 rules needs"):
        quantize_(tiny_llama().model, GPTQ_MIX)
    with pytest.raises(MemoptError, match="no calibrated"):
        calibrate_(tiny_llama().model, RTN_MIX, _ids())


# ---- calibrated, in memory ----


def test_gptq_everywhere_as_a_mix_equals_the_uniform_calibration() -> None:
    ids = _ids()
    uniform = tiny_llama().model
    calibrate_(uniform, GPTQ32, ids)
    mixed = tiny_llama().model
    report = quantize_(mixed, Mixed((("*", GPTQ32),)), calib=ids)
    _assert_same_state(mixed, uniform)
    assert report.formats == {"int4": 4 * 7 + 2}


def test_blocks_calibrate_on_the_mixed_model() -> None:
    """Block 1's GPTQ MLP is computed from the inputs that block 0 in int8 gives, with block 1's
    attention already in int4: the same as doing it by hand in that order."""
    ids = _ids()
    mix = Mixed(
        (
            ("model.layers.0.*", Int8WeightOnly()),
            ("model.layers.1.self_attn.*", Int4WeightOnly(group_size=64)),
            ("model.layers.1.mlp.*", GPTQ32),
        )
    )
    mixed = tiny_llama().model
    quantize_(mixed, mix, calib=ids)

    def by_hand(first: bool) -> nn.Module:
        ref = tiny_llama().model
        if first:
            quantize_(ref, Int8WeightOnly(), include=["model.layers.0.*"])
            quantize_(ref, Int4WeightOnly(group_size=64), include=["model.layers.1.self_attn.*"])
        block = ref.model.layers[1]
        with torch.no_grad():
            inputs = capture_inputs(ref, block, ids, CALIB_BATCH)
            quantize_block_(block, inputs, GPTQ32, select=lambda nm, m: nm.startswith("mlp."))
        if not first:  # quantized after the GPTQ instead
            quantize_(ref, Int8WeightOnly(), include=["model.layers.0.*"])
            quantize_(ref, Int4WeightOnly(group_size=64), include=["model.layers.1.self_attn.*"])
        return ref

    _assert_same_state(mixed, by_hand(True))
    late = by_hand(False).model.layers[1].mlp.down_proj.qweight.packed
    assert not torch.equal(mixed.model.layers[1].mlp.down_proj.qweight.packed, late)


# ---- streamed = in memory, saved and loaded back ----


def _in_memory_and_streamed(folder: Path, out: Path, mix: Mixed, calib=None) -> tuple:
    ref = load_model(folder)
    report = quantize_(ref.model, mix, calib=calib)
    result = quantize_model(folder, mix, out, calib=calib)
    back = load_model(out)
    assert result["streamed"]
    _assert_same_state(back.model, ref.model)
    assert torch.equal(_logits(back.model), _logits(ref.model))
    assert sorted(result["modules"]) == sorted(report.modules)
    assert result["formats"] == report.formats and result["skipped"] == report.skipped
    assert result["bytes_after"] == report.bytes_after == model_bytes(back.model)
    return ref, report, back


def test_streamed_rtn_mix_equals_in_memory(llama_folder, tmp_path) -> None:
    _, report, back = _in_memory_and_streamed(llama_folder, tmp_path / "out", RTN_MIX)
    assert back.model.model.layers[1].self_attn.q_proj.dynamic
    assert back.model.lm_head.qweight is back.model.model.embed_tokens.qweight
    manifest = read_manifest(tmp_path / "out")
    assert [QuantConfig.from_dict(q["config"]) for q in manifest["quantization"]] == [RTN_MIX]


def test_streamed_gptq_mix_equals_in_memory(llama_folder, tmp_path) -> None:
    ids = _ids()
    ref, report, back = _in_memory_and_streamed(llama_folder, tmp_path / "out", GPTQ_MIX, ids)
    model, layers = back.model, back.model.model.layers
    assert type(layers[0].mlp.up_proj) is nn.Linear  # the float block
    assert isinstance(layers[1].mlp.up_proj.qweight, Int8Weight)
    assert isinstance(layers[3].mlp.up_proj.qweight, IntNWeight)
    up2 = layers[2].mlp.up_proj.qweight
    assert isinstance(up2, Int4Weight) and up2.symmetric and up2.group_size == 64
    # the tied head + embedding by GPTQ with the embedding's rule (group 32), stored once
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    rtn = Int4Weight(load_model(llama_folder).model.lm_head.weight.detach(), 32)
    assert model.lm_head.qweight.group_size == 32
    assert not torch.equal(model.lm_head.qweight.packed, rtn.packed)
    # GPTQ's Linears differ from round to nearest's
    rtn_q = Int4Weight(load_model(llama_folder).model.model.layers[1].self_attn.q_proj.weight, 32)
    assert not torch.equal(layers[1].self_attn.q_proj.qweight.packed, rtn_q.packed)
    quant = read_manifest(tmp_path / "out")["quantization"]
    assert QuantConfig.from_dict(quant[0]["config"]) == GPTQ_MIX
    assert quant[0]["calib"] == "token ids [4, 32]"
    # the in-memory model saved by save() records the same config and loads back the same
    save(ref, tmp_path / "saved", quant_config=GPTQ_MIX)
    again = load_model(tmp_path / "saved")
    quant = read_manifest(tmp_path / "saved")["quantization"]
    assert QuantConfig.from_dict(quant[-1]["config"]) == GPTQ_MIX
    _assert_same_state(again.model, model)
    assert torch.equal(_logits(again.model), _logits(model))


# ---- memopt quantize --config FILE.json ----


def test_cli_quantize_takes_a_config_file(llama_folder, tmp_path, capsys) -> None:
    from memopt.app.cli import main

    (tmp_path / "mix.json").write_text(json.dumps(RTN_MIX.to_dict()))
    code = main(["quantize", str(llama_folder), "--config", str(tmp_path / "mix.json"),
                 "-o", str(tmp_path / "out"), "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["config"] == RTN_MIX.to_dict()
    ref = load_model(llama_folder)
    quantize_(ref.model, RTN_MIX)
    _assert_same_state(load_model(tmp_path / "out").model, ref.model)

    (tmp_path / "bad.json").write_text('{"type": "Mixed", "rules": [["*", {"type": "Cast"}]]}')
    (tmp_path / "broken.json").write_text("{")
    for argv, needle in [
        (["--config", str(tmp_path / "bad.json")], "got Cast"),
        (["--config", str(tmp_path / "broken.json")], "not a JSON config"),
        (["--config", str(tmp_path / "none.json")], "no such config file"),
        (["--config", str(tmp_path / "mix.json"), "--group-size", "32"], "go with --method"),
    ]:
        code = main(["quantize", str(llama_folder), *argv, "-o", str(tmp_path / "o2")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o2").exists()
