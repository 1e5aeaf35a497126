"""MSAM, Momentum-SAM (Becker et al., 2024): the perturbation along the negative momentum,
so a step is ONE forward/backward, at the perturbed point.

With v the base optimizer's momentum buffer (SGD's ``momentum_buffer``, v ← μ v + g; Adam's
and AdamW's first moment ``exp_avg``), before pass 1::

    θ̃ = θ − r · v / (‖v‖₂ + δ)            (one global norm)
    g  = ∇ L(θ̃)                            (the only forward/backward)
    θ ← θ (the exact copy);  base step with g

with the radius r = ρ (``rho_mode="absolute"``, the paper's) or r = ρ · ‖θ‖₂
(``rho_mode="relative"``: ‖θ‖ one global norm over the wrapped trainable parameters, taken
at the current θ on every step). The first step (no momentum yet) is a plain step.

ρ is absolute in the paper and on a different scale from SAM's: the authors' README runs
use ρ = 3 for CIFAR-100 (WRN-16-4 and ResNet-50), ImageNet (ResNet-50) and, with AdamW, the
ImageNet ViT (0.3 is only the default of their ImageNet ResNet-50 config file, which the
README's ``--rho 3`` overrides). An absolute radius does not transfer across models: ρ = 3 is
4.1 % of the authors' WRN-16-4's ‖θ‖ at initialisation (73.2) but 18 % of a CNN with
‖θ‖ ≈ 17. The relative radius keeps the authors' share: ``msam-rel`` uses
ρ = 0.041 ≈ 3 / 73.24.

BatchNorm: the authors recompute the BN running statistics at θ after training with one
no-grad epoch in train mode. ``bn_recompute=True`` (the default) asks a training loop to do
so before each evaluation (attribute :attr:`MSAM.recompute_bn_before_eval`, honoured by
effsam's training loop through :func:`effsam.bn.recompute_bn_stats`).

Deviations from the authors' code, which keeps the weights at θ̃ between steps: θ is
restored after the pass (one more copy in memory, the same update), so weight decay is
taken at θ rather than at θ̃ (their gradient carries an extra −wd·r·v/‖v‖, which grows with
ρ·wd), and the BN statistics left by training are those of the passes at θ̃ (hence the
recompute). Their MSAM is heavy-ball SGD only (its ``nesterov`` argument is never read);
effsam accepts a Nesterov base, a deviation from the authors. Several param groups share
one global norm (the authors' code refuses more than one group).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._validate import check_bool, check_choice, check_int
from .ascent import global_norm
from .sharpness_aware import SharpnessAware, resolve_base

#: the state key holding each base optimizer's momentum, in order of preference
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")

#: how ρ is read: an absolute radius (the paper's) or a share of ‖θ‖
RHO_MODES = ("absolute", "relative")

#: the relative radius matching the authors' ρ = 3 on their CIFAR-100 WRN-16-4
#: (‖θ‖ = 73.24 at initialisation, 2,772,020 parameters): 3 / 73.24 = 0.041
AUTHORS_RELATIVE_RHO = 0.041


class MSAM(SharpnessAware):
    """Momentum-SAM: ε = −r v/‖v‖ from the base optimizer's momentum, one pass per step.

    Args:
        base: the optimizer instance to wrap; it must keep a momentum (SGD with
            ``momentum > 0``, Adam, AdamW, or any optimizer whose state has
            ``momentum_buffer`` or ``exp_avg``).
        rho: ρ: the radius r itself (``rho_mode="absolute"``; the authors: 3 for CIFAR,
            ImageNet and ViT), or its share of ‖θ‖ (``"relative"``; 0.041 is the authors'
            share on their WRN-16-4).
        rho_mode: ``"absolute"`` (r = ρ, the paper's) or ``"relative"`` (r = ρ‖θ‖₂, one
            global norm over the wrapped trainable parameters at the current θ).
        bn_recompute: ask the training loop to recompute BatchNorm running statistics at θ
            before each evaluation, as the authors do after training (exposed as
            :attr:`recompute_bn_before_eval`; the optimizer itself does nothing with it).
        bn_recompute_batches: at most this many training batches for that pass (None: one
            whole epoch, the authors' choice).
    """

    single_pass = True

    def __init__(
        self,
        params: Any = None,
        rho: float = 3.0,
        *,
        base: Any = None,
        rho_mode: str = "absolute",
        bn_recompute: bool = True,
        bn_recompute_batches: int | None = None,
        **kwargs,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        for key in ("mask", "selection", "ascent"):
            if kwargs.get(key) is not None:
                raise ValueError(f"MSAM takes no {key} policy: its ascent is the momentum")
        check_choice(rho_mode, "MSAM rho_mode", RHO_MODES)
        check_bool(bn_recompute, "MSAM bn_recompute")
        if bn_recompute_batches is not None:
            check_int(bn_recompute_batches, "MSAM bn_recompute_batches", 1)
        if isinstance(base, torch.optim.SGD):
            flat = [g for g in base.param_groups if not g.get("momentum", 0)]
            if flat:
                raise ValueError(
                    "MSAM perturbs along the base optimizer's momentum, but the SGD base has "
                    "momentum=0: use momentum > 0 (e.g. 0.9)"
                )
        super().__init__(base, rho, **kwargs)
        self.rho_mode = rho_mode
        #: whether a training loop should recompute BN statistics at θ before evaluating
        #: (effsam's loop does, with :func:`effsam.bn.recompute_bn_stats`)
        self.recompute_bn_before_eval = bn_recompute
        #: the most training batches that pass may use (None: one epoch)
        self.bn_recompute_batches = bn_recompute_batches
        #: the radius r of the last perturbation, per param group (None: no perturbation yet)
        self.last_radius: list[float] | None = None

    def _momentum(self, p: Tensor) -> Tensor | None:
        state = self.base.state.get(p, {})
        for key in MOMENTUM_KEYS:
            v = state.get(key)
            if isinstance(v, Tensor):
                return v
        return None

    @torch.no_grad()
    def _theta_norm(self) -> float:
        """‖θ‖₂: one global norm over every trainable parameter of every group."""
        ps = [p for p in self.params if p.requires_grad]
        return float(global_norm(ps, self.foreach)) if ps else 0.0

    @torch.no_grad()
    def _pre_pass1_perturb(self) -> None:
        groups = []
        for group in self.param_groups:
            pairs = [(p, self._momentum(p)) for p in group["params"] if p.requires_grad]
            pairs = [(p, v) for p, v in pairs if v is not None]
            if pairs:
                groups.append((self._rho(group), pairs))
        txn = self._open_step()
        txn.pre_pass1_done = True
        if not groups:
            if self.steps > 0:
                raise RuntimeError(
                    f"MSAM found no momentum in the {type(self.base).__name__} base "
                    f"optimizer's state (looked for {', '.join(MOMENTUM_KEYS)})"
                )
            return  # the first step: no momentum yet, a plain step
        scale = self._theta_norm() if self.rho_mode == "relative" else 1.0
        vs = [v for _, pairs in groups for _, v in pairs]
        denom = float(global_norm(vs, self.foreach)) + self.eps_denominator
        txn.perturbed = []
        self.last_radius = []
        for rho, pairs in groups:
            radius = rho * scale
            self.last_radius.append(radius)
            for p, v in pairs:
                backup = self._backup(p)
                backup.copy_(p)
                p.add_(v, alpha=-radius / denom)
                txn.perturbed.append((p, backup))

    def extra_repr(self) -> str:
        return f"rho_mode={self.rho_mode}, bn_recompute={self.recompute_bn_before_eval}"
