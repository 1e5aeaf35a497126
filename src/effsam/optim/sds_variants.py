"""Variants of ESAM's data selection, for diagnosing and repairing its accuracy loss.

* :class:`RandomSubset` — the control: k = round(γ b) samples drawn uniformly at random
  (the same data reduction as SDS without its choice of samples; no extra forward).
* ``ESAM(..., sds_update="mix")`` (registered as ``esam-mix``, see
  :func:`mix_gradients`) — every sample stays in the update at no extra forward or
  backward: with w = k / b,

      g_update = w · ∇L_{B+}(θ + ε) + (1 − w) · ∇L_B(θ)

  i.e. the selected samples' perturbed gradient (ESAM's) blended with pass 1's clean
  gradient of the whole batch, which is otherwise thrown away. It rests on ESAM's own
  argument — the samples left out are those whose loss barely moves under ε, so their
  gradient at θ + ε is close to the one at θ. Costs one copy of the gradients in memory.
  Tensors that SWP left out of pass 1 have no clean gradient: they take the perturbed
  gradient alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._random import SeededPolicy
from .selection import _TopK
from .update import PassThrough


class RandomSubset(_TopK, SeededPolicy):
    """The SDS control: k = max(1, round(γ b)) samples uniformly at random per batch."""

    name = "random"
    stream = "random-subset"

    def __init__(self, gamma: float, seed: int = 0) -> None:
        super().__init__(gamma)
        self._seed_stream(seed, "random-selection")

    def select(self, loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        if self.gamma >= 1.0 or loss_before is None:
            return None
        n = loss_before.numel()
        k = self.num_selected(n)
        self.last_fraction = k / n
        self.last_indices = None
        if k >= n:
            return None
        idx = torch.randperm(n, generator=self.generator)[:k].sort().values
        self.last_indices = idx.to(loss_before.device)
        return self.last_indices

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self._load_generator(state["generator"], "random-selection")

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, seed={self.seed}"


class MixWithPass1(PassThrough):
    """ESAM-mix's update: g ← w · g_pass2 + (1 − w) · g_pass1, w the share of the batch
    pass 2 selected over the step (k / b), so every sample stays in the update. Pass 1's
    gradients are kept for the step only (where a selection can happen)."""

    name = "mix-with-pass-1"

    def __init__(self, selects: bool) -> None:
        #: whether the optimizer's selection ranks samples (else there is nothing to mix)
        self.selects = bool(selects)

    @torch.no_grad()
    def on_ascent(self, state, params, ascended, grads, step) -> None:  # type: ignore[override]
        if self.selects:
            kept = {id(p): g.detach().clone() for p, g in zip(ascended, grads)}
            step.pending["pass1"] = [kept.get(id(p)) for p in params]

    def before_descent(self, state, params, step, selected_fraction) -> None:  # type: ignore[override]
        pass1 = step.pending.pop("pass1", None)
        if pass1 is not None and selected_fraction is not None:
            mix_gradients(list(params), pass1, selected_fraction)


@torch.no_grad()
def mix_gradients(params: list[Tensor], clean: list[Tensor | None], weight: float) -> None:
    """p.grad ← w · p.grad + (1 − w) · clean, where a clean gradient exists."""
    for p, c in zip(params, clean):
        if p.grad is None or c is None:
            continue
        p.grad.mul_(weight).add_(c.to(p.grad.dtype), alpha=1.0 - weight)
