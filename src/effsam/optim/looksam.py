"""LookSAM (Liu et al., CVPR 2022): the full SAM step every k-th step, and in between one
forward/backward at θ with SAM's extra direction reused.

On a refresh step (t mod k = 0) with g = ∇L(θ) and g_s = ∇L(θ + ε) the ordinary SAM
gradient, the component of g_s orthogonal to g is stored::

    g_v = g_s − (⟨g_s, g⟩ / ‖g‖²) · g          (global inner product and norms)

and the base optimizer steps with g_s. On every other step ONE forward/backward at θ
gives g and the base optimizer steps with::

    g + α · (‖g‖ / ‖g_v‖) · g_v

so it sees exactly one gradient per step, and pass 2 does not run. g_v is in
``state_dict`` (exact resume). Extra memory: one copy of the parameters for g_v.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._contract import resolve_base
from .ascent import AdaptiveAscent, L2Ascent
from .schedule import Interval
from .sharpness_aware import SharpnessAware


def _dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Σ ⟨x, y⟩ over the tensors, accumulated in float64 (one temporary per tensor at a
    time, in the tensors' own dtype)."""
    device = xs[0].device
    return torch.stack(
        [torch.mul(x, y).sum(dtype=torch.float64).to(device) for x, y in zip(xs, ys)]
    ).sum()


class LookSAM(SharpnessAware):
    """LookSAM: SAM every ``k`` steps, the stored orthogonal direction reused in between.

    Args:
        base: the optimizer instance to wrap.
        rho: ρ, as SAM's.
        k: refresh interval (the paper's default 5); k = 1 is SAM.
        alpha: weight α of the reused direction (the paper's default 0.7).
        adaptive: ASAM's ascent on refresh steps.
    """

    def __init__(
        self,
        params: Any = None,
        rho: float = 0.05,
        *,
        base: Any = None,
        k: int = 5,
        alpha: float = 0.7,
        adaptive: bool = False,
        eta: float = 0.0,
        **kwargs,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        for key in ("mask", "selection", "schedule"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"LookSAM sets its own {key}: its reused direction needs the dense "
                    "gradients of the whole batch"
                )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"Invalid LookSAM alpha: {alpha!r} (must be a number >= 0)")
        ascent = AdaptiveAscent(eta) if adaptive else L2Ascent()
        super().__init__(base, rho, ascent=ascent, schedule=Interval(k, offset=0), **kwargs)
        self.k = k
        self.alpha = float(alpha)

    def _gv(self, p: Tensor) -> Tensor | None:
        return self.state[p].get("looksam_gv")

    @torch.no_grad()
    def _on_ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        # Keep g for the projection after pass 2, in the buffer g_v occupies (reused).
        kept = {id(p) for p in params}
        for p in self.params:
            if id(p) not in kept:
                self.state[p].pop("looksam_gv", None)
        for p, g in zip(params, grads):
            buf = self._gv(p)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype:
                self.state[p]["looksam_gv"] = g.detach().clone()
            else:
                buf.copy_(g)

    @torch.no_grad()
    def _before_descent(self) -> None:
        ps = [p for p in self.params if p.grad is not None]
        if not ps:
            return
        gs = [p.grad for p in ps]
        clean = [self._gv(p) if self._gv(p) is not None else torch.zeros_like(p.grad) for p in ps]
        g_sq = _dot(clean, clean)
        coef = _dot(gs, clean) / g_sq if float(g_sq) > 0 else torch.zeros_like(g_sq)
        for p, g_s, g in zip(ps, gs, clean):
            # g_v = g_s − coef · g, formed in the buffer that held g
            g.mul_(-coef.to(g.device, g.dtype)).add_(g_s)
            self.state[p]["looksam_gv"] = g
        for p in self.params:
            if p.grad is None:
                self.state[p].pop("looksam_gv", None)

    @torch.no_grad()
    def _plain_update(self) -> None:
        pairs = [(p.grad, self._gv(p)) for p in self.params if p.grad is not None]
        pairs = [(g, v) for g, v in pairs if v is not None]
        if not pairs or self.alpha == 0.0:
            return
        gs = [g for g, _ in pairs]
        vs = [v for _, v in pairs]
        g_norm = _dot(gs, gs).sqrt()
        v_norm = _dot(vs, vs).sqrt()
        if float(v_norm) == 0.0:
            return
        coef = float(self.alpha * g_norm / v_norm)
        for g, v in pairs:
            g.add_(v, alpha=coef)

    def _extra_state(self) -> dict[str, Any]:
        return {"looksam_gv": [self._gv(p) for p in self.params]}

    def _load_extra_state(self, ours: dict[str, Any]) -> None:
        saved = ours.get("looksam_gv")
        if saved is None:
            return
        params = self.params
        if len(saved) != len(params):
            raise ValueError(
                f"LookSAM state has {len(saved)} g_v entries for {len(params)} parameters"
            )
        for p, v in zip(params, saved):
            if v is None:
                self.state[p].pop("looksam_gv", None)
            else:
                self.state[p]["looksam_gv"] = v.to(device=p.device, dtype=p.dtype).clone()

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}"
