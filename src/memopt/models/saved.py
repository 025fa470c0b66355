"""Save and load optimized models: one safetensors file + a versioned JSON manifest, never pickle.

The folder and its manifest are described in :mod:`memopt.formats.manifest`. ``load`` rebuilds the
architecture on the meta device from config.json, swaps in the quantized modules the manifest names
(each weight kind rebuilt empty by its own class, memopt.weights), and fills every tensor from the
file: the original model is never needed. Writes go to a temporary folder beside the output,
renamed into place at the end: a failure never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.core.atomic import check_output as _check_output
from memopt.core.atomic import staged_folder as _staged_folder
from memopt.core.errors import MemoptError, one_line
from memopt.core.modules import numel, set_module
from memopt.core.version import VERSION
from memopt.formats.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_FILES,
    WEIGHTS,
    read_manifest,
)
from memopt.formats.safetensors import SafetensorsWriter, dtype_name, dtype_of
from memopt.models.load import (
    LoadedModel,
    ModelSource,
    SafetensorsSource,
    Task,
    architecture,
    load_config,
    materialize_buffers,
    resolve,
    task_of,
    tie_weights,
)
from memopt.weights import (
    MODULE_KINDS,
    QModule,
    QuantizedWeight,
    boundary_of,
    disk_layout,
    disk_tensors,
    empty_weight,
    fill_weight,
    set_boundary,
    weight_spec,
)

__all__ = [
    "Description",
    "Entry",
    "build_meta",
    "check_output",
    "describe",
    "disk_bytes",
    "iter_chunks",
    "load",
    "quantized_meta",
    "save",
    "staged_folder",
    "write_folder",
]

ProgressFn = Callable[[int, int], None]


def check_output(out_dir: str | Path) -> Path:
    """Refuse an output that is a file, or a non-empty folder that memopt did not write."""
    return _check_output(out_dir, MANIFEST)


def staged_folder(out_dir: str | Path) -> _staged_folder:
    """``with staged_folder(out) as tmp:`` write a memopt folder into ``tmp``; it becomes ``out``
    on success (replacing an earlier memopt folder there) and is removed on failure."""
    return _staged_folder(out_dir, MANIFEST)


# --------------------------------------------------------------------------------------------------
# Describing a model: what goes into the file and the manifest, in execution order


@dataclass
class Entry:
    """One tensor of the file: ``tensor`` is a float/int tensor of the model, or for a quantized
    weight ``(weight, suffix)`` whose disk form is computed when written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    weight: QuantizedWeight | None = None
    weight_key: str = ""
    suffix: str = ""


@dataclass
class Description:
    entries: list[Entry]
    modules: dict[str, dict[str, Any]]
    weights: dict[str, dict[str, Any]]
    aliases: dict[str, str]
    non_persistent: list[str]
    cast_hooks: dict[str, list[str]]

    def manifest_part(self) -> dict[str, Any]:
        ties: dict[str, list[str]] = {}
        for name, m in self.modules.items():
            ties.setdefault(m["weight"], []).append(name)
        return {
            "tensors": [e.name for e in self.entries],
            "weights": self.weights,
            "modules": self.modules,
            "tied": [names for names in ties.values() if len(names) > 1],
            "aliases": self.aliases,
            "non_persistent": self.non_persistent,
            "cast_hooks": self.cast_hooks,
        }


def describe(model: nn.Module) -> Description:
    """Walk ``model`` (real or meta) in registration order, which for transformers models is
    execution order: embeddings, block 0, block 1, ..., final norm, head. Every tensor once."""
    entries: list[Entry] = []
    modules: dict[str, dict[str, Any]] = {}
    weights: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    non_persistent: list[str] = []
    cast_hooks: dict[str, list[str]] = {}
    seen_tensor: dict[int, str] = {}
    seen_weight: dict[int, str] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedWeight):
            continue  # written through its parent, in disk form
        prefix = f"{mname}." if mname else ""
        hooks = boundary_of(m)
        if hooks is not None:
            cast_hooks[mname] = [dtype_name(hooks[0]), dtype_name(hooks[1])]
        if isinstance(m, QModule):
            qw = m.qweight
            key = seen_weight.get(id(qw))
            if key is None:
                key = seen_weight[id(qw)] = f"{prefix}qweight"
                spec = weights[key] = weight_spec(qw)
                for suffix, (dt, shape) in disk_layout(spec).items():
                    entries.append(Entry(f"{key}.{suffix}", dt, shape, None, qw, key, suffix))
            modules[mname] = {"class": m.KIND, "weight": key, **m.manifest_entry()}
        own = [(a, t, True) for a, t in m._parameters.items()]
        own += [(a, t, a not in m._non_persistent_buffers_set) for a, t in m._buffers.items()]
        for attr, t, persistent in own:
            if t is None:
                continue
            name = prefix + attr
            first = seen_tensor.get(id(t))
            if first is not None:
                aliases[name] = first
                continue
            seen_tensor[id(t)] = name
            if not persistent:
                non_persistent.append(name)
            entries.append(Entry(name, t.dtype, tuple(t.shape), t))
    return Description(entries, modules, weights, aliases, non_persistent, cast_hooks)


# --------------------------------------------------------------------------------------------------
# Folders


def disk_bytes(folder: str | Path) -> int:
    """Sum of the sizes of the files in a folder (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# save


def _quant_list(quant_config: Any) -> list[dict[str, Any]]:
    """Configs as manifest entries ``{"config": {...}, "include": ..., "exclude": ...}``."""
    if quant_config is None:
        return []
    items = quant_config if isinstance(quant_config, (list, tuple)) else [quant_config]
    out = []
    for item in items:
        if hasattr(item, "to_dict"):
            out.append({"config": item.to_dict()})
        elif isinstance(item, dict) and "config" in item:
            out.append(dict(item))
        elif isinstance(item, dict):
            out.append({"config": dict(item)})
        else:
            raise MemoptError(f"cannot record quantization config {item!r}")
    return out


def copy_tokenizer(source: ModelSource | None, dest: Path, loaded: LoadedModel | None) -> list[str]:
    """Put the source's tokenizer files in ``dest``; returns their names (empty: no tokenizer)."""
    if source is None:
        return []
    if source.kind == "gguf":
        try:
            tok = loaded.tokenizer() if loaded is not None else None
            if tok is None:
                from memopt.formats.gguf import gguf_tokenizer

                tok = gguf_tokenizer(source.path)
        except MemoptError:
            return []
        before = set(os.listdir(dest))
        tok.save_pretrained(str(dest))
        return sorted(set(os.listdir(dest)) - before)
    copied = []
    for name in TOKENIZER_FILES:
        src = source.folder / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


def write_folder(
    tmp: Path,
    desc: Description,
    fill: Callable[[Entry], torch.Tensor | list[torch.Tensor]],
    *,
    config: Any,
    task: Task,
    name: str,
    quant: list[dict[str, Any]],
    source: ModelSource | None,
    loaded: LoadedModel | None = None,
    progress: ProgressFn | None = None,
    late: Callable[[Entry], bool] | None = None,
) -> dict[str, Any]:
    """Write weights (``fill(entry)`` gives each entry's tensor, in order), config, tokenizer and
    manifest into ``tmp``; returns the manifest. Entries for which ``late(entry)`` is true keep
    their place in the file but are filled after all the others."""
    # config and tokenizer first: converting a GGUF tokenizer takes much memory for a moment, which
    # is then given back before the weights' own working memory is needed
    config_dict = config.to_dict()
    config.to_json_file(str(tmp / "config.json"))
    tokenizer = copy_tokenizer(source, tmp, loaded)
    layout = [(e.name, e.dtype, e.shape) for e in desc.entries]
    writer = SafetensorsWriter(tmp / WEIGHTS, layout)
    total = sum(numel(e.shape) * e.dtype.itemsize for e in desc.entries)
    done = 0
    deferred = [e for e in desc.entries if late is not None and late(e)]
    later = {id(e) for e in deferred}
    try:
        for e in desc.entries:
            if id(e) in later:
                writer.reserve(e.name)
                continue
            writer.write(e.name, fill(e))
            done += numel(e.shape) * e.dtype.itemsize
            if progress is not None:
                progress(done, total)
        for e in deferred:
            writer.write(e.name, fill(e))
            done += numel(e.shape) * e.dtype.itemsize
            if progress is not None:
                progress(done, total)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    manifest = {
        "format": "memopt",
        "format_version": FORMAT_VERSION,
        "memopt_version": VERSION,
        "name": name,
        "task": task,
        "source": None if source is None else {"kind": source.kind, "name": source.name},
        "quantization": quant,
        "files": {"weights": WEIGHTS, "config": "config.json", "tokenizer": tokenizer},
        "config": config_dict,
        **desc.manifest_part(),
    }
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    return manifest


def save(
    model_or_loaded: nn.Module | LoadedModel,
    out_dir: str | Path,
    *,
    config: Any = None,
    quant_config: Any = None,
    source: ModelSource | str | Path | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Save a (quantized, cast or float) transformers model to ``out_dir``; returns the manifest.

    ``quant_config``: the config(s) applied (``QuantConfig``, dict, or a list), recorded in the
    manifest after those the model was loaded with. ``source`` (default: the LoadedModel's) is where
    the tokenizer is copied from. ``config`` defaults to the LoadedModel's or ``model.config``.
    """
    loaded = model_or_loaded if isinstance(model_or_loaded, LoadedModel) else None
    model = loaded.model if loaded is not None else model_or_loaded
    if not isinstance(model, nn.Module):
        raise MemoptError(f"save: expected an nn.Module or LoadedModel, got {type(model).__name__}")
    config = config if config is not None else getattr(loaded, "config", None)
    config = config if config is not None else getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise MemoptError("save: the model has no transformers config, so it could not be rebuilt")
    if isinstance(source, (str, Path)):
        source = resolve(source)
    source = source if source is not None else getattr(loaded, "source", None)
    task: Task = loaded.task if loaded is not None else task_of(config)
    if task == "module":
        task = task_of(config)
    quant = list(getattr(model, "memopt_quantization", [])) + _quant_list(quant_config)
    name = loaded.name if loaded is not None else type(model).__name__
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise MemoptError(f"save: tensor {n} is on the meta device (not loaded)")
    desc = describe(model)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def fill(e: Entry) -> torch.Tensor:
        if e.weight is None:
            assert e.tensor is not None
            return e.tensor.detach().cpu()
        if e.weight_key not in cache:
            cache.clear()  # one weight's disk form at a time
            cache[e.weight_key] = {k: v.cpu() for k, v in disk_tensors(e.weight).items()}
        return cache[e.weight_key][e.suffix]

    with torch.no_grad(), staged_folder(out_dir) as tmp:
        manifest = write_folder(
            tmp,
            desc,
            fill,
            config=config,
            task=task,
            name=name,
            quant=quant,
            source=source,
            loaded=loaded,
            progress=progress,
        )
    return manifest


# --------------------------------------------------------------------------------------------------
# load


def _float_meta(folder: Path, manifest: dict[str, Any], name: str) -> tuple[nn.Module, Any]:
    source = ModelSource("memopt", folder, name)
    config = load_config(source)
    with torch.device("meta"):
        model = architecture(config, manifest["task"], name)
    tie_weights(model)
    return model, config


def quantized_meta(
    model: nn.Module, modules: dict[str, dict[str, Any]], weights: dict[str, dict[str, Any]]
) -> dict[str, QuantizedWeight]:
    """Swap the named modules of a (meta) float model for their quantized classes, with empty
    weights (one per weight key: tied modules share it). Returns weight key -> weight. ``modules``
    and ``weights`` as :func:`~memopt.formats.manifest.read_manifest` checked them."""
    made: dict[str, QuantizedWeight] = {}
    for mname, info in modules.items():
        key = info["weight"]  # a key of weights: read_manifest checked it
        qw = made.get(key)
        if qw is None:
            try:
                qw = made[key] = empty_weight(weights[key])
            except MemoptError as exc:
                raise MemoptError(f"$.weights[{key!r}]: {exc}") from None
        try:
            old = model.get_submodule(mname)
        except AttributeError:
            raise MemoptError(
                f"$.modules[{mname!r}]: the architecture has no such module"
            ) from None
        kind = MODULE_KINDS.get(info.get("class"))
        if kind is None:
            raise MemoptError(
                f"$.modules[{mname!r}].class: {info.get('class')!r}, expected one of "
                f"{', '.join(MODULE_KINDS)}"
            )
        try:
            new = kind.from_manifest(old, qw, info)
        except MemoptError as exc:
            raise MemoptError(f"$.modules[{mname!r}]: {exc}") from None
        set_module(model, mname, new)
    return made


def _quantized_meta_checked(
    folder: Path, model: nn.Module, manifest: dict[str, Any]
) -> dict[str, QuantizedWeight]:
    """:func:`quantized_meta`, after each weight entry is checked against the layout its own
    class gives it and every name the manifest uses is resolved in the architecture; a damaged
    entry reported in one line."""
    where = folder / MANIFEST
    for key, spec in manifest["weights"].items():
        try:
            layout = disk_layout(spec)
        except MemoptError as exc:
            raise MemoptError(f"{where}: corrupt manifest ($.weights[{key!r}]: {exc})") from None
        except Exception as exc:  # the class computing its layout from the entry's fields
            raise MemoptError(
                f"{where}: corrupt manifest ($.weights[{key!r}]: {type(exc).__name__}: "
                f"{one_line(exc)})"
            ) from None
        want = {s: {"dtype": dtype_name(dt), "shape": list(sh)} for s, (dt, sh) in layout.items()}
        if spec["tensors"] != want:
            raise MemoptError(
                f"{where}: corrupt manifest ($.weights[{key!r}].tensors: {spec['tensors']}, its "
                f"format {spec['format']!r} makes {want})"
            )
    names = {n for n, _ in model.named_modules()}
    for kind, table in (("modules", manifest["modules"]), ("cast_hooks", manifest["cast_hooks"])):
        for mname in table:
            if mname not in names:
                raise MemoptError(
                    f"{where}: corrupt manifest ($.{kind}[{mname!r}]: the architecture has no "
                    "such module)"
                )
    try:
        return quantized_meta(model, manifest["modules"], manifest["weights"])
    except MemoptError as exc:
        raise MemoptError(f"{where}: corrupt manifest ({exc})") from None
    except Exception as exc:  # a weight class building itself from the entry's fields
        raise MemoptError(
            f"{where}: corrupt manifest (module or weight entry: {type(exc).__name__}: "
            f"{one_line(exc)})"
        ) from None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, params: dict[str, Any]) -> None:
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        owner = None
    if owner is not None and (attr in owner._parameters or attr in owner._buffers):
        old = owner._parameters.get(attr, owner._buffers.get(attr))
        if old is not None and (
            old.is_floating_point() != tensor.is_floating_point() or old.shape != tensor.shape
        ):
            raise MemoptError(
                f"tensor {name!r} is {dtype_name(tensor.dtype)} {tuple(tensor.shape)}, the "
                f"architecture expects {dtype_name(old.dtype)} {tuple(old.shape)}"
            )
    if owner is not None and attr in owner._parameters:
        old = owner._parameters[attr]
        p = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
        owner._parameters[attr] = params[name] = p
    elif owner is not None and attr in owner._buffers:
        owner._buffers[attr] = params[name] = tensor
    else:
        raise MemoptError(f"unexpected tensor {name!r}: the architecture has no such parameter")


def build_meta(folder: str | Path, name: str | None = None) -> LoadedModel:
    """The saved model's architecture on the meta device, quantized modules in place (estimation)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    model, config = _float_meta(folder, manifest, name or str(folder))
    _quantized_meta_checked(folder, model, manifest)
    return LoadedModel(
        model.eval(), manifest["task"], name or str(folder), config,
        ModelSource("memopt", folder.resolve(), name or str(folder)),
    )  # fmt: skip


def load(
    folder: str | Path, *, name: str | None = None, progress: ProgressFn | None = None
) -> LoadedModel:
    """Rebuild a model saved by :func:`save` (or ``quantize_model``) without the original."""
    folder = Path(folder)
    name = name or str(folder)
    if not folder.is_dir():
        raise MemoptError(f"{folder}: not a folder")
    manifest = read_manifest(folder)
    model, config = _float_meta(folder, manifest, name)
    made = _quantized_meta_checked(folder, model, manifest)
    src = SafetensorsSource(folder, name)
    present = set(src.names())
    order: list[str] = manifest["tensors"]
    missing = [t for t in order if t not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MemoptError(f"{folder / WEIGHTS}: tensor {missing[0]!r} is missing{more}")
    extra = sorted(present - set(order))
    if extra:
        raise MemoptError(f"{folder / WEIGHTS}: unexpected tensor {extra[0]!r} (not in manifest)")
    suffixes = {k: list(disk_layout(spec)) for k, spec in manifest["weights"].items()}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    params: dict[str, Any] = {}
    total = sum(src.nbytes(t) for t in order)
    done = 0
    with torch.no_grad():
        for tname in order:
            tensor = src.get(tname)
            key, _, suffix = tname.rpartition(".")
            if key in suffixes and suffix in suffixes[key]:
                want = manifest["weights"][key]["tensors"][suffix]
                if dtype_name(tensor.dtype) != want["dtype"] or list(tensor.shape) != want["shape"]:
                    raise MemoptError(
                        f"{folder / WEIGHTS}: tensor {tname!r} is {tensor.dtype} "
                        f"{tuple(tensor.shape)}, the manifest says {want['dtype']} {want['shape']}"
                    )
                got = pending.setdefault(key, {})
                got[suffix] = tensor
                if len(got) == len(suffixes[key]):
                    fill_weight(made[key], pending.pop(key))
            else:
                _assign(model, tname, tensor, params)
            done += src.nbytes(tname)
            if progress is not None:
                progress(done, total)
        for alias, first in manifest["aliases"].items():
            if first not in params:
                raise MemoptError(f"manifest: alias {alias!r} of unknown tensor {first!r}")
            owner_name, _, attr = alias.rpartition(".")
            try:
                owner = model.get_submodule(owner_name) if owner_name else model
            except AttributeError:
                owner = None
            if owner is None or (attr not in owner._parameters and attr not in owner._buffers):
                raise MemoptError(f"manifest: alias {alias!r} names no tensor of the architecture")
            if attr in owner._parameters:
                owner._parameters[attr] = params[first]
            else:
                owner._buffers[attr] = params[first]
        materialize_buffers(model)  # buffers nobody saved (none when written by this module)
        for mname, (inner, outer) in manifest["cast_hooks"].items():
            set_boundary(model.get_submodule(mname), dtype_of(inner), dtype_of(outer))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MemoptError(f"{folder}: no saved value for {left[0]!r} (corrupt folder)")
    model.memopt_quantization = list(manifest.get("quantization", []))  # kept for a re-save
    return LoadedModel(
        model.eval(), manifest["task"], name, config, ModelSource("memopt", folder.resolve(), name)
    )


def iter_chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``step`` rows covering ``0..n``."""
    for a in range(0, n, step):
        yield a, min(n, a + step)
