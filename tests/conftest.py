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
    """The bundled SmolLM2 GGUF dequantized to float32 (the float model: training, streaming,
    pruning and the float folders start from it)."""
    from memopt.models import load_model

    return load_model("smollm2", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_blocks():
    """The bundled SmolLM2 GGUF as shipped: its Q4_1 / Q8_0 blocks kept (``load_model`` default)."""
    from memopt.models import load_model

    return load_model("smollm2")


# --------------------------------------------------------------------------------------------------
# Tiny GGUF files, written with the gguf package as llama.cpp's converter writes them

HF_TO_GGUF_STEMS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_llama(tied: bool, arch: str = "llama", bias: bool = False) -> torch.nn.Module:
    """A tiny random Llama (or Qwen2) for a GGUF file, norms and biases away from 1 and 0."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    extra = {"attention_bias": True} if bias else {}
    cfg = config_class(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=tied,
        **extra,
    )
    model = model_class(cfg).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that they matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def write_llama_gguf(
    path: Path, model: torch.nn.Module, qtype: object, arch: str = "llama", float_stems=()
) -> None:
    """``model`` as a GGUF file: 2-D weights in ``qtype`` (a ``gguf.GGMLQuantizationType``)
    except those whose GGUF stem (``token_embd``, ``ffn_up``...) is in ``float_stems`` (F32)."""
    import gguf
    import numpy as np

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    to_gguf = HF_TO_GGUF_STEMS
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, _, kind = name.rpartition(".")
        parts = stem.split(".")
        if parts[:2] == ["model", "layers"]:
            gname = f"blk.{parts[2]}.{to_gguf['.'.join(parts[3:])]}.{kind}"
        else:
            gname = f"{to_gguf[stem]}.{kind}"
        a = w.numpy()
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
        gstem = gname.split(".")[-2]
        h = heads.get(gstem if gname.startswith("blk.") else "", 0)
        if (
            h and arch == "llama"
        ):  # llama.cpp's converter: (n_head, 2, head_dim/2, in) -> (n_head, head_dim/2, 2, in)
            a = a.reshape(h, 2, a.shape[0] // h // 2, -1).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and gstem not in float_stems:
            writer.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(a))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
