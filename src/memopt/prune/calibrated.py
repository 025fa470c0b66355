"""Calibrated pruning of transformer blocks, one block at a time (as Wanda's and SparseGPT's own
procedures do): each block is pruned from the inputs it receives with every earlier block already
pruned, so the errors of earlier layers are seen, not ignored.

Per Linear, from ``H = Σ x xᵀ`` over the calibration tokens at its input ``(K, K)``:

Wanda      score ``|W_ij| · sqrt(H_jj)`` (= ``|W_ij| · ‖X_j‖₂``), lowest ``s`` of each row removed;
           the kept weights are not changed.
SparseGPT  (Frantar & Alistarh 2023) the optimal-brain-surgeon update: columns are visited in
           order; pruning column i's selected entries leaves an error ``e = w_i / [H⁻¹]_ii`` that is
           fed to the columns not yet visited through the Cholesky factor of ``H⁻¹`` (as GPTQ does
           for rounding). The mask is chosen per block of 128 columns with the score
           ``w² / [U]_ii²``, each row losing exactly ``s`` of every block (N:M: of every group).

Non-uniform sparsity across blocks (OWL, Yin et al. 2023; ``owl=λ`` in the config): a first pass
over the dense model measures each block's outlier ratio, the fraction of its Wanda scores
``|W_ij| · ‖X_j‖₂`` above ``OWL_M`` times their mean; blocks with more outliers keep more weights.
Block ``b`` gets sparsity ``s − (r_b − mean r)``, ``r`` the ratios scaled linearly onto
``[0, 2λ]``, so the sparsities span ``[s − λ, s + λ]`` and their mean is ``s`` (every block has the
same Linears, so the model's sparsity is ``s``).

The block machinery (capturing the first block's inputs, grouping Linears by the tensor they read,
accumulating H) is memopt.quant.calibrate's, shared with GPTQ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.core.errors import MemoptError
from memopt.core.modules import require_blocks
from memopt.prune.masks import nm_mask, row_mask

__all__ = ["OWL_M", "block_sparsities", "sequential_prune", "sparsegpt_prune"]

OWL_M = 5.0  # a score is an outlier above OWL_M x the block's mean score (the paper's M)


def _damped_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor U of (H + λI)⁻¹ (K, K), dead-column mask (K,))."""
    H = h.detach().float().clone()
    dead = H.diagonal() <= 0  # inputs never excited: nothing to feed back
    H[dead, dead] = 1.0
    lam = damp * float(H.diagonal().mean())
    for _ in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(lam)
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
            return torch.linalg.cholesky(hinv, upper=True), dead
        except torch.linalg.LinAlgError:
            lam *= 10
    raise MemoptError("SparseGPT: the calibration Hessian is not positive definite")


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
    block: int = 128,
) -> torch.Tensor:  # fmt: skip
    """The pruned (and compensated) weight ``(N, K)`` in ``w``'s dtype; see the module docstring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-column rank-1 updates are too small to split (see GPTQ)
    try:
        return _sparsegpt(w, h, sparsity, nm, block)
    finally:
        torch.set_num_threads(threads)


def _sparsegpt(w, h, sparsity, nm, block) -> torch.Tensor:
    n, k = w.shape
    U, dead = _damped_factor(h)
    Wt = w.detach().float().t().contiguous()  # (K, N): column i of W is row i here
    Wt[dead] = 0.0
    if nm is not None and block % nm[1]:
        block = nm[1] * max(1, block // nm[1])
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = Wt[i1:i2].clone()  # (B, N), updated as columns are pruned
        U1 = U[i1:i2, i1:i2]  # (B, B)
        E1 = torch.zeros_like(W1)  # (B, N) scaled errors
        d = U1.diagonal()[:, None]  # (B, 1)
        if nm is None:
            keep = row_mask((W1 / d).pow(2).t(), sparsity).t()  # (B, N): per row of W
        else:
            keep = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = W1[i : i + nm[1]] / d[i : i + nm[1]]  # (M, N) current values of the group
                keep[i : i + nm[1]] = nm_mask(g.pow(2).t(), nm[0], nm[1]).t()
            x = W1[i]  # (N,)
            q = x * keep[i]
            err = (x - q) / U1[i, i]  # (N,)
            W1[i] = q
            W1[i + 1 :].addmm_(U1[i, i + 1 :, None], err[None, :], alpha=-1.0)
            E1[i] = err
        Wt[i1:i2] = W1
        Wt[i2:] -= U[i1:i2, i2:].t() @ E1  # lazy update of the columns after this block
    return Wt.t().contiguous().to(w.dtype)


def _stat_hook(stats: dict[str, torch.Tensor], key: str, full: bool) -> Any:
    """A pre-hook adding ``Σ x xᵀ`` (``full``: (K, K)) or its diagonal ``Σ x²`` (K,) to stats[key]."""

    def pre(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (M, K)
        h = x.t() @ x if full else x.pow(2).sum(0)
        stats[key] = stats[key] + h if key in stats else h

    return pre


def _block_stats(
    blk: nn.Module, inputs: list, names: list[str], full: bool
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """One pass of ``blk`` over ``inputs``: ``Σ x xᵀ`` (``full``) or ``Σ x²`` per stage's input."""
    from memopt.quant.calibrate import stages

    groups = stages(blk, inputs[0], names)  # Linears grouped by the tensor they read
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for stage in groups:
        hook = _stat_hook(stats, stage[0], full=full)
        handles.append(blk.get_submodule(stage[0]).register_forward_pre_hook(hook))
    try:
        for a, kw in inputs:
            blk(*a, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats, groups


def _block_names(blk: nn.Module, here: str, chosen: set[str]) -> list[str]:
    return [
        nm_ for nm_, m in blk.named_modules() if isinstance(m, nn.Linear) and here + nm_ in chosen
    ]


@torch.no_grad()
def block_sparsities(
    model: nn.Module, targets: list[tuple[str, nn.Module]], calib: torch.Tensor, sparsity: float,
    lam: float, batch: int = 8,
) -> list[float]:  # fmt: skip
    """OWL's sparsity per transformer block (module docstring), from the dense model's outlier
    ratios on ``calib``; ``lam`` = 0 gives ``sparsity`` everywhere."""
    from memopt.quant.calibrate import capture_inputs, next_inputs

    prefix, blocks = require_blocks(model, "calibration")
    if lam <= 0:
        return [sparsity] * len(blocks)
    chosen = {n for n, _ in targets}
    inputs = capture_inputs(model, blocks[0], calib, batch)
    ratios = []
    for b, blk in enumerate(blocks):
        names = _block_names(blk, f"{prefix}.{b}.", chosen)
        stats, groups = _block_stats(blk, inputs, names, full=False) if names else ({}, [])
        scores = []
        for stage in groups:
            st = stats.get(stage[0])
            for nm_ in stage:
                w = blk.get_submodule(nm_).weight.detach().abs().float()
                norm = st.clamp_min(0).sqrt()[None] if st is not None else 1.0
                scores.append((w * norm).reshape(-1))
        if scores:
            sc = torch.cat(scores)
            ratios.append(float((sc > OWL_M * sc.mean()).float().mean()))
        else:
            ratios.append(0.0)
        inputs = next_inputs(inputs, [blk(*a, **kw) for a, kw in inputs])
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0:
        return [sparsity] * len(blocks)
    r = (r - r.min()) / span * (2 * lam)  # [0, 2λ]
    out = (sparsity - (r - r.mean())).clamp(0.0, 0.99)
    return [float(x) for x in out]


@torch.no_grad()
def sequential_prune(
    model: nn.Module, config: Any, targets: list[tuple[str, nn.Module]], calib: torch.Tensor,
    report: Any, *, method: str, batch: int = 8,
) -> set[str]:  # fmt: skip
    """Prune the selected Linears inside the transformer blocks, block by block.

    ``method``: ``"wanda"`` or ``"sparsegpt"``; ``config`` has ``sparsity`` (or ``n``, ``m``).
    Per block: one pass over the calibration inputs accumulates ``H`` (SparseGPT) or its diagonal
    (Wanda) for every selected Linear at once (Linears reading the same tensor share it), then the
    block is pruned and run again to give the next block its inputs. Returns the names pruned
    (targets outside the blocks are left to the caller)."""
    from memopt.quant.calibrate import capture_inputs, next_inputs

    chosen = {n for n, _ in targets}
    prefix, blocks = require_blocks(model, "calibration")
    nm = (config.n, config.m) if hasattr(config, "m") else None
    lam = 0.0 if nm else float(getattr(config, "owl", 0.0))
    per_block = block_sparsities(model, targets, calib, config.sparsity, lam, batch)
    done: set[str] = set()
    was_training = model.training
    model.eval()
    inputs = capture_inputs(model, blocks[0], calib, batch)
    for b, blk in enumerate(blocks):
        here = f"{prefix}.{b}."
        s = per_block[b]
        names = _block_names(blk, here, chosen)
        if names:
            stats, groups = _block_stats(blk, inputs, names, full=method == "sparsegpt")
            for stage in groups:
                st = stats.pop(stage[0], None)
                for nm_ in stage:
                    w = blk.get_submodule(nm_).weight
                    if st is None:  # never ran on the calibration data: plain magnitude
                        keep = nm_mask(w.abs(), *nm) if nm else row_mask(w.abs(), s)
                        w.mul_(keep.to(w.dtype))
                    elif method == "sparsegpt":
                        w.copy_(sparsegpt_prune(w, st, s, nm))
                    else:
                        score = w.detach().abs().float() * st.clamp_min(0).sqrt()[None]
                        keep = nm_mask(score, *nm) if nm else row_mask(score, s)
                        w.mul_(keep.to(w.dtype))
                    done.add(here + nm_)
        outputs = [blk(*a, **kw) for a, kw in inputs]
        inputs = next_inputs(inputs, outputs)
        del outputs
    model.train(was_training)
    return done
