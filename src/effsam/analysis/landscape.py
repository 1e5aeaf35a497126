"""Loss landscapes: the loss on a line or a plane of random, filter-normalised directions.

Li et al., "Visualizing the loss landscape of neural nets" (NeurIPS 2018). Along random
directions d (and e) through the weights θ,

    f(α) = L(θ + α d)            (1D),      f(α, β) = L(θ + α d + β e)      (2D),

with L the mean per-sample loss of a batch in eval mode. A raw Gaussian direction would
move small-norm filters much further, relative to their size, than large ones, and a
network with BatchNorm is invariant to each filter's scale, so plots of differently
trained networks would not be comparable. Filter normalisation rescales each filter of d
(an output channel of a convolution, a row of a linear layer) to the norm of the same
filter of θ:

    d_{i,j} ← d_{i,j} / ‖d_{i,j}‖ · ‖θ_{i,j}‖     (tensor i, filter j).

As in that paper, the directions of biases and BatchNorm parameters (every tensor with at
most one dimension) are zero: those stay at their trained values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .evaluation import (
    LossFn,
    check_int,
    check_positive,
    eval_mode,
    mean_loss,
    seeded_generator,
    trainable_parameters,
)

__all__ = [
    "Landscape",
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
]


@dataclass(frozen=True)
class Landscape:
    """Losses on a grid of a line (1D) or plane (2D) through the weights.

    Attributes:
        alphas: Coordinates along the first direction, float64 ``[steps]``.
        betas: Coordinates along the second direction (float64 ``[steps]``), None in 1D.
        losses: Mean batch loss at each point, float64: ``[steps]`` in 1D, ``[steps, steps]``
            in 2D with ``losses[i, j]`` at ``(alphas[i], betas[j])``.
        span: The grid covers ``[-span, span]`` on each axis.
        seed: Seed of the directions.
    """

    alphas: Tensor
    betas: Tensor | None
    losses: Tensor
    span: float
    seed: int

    @property
    def dims(self) -> int:
        """1 or 2."""
        return 1 if self.betas is None else 2

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (for JSON)."""
        return {
            "dims": self.dims,
            "span": self.span,
            "seed": self.seed,
            "alphas": self.alphas.tolist(),
            "betas": None if self.betas is None else self.betas.tolist(),
            "losses": self.losses.tolist(),
        }


def filter_normalized_direction(
    params: Sequence[Tensor], generator: torch.Generator
) -> list[Tensor]:
    """A random direction shaped like ``params``, filter-normalised (Li et al., 2018).

    For each tensor, in order: a tensor with at most one dimension (bias, BatchNorm weight)
    gets a zero direction and draws nothing; any other tensor draws a standard Gaussian of
    its shape (on the CPU, in float64, from ``generator``), and each slice along dimension
    0 (one filter) is scaled to the norm of the same slice of the tensor. A filter of norm
    zero gets a zero direction.

    Args:
        params: The weights, e.g. a model's trainable parameters.
        generator: Source of the random draws.

    Returns:
        One tensor per parameter, of its shape, dtype and device.
    """
    direction = []
    for p in params:
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        weight_norms = p.detach().flatten(1).to(torch.float64).norm(dim=1).cpu()
        draw_norms = d.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        scale = (weight_norms / draw_norms).view(-1, *([1] * (p.dim() - 1)))
        direction.append((d * scale).to(device=p.device, dtype=p.dtype))
    return direction


def _grid(steps: int, span: float) -> Tensor:
    # span·(2i − (steps−1))/(steps−1): the numerator is an exact integer, so for odd steps
    # the middle point is exactly 0 (the grid passes through the trained weights themselves)
    # and the points are symmetric about it.
    i = torch.arange(steps, dtype=torch.float64)
    return (2 * i - (steps - 1)) / (steps - 1) * span


def _losses_on_grid(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    directions: list[list[Tensor]],
    points: list[tuple[float, ...]],
) -> list[float]:
    """The mean loss at θ + Σ_k c_k d_k for each point c, the weights restored after."""
    params = trainable_parameters(model)
    saved = [p.detach().clone() for p in params]
    losses = []
    with eval_mode(model), torch.no_grad():
        try:
            for coords in points:
                for j, p in enumerate(params):
                    # Set from the saved copy every time: adding and subtracting steps
                    # would accumulate rounding errors.
                    p.copy_(saved[j])
                    for c, d in zip(coords, directions, strict=True):
                        p.add_(d[j], alpha=c)
                losses.append(float(mean_loss(model, batch, loss_fn)))
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return losses


def _check(steps: int, span: float) -> float:
    check_int("steps", steps, 2)
    return check_positive("span", span)


def loss_landscape_1d(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    steps: int = 21,
    span: float = 1.0,
    seed: int = 0,
) -> Landscape:
    """The loss along one random filter-normalised direction: f(α) = L(θ + α d).

    The direction is ``filter_normalized_direction(trainable parameters,
    torch.Generator().manual_seed(seed))``. α runs over ``steps`` evenly spaced values in
    ``[-span, span]`` (α = ±1 moves every filter by its own norm); with an odd number of
    steps the middle one is α = 0, the trained weights. The model is evaluated in eval
    mode; training flags, buffers and ``.grad`` are left as they were, and the weights are
    copied back bit for bit.

    Args:
        model: The network.
        batch: One batch, passed to ``loss_fn`` as is.
        loss_fn: ``loss_fn(model, batch)`` → per-sample losses (or a tuple starting with them).
        steps: Grid points (≥ 2).
        span: Half-width of the grid (> 0).
        seed: Seed of the direction.

    Returns:
        The :class:`Landscape` (``betas`` None, ``losses`` ``[steps]``).

    Raises:
        ValueError: For ``steps < 2``, ``span ≤ 0`` or a model without trainable parameters.
    """
    span = _check(steps, span)
    generator = seeded_generator(seed)
    d = filter_normalized_direction(trainable_parameters(model), generator)
    alphas = _grid(steps, span)
    losses = _losses_on_grid(model, batch, loss_fn, [d], [(a,) for a in alphas.tolist()])
    return Landscape(alphas, None, torch.tensor(losses, dtype=torch.float64), span, seed)


def loss_landscape_2d(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    steps: int = 11,
    span: float = 1.0,
    seed: int = 0,
) -> Landscape:
    """The loss on the plane of two random filter-normalised directions:
    f(α, β) = L(θ + α d + β e).

    d and e are two successive draws of ``filter_normalized_direction`` from one
    ``torch.Generator().manual_seed(seed)``. They are not orthogonalised: in the millions
    of dimensions of a network two random directions are nearly orthogonal already (Li et
    al., 2018, Section 4). The grid is ``steps × steps`` points of ``[-span, span]²``
    (``steps²`` forward passes); the rest is as in :func:`loss_landscape_1d`.

    Returns:
        The :class:`Landscape` (``losses[i, j]`` at ``(alphas[i], betas[j])``).

    Raises:
        ValueError: For ``steps < 2``, ``span ≤ 0`` or a model without trainable parameters.
    """
    span = _check(steps, span)
    generator = seeded_generator(seed)
    params = trainable_parameters(model)
    d = filter_normalized_direction(params, generator)
    e = filter_normalized_direction(params, generator)
    axis = _grid(steps, span)
    points = [(a, b) for a in axis.tolist() for b in axis.tolist()]
    losses = _losses_on_grid(model, batch, loss_fn, [d, e], points)
    grid = torch.tensor(losses, dtype=torch.float64).view(steps, steps)
    return Landscape(axis, axis.clone(), grid, span, seed)
