"""Every reproducer of the hardening issue's table, each a refusal in one line (MemoptError)
naming the field, never a traceback, never a silently different model; on the originals that
bench/fuzz.py builds (a tiny Llama as a Hugging Face folder, a GGUF file, int8/int4 folders)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fuzz  # noqa: E402
from memopt.core.errors import MemoptError  # noqa: E402
from memopt.measure.estimate import estimate  # noqa: E402
from memopt.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def orig(tmp_path_factory: pytest.TempPathFactory) -> fuzz.Originals:
    return fuzz.Originals(tmp_path_factory.mktemp("originals"))


def _refused(fn: Callable[[], Any], *words: str) -> str:
    with pytest.raises(MemoptError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text.strip(), text
    for w in words:
        assert w in text, text
    return text


# -- safetensors header ------------------------------------------------------------------------


def _hf_with_header(orig: fuzz.Originals, tmp: Path, edit: Callable[[dict], Any]) -> Path:
    n, header, body = fuzz._st_parse(orig.st_bytes)
    new = edit(header)
    text = new if isinstance(new, str) else json.dumps(header if new is None else new)
    folder = tmp / "hf"
    folder.mkdir()
    shutil.copy(orig.paths["hf"] / "config.json", folder)
    (folder / "model.safetensors").write_bytes(fuzz._st_pack(text.encode(), body))
    return folder


NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h[NAME].update(data_offsets=[]),
        lambda h: h[NAME].update(data_offsets=[h[NAME]["data_offsets"][0]]),
        lambda h: [1, 2],
        lambda h: "header",
        lambda h: 3,
        lambda h: "null",
        lambda h: "[" * 100_000 + "]" * 100_000,
        lambda h: h[NAME].update(data_offsets=[d + 4 for d in h[NAME]["data_offsets"]]),
        lambda h: h[NAME].update(shape=[-64, -128]),
        lambda h: h.update(__metadata__={"format": 7}),
    ],
    ids=[
        "offsets-empty",
        "offsets-one",
        "list",
        "string",
        "number",
        "null",
        "deep",
        "shifted",
        "negative-shape",
        "metadata",
    ],  # fmt: skip
)
def test_safetensors_header(orig: fuzz.Originals, tmp_path: Path, edit) -> None:
    folder = _hf_with_header(orig, tmp_path, edit)
    _refused(lambda: load_model(folder), "model.safetensors")


@pytest.mark.parametrize(("code", "name"), [("I32", "int32"), ("U32", "U32")])
def test_safetensors_int32_in_place_of_float32(
    orig: fuzz.Originals, tmp_path: Path, code: str, name: str
) -> None:
    folder = _hf_with_header(orig, tmp_path, lambda h: h[NAME].update(dtype=code))
    _refused(lambda: load_model(folder), NAME, name)


def test_safetensors_block_beyond_the_config(orig: fuzz.Originals, tmp_path: Path) -> None:
    def rename(h: dict) -> None:
        h[NAME.replace("layers.0", "layers.5")] = h.pop(NAME)

    folder = _hf_with_header(orig, tmp_path, rename)
    _refused(lambda: load_model(folder), "layers.5")


# -- GGUF metadata and tensor table --------------------------------------------------------------


def _gguf(orig: fuzz.Originals, tmp: Path, edit: Callable[[fuzz.GFile], Any]) -> Path:
    g = copy.deepcopy(orig.gguf)
    edit(g)
    path = tmp / "m.gguf"
    path.write_bytes(fuzz.gguf_bytes(g))
    return path


def _kv(key: str, t: int, v: Any) -> Callable[[fuzz.GFile], None]:
    def edit(g: fuzz.GFile) -> None:
        g.kvs = [(k, t, v) if k == key else (k, tt, vv) for k, tt, vv in g.kvs]

    return edit


@pytest.mark.parametrize(
    ("key", "t", "v"),
    [
        ("llama.context_length", fuzz.STR, "128"),
        ("llama.context_length", fuzz.ARR, (fuzz.U32, [128])),
        ("llama.context_length", fuzz.F32, math.nan),
        ("llama.context_length", fuzz.I32, -1),
        ("llama.attention.head_count", fuzz.U32, 0),
        ("llama.attention.head_count_kv", fuzz.U32, 3),
        ("llama.embedding_length", fuzz.U32, 63),
        ("llama.block_count", fuzz.U32, 0),
        ("llama.block_count", fuzz.I32, -1),
        ("llama.block_count", fuzz.F32, 1.5),
        ("llama.block_count", fuzz.BOOL, True),
        ("llama.block_count", fuzz.U32, 1),
        ("llama.block_count", fuzz.U32, 10**9),
        ("llama.attention.layer_norm_rms_epsilon", fuzz.F32, math.nan),
        ("llama.attention.layer_norm_rms_epsilon", fuzz.F32, -1e-5),
        ("llama.rope.freq_base", fuzz.F32, math.inf),
        ("llama.rope.freq_base", fuzz.F32, -1.0),
        ("tokenizer.ggml.eos_token_id", fuzz.U32, 10**6),
    ],
)
def test_gguf_metadata(orig: fuzz.Originals, tmp_path: Path, key: str, t: int, v: Any) -> None:
    path = _gguf(orig, tmp_path, _kv(key, t, v))
    text = _refused(lambda: load_model(path), "m.gguf")
    assert key in text or "hidden size (63)" in text, text  # the field, or transformers' words


@pytest.mark.parametrize(
    "edit",
    [
        lambda g: setattr(g.tensors[1], "offset", g.tensors[1].offset + 32),
        lambda g: setattr(g.tensors[1], "offset", g.tensors[1].offset + 1),
        lambda g: setattr(g.tensors[-1], "type", 1),  # F32 -> F16: half the bytes, other data
        lambda g: setattr(g.tensors[1], "dims", [64, 0]),
        lambda g: g.tensors.append(
            fuzz.GTensor(
                "blk.5.attn_norm.weight", [64], 0, g.tensors[-1].offset + 256 + 32 * 0, bytes(256)
            )  # fmt: skip
        ),
    ],
    ids=["offset-overlap", "offset-misaligned", "type-smaller", "zero-dim", "extra-block"],
)
def test_gguf_tensor_table(orig: fuzz.Originals, tmp_path: Path, edit) -> None:
    def keep_data(g: fuzz.GFile) -> None:
        tail = fuzz._gguf_data(g)
        edit(g)
        if g.tensors[-1].name != "blk.5.attn_norm.weight":
            g.raw_tail = tail  # the table changes, the bytes stay where they were

    path = _gguf(orig, tmp_path, keep_data)
    _refused(lambda: load_model(path), "m.gguf")


def test_gguf_kv_heads_not_dividing_the_rows(orig: fuzz.Originals, tmp_path: Path) -> None:
    from memopt.formats.gguf import GGUFSource

    # 64 rows of attn_k for 2 kv heads; 3 heads of 4 would pass the config's own divisibility
    path = _gguf(orig, tmp_path, _kv("llama.attention.head_count_kv", fuzz.U32, 3))
    _refused(lambda: GGUFSource(path), "attn_k", "rows", "3 heads")


# -- config.json sizes ---------------------------------------------------------------------------


def _config(orig: fuzz.Originals, tmp: Path, weights: bool, **values: Any) -> Path:
    folder = tmp / "cfg"
    folder.mkdir()
    cfg = dict(orig.config, **values)
    (folder / "config.json").write_text(json.dumps(cfg))
    if weights:
        shutil.copy(orig.paths["hf"] / "model.safetensors", folder)
    return folder


@pytest.mark.parametrize(
    "values",
    [
        {"hidden_size": -64},
        {"intermediate_size": 2**63},
        {"vocab_size": -1},
        {"num_attention_heads": 0},
        {"num_key_value_heads": 3},
        {"rms_norm_eps": math.nan},
        {"hidden_act": -1},
        {"architectures": 7},
    ],
)
def test_config_sizes(orig: fuzz.Originals, tmp_path: Path, values: dict) -> None:
    folder = _config(orig, tmp_path, True, **values)
    _refused(lambda: load_model(folder))
    _refused(lambda: estimate(folder))


@pytest.mark.parametrize("layers", [10**9, 2**31])
def test_config_billion_layers_refused_before_building(
    orig: fuzz.Originals, tmp_path: Path, layers: int
) -> None:
    folder = _config(orig, tmp_path, False, num_hidden_layers=layers)
    start = time.perf_counter()
    _refused(lambda: estimate(folder), "num_hidden_layers", "4096")
    assert time.perf_counter() - start < 2.0  # refused, not built (it was minutes and 16 GB)


# -- memopt manifest -----------------------------------------------------------------------------


def _manifest(orig: fuzz.Originals, tmp: Path, which: str, edit: Callable[[dict], Any]) -> Path:
    folder = tmp / which
    shutil.copytree(orig.paths[which], folder)
    m = copy.deepcopy(orig.manifests[which])
    edit(m)
    (folder / "memopt.json").write_text(json.dumps(m))
    return folder


Q = "model.layers.0.self_attn.q_proj"


W = f"$.weights['{Q}.qweight']"
M = f"$.modules['{Q}']"


@pytest.mark.parametrize(
    ("which", "edit", "field"),
    [
        ("int8", lambda m: m["weights"].pop(f"{Q}.qweight"), f"{M}.weight"),
        ("int8", lambda m: m["weights"][f"{Q}.qweight"].pop("tensors"), f"{W}.tensors"),
        ("int8", lambda m: m["weights"][f"{Q}.qweight"]["tensors"].pop("scale"), f"{W}.tensors"),
        ("int8", lambda m: m["weights"][f"{Q}.qweight"].update(shape=[-64, 64]), f"{W}.shape[0]"),
        ("int8", lambda m: m["weights"][f"{Q}.qweight"].update(shape=[64.0, 64]), f"{W}.shape[0]"),
        ("int4", lambda m: m["weights"][f"{Q}.qweight"].update(group_size=0), f"{W}.group_size"),
        ("int4", lambda m: m["weights"][f"{Q}.qweight"].update(block_n=0), f"{W}.block_n"),
        ("int4", lambda m: m["weights"][f"{Q}.qweight"].pop("block_n"), W),
        ("int4", lambda m: m["weights"][f"{Q}.qweight"].update(symmetric=1), f"{W}.symmetric"),
        ("int8", lambda m: m.pop("files"), "$.files"),
        (
            "int8",
            lambda m: m["cast_hooks"].update({"model.nowhere": ["float32", "float32"]}),
            "$.cast_hooks['model.nowhere']",
        ),  # fmt: skip
        ("int8", lambda m: m["cast_hooks"].update({Q: ["float32"]}), f"$.cast_hooks['{Q}']"),
        ("int8", lambda m: m["modules"][Q].update({"class": "QEmbedding"}), M),
        ("int8", lambda m: m["modules"][Q].update({"class": "QFoo"}), f"{M}.class"),
        ("int8", lambda m: m["modules"][Q].update(dynamic="yes"), f"{M}.dynamic"),
        (
            "int8",
            lambda m: m["modules"].update({"model.nowhere": m["modules"][Q]}),
            "$.modules['model.nowhere']",
        ),  # fmt: skip
        ("int8", lambda m: m.update(task="foo"), "$.task"),
        ("int8", lambda m: m.update(task=""), "$.task"),
        ("int8", lambda m: m.update(format_version=True), "$.format_version"),
        ("int8", lambda m: m.pop("format_version"), "$.format_version"),
        ("int8", lambda m: m["files"].update(tokenizer=["tokenizer.json"]), "$.files.tokenizer"),
        ("int8", lambda m: m["files"].update(tokenizer=["../config.json"]), "$.files.tokenizer[0]"),
        ("int8", lambda m: m["files"].update(weights="other.safetensors"), "$.files.weights"),
        ("int8", lambda m: m.update(quantization=1.5), "$.quantization"),
        ("int8", lambda m: m["tensors"].append(m["tensors"][0]), "$.tensors"),
        (
            "int8",
            lambda m: m["aliases"].update({"lm_head.weight": "nowhere"}),
            "$.aliases['lm_head.weight']",
        ),  # fmt: skip
    ],
)
def test_manifest(orig: fuzz.Originals, tmp_path: Path, which: str, edit, field: str) -> None:
    """Refused in one line naming the file and the field as a JSON path (the schema's checks and
    those after it alike)."""
    folder = _manifest(orig, tmp_path, which, edit)
    _refused(lambda: load_model(folder), "memopt.json", f"corrupt manifest ({field}")


def test_untouched_originals_load(orig: fuzz.Originals) -> None:
    """The checks refuse none of the real files (and bench/fuzz.py's oracle sees them as same)."""
    for key in ("hf", "gguf", "int8", "int4"):
        assert fuzz.fingerprint(load_model(orig.paths[key])) == orig.fingerprint(key)


def test_gguf_trailing_unit_dims_are_the_same_tensors(orig: fuzz.Originals, tmp_path: Path) -> None:
    """ggml's own shapes are 4-D padded with 1s: a matrix stored as (64, 128, 1) is the same."""

    def pad(g: fuzz.GFile) -> None:
        for t in g.tensors:
            if len(t.dims) == 2:
                t.dims = [*t.dims, 1]

    path = _gguf(orig, tmp_path, pad)
    assert fuzz.fingerprint(load_model(path))[1] == orig.fingerprint("gguf")[1]


def test_streamed_quantize_checks_shapes_first(orig: fuzz.Originals, tmp_path: Path) -> None:
    """head_count_kv removed: the config asks for 4 key/value heads, the file holds 2; the
    streamed quantization (which reads rows by the architecture's shapes) refuses up front."""
    from memopt.quant import Int8WeightOnly
    from memopt.quant.stream import quantize_model

    def drop(g: fuzz.GFile) -> None:
        g.kvs = [kv for kv in g.kvs if kv[0] != "llama.attention.head_count_kv"]

    path = _gguf(orig, tmp_path, drop)
    _refused(lambda: quantize_model(path, Int8WeightOnly(), tmp_path / "out"), "k_proj", "(64, 64)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_gguf_absurd_offset_refused_without_a_warning(orig: fuzz.Originals, tmp_path: Path) -> None:
    """An offset near 2^64 overflows numpy's sum inside gguf's reader: the warning it prints would
    be a second line on stderr after the refusal."""
    import warnings

    def far(g: fuzz.GFile) -> None:
        tail = fuzz._gguf_data(g)
        g.tensors[0].offset = 2**64 - 32
        g.raw_tail = tail

    path = _gguf(orig, tmp_path, far)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _refused(lambda: load_model(path), "m.gguf")
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], seen


# -- the command line: each of these an exit 2 in one line (it was exit 1, "internal error") -----


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "manifest", "config"])
def test_cli_refuses_with_exit_2_in_one_line(
    orig: fuzz.Originals, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    from memopt.app.cli import main

    if fmt == "safetensors":
        model = _hf_with_header(orig, tmp_path, lambda h: h[NAME].update(data_offsets=[]))
    elif fmt == "gguf":
        model = _gguf(orig, tmp_path, _kv("llama.attention.head_count", fuzz.U32, 0))
    elif fmt == "manifest":
        model = _manifest(
            orig, tmp_path, "int8", lambda m: m["weights"][f"{Q}.qweight"].pop("tensors")
        )
    else:
        model = _config(orig, tmp_path, True, hidden_size=-64)
    capsys.readouterr()
    if fmt in ("safetensors", "gguf"):  # weights are read by a transform, not by an estimate
        code = main(["quantize", str(model), "--method", "int8", "-o", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()
    else:
        code = main(["estimate", str(model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("memopt: error: "), err
