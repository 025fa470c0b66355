"""The command line: bad input ends with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memopt.app.cli import main


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own exits (--help, bad options)
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memopt: error:")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_missing_path(capsys) -> None:
    code, out, err = _run(capsys, "estimate", "/no/such/folder")
    _assert_one_line_error(code, err, "no such model")
    assert out == ""


def test_unknown_bundled_name(capsys) -> None:
    code, _, err = _run(capsys, "estimate", "llama-9000")
    _assert_one_line_error(code, err, "bundled")


def test_folder_without_config(capsys, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "profile", str(tmp_path))
    _assert_one_line_error(code, err, "config.json")


def test_truncated_safetensors(capsys, tiny_folder, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for f in tiny_folder("gpt2").iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(
            data[: len(data) // 3] if f.suffix == ".safetensors" else data
        )
    code, _, err = _run(capsys, "eval", str(folder))
    _assert_one_line_error(code, err, "truncated")


def test_corrupt_safetensors(capsys, tiny_folder, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for f in tiny_folder("gpt2").iterdir():
        data = bytearray(f.read_bytes())
        if f.suffix == ".safetensors":
            data[:8] = (10**12).to_bytes(8, "little")  # header length past the end of the file
        (folder / f.name).write_bytes(bytes(data))
    code, _, err = _run(capsys, "eval", str(folder))
    _assert_one_line_error(code, err, "corrupt")


def test_garbage_gguf(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    code, _, err = _run(capsys, "estimate", str(bad))
    _assert_one_line_error(code, err, "model.gguf")


@pytest.mark.parametrize("option", [["--batch", "-3"], ["--seq", "0"], ["--batch", "two"]])
def test_bad_numbers(capsys, option: list[str]) -> None:
    code, _, err = _run(capsys, "estimate", "minilm", *option)
    _assert_one_line_error(code, err, option[0])


def test_unknown_choice(capsys) -> None:
    code, _, err = _run(capsys, "estimate", "minilm", "--dtype", "float8")
    _assert_one_line_error(code, err, "--dtype")


def test_help_explains_every_command(capsys) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for command in ("estimate", "profile", "eval", "demo"):
        assert command in out


def test_real_entry_point_exit_code() -> None:
    """Through the installed interpreter and `python -m memopt`, not just main()."""
    proc = subprocess.run(
        [sys.executable, "-m", "memopt", "estimate", "minilm", "--batch", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_json_contract(capsys) -> None:
    """`memopt plan --json`: the contract's keys, and the planned step allocates nothing."""
    import json

    code, out, _ = _run(capsys, "plan", "minilm", "--seq", "32", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["lower_bound_bytes"] <= result["arena_bytes"] <= result["naive_bytes"]
    assert result["arena_bytes"] <= 1.05 * result["lower_bound_bytes"]
    assert result["steady_state_allocations"] == 0
    assert result["max_abs_diff"] < 1e-4


def test_quantize_json_contract_and_reload(capsys, tiny_folder, tmp_path: Path) -> None:
    import json

    out_dir = tmp_path / "q"
    code, out, _ = _run(
        capsys,
        "quantize",
        str(tiny_folder("llama")),
        "--method",
        "int8",
        "-o",
        str(out_dir),
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    for key in ("bytes_before", "bytes_after", "disk_bytes", "peak_rss_bytes"):
        assert isinstance(result[key], int)
    # int8 weights + float32 scales and norms: well under half of float32, over a quarter.
    assert 0.25 < result["bytes_after"] / result["bytes_before"] < 0.5
    assert result["disk_bytes"] == sum(f.stat().st_size for f in out_dir.iterdir())
    # The saved folder is a MODEL for the other commands.
    code, out, _ = _run(capsys, "estimate", str(out_dir), "--json")
    assert code == 0 and json.loads(out)["peak_bytes"] > 0


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--method", "int4", "--group-size", "48"], "group"),
        (["--method", "float16", "--group-size", "32"], "group-size"),
        (["--method", "int8", "--algo", "rtn"], "--algo"),
        (["--method", "int9"], "--method"),
    ],
)
def test_quantize_bad_options(capsys, tiny_folder, tmp_path: Path, options, needle) -> None:
    code, _, err = _run(
        capsys, "quantize", str(tiny_folder("llama")), *options, "-o", str(tmp_path / "q")
    )
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "q").exists()  # never a half-written output


def test_quantize_output_is_a_file(capsys, tiny_folder, tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    code, _, err = _run(
        capsys, "quantize", str(tiny_folder("llama")), "--method", "int8", "-o", str(target)
    )
    _assert_one_line_error(code, err, "a-file")
    assert target.read_text() == "keep me"


def test_run_json_contract(capsys) -> None:
    import json

    code, out, _ = _run(
        capsys,
        "run",
        "smollm2",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert isinstance(result["text"], str) and len(result["tokens"]) == 4
    assert result["tokens_per_s"] > 0
    # the GGUF runs in its own blocks (96.6 MB, read from the file's mapping), not 538 MB of float32
    assert result["peak_rss_bytes"] > 96e6


def test_quantize_of_a_gguf_says_it_requantizes(capsys, tmp_path: Path) -> None:
    import json

    from gguf import GGMLQuantizationType

    from conftest import gguf_llama, write_llama_gguf

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, gguf_llama(tied=True), GGMLQuantizationType.Q4_1)
    code, out, _ = _run(
        capsys, "quantize", str(path), "--method", "int8", "-o", str(tmp_path / "a")
    )
    assert code == 0 and "note: requantized from the dequantized Q4_1 weights of the GGUF" in out
    code, out, _ = _run(
        capsys, "quantize", str(path), "--method", "int8", "-o", str(tmp_path / "b"), "--json"
    )
    assert code == 0
    assert json.loads(out)["note"] == "requantized from the dequantized Q4_1 weights of the GGUF"


def test_finetune_missing_data(capsys, tmp_path: Path) -> None:
    code, _, err = _run(
        capsys,
        "finetune",
        "smollm2",
        "--data",
        str(tmp_path / "none.txt"),
        "--out",
        str(tmp_path / "out"),
    )
    _assert_one_line_error(code, err, "none.txt")


def test_training_a_quantized_model_is_refused(capsys, tiny_folder, tmp_path: Path) -> None:
    out_dir = tmp_path / "q"
    assert (
        _run(capsys, "quantize", str(tiny_folder("llama")), "--method", "int8", "-o", str(out_dir))[
            0
        ]
        == 0
    )
    code, _, err = _run(capsys, "estimate", str(out_dir), "--task", "train")
    _assert_one_line_error(code, err, "quantized")


def test_run_budget_too_small_names_the_minimum(capsys) -> None:
    code, _, err = _run(capsys, "run", "smollm2", "--prompt", "x", "--max-memory", "20MB")
    _assert_one_line_error(code, err, "smallest budget that works")


def test_prune_json_contract_and_reload(capsys, tiny_folder, tmp_path: Path) -> None:
    import json

    out_dir = tmp_path / "p"
    code, out, _ = _run(
        capsys,
        "prune",
        str(tiny_folder("llama")),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "-o",
        str(out_dir),
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result["bytes_after"] < result["bytes_before"]
    assert result["disk_bytes"] == sum(f.stat().st_size for f in out_dir.iterdir())
    # The saved folder loads and runs (sparse weights are rebuilt layer by layer).
    import torch

    from memopt.models import load_model

    logits = load_model(out_dir).model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--method", "magnitude", "--sparsity", "1.5"], "sparsity"),
        (["--method", "3:7"], "3:7"),
        (["--method", "random", "--sparsity", "0.5"], "random"),
    ],
)
def test_prune_bad_options(capsys, tiny_folder, tmp_path: Path, options, needle) -> None:
    code, _, err = _run(
        capsys, "prune", str(tiny_folder("llama")), *options, "-o", str(tmp_path / "p")
    )
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------------------------------
# export


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama quantized to int8 (per channel), with a BPE tokenizer: a memopt folder."""
    import memopt
    from memopt.models import saved
    from memopt.models.toy import tiny_llama, tiny_tokenizer

    loaded = tiny_llama()
    memopt.quantize_(loaded.model, memopt.Int8WeightOnly())
    path = tmp_path_factory.mktemp("export") / "int8"
    saved.save(loaded, path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt, name", [("gguf", "m.gguf"), ("safetensors", "hf")])
def test_export_json_contract(capsys, int8_folder: Path, tmp_path: Path, fmt, name) -> None:
    import json

    target = tmp_path / name
    code, out, _ = _run(
        capsys, "export", str(int8_folder), "--format", fmt, "-o", str(target), "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert (result["format"], result["path"]) == (fmt, str(target))
    size = (
        target.stat().st_size if fmt == "gguf" else sum(f.stat().st_size for f in target.iterdir())
    )
    assert result["bytes"] == size > 0
    if fmt == "gguf":  # int8 per channel, K a multiple of 32: every tensor written exactly
        assert result["all_exact"] and result["requantized"] == {}
    # the output is a MODEL for the other commands
    code, out, _ = _run(capsys, "estimate", str(target), "--json")
    assert code == 0 and json.loads(out)["peak_bytes"] > 0


def test_export_table(capsys, int8_folder: Path, tmp_path: Path) -> None:
    code, out, _ = _run(
        capsys, "export", str(int8_folder), "--format", "gguf", "-o", str(tmp_path / "m.gguf")
    )
    assert code == 0 and "exact (bit for bit)" in out and "38 of 38" in out


def test_export_bad_inputs(capsys, int8_folder: Path, tiny_folder, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "export", str(int8_folder), "--format", "gguf", "-o", str(tmp_path))
    _assert_one_line_error(code, err, "is a folder")
    target = tmp_path / "gpt2.gguf"
    code, _, err = _run(
        capsys, "export", str(tiny_folder("gpt2")), "--format", "gguf", "-o", str(target)
    )
    _assert_one_line_error(code, err, "architectures")
    code, _, err = _run(capsys, "export", str(int8_folder), "--format", "onnx", "-o", str(target))
    _assert_one_line_error(code, err, "--format")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_float16_on_a_slow_cpu_says_so(
    capsys, tiny_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the note is memopt.measure.cpu16's (its own tests: flags and timings); here, where it goes
    import json

    from memopt.measure import cpu16

    monkeypatch.setattr(cpu16, "float16_note", lambda: "float16 is slow on this CPU")
    code, out, _ = _run(
        capsys, "quantize", str(tiny_folder("llama")), "--method", "float16", "-o", str(tmp_path / "h"),
        "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["note"] == "float16 is slow on this CPU: --method bfloat16"
    code, out, _ = _run(
        capsys, "quantize", str(tiny_folder("llama")), "--method", "bfloat16", "-o", str(tmp_path / "b"),
        "--json",
    )  # fmt: skip
    assert code == 0 and "note" not in json.loads(out)
