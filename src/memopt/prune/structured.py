"""Structured pruning: remove whole neurons, heads and channels, so the model is smaller and dense.

Found by pattern, not by model name:

FFN            a module with ``gate_proj``/``up_proj``/``down_proj`` (Llama family), ``fc1``/``fc2``
               (OPT, CLIP) or ``intermediate.dense``/``output.dense`` (BERT): neuron j is row j of
               the input projections and column j of the output projection.
attention      a module with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``head_dim``: query heads
               are removed within each key-value group (grouped-query attention keeps every group
               the same size), or whole heads (q, k, v and o) when there are no groups.
chains         inside an ``nn.Sequential``: a Linear/Conv whose output reaches another Linear/Conv
               through only elementwise or pooling layers (ReLU, MaxPool, Dropout, BatchNorm, ...;
               a Flatten in front of a Linear maps each channel to its block of features).

Counts are the same in every layer (a transformers config has one ``intermediate_size`` and one
``num_attention_heads``), and the config is updated so the model saves and reloads as what it now is.
Removing neuron j changes the output by exactly its contribution, so the pruned model equals the
dense model with those neurons' output columns zeroed (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError

__all__ = ["Chain", "FFN", "Heads", "find_groups", "structured_prune"]

_PASS = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity,
    nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
)  # fmt: skip
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class FFN:
    name: str
    inputs: list[str]  # Linear names whose rows are the neurons
    output: str  # Linear whose columns are the neurons
    config_key: str | None  # "intermediate_size" / "ffn_dim"


@dataclass
class Heads:
    name: str
    q: str
    k: str
    v: str
    o: str
    head_dim: int


@dataclass
class Chain:
    producer: str  # Linear / Conv whose output units (rows / channels) are removed
    consumer: str  # Linear / Conv whose inputs follow them
    norms: list[str] = field(default_factory=list)  # BatchNorms in between
    per_unit: int = 1  # consumer inputs per producer unit (Flatten: H*W; conv: kernel taps)


def _lin(m: Any) -> bool:
    return isinstance(m, nn.Linear)


def _bert_ffn(m: nn.Module) -> bool:
    inter = getattr(getattr(m, "intermediate", None), "dense", None)
    out = getattr(getattr(m, "output", None), "dense", None)
    return _lin(inter) and _lin(out) and out.in_features == inter.out_features


def _conv_takes(m: nn.Module, units: int) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1 and m.in_channels == units


def find_groups(model: nn.Module) -> list[FFN | Heads | Chain]:
    """Every structure of the patterns above, in module order."""
    out: list[FFN | Heads | Chain] = []
    cfg = getattr(model, "config", None)
    ffn_key = next((k for k in ("intermediate_size", "ffn_dim") if hasattr(cfg, k)), None)
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if all(_lin(getattr(m, a, None)) for a in ("gate_proj", "up_proj", "down_proj")):
            out.append(FFN(name, [p + "gate_proj", p + "up_proj"], p + "down_proj", ffn_key))
        elif _lin(getattr(m, "fc1", None)) and _lin(getattr(m, "fc2", None)):
            out.append(FFN(name, [p + "fc1"], p + "fc2", ffn_key))
        elif _bert_ffn(m):
            out.append(FFN(name, [p + "intermediate.dense"], p + "output.dense", ffn_key))
        if all(_lin(getattr(m, a, None)) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            hd = getattr(m, "head_dim", None)
            if isinstance(hd, int) and hd > 0:
                out.append(Heads(name, p + "q_proj", p + "k_proj", p + "v_proj", p + "o_proj", hd))
        if isinstance(m, nn.Sequential):
            out.extend(_chains(p, list(m.named_children())))
    return out


def _chains(prefix: str, children: list[tuple[str, nn.Module]]) -> list[Chain]:
    out = []
    for i, (pname, prod) in enumerate(children):
        if not isinstance(prod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        if isinstance(prod, (nn.Conv1d, nn.Conv2d)) and prod.groups != 1:
            continue
        units = prod.weight.shape[0]
        norms: list[str] = []
        flatten = False
        for cname, cons in children[i + 1 :]:
            if isinstance(cons, _PASS):
                continue
            if isinstance(cons, _NORMS) and cons.num_features == units:
                norms.append(prefix + cname)
                continue
            if isinstance(cons, nn.Flatten) and not flatten:
                flatten = True
                continue
            if isinstance(cons, nn.Linear) and (flatten or isinstance(prod, nn.Linear)):
                if cons.in_features % units == 0:
                    per = cons.in_features // units
                    out.append(Chain(prefix + pname, prefix + cname, norms, per))
            elif _conv_takes(cons, units) and not flatten:
                out.append(Chain(prefix + pname, prefix + cname, norms, 1))
            break
    return out


# ---- shrinking ----


def _keep_rows(lin: nn.Module, idx: torch.Tensor) -> None:
    """Keep output units ``idx`` of a Linear / Conv (rows of its weight, entries of its bias)."""
    lin.weight = nn.Parameter(lin.weight.data[idx].clone(), lin.weight.requires_grad)
    if getattr(lin, "bias", None) is not None:
        lin.bias = nn.Parameter(lin.bias.data[idx].clone(), lin.bias.requires_grad)
    if isinstance(lin, nn.Linear):
        lin.out_features = int(idx.numel())
    else:
        lin.out_channels = int(idx.numel())


def _keep_cols(lin: nn.Module, idx: torch.Tensor) -> None:
    """Keep inputs ``idx`` of a Linear (columns) / Conv (input channels)."""
    lin.weight = nn.Parameter(lin.weight.data[:, idx].clone(), lin.weight.requires_grad)
    if isinstance(lin, nn.Linear):
        lin.in_features = int(idx.numel())
    else:
        lin.in_channels = int(idx.numel())


def _keep_norm(bn: nn.Module, idx: torch.Tensor) -> None:
    for attr in ("weight", "bias"):
        p = getattr(bn, attr, None)
        if p is not None:
            setattr(bn, attr, nn.Parameter(p.data[idx].clone(), p.requires_grad))
    for attr in ("running_mean", "running_var"):
        b = getattr(bn, attr, None)
        if b is not None:
            setattr(bn, attr, b[idx].clone())
    bn.num_features = int(idx.numel())


def _col_norms(w: torch.Tensor) -> torch.Tensor:
    """‖W[:, j]‖₂ of a (N, K, ...) weight over everything but dim 1: (K,)."""
    return w.detach().float().transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def _unit_scores(cons_w: torch.Tensor, per: int, act: torch.Tensor | None) -> torch.Tensor:
    """Importance of each producer unit: Σ over its consumer inputs j of ``a_j · ‖W[:, j]‖₂``
    (``a_j`` = 1 without calibration): the size of what the unit can add to the consumer's output."""
    if cons_w.dim() > 2:  # conv consumer: a unit is an input channel; fold its kernel taps
        c = _col_norms(cons_w)  # (C,)
        a = None if act is None else act.view(c.numel(), -1).mean(1)
        return c if a is None else c * a
    c = _col_norms(cons_w)  # (K,)
    if act is not None:
        c = c * act
    return c.view(-1, per).sum(1)  # (units,)


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(scores, keep).indices.sort().values


def structured_prune(model: nn.Module, config: Any, targets, calib: Any, report: Any) -> None:
    """The handler of :class:`memopt.prune.Structured` (called by ``prune_``)."""
    from memopt.prune.api import input_norms

    chosen = {n for n, _ in targets}
    groups = []
    for g in find_groups(model):
        if isinstance(g, FFN):
            need = [*g.inputs, g.output]
        elif isinstance(g, Heads):
            if not config.heads:
                continue
            need = [g.q, g.k, g.v, g.o]
        else:
            need = [g.producer, g.consumer]
        if all(n in chosen for n in need):
            groups.append(g)
    if not groups:
        raise MemoptError(
            "structured pruning found no FFN, attention or Sequential chain to shrink"
        )
    mods = dict(model.named_modules())
    consumers = sorted({g.output if isinstance(g, FFN) else g.o if isinstance(g, Heads)
                        else g.consumer for g in groups})  # fmt: skip
    acts = input_norms(model, [(n, mods[n]) for n in consumers], calib) if calib is not None else {}
    touched: set[str] = set()
    before = {n: mods[n].weight.numel() for g in groups for n in _names(g)}
    cfg = getattr(model, "config", None)
    changed: dict[str, Any] = {}
    s = config.sparsity
    for g in groups:
        if isinstance(g, FFN):
            down = mods[g.output]
            size = down.in_features
            keep = max(1, round((1 - s) * size))
            score = _unit_scores(down.weight, 1, acts.get(g.output))
            if g.output not in acts:  # weight-only: the input rows' norms count too
                for n in g.inputs:
                    score = score * mods[n].weight.detach().float().norm(dim=1)
            idx = _keep_top(score, keep)
            for n in g.inputs:
                _keep_rows(mods[n], idx)
            _keep_cols(down, idx)
            if g.config_key:
                changed[g.config_key] = keep
            _set_attr(mods[g.name], ("intermediate_size", "ffn_dim"), keep)
        elif isinstance(g, Heads):
            _prune_heads(g, mods, s, acts.get(g.o), changed)
        else:
            prod, cons = mods[g.producer], mods[g.consumer]
            units = prod.weight.shape[0]
            keep = max(1, round((1 - s) * units))
            score = _unit_scores(cons.weight, g.per_unit, acts.get(g.consumer))
            if g.consumer not in acts:
                score = score * prod.weight.detach().float().reshape(units, -1).norm(dim=1)
            idx = _keep_top(score, keep)
            _keep_rows(prod, idx)
            for n in g.norms:
                _keep_norm(mods[n], idx)
            if isinstance(cons, nn.Linear):
                cols = (idx[:, None] * g.per_unit + torch.arange(g.per_unit)).reshape(-1)
                _keep_cols(cons, cols)
            else:
                _keep_cols(cons, idx)
        touched.update(_names(g))
    if cfg is not None:
        for k, v in changed.items():
            setattr(cfg, k, v)
    after = {n: mods[n].weight.numel() for n in before}
    report.modules = sorted(touched)
    report.params_before = sum(before.values())
    report.params_after = sum(after.values())
    report.sparsity = 1 - report.params_after / report.params_before
    report.changed_config = changed


def _names(g: FFN | Heads | Chain) -> list[str]:
    if isinstance(g, FFN):
        return [*g.inputs, g.output]
    if isinstance(g, Heads):
        return [g.q, g.k, g.v, g.o]
    return [g.producer, g.consumer]


def _set_attr(m: nn.Module, names: tuple[str, ...], value: int) -> None:
    for a in names:
        if isinstance(getattr(m, a, None), int):
            setattr(m, a, value)


def _prune_heads(
    g: Heads, mods: dict[str, nn.Module], s: float, act: torch.Tensor | None, changed: dict
) -> None:
    q, k, v, o = mods[g.q], mods[g.k], mods[g.v], mods[g.o]
    hd = g.head_dim
    h, hkv = q.out_features // hd, k.out_features // hd
    groups = h // hkv  # query heads per key-value head
    col = _col_norms(o.weight) * (act if act is not None else 1.0)  # (H*hd,)
    if act is None:
        col = col * q.weight.detach().float().norm(dim=1)
    score = col.view(h, hd).sum(1)  # (H,)
    if groups > 1:  # drop r query heads inside every group; k / v untouched
        r = min(groups - 1, round(s * groups))
        per = score.view(hkv, groups)
        keep_in = torch.topk(per, groups - r, dim=1).indices.sort(dim=1).values  # (Hkv, G-r)
        heads = (keep_in + torch.arange(hkv)[:, None] * groups).reshape(-1)
        new_h, new_kv = hkv * (groups - r), hkv
        kv_heads = None
    else:  # no groups: whole heads, with their k and v
        r = min(h - 1, round(s * h))
        heads = _keep_top(score, h - r)
        new_h = new_kv = h - r
        kv_heads = heads
    rows = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    _keep_rows(q, rows)
    _keep_cols(o, rows)
    if kv_heads is not None:
        kv_rows = (kv_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        _keep_rows(k, kv_rows)
        _keep_rows(v, kv_rows)
    attn = mods[g.name]
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = new_h // new_kv
    _set_attr(attn, ("num_heads",), new_h)
    _set_attr(attn, ("num_key_value_heads",), new_kv)
    changed.update(num_attention_heads=new_h, num_key_value_heads=new_kv, head_dim=hd)
