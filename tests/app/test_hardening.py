"""The command line under the failures around it: two runs into one output, a killed run's
leftovers, a full disk, a parent killed while its measured child runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = dict(os.environ, PYTHONPATH=SRC, TRANSFORMERS_VERBOSITY="error")


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama as a Hugging Face folder (321 KiB of float32 weights)."""
    from memopt.models.toy import tiny_llama

    folder = tmp_path_factory.mktemp("hf")
    loaded = tiny_llama(0, vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, max_position_embeddings=128)  # fmt: skip
    loaded.model.save_pretrained(folder, safe_serialization=True)
    return folder


def _quantize(hf: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "memopt", "quantize", str(hf), "--method", "int8", "-o", str(out),
         "--json"],  # fmt: skip
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_two_writers_one_output(hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [_quantize(hf, out) for _ in range(2)]
    done = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], done
    err = next(e for p, (_, e) in zip(procs, done, strict=True) if p.returncode == 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another memopt run" in lines[0] and ".out.lock" in lines[0]
    assert (out / "memopt.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no temporary left


def test_killed_run_leftovers_removed_by_the_next(hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-killed"  # what a run killed in its write window leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".out.lock").touch()  # and its lock file (the kernel dropped the lock itself)
    p = _quantize(hf, out)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_disk_full_is_one_line_and_leaves_nothing(hf: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs to mount a small tmpfs (root)")
    try:
        p = _quantize(hf, mnt / "out")
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


PARENT = """
import sys
from memopt.core.rss import run_in_child
run_in_child("time:sleep", 60)
"""


def test_measured_child_dies_with_its_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=ENV)
    try:
        deadline = time.monotonic() + 30
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline:
            time.sleep(0.1)
            children = psutil.Process(parent.pid).children()
        assert children, "the child never started"
        time.sleep(0.5)  # past the child's first lines (where it asks to die with its parent)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(children, timeout=2)
        assert not alive, f"orphans 2 s after the parent's SIGKILL: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
