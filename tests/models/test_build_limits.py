"""A model is built (on the meta device) under a bound on its modules and a memory limit of its
own (memopt.core.memcap, formats.limits): a config that asks for more is refused in one line while
it builds, quickly; ordinary models build as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.memcap import BuildLimitExceeded, build_limits
from memopt.formats import limits
from memopt.measure.estimate import estimate
from memopt.models import build_meta

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _llama(tmp: Path, layers: int, name: str = "llama") -> Path:
    folder = tmp / name
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 128}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_module_bound_counts_this_threads_build_only() -> None:
    with torch.device("meta"), build_limits("toy", max_modules=100, max_growth=1 << 40):
        nn.Sequential(*[nn.Linear(4, 4) for _ in range(99)])  # 99 children + the Sequential's own
        # another thread's build is not this one's
        other = threading.Thread(target=lambda: nn.Sequential(*[nn.ReLU() for _ in range(500)]))
        other.start()
        other.join()
    with (
        torch.device("meta"),
        pytest.raises(BuildLimitExceeded, match="more than 100 modules"),
        build_limits("toy", max_modules=100, max_growth=1 << 40),
    ):
        nn.Sequential(*[nn.Linear(4, 4) for _ in range(101)])
    nn.Sequential(*[nn.ReLU() for _ in range(200)])  # the hook is gone after the guard


def test_memory_limit_stops_the_build() -> None:
    keep = []
    with (
        pytest.raises(BuildLimitExceeded, match="over its memory limit of 8 MiB") as info,
        build_limits("toy", max_modules=1 << 30, max_growth=8 << 20),
    ):
        for _ in range(10_000):  # modules that each hold 64 KiB of their own: 640 MB if let run
            m = nn.Module()
            m.blob = nn.Module()
            m.blob.data = bytearray(64 << 10)
            keep.append(m)
    assert "\n" not in str(info.value)
    assert len(keep) < 10_000 // 4  # stopped within a few reads of the limit, not at the end


def test_more_modules_than_the_bound_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config under every size bound whose model has more modules than MAX_MODULES (lowered
    here to keep the test short: the real bound is 65,536)."""
    import memopt.models.load as load

    monkeypatch.setattr(load, "MAX_MODULES", 500)
    folder = _llama(tmp_path, 64)  # 64 layers: ~850 modules
    start = time.perf_counter()
    with pytest.raises(MemoptError, match="more than 500 modules") as info:
        estimate(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    assert time.perf_counter() - start < 5.0
    monkeypatch.setattr(load, "MAX_MODULES", limits.MAX_MODULES)
    assert build_meta(folder).model.config.num_hidden_layers == 64  # the real bound builds it


@pytest.mark.parametrize(
    "field", ["decoder_layers", "encoder_layers", "num_layers", "num_decoder_layers", "n_layer"]
)
def test_every_layer_count_is_bounded_before_building(tmp_path: Path, field: str) -> None:
    """A billion decoder layers of a BART (or any other name a layer count goes by) was a hang:
    only num_hidden_layers was bounded."""
    folder = tmp_path / "bart"
    folder.mkdir()
    config = {"architectures": ["BartForConditionalGeneration"], "model_type": "bart",
              "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
              "vocab_size": 128, "max_position_embeddings": 128, field: 10**9}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    # (BART's config also answers encoder_layers to num_hidden_layers: either name)
    said = f"({field}|num_hidden_layers) is 1000000000, expected a whole number"
    with pytest.raises(MemoptError, match=said):
        estimate(folder)
    assert time.perf_counter() - start < 2.0


def test_build_memory_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOPT_BUILD_MEMORY", raising=False)
    assert limits.build_memory() == limits.BUILD_MEMORY == 2 << 30
    monkeypatch.setenv("MEMOPT_BUILD_MEMORY", "4GiB")
    assert limits.build_memory() == 4 << 30
    monkeypatch.setenv("MEMOPT_BUILD_MEMORY", "lots")
    with pytest.raises(MemoptError, match="not a size"):
        limits.build_memory()


def test_cli_estimate_over_the_memory_limit_is_exit_2_one_line(tmp_path: Path) -> None:
    """``memopt estimate`` of a 2048-layer model (under the layer bound) with the build's memory
    limit set to 48 MiB: refused while it builds, exit 2, one line, no traceback."""
    folder = _llama(tmp_path, 2048)
    env = dict(os.environ, PYTHONPATH=SRC, MEMOPT_BUILD_MEMORY="48MiB")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "memopt", "estimate", str(folder)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    seconds = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "over its memory limit of 48 MiB" in lines[0], done.stderr
    assert seconds < 60  # the whole build of 2048 layers, uncapped: ~15 s on 2 loaded cores
