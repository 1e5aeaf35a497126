"""DTensor (FSDP2) helpers: the one test for a DTensor, and the full tensor / local
layout conversions the mask policies need."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

__all__ = ["full_grad", "full_tensor", "is_dtensor", "like_param"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a DTensor exists only once torch.distributed.tensor is
    imported: nothing is imported here)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (FSDP2: an all-gather), else the tensor."""
    return t.full_tensor() if is_dtensor(t) else t


def full_grad(p: Tensor) -> Tensor:
    """``p``'s whole gradient (zeros if it has none), also for a DTensor parameter."""
    if p.grad is None:
        return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    return full_tensor(p.grad)


def like_param(mask: Tensor, p: Tensor) -> Tensor:
    """A full-size mask laid out like ``p``: for a DTensor parameter (FSDP2), this rank's
    shard of it (every rank holds the same full mask, so no communication)."""
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask, p.device_mesh, p.placements, src_data_rank=None)
    return mask
