"""Ranking helpers shared by the SSAM masks and ESAM's sample selection: one top-k rule
(ties to the lower index, deterministic on every device) and one rounding rule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def round_half_up(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even)."""
    return int(math.floor(x + 0.5))


def ranking_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are ranked in: at least float32 (half precision is upcast, float64
    stays float64, so scores closer than float32's resolution stay distinct)."""
    return torch.promote_types(dtype, torch.float32)


def common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The ranking dtype of several tensors together."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def smallest_indices(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` smallest entries of a 1-D tensor; ties go to the lower
    index (the mirror of :func:`largest_indices`, without a negated copy of the scores)."""
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    threshold = torch.kthvalue(scores, k).values  # the k-th smallest value
    below = (scores < threshold).nonzero().flatten()
    ties = (scores == threshold).nonzero().flatten()[: k - below.numel()]
    return torch.cat([below, ties]).sort().values


def largest_indices(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` largest entries of a 1-D tensor; ties go to the lower
    index. O(n) (one selection, no full sort), deterministic on every device."""
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    threshold = torch.kthvalue(scores, n - k + 1).values  # the k-th largest value
    above = (scores > threshold).nonzero().flatten()
    ties = (scores == threshold).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, ties]).sort().values
