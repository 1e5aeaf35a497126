"""Mask policies: which weights the ascent perturbs.

A policy answers three questions for the :class:`~effsam.SharpnessAware` skeleton (the
full interface and the order of the calls are in :class:`effsam.optim.policy.MaskPolicy`):

1. ``draw(params)`` — at the start of a step, which parameter TENSORS need a gradient in
   pass 1 (``None``: all). Tensors not kept get ``requires_grad`` off for pass 1 only, so
   autograd skips their weight-gradient kernels; that is where SWP saves time.
2. ``element_masks(params)`` — an optional per-ELEMENT bool mask for the perturbed tensors
   (SSAM), multiplied into ε.
3. ``scale`` and ``normalise_masked`` — how ε is normalised.

Policies that need data to refresh (SSAM's Fisher mask) implement ``refresh``; the
optimizer's ``step()`` never sees a model or data, the training loop calls
``SharpnessAware.refresh_mask`` on schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._random import SeededPolicy
from ._ranking import round_half_up
from ._validate import check_fraction
from .policy import Policy

__all__ = ["PerturbationMask", "RandomTensorSubset", "kept_fraction", "round_half_up"]


class PerturbationMask(Policy):
    """Perturb every weight (SAM). The base class of every mask policy."""

    name = "dense"
    granularity = ""
    #: With element masks: normalise ε by ‖m ⊙ g‖ (True) or by ‖g‖ (False).
    normalise_masked = True
    #: Whether ``refresh`` must run before the first step.
    needs_data = False
    #: Whether the per-element masks (none here) are laid out like the parameters, so that
    #: they shard with DTensor parameters (FSDP2). A policy whose ``element_masks`` are
    #: full-size tensors sets it False: such parameters are then refused.
    masks_follow_param_layout = True

    def draw(self, params: Sequence[Tensor]) -> list[bool] | None:
        """Start of a step: per-tensor pass-1 keep flags (``None`` keeps all)."""
        return None

    @property
    def ready(self) -> bool:
        """Whether the policy can draw (a data-dependent mask must be computed first)."""
        return True

    def rollback_draw(self) -> None:
        """Undo the last ``draw`` (a failed step must leave the policy state as it was)."""

    def element_counts(self) -> list[int] | None:
        """Per parameter, the elements the current mask perturbs (``None``: all of each)."""
        return None

    def prepare(self, params: Sequence[Tensor]) -> None:
        """In ``first_step``, with the pass-1 gradients present, before ``element_masks``
        (SSAM-D computes a scheduled drop/grow here)."""

    def element_masks(self, params: Sequence[Tensor]) -> list[Tensor | None] | None:
        """Per-element bool masks on each parameter's device (``None``: no mask for that
        tensor, or for all). A getter: it changes no state."""
        return None

    @property
    def scale(self) -> float:
        """Multiplier on ε after normalisation."""
        return 1.0

    def refresh_due(self, step: int) -> bool:
        """Whether ``refresh`` should run before step number ``step`` (0-based)."""
        return False

    def refresh(
        self,
        model: torch.nn.Module,
        params: Sequence[Tensor],
        batch: Any,
        loss_fn: Callable[..., Any],
        step: int,
    ) -> bool:
        """Recompute the mask from data; returns whether the mask changed."""
        return False


class RandomTensorSubset(PerturbationMask, SeededPolicy):
    """ESAM's Stochastic Weight Perturbation (Du et al., ICLR 2022).

    Each step every parameter tensor n is kept with probability β, m_n ~ Bernoulli(β),
    drawn from a generator owned by this policy (seedable; its state is in
    ``state_dict``, and equal seeds give equal masks on every data-parallel worker).
    Only kept tensors get pass-1 gradients, and

        ε_n = m_n · ρ g_n / (β (‖m ⊙ g‖₂ + δ))        (``scaling="authors"``, default)

    as in the authors' code: normalised by the norm of the KEPT gradients, so the
    effective radius is ‖ε‖ = ρ/β. ``scaling="unit"`` drops the 1/β (‖ε‖ = ρ).
    A draw that keeps no trainable tensor keeps one chosen uniformly at random.

    Args:
        beta: keep probability in (0, 1]; β = 1 is SAM.
        seed: seed of the mask generator (its stream ``"swp"`` is derived from it, see
            :mod:`effsam.optim._random`).
        scaling: ``"authors"`` (‖ε‖ = ρ/β) or ``"unit"`` (‖ε‖ = ρ).
    """

    name = "swp"
    stream = "swp"

    def __init__(self, beta: float, seed: int = 0, scaling: str = "authors") -> None:
        self.beta = check_fraction(beta, "SWP beta")
        if scaling not in ("authors", "unit"):
            raise ValueError(f"Invalid SWP scaling: {scaling!r} (choose 'authors' or 'unit')")
        self.scaling = scaling
        self._seed_stream(seed, "SWP")
        self._before_draw: Tensor | None = None

    def draw(self, params: Sequence[Tensor]) -> list[bool] | None:
        self._before_draw = self.generator.get_state()
        if self.beta >= 1.0:
            return None
        # One draw per tensor in the optimizer's order, frozen tensors included, so the
        # random stream does not depend on which tensors happen to have gradients.
        u = torch.rand(len(params), generator=self.generator, dtype=torch.float64)
        keep = (u < self.beta).tolist()
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        if trainable and not any(keep[i] for i in trainable):
            # A draw that keeps nothing would leave pass 1 with no graph to differentiate:
            # keep one trainable tensor, uniformly at random (matters only for tiny models;
            # ResNet-18 at β = 0.6 has 62 tensors, P(empty) = 0.4⁶²).
            pick = torch.randint(len(trainable), (1,), generator=self.generator)
            keep[trainable[int(pick)]] = True
        return keep

    def rollback_draw(self) -> None:
        if self._before_draw is not None:
            self.generator.set_state(self._before_draw)
            self._before_draw = None

    @property
    def scale(self) -> float:
        return 1.0 / self.beta if self.scaling == "authors" else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_generator(state["generator"], "SWP")

    def extra_repr(self) -> str:
        return f"beta={self.beta}, scaling={self.scaling!r}, seed={self.seed}"


def kept_fraction(
    params: Sequence[Tensor],
    keep: Sequence[bool] | None,
    counts: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Fraction of trainable tensors and of their elements the perturbation covers: kept
    by the pass-1 flags ``keep`` and, with element ``counts``, by the element mask."""
    n = len(params)
    keep = keep if keep is not None else [True] * n
    counts = counts if counts is not None else [p.numel() for p in params]
    rows = [(p, c if k else 0) for p, k, c in zip(params, keep, counts) if p.requires_grad]
    if not rows:
        return 1.0, 1.0
    n_kept = sum(1 for _, c in rows if c > 0)
    total = sum(p.numel() for p, _ in rows)
    elems = sum(c for _, c in rows)
    return n_kept / len(rows), (elems / total if total else 1.0)
