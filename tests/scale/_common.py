"""Tiny float64 models, batches and the SAM/ESAM maths written out by hand.

The expectations in the scaling tests are computed here from the formulas in
ALGORITHMS.md with plain autograd on a functional copy of the weights, never by calling
the code under test, so a test fails when the library and the formulas disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

LR, MOMENTUM, RHO = 0.1, 0.9, 0.2
DELTA = 1e-12  # the library's default ε denominator offset

Weights = dict[str, Tensor]


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Six parameter tensors, no BatchNorm (so batches can be split or merged exactly)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(dtype)


def bn_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def data(seed: int, n: int, first_id: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """A dict batch; ``idx`` names each sample so a test can see which ones pass 2 used."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 4, generator=g, dtype=dtype),
        "y": torch.randint(0, 3, (n,), generator=g),
        "idx": torch.arange(first_id, first_id + n),
    }


def ce(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample cross-entropy (reduction 'none'), as sharpness_aware_step expects."""
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def cat(batches: Sequence[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def sub(batch: dict, index: Tensor) -> dict:
    return {k: v[index] for k, v in batch.items()}


def weights_of(model: nn.Module) -> Weights:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------- by-hand maths
def per_sample_loss(model: nn.Module, w: Weights, batch: dict) -> Tensor:
    with torch.no_grad():
        out = functional_call(model, w, (batch["x"],))
        return F.cross_entropy(out, batch["y"], reduction="none")


def grad(model: nn.Module, w: Weights, batch: dict) -> Weights:
    """∇ of the mean loss over ``batch`` at weights ``w``."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in w.items()}
    out = functional_call(model, leaves, (batch["x"],))
    loss = F.cross_entropy(out, batch["y"])
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def norm(ts: Weights) -> Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts.values()))


def ascent(
    g: Weights,
    rho: float,
    *,
    w: Weights | None = None,
    keep: Sequence[bool] | None = None,
    beta: float = 1.0,
    delta: float = DELTA,
) -> Weights:
    """ε of SAM (``w`` None), ASAM (``w`` given: T = |w|) or SWP (``keep``, ``beta``)."""
    names = list(g)
    kept = [n for i, n in enumerate(names) if keep is None or keep[i]]
    if w is None:
        terms = {n: g[n] for n in kept}
        numer = terms
    else:
        terms = {n: w[n].abs() * g[n] for n in kept}
        numer = {n: w[n].abs() * terms[n] for n in kept}
    denom = norm(terms) + delta
    return {
        n: (rho / beta) * numer[n] / denom if n in kept else torch.zeros_like(g[n]) for n in names
    }


def add(a: Weights, b: Weights, scale: float = 1.0) -> Weights:
    return {n: a[n] + scale * b[n] for n in a}


def mean(gs: Sequence[Weights], weights: Sequence[float] | None = None) -> Weights:
    weights = weights if weights is not None else [1.0 / len(gs)] * len(gs)
    return {n: sum(c * g[n] for c, g in zip(weights, gs)) for n in gs[0]}


def clip(g: Weights, max_norm: float) -> Weights:
    """torch.nn.utils.clip_grad_norm_'s rule: scale by min(1, c / (‖g‖ + 1e-6))."""
    coef = torch.clamp(max_norm / (norm(g) + 1e-6), max=1.0)
    return {n: t * coef for n, t in g.items()}


class SGDMomentum:
    """torch.optim.SGD(momentum=μ, dampening=0, no weight decay): b ← μb + g, w ← w − lr·b,
    with b = g on the first step."""

    def __init__(self, lr: float = LR, momentum: float = MOMENTUM) -> None:
        self.lr, self.momentum = lr, momentum
        self.buf: Weights | None = None

    def step(self, w: Weights, g: Weights) -> Weights:
        if self.buf is None:
            self.buf = {n: t.clone() for n, t in g.items()}
        else:
            self.buf = {n: self.momentum * self.buf[n] + g[n] for n in g}
        return {n: w[n] - self.lr * self.buf[n] for n in w}


def assert_close(a: Weights, b: Weights, atol: float = 1e-12, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


def max_diff(a: Weights, b: Weights) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)
