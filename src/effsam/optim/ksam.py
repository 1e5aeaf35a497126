"""K-SAM (Ni et al., 2022): both SAM passes on the k samples of highest loss.

A no-grad forward of the whole batch at θ gives the per-sample losses ℓ_i(θ); the
k = max(1, round(γ b)) samples with the largest ℓ_i form B_k, and pass 1 (the ascent
gradient) and pass 2 (the update gradient) both run on B_k only::

    g   = ∇ L_{B_k}(θ)
    ε   = ρ g / (‖g‖₂ + δ)
    θ  ← θ − η · ∇ L_{B_k}(θ + ε)         (through the base optimizer)

Cost: one no-grad forward of b samples plus two forward/backward passes of k samples.
The ranking forward leaves BatchNorm statistics as they were; pass 1 on B_k sets them.
"""

from __future__ import annotations

from typing import Any

from .ascent import AdaptiveAscent, L2Ascent
from .selection import TopLoss
from .sharpness_aware import SharpnessAware, refuse_nonfinite, resolve_base


class TopLossBeforePass1(TopLoss):
    """Selection for K-SAM: the top-k samples by ℓ_i(θ), chosen before pass 1 (ties to the
    lower index)."""

    name = "ksam"
    before_pass1 = True


class KSAM(SharpnessAware):
    """K-SAM: SAM with both passes on the k = round(γ b) samples of highest loss.

    Needs :func:`effsam.sharpness_aware_step` with a per-sample ``loss_fn`` (the ranking
    forward needs the model); with the two-phase API, select the samples yourself with
    ``opt.selection.select(losses)`` and run an ordinary SAM step on them.

    Args:
        base: the optimizer instance to wrap.
        rho: ρ, as SAM's.
        gamma: the share of the batch kept, in (0, 1]; γ = 1 is SAM.
        adaptive: ASAM's ascent.
    """

    def __init__(
        self,
        params: Any = None,
        rho: float = 0.05,
        *,
        base: Any = None,
        gamma: float = 0.5,
        adaptive: bool = False,
        eta: float = 0.0,
        **kwargs,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        refuse_nonfinite("K-SAM", eta=eta)
        ascent = AdaptiveAscent(eta) if adaptive else L2Ascent()
        selection = TopLossBeforePass1(gamma)
        super().__init__(base, rho, ascent=ascent, selection=selection, **kwargs)
        self.gamma = selection.gamma
