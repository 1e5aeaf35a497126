"""Reduced-batch ascent: pass 1 (the ascent) on a random slice of the batch.

The ascent only has to find a direction; SAM's own m-sharpness results (Foret et al.,
2021; Andriushchenko & Flammarion, 2022) find that a smaller ascent batch generalises at
least as well, and Wei, Zhang & Tan (Neural Networks 185, 2025) run the ascent on a
micro-batch and inject noise into its gradient when the micro-batch is small. The
descent (pass 2) stays on the whole batch, at θ + ε.

With a batch of b samples and the fraction f, pass 1 runs on k = max(1, ⌊f·b + ½⌋)
samples drawn uniformly without replacement (a generator owned by the policy, seeded,
saved in ``state_dict``; the same seed on every data-parallel worker, each slicing its own
local batch). With the noise σ > 0 the pass-1 gradient becomes, before the ascent,

    g ← g + σ · ‖g‖₂ · z / ‖z‖₂,     z ~ N(0, I) over the perturbed tensors

(one global norm each; a scale-free form: the noise is a fixed share σ of the gradient's
norm, in a uniformly random direction). The paper's exact noise law is not restated in
its abstract; this form is effsam's choice, documented in docs/algorithms.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._random import SeededPolicy
from ._ranking import round_half_up
from ._validate import check_fraction, check_non_negative
from .ascent import global_norm
from .policy import Policy


class AscentSlice(Policy, SeededPolicy):
    """Which samples pass 1 runs on (all, or a random fraction f), and the ascent noise σ.

    Args:
        fraction: f in (0, 1]; 1 is the whole batch (SAM).
        noise: σ ≥ 0, the ascent noise's norm relative to ‖g‖ (0: none).
        seed: seed of the slice/noise generator.
    """

    name = "ascent-slice"
    stream = "ascent-slice"

    def __init__(self, fraction: float = 1.0, noise: float = 0.0, seed: int = 0) -> None:
        self.fraction = check_fraction(fraction, "ascent_fraction", typed=True)
        self.noise = check_non_negative(noise, "ascent_noise")
        self._seed_stream(seed, "ascent_seed")

    @property
    def slices(self) -> bool:
        return self.fraction < 1.0

    def size(self, b: int) -> int:
        """Samples pass 1 runs on, out of ``b``."""
        return min(b, max(1, round_half_up(self.fraction * b)))

    def draw(self, b: int) -> Tensor:
        """Sorted indices of the slice of a batch of ``b`` samples (CPU, int64)."""
        perm = torch.randperm(b, generator=self.generator)
        return perm[: self.size(b)].sort().values

    @torch.no_grad()
    def add_noise_(self, grads: Sequence[Tensor], foreach: bool = True) -> None:
        """g ← g + σ‖g‖ z/‖z‖ in place (z drawn on the CPU in float32, or float64 for
        float64 gradients, then moved to each gradient's device)."""
        if self.noise == 0.0 or not grads:
            return
        zs = []
        for g in grads:
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            z = torch.randn(g.shape, generator=self.generator, dtype=dtype)
            zs.append(z.to(device=g.device))
        g_norm = float(global_norm(list(grads), foreach))
        z_norm = float(global_norm(zs, foreach))
        if z_norm == 0.0 or not math.isfinite(g_norm):
            return  # a non-finite g is refused by the ascent's own check
        coef = self.noise * g_norm / z_norm
        for g, z in zip(grads, zs):
            g.add_(z.to(g.dtype), alpha=coef)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "fraction": self.fraction,
            "noise": self.noise,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self._load_generator(state["generator"], "ascent slice")

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}, noise={self.noise}, seed={self.seed}"
