"""Ascent policies: how the perturbation direction is computed from the pass-1 gradient.

Every policy gives two per-tensor quantities from the parameters θ and gradients g:

* ``norm_terms`` — the vector whose global L2 norm normalises the ascent, and
* ``numerators`` — the (unnormalised) direction,

so that ε = ρ · numerator / (‖norm_terms‖₂ + δ). For SAM both are g. For ASAM
(Kwon et al., ICML 2021) with T = |θ| + η: norm_terms = T ⊙ g and numerators = T² ⊙ g.
Both list methods have a ``foreach`` switch: ``torch._foreach_*`` kernels, or a plain
loop kept as the readable reference (a test checks that they agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .policy import Policy


class L2Ascent(Policy):
    """SAM's ascent (Foret et al., ICLR 2021): ε = ρ g / (‖g‖₂ + δ)."""

    name = "l2"

    def norm_terms(self, params: Sequence[Tensor], grads: Sequence[Tensor], foreach: bool):
        return list(grads)

    def numerators(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        norm_terms: Sequence[Tensor],
        foreach: bool,
    ) -> list[Tensor]:
        return list(grads)


class AdaptiveAscent(L2Ascent):
    """ASAM's ascent: with T = |θ| + η, ε = ρ T² g / (‖T g‖₂ + δ).

    Args:
        eta: offset added to |θ| (Kwon et al. use it so that zero weights can still be
            perturbed); the default 0 is the formula in the ASAM paper's main text.
    """

    name = "adaptive"

    def __init__(self, eta: float = 0.0) -> None:
        if not (eta >= 0.0) or eta != eta or eta == float("inf"):
            raise ValueError(f"Invalid ASAM eta: {eta!r} (must be a finite number >= 0)")
        self.eta = float(eta)

    def _scales(self, params: Sequence[Tensor], foreach: bool) -> list[Tensor]:
        if foreach:
            t = torch._foreach_abs(list(params))
            if self.eta:
                torch._foreach_add_(t, self.eta)
            return list(t)
        return [p.abs() + self.eta if self.eta else p.abs() for p in params]

    def norm_terms(self, params: Sequence[Tensor], grads: Sequence[Tensor], foreach: bool):
        t = self._scales(params, foreach)
        if foreach:
            return list(torch._foreach_mul(t, list(grads)))
        return [ti * g for ti, g in zip(t, grads)]

    def numerators(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        norm_terms: Sequence[Tensor],
        foreach: bool,
    ) -> list[Tensor]:
        # T² g = T · (T g): reuse the norm terms instead of a second product with g.
        t = self._scales(params, foreach)
        if foreach:
            return list(torch._foreach_mul(t, list(norm_terms)))
        return [ti * tg for ti, tg in zip(t, norm_terms)]

    def extra_repr(self) -> str:
        return f"eta={self.eta}"


def global_norm(tensors: Sequence[Tensor], foreach: bool) -> Tensor:
    """One L2 norm over all tensors jointly (never per layer), as a 0-d tensor."""
    if not tensors:
        raise ValueError("global_norm of an empty list")
    device = tensors[0].device
    if foreach:
        norms = torch._foreach_norm(list(tensors))
    else:
        norms = [torch.linalg.vector_norm(t) for t in tensors]
    # Low-precision parameters: accumulate the per-tensor norms in float32.
    norms = [n.float() if n.dtype in (torch.float16, torch.bfloat16) else n for n in norms]
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
