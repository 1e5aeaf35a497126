"""Ascent policies: how the perturbation direction is computed from the pass-1 gradient.

Every policy's ``terms`` gives two per-tensor quantities from the parameters θ and
gradients g:

* the norm terms — the vector whose global L2 norm normalises the ascent, and
* the numerators — the (unnormalised) direction,

so that ε = ρ · numerator / (‖norm_terms‖₂ + δ). For SAM both are g. For ASAM
(Kwon et al., ICML 2021) with T = |θ| + η: norm_terms = T ⊙ g and numerators = T² ⊙ g.
``terms`` has a ``foreach`` switch: ``torch._foreach_*`` kernels, or a plain
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

    def terms(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], foreach: bool
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(norm terms, numerators): the vector whose norm normalises ε, and ε's direction."""
        return list(grads), list(grads)


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

    def terms(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], foreach: bool
    ) -> tuple[list[Tensor], list[Tensor]]:
        # T is computed once; T² g = T · (T g) reuses the norm terms.
        t = self._scales(params, foreach)
        if foreach:
            tg = list(torch._foreach_mul(t, list(grads)))
            return tg, list(torch._foreach_mul(t, tg))
        tg = [ti * g for ti, g in zip(t, grads)]
        return tg, [ti * x for ti, x in zip(t, tg)]

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
