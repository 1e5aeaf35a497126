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


def _order_bits(scores: Tensor) -> Tensor:
    """Non-negative finite floats viewed as integers: the same order, no copy."""
    if scores.dtype == torch.float32:
        return scores.view(torch.int32)
    if scores.dtype == torch.float64:
        return scores.view(torch.int64)
    raise TypeError(f"select_mask ranks float32 or float64 scores, got {scores.dtype}")


def _count(where: Tensor | None, cond: Tensor) -> int:
    return int(torch.count_nonzero(cond if where is None else where & cond))


def select_mask(scores: Tensor, k: int, where: Tensor | None = None, *, largest: bool) -> Tensor:
    """A bool mask of the ``k`` largest (or smallest) entries of the non-negative scores
    among ``where`` (all if None); ties go to the lower index, as in
    :func:`largest_indices`.

    The k-th value is found by bisection on the scores' bit patterns (non-negative floats
    order like their bits), so the memory is a few bool vectors of the scores' length —
    no sorted copy and no int64 index vector of that length (``kthvalue`` makes both).
    """
    n = scores.numel() if where is None else int(torch.count_nonzero(where))
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return out
    if k > n:
        raise ValueError(f"select_mask: k = {k} exceeds the {n} candidates")
    bits = _order_bits(scores)
    lo, hi = 0, int(bits.max())
    if largest:  # the largest t with count(bits >= t) >= k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _count(where, bits >= mid) >= k:
                lo = mid
            else:
                hi = mid - 1
        strict = bits > lo
    else:  # the smallest t with count(bits <= t) >= k
        while lo < hi:
            mid = (lo + hi) // 2
            if _count(where, bits <= mid) >= k:
                hi = mid
            else:
                lo = mid + 1
        strict = bits < lo
    if where is not None:
        strict &= where
    ties = bits == lo
    if where is not None:
        ties &= where
    out |= strict
    need = k - int(torch.count_nonzero(strict))
    out[ties.nonzero().flatten()[:need]] = True
    return out
