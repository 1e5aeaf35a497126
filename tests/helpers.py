"""Tiny float64 models and data shared by the optimizer tests, and an exact nested equality."""

from __future__ import annotations

from typing import Any

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


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """a == b all the way down (dicts, lists, tuples), tensors bit for bit and of one dtype;
    the assertion names the path of the first difference."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)
