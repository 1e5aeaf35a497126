"""LookSAM (Liu et al., CVPR 2022): the full SAM step every k-th step, and in between one
forward/backward at θ with SAM's extra direction reused.

On a refresh step (t mod k = 0) with g = ∇L(θ) and g_s = ∇L(θ + ε) the ordinary SAM
gradient, the component of g_s orthogonal to g is stored::

    g_v = g_s − (⟨g_s, g⟩ / ‖g‖²) · g          (global inner product and norms)
    r   = ‖g_v‖ / ‖g‖                            (SAM's own correction, measured; 0 if g = 0)

and the base optimizer steps with g_s. On every other step ONE forward/backward at θ
gives g and the base optimizer steps with::

    g + a · ‖g‖ · g_v / ‖g_v‖

so it sees exactly one gradient per step, and pass 2 does not run. The weight a is

* ``alpha_mode="absolute"`` (the paper's): a = α;
* ``"relative"``: a = α · r, r of the last refresh — α = 1 adds an orthogonal component
  whose share of ‖g‖ is the one SAM itself produced at that refresh;
* ``"adaptive"``: a = α · r̄, r̄ an exponential average of r over the refreshes
  (r̄ ← β r̄ + (1 − β) r, r̄ = r at the first refresh; β = ``ratio_ema``, 0.9 by default).

α is absolute in the paper, so its effect depends on ρ and the data: the push it adds
has norm α‖g‖ whatever SAM's own correction is (on a small CIFAR CNN at ρ = 0.1, r ≈ 0.11
on every refresh, so α = 0.7 pushes about 6.5 times harder than SAM does).

g_v, r and r̄ are in ``state_dict`` (exact resume); a step that fails part-way leaves r
and r̄ as they were. Extra memory: one copy of the parameters for g_v.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._validate import check_fraction, check_non_negative
from .ascent import AdaptiveAscent, L2Ascent
from .schedule import Interval
from .sharpness_aware import SharpnessAware, refuse_nonfinite, resolve_base
from .update import PassThrough

#: how α is read: the paper's absolute weight, or a multiple of SAM's measured correction
ALPHA_MODES = ("absolute", "relative", "adaptive")


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
        k: refresh interval (5 by default, as in the unofficial implementations; the
            paper's tables were not available to us); k = 1 is SAM.
        alpha: weight α of the reused direction: the push's share of ‖g‖
            (``alpha_mode="absolute"``; 0.7 by default, as in the unofficial
            implementations), or a multiple of SAM's measured share r = ‖g_v‖/‖g‖
            (``"relative"``, ``"adaptive"``; 1 reuses exactly SAM's correction).
        alpha_mode: ``"absolute"`` (the paper's), ``"relative"`` (r of the last refresh)
            or ``"adaptive"`` (r averaged over refreshes).
        ratio_ema: β of the ``"adaptive"`` average, in [0, 1) (0.9: about the last ten
            refreshes).
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
        alpha_mode: str = "absolute",
        ratio_ema: float = 0.9,
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
        check_non_negative(alpha, "LookSAM alpha", typed=False)
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(
                f"Invalid LookSAM alpha_mode: {alpha_mode!r} (choose from {', '.join(ALPHA_MODES)})"
            )
        check_fraction(ratio_ema, "LookSAM ratio_ema", "[0, 1)")
        refuse_nonfinite("LookSAM", eta=eta)
        if kwargs.get("update") is not None:
            raise ValueError("LookSAM sets its own update: the reused correction")
        ascent = AdaptiveAscent(eta) if adaptive else L2Ascent()
        reuse = ReuseCorrection(alpha, alpha_mode, ratio_ema)
        super().__init__(
            base, rho, ascent=ascent, schedule=Interval(k, offset=0), update=reuse, **kwargs
        )
        self.k = k

    # α, its mode and the measured ratios are the update policy's (see ReuseCorrection)
    alpha = property(lambda self: self.update.alpha)
    alpha_mode = property(lambda self: self.update.alpha_mode)
    ratio_ema = property(lambda self: self.update.ratio_ema)

    @property
    def last_ratio(self) -> float | None:
        """r = ‖g_v‖/‖g‖ measured at the last refresh (None before the first)."""
        return self.update.last_ratio

    @property
    def ratio_average(self) -> float | None:
        """r̄, the average of r over the refreshes (None before the first)."""
        return self.update.ratio_average

    @property
    def reuse_weight(self) -> float | None:
        """a, the weight of the reused direction on a step between refreshes."""
        return self.update.reuse_weight

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}, alpha_mode={self.alpha_mode}"


class ReuseCorrection(PassThrough):
    """LookSAM's update: on a refresh step keep g_v, pass 2's component orthogonal to
    pass 1's gradient, and r = ‖g_v‖/‖g‖; on a plain step add a · ‖g‖ · g_v/‖g_v‖ to the
    gradient (a = α, α·r or α·r̄ by ``alpha_mode``). g_v lives in the optimizer's
    per-parameter state (``looksam_gv``)."""

    name = "reuse-correction"

    def __init__(self, alpha: float, alpha_mode: str, ratio_ema: float) -> None:
        self.alpha = float(alpha)
        self.alpha_mode = alpha_mode
        self.ratio_ema = float(ratio_ema)
        self.last_ratio: float | None = None
        self.ratio_average: float | None = None

    @property
    def reuse_weight(self) -> float | None:
        """a, the weight of the reused direction on a step between refreshes: α, α·r or
        α·r̄ by ``alpha_mode`` (None: nothing measured yet)."""
        if self.alpha_mode == "absolute":
            return self.alpha
        ratio = self.last_ratio if self.alpha_mode == "relative" else self.ratio_average
        return None if ratio is None else self.alpha * ratio

    @torch.no_grad()
    def on_ascent(self, state, params, ascended, grads, step) -> None:  # type: ignore[override]
        # Keep g for the projection after pass 2, in the buffer g_v occupies (reused).
        kept = {id(p) for p in ascended}
        for p in params:
            if id(p) not in kept:
                state[p].pop("looksam_gv", None)
        for p, g in zip(ascended, grads):
            buf = state[p].get("looksam_gv")
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype:
                state[p]["looksam_gv"] = g.detach().clone()
            else:
                buf.copy_(g)

    @torch.no_grad()
    def before_descent(self, state, params, step, selected_fraction) -> None:  # type: ignore[override]
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        gs = [p.grad for p in ps]
        clean = [state[p].get("looksam_gv") for p in ps]
        clean = [torch.zeros_like(p.grad) if c is None else c for p, c in zip(ps, clean)]
        g_sq = _dot(clean, clean)
        coef = _dot(gs, clean) / g_sq if float(g_sq) > 0 else torch.zeros_like(g_sq)
        for p, g_s, g in zip(ps, gs, clean):
            # g_v = g_s − coef · g, formed in the buffer that held g
            g.mul_(-coef.to(g.device, g.dtype)).add_(g_s)
            state[p]["looksam_gv"] = g
        for p in params:
            if p.grad is None:
                state[p].pop("looksam_gv", None)
        # r = ‖g_v‖ / ‖g‖, SAM's own correction relative to the clean gradient
        g_sq_f = float(g_sq)
        ratio = math.sqrt(float(_dot(clean, clean)) / g_sq_f) if g_sq_f > 0 else 0.0
        self._record_ratio(ratio, step)

    def _record_ratio(self, ratio: float, step: Any) -> None:
        # a failed step puts r and r̄ back as they were before it
        before = (self.last_ratio, self.ratio_average)

        def undo() -> None:
            self.last_ratio, self.ratio_average = before

        step.on_rollback(undo)
        self.last_ratio = ratio
        if self.ratio_average is None:
            self.ratio_average = ratio
        else:
            beta = self.ratio_ema
            self.ratio_average = beta * self.ratio_average + (1.0 - beta) * ratio

    @torch.no_grad()
    def plain_update(self, state, params, step) -> None:  # type: ignore[override]
        pairs = [(p.grad, state[p].get("looksam_gv")) for p in params if p.grad is not None]
        pairs = [(g, v) for g, v in pairs if v is not None]
        weight = self.reuse_weight
        if not pairs or not weight:
            return
        gs = [g for g, _ in pairs]
        vs = [v for _, v in pairs]
        g_norm = _dot(gs, gs).sqrt()
        v_norm = _dot(vs, vs).sqrt()
        if float(v_norm) == 0.0:
            return
        coef = float(weight * g_norm / v_norm)
        for g, v in pairs:
            g.add_(v, alpha=coef)

    def state_dict(self, state, params) -> dict[str, Any]:  # type: ignore[override]
        return {
            "looksam_gv": [state.get(p, {}).get("looksam_gv") for p in params],
            "looksam_ratio": self.last_ratio,
            "looksam_ratio_average": self.ratio_average,
        }

    def load_state_dict(self, ours, state, params) -> None:  # type: ignore[override]
        saved = ours.get("looksam_gv")
        if saved is None:
            return
        if len(saved) != len(params):
            raise ValueError(
                f"LookSAM state has {len(saved)} g_v entries for {len(params)} parameters"
            )
        has_ratio = "looksam_ratio" in ours
        if not has_ratio and self.alpha_mode != "absolute" and any(v is not None for v in saved):
            raise ValueError(
                "this LookSAM state has no measured ratio ‖g_v‖/‖g‖ (saved by an older "
                f"version), which alpha_mode={self.alpha_mode!r} needs. Nothing was loaded."
            )
        for p, v in zip(params, saved):
            if v is None:
                state[p].pop("looksam_gv", None)
            else:
                state[p]["looksam_gv"] = v.to(device=p.device, dtype=p.dtype).clone()
        self.last_ratio = _float_or_none(ours.get("looksam_ratio"))
        self.ratio_average = _float_or_none(ours.get("looksam_ratio_average"))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, alpha_mode={self.alpha_mode}"


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)
