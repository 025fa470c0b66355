"""Shared fixtures: small real transformers models written as Hugging Face folders, loaded models;
shared helpers (``from conftest import assert_similar``): cosine similarity, /proc/self/status."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

torch.manual_seed(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine similarity of two tensors taken as flat vectors, computed in float64."""
    return torch.nn.functional.cosine_similarity(
        a.flatten().double(), b.flatten().double(), dim=0
    ).item()


def assert_similar(
    a: torch.Tensor, b: torch.Tensor, min_cosine: float, *, rows: bool = False, what: object = ""
) -> float:
    """Assert that ``a`` and ``b`` point the same way: their cosine similarity (:func:`cosine`,
    the tensors as flat vectors) is above ``min_cosine``; with ``rows``, that of every row (along
    the last dimension) is. Returns the cosine (the smallest row's, with ``rows``); a failure names
    ``what`` and the cosine found."""
    if rows:
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min().item()
    else:
        cos = cosine(a, b)
    assert cos > min_cosine, f"{what}{': ' if what else ''}cosine {cos:.6f} <= {min_cosine}"
    return cos


def proc_status(key: str) -> int:
    """A byte count of /proc/self/status (``RssAnon``, ``RssFile``, ``VmHWM`` ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    """transformers' own progress bars would land in the captured stderr of CLI tests."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _tiny_configs() -> dict[str, object]:
    """Randomly initialised, small configs of several architectures (a causal LM head each)."""
    from transformers import (
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=512)
    return {
        "gpt2": GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_positions=256,
            **common,
            architectures=["GPT2LMHeadModel"],
        ),
        "llama": LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **common,
            architectures=["LlamaForCausalLM"],
        ),
        "opt": OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            **common,
            architectures=["OPTForCausalLM"],
        ),
        "qwen2": Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
            architectures=["Qwen2ForCausalLM"],
        ),
        "mistral": MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
            architectures=["MistralForCausalLM"],
        ),
    }


TINY_ARCHS = tuple(_tiny_configs())


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A safetensors file of 4 × 8 MB float32 tensors and two small odd-sized ones (later offsets
    are not 8-aligned), and the tensors it holds."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(1024, 2048) for i in range(4)}  # 4 × 8 MB
    tensors["norm.weight"] = torch.randn(7)
    tensors["ids"] = torch.arange(5, dtype=torch.int64)
    folder = tmp_path_factory.mktemp("weights")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_folder("gpt2")`` → a Hugging Face folder (config.json + model.safetensors)."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_tiny_configs()[arch])
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path, safe_serialization=True)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def minilm():
    from memopt.models import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def smollm2():
    from memopt.models import load_model

    return load_model("smollm2")


@pytest.fixture(autouse=True)
def _one_thread_for_training_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """tests/train: one intra-op thread (here, not in tests/train/conftest.py, which would shadow
    this module's name for ``from conftest import ...``).

    Its models are tiny: each op is too small to split over threads, and on a shared 2-core machine
    two intra-op threads per process oversubscribe the cores. Restored after each test.
    """
    if "train" not in request.node.path.parent.parts[-1:]:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
