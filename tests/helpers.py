"""Tiny float64 models and data shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def tiny_bn_net(seed: int = 0, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7),
        nn.BatchNorm1d(7, momentum=momentum),
        nn.Tanh(),
        nn.Linear(7, 3),
    ).double()


def tiny_data(seed: int = 1, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def per_sample_ce(model: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
