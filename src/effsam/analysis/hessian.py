"""Hessian sharpness: the top eigenvalue (power iteration) and the trace (Hutchinson).

Both work with Hessian-vector products only, never the Hessian itself, so they cost a few
backward passes per iteration or sample whatever the model's size. The Hessian is that of

    L(θ) = (1/n) Σ_i ℓ_i(θ)

the mean per-sample loss of one batch, over the model's trainable parameters θ, with the
model in eval mode (BatchNorm normalises with its running statistics, dropout is off), so L
is a deterministic function of θ and no buffer changes. The product H v comes from double
back-propagation (Pearlmutter, "Fast exact multiplication by the Hessian", Neural
Computation 1994):

    g = ∇L(θ)   (kept differentiable),   H v = ∇_θ ⟨g, v⟩.

``.grad`` of the parameters is never touched: every gradient is taken with
``torch.autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .evaluation import (
    LossFn,
    check_int,
    check_positive,
    eval_mode,
    flat_dot,
    mean_loss,
    seeded_generator,
    trainable_parameters,
)

Vector = list[Tensor]

__all__ = ["hessian_top_eigenvalue", "hessian_trace", "hessian_trace_samples"]


def _hessian_operator(
    model: nn.Module, batch: Any, loss_fn: LossFn
) -> tuple[list[nn.Parameter], Callable[[Vector], Vector]]:
    """The trainable parameters and ``v ↦ H v`` at the current weights.

    One forward and one differentiable backward are done here; the graph of the gradient is
    kept, so each product costs one more backward only.
    """
    params = trainable_parameters(model)
    with eval_mode(model), torch.enable_grad():
        loss = mean_loss(model, batch, loss_fn)
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on the trainable parameters (is it detached?)"
            )
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # A gradient without a graph does not depend on the weights (the loss is at most linear
    # in that tensor): its rows of H are zero, and autograd refuses it as an output.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(v: Vector) -> Vector:
        out = [torch.zeros_like(p) for p in params]
        if not live:
            return out
        # H is symmetric, so the vector-Jacobian product of g with v is H v.
        products = torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[v[i] for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        for j, h in enumerate(products):
            if h is not None:
                out[j] = h.detach()
        return out

    return params, hvp


def _random_vector(params: list[nn.Parameter], generator: torch.Generator, kind: str) -> Vector:
    """A Gaussian or Rademacher vector shaped like ``params``, drawn on the CPU in float64 so
    a seed gives the same vector on every device and in every precision."""
    out = []
    for p in params:
        if kind == "gaussian":
            draw = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        else:
            draw = torch.randint(0, 2, p.shape, generator=generator).to(torch.float64) * 2 - 1
        out.append(draw.to(device=p.device, dtype=p.dtype))
    return out


def _power_iteration(
    hvp: Callable[[Vector], Vector], start: Vector, iters: int, tol: float, shift: float
) -> float:
    """The eigenvalue of largest magnitude of ``H - shift·I`` (its Rayleigh quotient)."""
    norm = torch.sqrt(flat_dot(start, start))
    v = [x / norm for x in start]
    estimate: float | None = None
    for _ in range(iters):
        hv = hvp(v)
        if shift:
            hv = [h - shift * x for h, x in zip(hv, v, strict=True)]
        rayleigh = float(flat_dot(v, hv))  # vᵀ(H - shift·I)v with ‖v‖ = 1
        hv_norm = float(torch.sqrt(flat_dot(hv, hv)))
        if hv_norm == 0.0:
            return rayleigh  # v is in the null space; no direction to follow
        v = [h / hv_norm for h in hv]
        converged = estimate is not None and abs(rayleigh - estimate) <= tol * abs(rayleigh)
        estimate = rayleigh
        if converged:
            break
    assert estimate is not None
    return estimate


def hessian_top_eigenvalue(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """The largest eigenvalue λ_max of the Hessian of the mean batch loss.

    Power iteration from a Gaussian start v₀ (seeded)::

        v ← H v / ‖H v‖,   λ ← vᵀ H v   (Rayleigh quotient, ‖v‖ = 1)

    until λ changes by at most ``tol·|λ|`` between iterations or ``iters`` products are
    done. The error of λ shrinks like (λ₂/λ₁)^(2k) after k iterations, λ₂ being the
    eigenvalue second in magnitude. Power iteration finds the eigenvalue of largest
    *magnitude*; when that one is negative (a saddle point), a second power iteration on
    ``H − λ·I``, whose eigenvalues are then all ≥ 0, gives λ_max. This is the sharpness
    measure of Keskar et al., "On large-batch training for deep learning: generalization
    gap and sharp minima" (ICLR 2017) as computed by Yao et al., "PyHessian" (2020).

    The model is evaluated in eval mode; each module's training flag is restored, buffers
    and ``.grad`` are left as they were.

    Args:
        model: The network; the Hessian is taken over its trainable parameters.
        batch: One batch, passed to ``loss_fn`` as is.
        loss_fn: ``loss_fn(model, batch)`` → per-sample losses ``[n]`` (or a tuple whose
            first element is that); their mean is differentiated.
        iters: Maximum number of Hessian-vector products per power iteration (≥ 1).
        tol: Relative change of the estimate that stops the iteration (> 0).
        seed: Seed of the start vector.

    Returns:
        The estimate of λ_max.

    Raises:
        ValueError: For ``iters < 1``, ``tol ≤ 0``, a model without trainable parameters or
            a loss that does not depend on them.
    """
    check_int("iters", iters, 1)
    check_positive("tol", tol)
    generator = seeded_generator(seed)
    params, hvp = _hessian_operator(model, batch, loss_fn)
    start = _random_vector(params, generator, "gaussian")
    dominant = _power_iteration(hvp, start, iters, tol, shift=0.0)
    if dominant >= 0.0:
        return dominant
    return dominant + _power_iteration(hvp, start, iters, tol, shift=dominant)


def hessian_trace_samples(
    model: nn.Module, batch: Any, loss_fn: LossFn, *, samples: int = 10, seed: int = 0
) -> Tensor:
    """Hutchinson's per-sample estimates ``zᵀ H z`` of tr(H), z Rademacher (float64 ``[samples]``).

    Their mean is :func:`hessian_trace`; their standard deviation over ``√samples`` is its
    standard error. For Rademacher z the variance of one estimate is
    ``2 Σ_{i≠j} H_ij²``: only off-diagonal entries add noise.

    Args:
        model: The network; the Hessian is taken over its trainable parameters.
        batch: One batch, passed to ``loss_fn`` as is.
        loss_fn: As for :func:`hessian_top_eigenvalue`.
        samples: Number of random vectors (≥ 1).
        seed: Seed of the vectors.

    Raises:
        ValueError: For ``samples < 1`` and as :func:`hessian_top_eigenvalue`.
    """
    check_int("samples", samples, 1)
    generator = seeded_generator(seed)
    params, hvp = _hessian_operator(model, batch, loss_fn)
    estimates = []
    for _ in range(samples):
        z = _random_vector(params, generator, "rademacher")
        estimates.append(flat_dot(z, hvp(z)).detach().to("cpu", torch.float64))
    return torch.stack(estimates)


def hessian_trace(
    model: nn.Module, batch: Any, loss_fn: LossFn, *, samples: int = 10, seed: int = 0
) -> float:
    """tr(H), the sum of the Hessian's eigenvalues, by Hutchinson's estimator.

        tr(H) ≈ (1/m) Σ_k z_kᵀ H z_k,   z_k ∈ {−1, +1}^d uniform (Rademacher)

    unbiased because E[z zᵀ] = I (Hutchinson, "A stochastic estimator of the trace of the
    influence matrix for Laplacian smoothing splines", 1989); the standard error falls like
    1/√m. The trace measures sharpness in every direction at once, where λ_max sees only
    the sharpest one. Eval mode, buffers and ``.grad`` as for
    :func:`hessian_top_eigenvalue`.

    Args:
        model: The network; the Hessian is taken over its trainable parameters.
        batch: One batch, passed to ``loss_fn`` as is.
        loss_fn: As for :func:`hessian_top_eigenvalue`.
        samples: Number m of random vectors (≥ 1).
        seed: Seed of the vectors.

    Returns:
        The estimate of tr(H).

    Raises:
        ValueError: For ``samples < 1`` and as :func:`hessian_top_eigenvalue`.
    """
    return float(hessian_trace_samples(model, batch, loss_fn, samples=samples, seed=seed).mean())
