"""Which weights to keep: boolean keep-masks from scores, with exact counts.

Every function takes a score tensor (higher = more important; ``|w|`` for magnitude, ``|w| * ‖x‖``
for Wanda) of a weight seen as ``(N, K)`` rows x inputs and returns a bool mask of the same shape,
True where the weight is kept. Counts are exact: ties are broken by position (``topk`` picks exactly
``k``), so the achieved sparsity is what was asked, rounded to whole weights.
"""

from __future__ import annotations

import torch

from memopt.core.errors import MemoptError

__all__ = ["global_masks", "layer_mask", "nm_mask", "row_mask"]


def _prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask with exactly ``count`` lowest entries removed: everything below the count-th
    smallest value (``kthvalue``: linear time, unlike a sort or a large ``topk``), then entries
    equal to it in index order until the count is met."""
    flat = score.reshape(-1).float()
    if count <= 0:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    thr = flat.kthvalue(count).values
    keep = flat > thr
    eq = (flat == thr).nonzero().squeeze(1)
    below = flat.numel() - int(keep.sum()) - eq.numel()
    keep[eq[count - below :]] = True  # ties beyond the count stay
    return keep.view(score.shape)


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove ``round(sparsity * numel)`` lowest scores of the whole tensor."""
    return _prune_lowest(score, round(sparsity * score.numel()))


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove ``round(sparsity * K)`` lowest scores in every row of ``(N, K)`` (Wanda's comparison
    group: each output's own inputs compete, so no output loses all its inputs)."""
    n, k = score.shape
    count = round(sparsity * k)
    keep = torch.ones(n, k, dtype=torch.bool, device=score.device)
    if count > 0:
        idx = torch.sort(score.float(), dim=1, stable=True).indices[:, :count]  # (N, count)
        keep.scatter_(1, idx, False)
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive inputs of each row of ``(N, K)``."""
    rows, k = score.shape
    if k % m:
        raise MemoptError(f"N:M {n}:{m}: M={m} does not divide the {k} inputs of a weight")
    g = score.float().view(rows, k // m, m)  # (N, K/M, M)
    idx = torch.topk(g, n, dim=-1, sorted=False).indices  # (N, K/M, n)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.view(rows, k)


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Remove ``round(sparsity * total)`` lowest scores over all tensors together.

    The threshold is the k-th smallest score (``kthvalue`` on the concatenation: linear time);
    entries below it go, then entries equal to it go in tensor order until the count is exact.
    """
    total = sum(s.numel() for s in scores)
    count = round(sparsity * total)
    if count == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    flat = torch.cat([s.reshape(-1).float() for s in scores])  # (total,)
    thr = flat.kthvalue(count).values
    del flat
    below = sum(int((s.float() < thr).sum()) for s in scores)
    ties_left = count - below  # how many entries equal to thr must also go
    masks = []
    for s in scores:
        sf = s.float().reshape(-1)
        keep = sf >= thr  # ties kept unless needed below
        if ties_left > 0:
            eq = (sf == thr).nonzero().squeeze(1)[:ties_left]
            keep[eq] = False
            ties_left -= eq.numel()
        masks.append(keep.view(s.shape))
    return masks
