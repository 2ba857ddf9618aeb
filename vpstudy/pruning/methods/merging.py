"""Merging dropped visual tokens into kept ones (VisionZip's contextual tokens, DeSAP's merge)."""

from __future__ import annotations

import torch


def assign_to_nearest(sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each source row, the index of its most cosine-similar target row (ties to the lower).

    Args:
        sources: [S, d] features of the tokens to assign.
        targets: [T, d] features of the tokens they can be assigned to.

    Returns:
        [S] long in 0..T-1.
    """
    a = torch.nn.functional.normalize(sources.float(), dim=-1)
    b = torch.nn.functional.normalize(targets.float(), dim=-1)
    return (a @ b.T).argmax(dim=-1)


def merge_into(
    features: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor, owner: torch.Tensor, *, keep_target: bool
) -> torch.Tensor:
    """New features of the ``targets`` after merging the ``sources`` assigned to them.

    Args:
        features: [N, D] all tokens' features.
        targets: [T] long, indices of the tokens that receive the merge.
        sources: [S] long, indices of the tokens merged into them.
        owner: [S] long in 0..T-1; ``owner[j]`` is the target (index into ``targets``) that
            source j merges into.
        keep_target: ``True`` gives target + mean(assigned sources) (VisionZip; a target with no
            source keeps its feature); ``False`` gives the mean of the target and its sources
            (an average merge, DeSAP).

    Returns:
        [len(targets), D].
    """
    base = features[targets].float()
    dim = features.shape[-1]
    sums = torch.zeros(len(targets), dim, dtype=torch.float32, device=features.device)
    sums.index_add_(0, owner, features[sources].float())
    counts = torch.bincount(owner, minlength=len(targets)).float().unsqueeze(-1)
    if keep_target:
        return base + torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return (base + sums) / (1 + counts)
