"""A model for the decode engine straight from its files: no transformers, no nn.Module.

``memopt run`` of a model the engine can run spends most of its time importing transformers and
building its modules on the meta device, neither of which the engine needs: it needs the weights
(as they are stored), a handful of config numbers, and the tokenizer. :func:`open_model` reads
exactly that: config.json (or a GGUF's metadata), the weights through memopt's own readers
(memory-mapped; quantized weights rebuilt by their weight kinds, as a load does), and the
tokenizer through the ``tokenizers`` library. The engine then computes what it computes over the
same tensors loaded by :func:`memopt.models.load_model` (tested: the same logits, bit for bit).
Anything it cannot read this way returns None, and the caller takes the full path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from memopt.core.errors import MemoptError
from memopt.engine.llama import (
    GGML_TYPES,
    Engine,
    Weight,
    _Unsupported,
    arch_of,
    build,
    library,
)
from memopt.formats.manifest import MANIFEST, read_manifest
from memopt.formats.safetensors import SafetensorsReader
from memopt.weights import empty_weight, fill_weight

__all__ = ["LeanModel", "open_model"]


@dataclass
class LeanModel:
    """An engine with its tokenizer and end tokens, read from files."""

    name: str
    engine: Engine
    tokenizer: Any  # tokenizers.Tokenizer
    eos: set[int]
    cleanup: bool = False  # transformers' clean_up_tokenization_spaces
    keep: list[Any] = field(default_factory=list)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if not ids:
            raise MemoptError("the prompt is empty (no tokens)")
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return _clean_up(text) if self.cleanup else text

    def generate(
        self, prompt: str | list[int], max_new_tokens: int = 32, stop_at_eos: bool = True
    ) -> dict[str, Any]:
        """Greedy generation, the result of :func:`memopt.generate.generate` (same keys, same
        tokens): ``text``, ``tokens``, ``prompt_tokens``, ``prefill_s``, ``decode_s``,
        ``tokens_per_s``, ``engine``."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if len(ids) + max_new_tokens > self.engine.max_seq:
            raise MemoptError(f"prompt + new tokens exceed the {self.engine.max_seq} positions")
        eos = self.eos if stop_at_eos else set()
        fwd = self.engine.forward
        fwd(ids[0], 0)  # the library's first load and the weights' first page faults
        start = time.perf_counter()
        for pos, tok in enumerate(ids):
            logits = fwd(tok, pos)
        tokens = [int(logits.argmax())]
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            tokens.append(int(fwd(tokens[-1], len(ids) + len(tokens) - 1).argmax()))
        decode_s = time.perf_counter() - start
        return {
            "text": self.decode(tokens),
            "tokens": tokens,
            "prompt_tokens": len(ids),
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s else None,
            "engine": "memopt",
        }


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (a tokenizer config can ask for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


def open_model(path: str | Path, max_seq: int, kv_int8: bool = False) -> LeanModel | None:
    """The engine over a GGUF file, a memopt folder or a Hugging Face folder of float32, float16
    or bfloat16 weights, for ``max_seq`` positions (``kv_int8``: an int8 KV cache); None when this
    path cannot run it (use the full one)."""
    path = Path(path)
    if library() is None:
        return None
    try:
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_file(path, max_seq, kv_int8)
        if not path.is_dir() or not (path / "tokenizer.json").is_file():
            return None
        if (path / MANIFEST).is_file():
            return _memopt_folder(path, max_seq, kv_int8)
        if (path / "config.json").is_file():
            return _hf_folder(path, max_seq, kv_int8)
    except _Unsupported:
        return None
    return None


def _config(data: dict[str, Any]) -> SimpleNamespace:
    cfg = SimpleNamespace(**data)
    if isinstance(getattr(cfg, "rope_parameters", None), dict) and not hasattr(cfg, "rope_scaling"):
        params = cfg.rope_parameters
        cfg.rope_theta = params.get("rope_theta", 10000.0)
        if params.get("rope_type", "default") != "default":
            cfg.rope_scaling = params
    return cfg


def _tokenizer(folder: Path) -> tuple[Any, set[int], bool]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos: set[int] = set()
    tc = _json(folder / "tokenizer_config.json")
    named = tc.get("eos_token")
    if isinstance(named, dict):
        named = named.get("content")
    if isinstance(named, str) and tok.token_to_id(named) is not None:
        eos.add(int(tok.token_to_id(named)))
    for data in (_json(folder / "config.json"), _json(folder / "generation_config.json")):
        value = data.get("eos_token_id")
        eos.update(
            [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
        )
    return tok, eos, bool(tc.get("clean_up_tokenization_spaces", False))


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _memopt_folder(folder: Path, max_seq: int, kv_int8: bool) -> LeanModel:
    manifest = read_manifest(folder)
    if manifest["task"] != "causal-lm" or manifest["cast_hooks"]:
        raise _Unsupported("not a float32 / quantized causal LM")
    config = _config(manifest["config"])
    reader = SafetensorsReader(folder, str(folder))
    aliases: dict[str, str] = manifest["aliases"]

    def tensor(name: str) -> torch.Tensor:
        return reader.get(aliases.get(name, name))

    made: dict[str, Any] = {}

    def weight(key: str) -> Any:
        if key not in made:
            spec = manifest["weights"][key]
            qw = empty_weight(spec)
            fill_weight(qw, {s: reader.get(f"{key}.{s}") for s in spec["tensors"]})
            made[key] = qw
        return made[key]

    def get(name: str) -> tuple[Weight, torch.Tensor | None]:
        info = manifest["modules"].get(name)
        if info is None:
            return tensor(f"{name}.weight"), _optional(reader, aliases, f"{name}.bias")
        if info.get("class") not in ("QLinear", "QEmbedding") or info.get("dynamic"):
            raise _Unsupported(f"module class {info.get('class')}")
        bias = tensor(f"{name}.bias") if info.get("bias") else None
        return weight(info["weight"]), bias

    arch = arch_of(config)
    if "model.rotary_emb.inv_freq" in reader.names():  # the saved model's own frequencies
        arch.inv_freq = reader.get("model.rotary_emb.inv_freq")
    eng = build(arch, get, lambda name: tensor(f"{name}.weight"), max_seq, kv_int8)
    tok, eos, cleanup = _tokenizer(folder)
    return LeanModel(str(folder), eng, tok, eos, cleanup, [reader])


def _optional(reader: SafetensorsReader, aliases: dict[str, str], name: str) -> Any:
    name = aliases.get(name, name)
    return reader.get(name) if name in reader.names() else None


def _hf_folder(folder: Path, max_seq: int, kv_int8: bool) -> LeanModel:
    config = _config(_json(folder / "config.json"))
    reader = SafetensorsReader(folder, str(folder))
    names = set(reader.names())

    def tensor(name: str) -> torch.Tensor:
        if (
            name not in names
            and name == "lm_head.weight"
            and getattr(config, "tie_word_embeddings", False)
        ):
            name = "model.embed_tokens.weight"
        if name not in names:
            raise _Unsupported(f"no tensor {name}")
        t = reader.get(name)
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise _Unsupported(f"{t.dtype} weights")
        return t  # a 16-bit checkpoint's matrices read as stored (the engine widens them)

    def get(name: str) -> tuple[Weight, torch.Tensor | None]:
        bias = f"{name}.bias"
        return tensor(f"{name}.weight"), (tensor(bias) if bias in names else None)

    eng = build(arch_of(config), get, lambda name: tensor(f"{name}.weight"), max_seq, kv_int8)
    tok, eos, cleanup = _tokenizer(folder)
    return LeanModel(str(folder), eng, tok, eos, cleanup, [reader])


def _gguf_file(path: Path, max_seq: int, kv_int8: bool) -> LeanModel:
    """The GGUF's blocks as they are stored (Hugging Face row order: llama q/k rows un-permuted,
    as a load does), its metadata for the config, its converted tokenizer (memopt's cache)."""
    from tokenizers import Tokenizer

    from memopt.formats.gguf import (
        GGUFSource,
        gguf_metadata,
        gguf_tensor_types,
        gguf_tokenizer_file,
    )
    from memopt.weights.ggml import GGMLWeight

    types = set(gguf_tensor_types(path).values())
    if not types <= GGML_TYPES:  # the engine's kernels
        raise _Unsupported(f"GGML types {sorted(types)}")
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2") or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise _Unsupported(f"GGUF architecture {arch!r}")
    src = GGUFSource(path)
    heads = int(meta[f"{arch}.attention.head_count"])
    dim = int(meta[f"{arch}.embedding_length"])
    head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // heads)
    config = SimpleNamespace(
        architectures=["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        model_type=arch, hidden_size=dim, num_attention_heads=heads, head_dim=head_dim,
        intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
        num_hidden_layers=int(meta[f"{arch}.block_count"]),
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        vocab_size=int(src.shape("model.embed_tokens.weight")[0]),
        rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
    )  # fmt: skip
    names = set(src.names())
    made: dict[str, Any] = {}

    def weight(name: str) -> Weight:
        if name not in made:
            ggml_type, raw = src.raw(name)
            blocks = torch.from_numpy(raw) if raw.flags.writeable else _view(raw)
            floats = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
            if ggml_type in floats:
                made[name] = blocks.view(floats[ggml_type]).reshape(src.shape(name))
            else:
                made[name] = GGMLWeight(blocks, ggml_type, src.shape(name))
        return made[name]

    def get(module: str) -> tuple[Weight, torch.Tensor | None]:
        name = f"{module}.weight"
        if name not in names and module == "lm_head":
            name = "model.embed_tokens.weight"  # tied: stored once
        if name not in names:
            raise _Unsupported(f"no tensor {name}")
        bias = f"{module}.bias"
        return weight(name), (weight(bias) if bias in names else None)

    def norm(module: str) -> torch.Tensor:
        w = weight(f"{module}.weight")
        if not isinstance(w, torch.Tensor):
            raise _Unsupported(f"a quantized norm {module}")
        return w

    eng = build(arch_of(config), get, norm, max_seq, kv_int8)
    tok_file = gguf_tokenizer_file(path)
    tok = Tokenizer.from_file(str(tok_file))
    eos = (
        {int(meta["tokenizer.ggml.eos_token_id"])}
        if "tokenizer.ggml.eos_token_id" in meta
        else set()
    )
    tc = _json(tok_file.parent / "tokenizer_config.json")
    return LeanModel(str(path), eng, tok, eos, bool(tc.get("clean_up_tokenization_spaces", False)),
                     [src])  # fmt: skip


def _view(raw: Any) -> torch.Tensor:
    """A read-only numpy view of the file's mapping as a tensor: never written (the weights are
    only read), so torch's warning about non-writable memory does not apply."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw)
