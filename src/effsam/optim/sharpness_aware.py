"""The one skeleton every sharpness-aware method here is built on: ascend, evaluate, restore,
descend."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _contract
from .ascent import AdaptiveAscent, L2Ascent, global_norm
from .masks import PerturbationMask, kept_fraction
from .selection import AllSamples

_WRAPPER_KEY = "effsam"


@dataclass(frozen=True)
class KeptFraction:
    """Share of the trainable parameters perturbed this step: by tensors, by elements."""

    tensors: float
    elements: float


def _check_rho(rho: Any, where: str = "rho") -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"Invalid {where}: {rho!r} (must be a number)")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"Invalid {where}: {rho!r} (must be finite and >= 0)")
    return float(rho)


class SharpnessAware(Optimizer):
    r"""Makes any ``torch.optim`` optimizer sharpness-aware.

    With θ the parameters of the wrapped optimizer's groups and g the pass-1 gradient::

        ε      = ρ · scale · m ⊙ a(θ, g) / (‖n(θ, g)‖₂ + δ)      # ascent policy a, n; mask m
        θ_copy = θ;  θ ← θ + ε                                  # first_step()
        g_SAM  = ∇L(θ + ε)                                      # pass 2 (caller)
        θ ← θ_copy (exact copy);  base.step() with g_SAM        # second_step()

    SAM: a = n = g. ASAM: a = T²g, n = Tg with T = |θ|. One global norm over all groups;
    ρ may differ per param group (``group["rho"]``). δ = 1e-12.

    The wrapper takes an optimizer INSTANCE and shares its ``param_groups`` (LR schedulers
    on either object act on both; ``add_param_group`` on either is seen by both).

    Three ways to drive it:

    * ``opt.step(closure)`` — a torch-standard closure (zero grads, forward, backward,
      return loss) is called twice, the first time under :meth:`first_pass`.
    * ``with opt.first_pass(): <forward, backward>``; ``opt.first_step(zero_grad=True)``;
      ``<forward, backward>``; ``opt.second_step(zero_grad=True)``.
    * :func:`effsam.sharpness_aware_step` — also protects BatchNorm statistics, selects
      samples (ESAM's SDS), handles AMP, accumulation and DDP.

    Non-finite gradients in either pass: the step changes nothing (weights restored, base
    optimizer not stepped), ``skipped_steps`` counts it, ``last_step_skipped`` is set and a
    warning is issued.

    Args:
        base: the optimizer instance to make sharpness-aware.
        rho: neighbourhood radius ρ ≥ 0 (ρ = 0 is exactly the base optimizer's step).
        ascent: ascent policy (:class:`L2Ascent` default, :class:`AdaptiveAscent` for ASAM).
        mask: mask policy (default: perturb everything).
        selection: sample-selection policy (default: all samples).
        foreach: use ``torch._foreach_*`` kernels (default: True on every device).
        check_finite: check both passes' gradients for inf/NaN (one device sync per pass).
        eps_denominator: δ in the normalisation.
    """

    def __init__(
        self,
        base: Optimizer,
        rho: float = 0.05,
        *,
        ascent: L2Ascent | AdaptiveAscent | None = None,
        mask: PerturbationMask | None = None,
        selection: AllSamples | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
        eps_denominator: float = 1e-12,
    ) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(
                f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}: "
                f"{base!r:.80}"
            )
        if isinstance(base, SharpnessAware):
            raise TypeError("base is already sharpness-aware; wrap the plain optimizer instead")
        rho = _check_rho(rho)
        if not (eps_denominator > 0 and math.isfinite(eps_denominator)):
            raise ValueError(f"Invalid eps_denominator: {eps_denominator!r} (must be > 0)")
        self.base = base
        self.ascent = ascent if ascent is not None else L2Ascent()
        self.mask = mask if mask is not None else PerturbationMask()
        self.selection = selection if selection is not None else AllSamples()
        self.foreach = True if foreach is None else bool(foreach)
        self.check_finite = bool(check_finite)
        self.eps_denominator = float(eps_denominator)
        # Optimizer.__init__ calls self.add_param_group on each of the base's own group
        # dicts: ours fills in our defaults (rho) in place, so both objects see them.
        super().__init__(base.param_groups, {"rho": rho})
        self.param_groups = base.param_groups
        self.steps = 0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.last_kept: KeptFraction | None = None
        self._keep: list[bool] | None = None
        self._drawn = False
        self._perturbed: list[tuple[Tensor, Tensor]] = []
        self._pass1_skipped = False

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rho" in param_group:
            _check_rho(param_group["rho"], "rho of the param group")
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if any(param_group is g for g in self.base.param_groups):
            return  # during __init__: the base already holds this group
        self.base.add_param_group(param_group)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _rho(self, group: dict[str, Any]) -> float:
        return group.get("rho", self.defaults["rho"])

    # ------------------------------------------------------------------ pass 1
    def _draw(self) -> list[bool] | None:
        if not self._drawn:
            if self.mask.needs_data and not getattr(self.mask, "ready", True):
                raise RuntimeError(
                    f"the {self.mask.name!r} mask has not been computed yet: call "
                    "opt.refresh_mask(model, batch, loss_fn) before the first step "
                    "(effsam.sharpness_aware_step does this on schedule)"
                )
            params = self._params()
            self._keep = self.mask.draw(params)
            self._drawn = True
            tensors, elements = kept_fraction(params, self._keep)
            self.last_kept = KeptFraction(tensors, elements)
        return self._keep

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Wrap pass 1's forward AND backward: tensors the mask does not keep get no
        weight gradients (``requires_grad`` off for this pass only; each tensor's own flag
        is restored, so frozen parameters stay frozen)."""
        keep = self._draw()
        switched: list[Tensor] = []
        if keep is not None:
            for p, k in zip(self._params(), keep):
                if not k and p.requires_grad:
                    p.requires_grad_(False)
                    switched.append(p)
        try:
            yield
        finally:
            for p in switched:
                p.requires_grad_(True)

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` (θ + ε is loaded)."""
        return bool(self._perturbed) or self._pass1_skipped

    # ------------------------------------------------------------------ the steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Ascend: θ ← θ + ε from the current gradients. Returns False if the gradients were
        not finite (then nothing is perturbed and :meth:`second_step` will not step)."""
        if self._perturbed or self._pass1_skipped:
            raise RuntimeError("first_step called twice without second_step in between")
        keep = self._draw()
        groups: list[tuple[float, list[Tensor], list[Tensor]]] = []
        masks_wanted = False
        index = 0
        for group in self.param_groups:
            ps, gs = [], []
            for p in group["params"]:
                kept = keep is None or keep[index]
                index += 1
                if p.grad is None or not kept:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("sharpness-aware optimizers do not support sparse gradients")
                ps.append(p)
                gs.append(p.grad)
            if ps:
                groups.append((self._rho(group), ps, gs))
        all_ps = [p for _, ps, _ in groups for p in ps]
        all_gs = [g for _, _, gs in groups for g in gs]
        if not all_ps:
            self._pass1_skipped = False
            self._perturbed = []
            return True  # nothing to perturb: pass 2 is a plain step
        masks = self.mask.element_masks(all_ps)
        if masks is not None:
            masks_wanted = any(m is not None for m in masks)
        terms, numer = self.ascent.terms(all_ps, all_gs, self.foreach)
        if masks_wanted and self.mask.normalise_masked:
            terms = [t if m is None else t * m for t, m in zip(terms, masks)]
        norm = global_norm(terms, self.foreach)
        if self.check_finite and not bool(torch.isfinite(norm)):
            self._skip("pass 1", norm)
            self._pass1_skipped = True
            if zero_grad:
                self.zero_grad(set_to_none=True)
            return False
        if masks_wanted:
            numer = [a if m is None else a * m for a, m in zip(numer, masks)]
        denom = norm + self.eps_denominator
        start = 0
        self._perturbed = []
        for rho, ps, _ in groups:
            n = len(ps)
            coef = rho * self.mask.scale / denom
            self._perturb(ps, numer[start : start + n], coef)
            start += n
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return True

    def _perturb(self, ps: list[Tensor], numer: list[Tensor], coef: Tensor) -> None:
        backups = []
        for p in ps:
            state = self.state[p]
            buf = state.get("theta")
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                buf = state["theta"] = torch.empty_like(p, memory_format=torch.preserve_format)
            backups.append(buf)
        if self.foreach:
            torch._foreach_copy_(backups, ps)
            eps = torch._foreach_mul(numer, coef)
            torch._foreach_add_(ps, eps)
        else:
            for p, buf, a in zip(ps, backups, numer):
                buf.copy_(p)
                p.add_(a * coef)
        self._perturbed.extend(zip(ps, backups))

    @torch.no_grad()
    def restore(self) -> None:
        """Load back the exact pre-ascent weights (a copy, never θ + ε − ε)."""
        if self._perturbed:
            ps = [p for p, _ in self._perturbed]
            backups = [b for _, b in self._perturbed]
            if self.foreach:
                torch._foreach_copy_(ps, backups)
            else:
                for p, b in zip(ps, backups):
                    p.copy_(b)
        self._perturbed = []

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restore θ and step the base optimizer with the current (pass-2) gradients.
        Returns False if the step was skipped (non-finite gradients in either pass)."""
        self.restore()
        skipped = self._pass1_skipped
        if not skipped and self.check_finite:
            gs = [p.grad for p in self._params() if p.grad is not None]
            if gs:
                norm = global_norm(gs, self.foreach)
                if not bool(torch.isfinite(norm)):
                    self._skip("pass 2", norm)
                    skipped = True
        if not skipped:
            self.base.step()
            self.steps += 1
        self.last_step_skipped = skipped
        self._pass1_skipped = False
        self._drawn = False
        # LR schedulers attached to the wrapper check that its step() was called.
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return not skipped

    def abort_step(self) -> None:
        """Undo a step that failed part-way: weights restored, mask draw rolled back,
        gradients cleared. The base optimizer has not been stepped."""
        self.restore()
        if self._drawn:
            self.mask.rollback_draw()
        self._drawn = False
        self._pass1_skipped = False
        self.zero_grad(set_to_none=True)

    def _skip(self, where: str, norm: Tensor) -> None:
        self.skipped_steps += 1
        warnings.warn(
            f"effsam: non-finite gradient norm ({float(norm)}) in {where}; step skipped, "
            f"weights restored, base optimizer not stepped (skipped so far: "
            f"{self.skipped_steps})",
            RuntimeWarning,
            stacklevel=3,
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One sharpness-aware step with a torch-standard closure (zero grads, forward,
        backward, return loss), called twice. Returns the pass-1 loss."""
        if closure is None:
            raise RuntimeError(
                "SharpnessAware.step needs a closure (zero grads, forward, backward, return "
                "loss); or use first_step()/second_step() or effsam.sharpness_aware_step()"
            )
        if self.selection.needs_per_sample:
            raise RuntimeError(
                f"sample selection ({self.selection.name}, gamma={self.selection.gamma}) "
                "cannot work through a closure: use effsam.sharpness_aware_step(model, opt, "
                "batch, loss_fn) with a per-sample loss_fn"
            )
        try:
            with torch.enable_grad(), self.first_pass():
                loss = closure()
            if self.first_step(zero_grad=True):
                with torch.enable_grad():
                    closure()
        except BaseException:
            self.abort_step()
            raise
        self.second_step()
        return loss

    # ------------------------------------------------------------------ masks needing data
    def mask_refresh_due(self) -> bool:
        """Whether the mask policy wants :meth:`refresh_mask` before the next step."""
        return self.mask.refresh_due(self.steps)

    def refresh_mask(self, model: torch.nn.Module, batch: Any, loss_fn: Callable) -> bool:
        """Recompute a data-dependent mask (SSAM-F's Fisher, SSAM-D's drop/grow)."""
        return self.mask.refresh(model, self._params(), batch, loss_fn, self.steps)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus an ``"effsam"`` entry with the wrapper's
        counters and every policy's state."""
        state = self.base.state_dict()
        state[_WRAPPER_KEY] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "mask": self.mask.state_dict(),
            "selection": self.selection.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        ours = state_dict.pop(_WRAPPER_KEY, None)
        if ours is None:
            raise ValueError(
                "state_dict has no 'effsam' entry: it was not saved by a SharpnessAware "
                "optimizer (load a plain optimizer's state into opt.base instead)"
            )
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.steps = int(ours["steps"])
        self.skipped_steps = int(ours["skipped_steps"])
        self.mask.load_state_dict(ours["mask"])
        self.selection.load_state_dict(ours["selection"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        parts = [f"rho={self.defaults['rho']}", f"ascent={self.ascent.name}"]
        for policy in (self.ascent, self.mask, self.selection):
            extra = policy.extra_repr()
            if extra:
                parts.append(f"{policy.name}({extra})")
        return f"{type(self).__name__}({', '.join(parts)}, base={type(self.base).__name__})"


# torch.optim contract (hooks, step() without closure, pickling, defaults, compile, FSDP):
# wrappers around the methods above, see _contract.py.
_contract.install(SharpnessAware)
