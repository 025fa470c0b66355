"""The memopt manifest's JSON Schema: shipped as package data, itself valid draft 2020-12, and
what memopt writes passes it; a failing field is named by its JSON path in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from memopt.core.errors import MemoptError
from memopt.formats.manifest import FORMAT_VERSION, MANIFEST, SCHEMAS, TASKS, read_manifest, schema

ROOT = Path(__file__).resolve().parents[2]


def test_schema_is_valid_and_versioned() -> None:
    s = schema()
    Draft202012Validator.check_schema(s)  # raises on a schema that is not valid 2020-12
    assert s["properties"]["format_version"] == {"const": FORMAT_VERSION}
    assert set(SCHEMAS) == set(range(1, FORMAT_VERSION + 1))
    assert TASKS == ("causal-lm", "encoder")


def test_schema_is_package_data() -> None:
    """The wheel carries the schema: pyproject's package-data names it, and it lies in the
    package folder that importlib.resources reads."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.schema.json" in project["tool"]["setuptools"]["package-data"]["memopt.formats"]
    assert any(d.startswith("jsonschema") for d in project["project"]["dependencies"])
    for name in SCHEMAS.values():
        assert (ROOT / "src" / "memopt" / "formats" / name).is_file()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama quantized to int8 by memopt into a folder."""
    from memopt.models.toy import tiny_llama
    from memopt.quant import Int8WeightOnly
    from memopt.quant.stream import quantize_model

    loaded = tiny_llama(0, vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, max_position_embeddings=32)  # fmt: skip
    root = tmp_path_factory.mktemp("saved")
    loaded.model.save_pretrained(root / "hf", safe_serialization=True)
    quantize_model(root / "hf", Int8WeightOnly(), root / "q")
    return root / "q"


def test_what_memopt_writes_passes(saved: Path) -> None:
    manifest = read_manifest(saved)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["weights"], "an int8 model has quantized weights"


def _edited(saved: Path, tmp: Path, edit) -> Path:
    import shutil

    folder = tmp / "edited"
    shutil.copytree(saved, folder)
    m = json.loads((folder / MANIFEST).read_text())
    edit(m)
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(task=7), "($.task: 7, expected one of causal-lm, encoder)"),
        (lambda m: m.update(format_version=0), "($.format_version: 0, expected 1)"),
        (lambda m: m.pop("tensors"), "($.tensors: missing (a required field))"),
        (lambda m: m.update(non_persistent=[""]), '($.non_persistent[0]: "", expected a '),
        (
            lambda m: m["cast_hooks"].update(x=["a", "b", "c"]),
            "($.cast_hooks.x: 3 items, expected at most 2)",
        ),  # fmt: skip
        (
            lambda m: m["weights"][next(iter(m["weights"]))].update(group_size=1.0),
            ".group_size: 1.0, expected integer or null)",
        ),  # fmt: skip
        (
            lambda m: m["weights"][next(iter(m["weights"]))].update(tensors={}),
            ".tensors: {}, expected at least 1 entry)",
        ),  # fmt: skip
    ],
)
def test_refusal_names_file_field_and_expectation(
    saved: Path, tmp_path: Path, edit, message: str
) -> None:
    folder = _edited(saved, tmp_path, edit)
    with pytest.raises(MemoptError) as info:
        read_manifest(folder)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(folder / MANIFEST)), text
    assert message in text, text


def test_a_huge_manifest_is_checked_quickly(saved: Path, tmp_path: Path) -> None:
    """80 layers' worth of entries (the size of a 70B model's manifest) in well under a second."""
    import time

    def grow(m: dict) -> None:
        for i in range(80 * 7):
            key = f"model.extra.{i}.qweight"
            m["weights"][key] = {"format": "int8", "shape": [8192, 8192], "dtype": "float32",
                                 "group_size": None,
                                 "tensors": {"qdata": {"dtype": "int8", "shape": [8192, 8192]},
                                             "scale": {"dtype": "float32", "shape": [8192, 1]}}}  # fmt: skip
            m["modules"][f"model.extra.{i}"] = {"class": "QLinear", "weight": key}
            m["tensors"] += [f"{key}.qdata", f"{key}.scale"]

    folder = _edited(saved, tmp_path, grow)
    t0 = time.perf_counter()
    read_manifest(folder)  # the names resolve in the manifest; the architecture is not built
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (ROOT / "tests/fixtures/v1").iterdir() if p.is_dir())
)
def test_folders_an_earlier_memopt_wrote_pass(name: str) -> None:
    """The schema states format version 1 as it was written: the v1 fixtures (int8, int4, int3,
    sparse, casts) pass it unchanged."""
    manifest = read_manifest(ROOT / "tests/fixtures/v1" / name)
    assert manifest["format_version"] == 1
