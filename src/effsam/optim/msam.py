"""MSAM, Momentum-SAM (Becker et al., 2024): the perturbation along the negative momentum,
so a step is ONE forward/backward, at the perturbed point.

With v the base optimizer's momentum buffer (SGD's ``momentum_buffer``, v ← μ v + g; Adam's
and AdamW's first moment ``exp_avg``), before pass 1::

    θ̃ = θ − ρ · v / (‖v‖₂ + δ)            (one global norm)
    g  = ∇ L(θ̃)                            (the only forward/backward)
    θ ← θ (the exact copy);  base step with g

The first step (no momentum yet) is a plain step. ρ is on a different scale from SAM's:
the authors use ρ = 3 for CIFAR with SGD and 0.3 for ImageNet.

Deviations from the authors' code, which keeps the weights at θ̃ between steps: θ is
restored after the pass (one more copy in memory, the same update), so weight decay is
taken at θ rather than at θ̃, and BatchNorm statistics are those of the pass at θ̃ (the
authors recompute them at θ after training; effsam does not).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._contract import resolve_base
from .ascent import global_norm
from .sharpness_aware import SharpnessAware

#: the state key holding each base optimizer's momentum, in order of preference
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MSAM(SharpnessAware):
    """Momentum-SAM: ε = −ρ v/‖v‖ from the base optimizer's momentum, one pass per step.

    Args:
        base: the optimizer instance to wrap; it must keep a momentum (SGD with
            ``momentum > 0``, Adam, AdamW, or any optimizer whose state has
            ``momentum_buffer`` or ``exp_avg``).
        rho: ρ (the authors: 3 for CIFAR with SGD, 0.3 for ImageNet).
    """

    single_pass = True

    def __init__(self, params: Any = None, rho: float = 3.0, *, base: Any = None, **kwargs) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        for key in ("mask", "selection", "ascent"):
            if kwargs.get(key) is not None:
                raise ValueError(f"MSAM takes no {key} policy: its ascent is the momentum")
        if isinstance(base, torch.optim.SGD):
            flat = [g for g in base.param_groups if not g.get("momentum", 0)]
            if flat:
                raise ValueError(
                    "MSAM perturbs along the base optimizer's momentum, but the SGD base has "
                    "momentum=0: use momentum > 0 (e.g. 0.9)"
                )
        super().__init__(base, rho, **kwargs)

    def _momentum(self, p: Tensor) -> Tensor | None:
        state = self.base.state.get(p, {})
        for key in MOMENTUM_KEYS:
            v = state.get(key)
            if isinstance(v, Tensor):
                return v
        return None

    @torch.no_grad()
    def _pre_pass1_perturb(self) -> None:
        groups = []
        for group in self.param_groups:
            pairs = [(p, self._momentum(p)) for p in group["params"] if p.requires_grad]
            pairs = [(p, v) for p, v in pairs if v is not None]
            if pairs:
                groups.append((self._rho(group), pairs))
        self._pre_pass1_done = True
        if not groups:
            if self.steps > 0:
                raise RuntimeError(
                    f"MSAM found no momentum in the {type(self.base).__name__} base "
                    f"optimizer's state (looked for {', '.join(MOMENTUM_KEYS)})"
                )
            return  # the first step: no momentum yet, a plain step
        vs = [v for _, pairs in groups for _, v in pairs]
        denom = float(global_norm(vs, self.foreach)) + self.eps_denominator
        self._perturbed = []
        for rho, pairs in groups:
            for p, v in pairs:
                backup = self._backup(p)
                backup.copy_(p)
                p.add_(v, alpha=-rho / denom)
                self._perturbed.append((p, backup))
