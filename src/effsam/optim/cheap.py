"""Cheap ascents: the ascent (pass 1) only has to find a direction, so cut it, not the
descent.

* :class:`PartialSAM` — ε only on a subset of tensors, so that pass 1 computes weight
  gradients for those alone (``requires_grad`` off for the others during pass 1, as SWP
  does): SAM-ON's normalisation layers (Mueller et al., NeurIPS 2023), the last layers,
  or a random share of the tensors each step.
* :class:`StaleSAM` — ε from the previous step's update gradient (one extra buffer), a
  true ascent every k-th sharpness-aware step: 1 + 1/k passes per step.

Both compose with the reduced-batch ascent (``ascent_fraction``, every
:class:`~effsam.SharpnessAware` takes it) and with the step schedules (RST, late, interval).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ._validate import check_int
from .ascent import global_norm
from .masks import PerturbationMask, RandomTensorSubset
from .sharpness_aware import resolve_base
from .update import PassThrough
from .variants import SAM

_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def norm_params(model: nn.Module) -> list[Tensor]:
    """The trainable affine parameters of every normalisation layer of ``model``
    (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm): SAM-ON's perturbed set."""
    out: list[Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def param_layers(model: nn.Module) -> list[list[Tensor]]:
    """The layers of ``model``: each module holding trainable parameters of its own, in
    registration order (``model.modules()``), with those parameters."""
    layers: list[list[Tensor]] = []
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        own = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            layers.append(own)
    return layers


def last_layer_params(model: nn.Module, count: int | float) -> list[Tensor]:
    """The parameters of the last layers of ``model`` (see :func:`param_layers`): ``count``
    layers if an int ≥ 1, or the last ⌈count·L⌉ of its L layers if a float in (0, 1)."""
    layers = param_layers(model)
    if not layers:
        raise ValueError("the model has no trainable parameters")
    n = len(layers)
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        raise TypeError(f"Invalid layer count: {count!r} (an int >= 1 or a float in (0, 1))")
    if isinstance(count, int):
        if count < 1:
            raise ValueError(f"Invalid layer count: {count!r} (must be >= 1)")
        k = min(count, n)
    else:
        if not (0.0 < count < 1.0):
            raise ValueError(f"Invalid layer fraction: {count!r} (must be in (0, 1))")
        k = max(1, math.ceil(count * n))
    return [p for layer in layers[n - k :] for p in layer]


class FixedTensors(PerturbationMask):
    """ε only on a fixed set of tensors; pass 1 computes weight gradients for them alone.

    ε_n = ρ g_n / (‖g_S‖₂ + δ) for n in the set S (‖ε‖ = ρ), 0 elsewhere.
    """

    name = "tensors"

    def __init__(self, tensors: Iterable[Tensor], label: str = "tensors") -> None:
        chosen = list(tensors)
        if not chosen:
            raise ValueError(f"the {label!r} ascent has no tensor to perturb")
        self._ids = {id(t) for t in chosen}
        self.label = label
        self.name = f"tensors[{label}]"  # a state saved with another set is refused
        self.count = len(self._ids)

    def draw(self, params: Sequence[Tensor]) -> list[bool] | None:
        keep = [id(p) in self._ids for p in params]
        if not any(k and p.requires_grad for k, p in zip(keep, params)):
            raise ValueError(
                f"none of the {self.count} tensors of the {self.label!r} ascent is a "
                "trainable parameter of this optimizer"
            )
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {"label": self.label, "count": self.count}

    def extra_repr(self) -> str:
        return f"{self.label}, {self.count} tensors"


def _parse_layers(layers: str) -> tuple[str, float | int | None]:
    if not isinstance(layers, str):
        raise TypeError(f"Invalid layers: {layers!r} (a string: 'norm', 'last:K' or 'random:F')")
    kind, _, arg = layers.partition(":")
    if kind == "norm" and not arg:
        return "norm", None
    if kind in ("last", "random") and arg:
        try:
            value: float | int = int(arg) if arg.isdigit() else float(arg)
        except ValueError:
            value = math.nan
        if kind == "last" and ((isinstance(value, int) and value >= 1) or (0.0 < value < 1.0)):
            return "last", value
        if kind == "random" and 0.0 < float(value) <= 1.0:
            return "random", float(value)
    raise ValueError(
        f"Invalid layers: {layers!r} (choose 'norm', 'last:K' with an int K >= 1 or a "
        "fraction in (0, 1), or 'random:F' with F in (0, 1])"
    )


class PartialSAM(SAM):
    """Partial-layer ascent: ε only on some tensors, pass 1's weight gradients for those
    alone (the autograd kernels of the others are not run; its backward stops at the
    earliest perturbed layer).

    ``layers``:

    * ``"norm"`` — SAM-ON (Mueller et al., NeurIPS 2023): the normalisation layers' affine
      parameters (:func:`norm_params`);
    * ``"last:K"`` — the last K layers (an int), or the last ⌈K·L⌉ of the L layers (a
      fraction), in registration order (:func:`last_layer_params`);
    * ``"random:F"`` — each tensor with probability F, drawn each step (seeded; SWP's draw
      without its 1/β scaling, so ‖ε‖ = ρ).

    Or ``perturb=`` the tensors themselves (no model needed). ε is normalised over the
    perturbed tensors: ‖ε‖ = ρ, as SAM-ON does. Needs the model for "norm" and "last".
    """

    def __init__(
        self,
        params: Any = None,
        rho: float = 0.05,
        *,
        base: Any = None,
        model: nn.Module | None = None,
        layers: str = "norm",
        perturb: Iterable[Tensor] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        for key in ("mask", "selection"):
            if kwargs.get(key) is not None:
                raise ValueError(f"PartialSAM takes no {key} policy: its mask is `layers`")
        if perturb is not None:
            mask: PerturbationMask = FixedTensors(perturb, "perturb")
            self.layers = "perturb"
        else:
            kind, value = _parse_layers(layers)
            self.layers = layers
            if kind == "random":
                mask = RandomTensorSubset(float(value), seed=seed, scaling="unit")  # type: ignore[arg-type]
            else:
                if not isinstance(model, nn.Module):
                    raise ValueError(
                        f"layers={layers!r} needs the model (model=...), or pass the tensors "
                        "to perturb as perturb=[...]"
                    )
                if kind == "norm":
                    chosen = norm_params(model)
                    if not chosen:
                        raise ValueError(
                            "layers='norm' (SAM-ON): the model has no normalisation layer "
                            "with trainable affine parameters"
                        )
                else:
                    chosen = last_layer_params(model, value)  # type: ignore[arg-type]
                mask = FixedTensors(chosen, layers)
        super().__init__(base, rho, mask=mask, **kwargs)


class StaleSAM(SAM):
    """Stale ascent with refresh: ε from the previous step's update gradient.

    With s the gradient the base optimizer stepped with at the previous step (one buffer
    per parameter; after a plain scheduled step, that step's gradient), a sharpness-aware
    step is, except every k-th one::

        θ̃ = θ + ρ · s / (‖s‖₂ + δ)          (one global norm, ρ per param group)
        g  = ∇L(θ̃)                          (the only forward/backward)
        θ ← θ (exact copy);  base step with g;  s ← g

    and every k-th sharpness-aware step (the first one, and whenever s is missing) is a
    true SAM step (two passes; s ← g_SAM). So a step costs 1 + 1/k passes; k = 1 is SAM.

    How it differs from its neighbours: MSAM also makes one pass at a moved point, but
    moves AGAINST the momentum (θ − ρ v/‖v‖, a step in the descent direction) and never
    refreshes; LookSAM keeps SAM's ascent point θ + ε(g) at every step (a pass at θ) and
    reuses SAM's orthogonal correction g_v between refreshes, so it needs a forward at θ
    each step. StaleSAM ascends along last step's gradient, skipping the pass at θ.

    Args:
        refresh_every: k ≥ 1, a true ascent every k-th sharpness-aware step.
    """

    def __init__(
        self,
        params: Any = None,
        rho: float = 0.05,
        *,
        base: Any = None,
        refresh_every: int = 2,
        **kwargs: Any,
    ) -> None:
        self._stale_now = False
        self.last_step_stale = False
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        check_int(refresh_every, "refresh_every", 1, typed=True)
        for key in ("mask", "selection"):
            if kwargs.get(key) is not None:
                raise ValueError(f"StaleSAM takes no {key} policy")
        if kwargs.get("adaptive"):
            raise ValueError("StaleSAM's ascent is SAM's (adaptive=True is not supported)")
        if kwargs.get("update") is not None:
            raise ValueError("StaleSAM sets its own update: it keeps each step's gradient")
        super().__init__(base, rho, update=KeepUpdate(), **kwargs)
        self.refresh_every = refresh_every
        self.settings = {"stale_refresh_every": refresh_every}

    @property
    def aware_count(self) -> int:
        """Sharpness-aware steps taken (fresh or stale); every k-th is fresh."""
        return self.update.aware_count

    # single_pass is per step: a stale step is one pass at the moved point
    @property  # type: ignore[override]
    def single_pass(self) -> bool:  # type: ignore[override]
        return self._stale_now

    def _has_stale(self) -> bool:
        return any("stale_grad" in self.state.get(p, {}) for p in self.params)

    def _on_begin_step(self, decision: bool | None) -> None:
        self._stale_now = (
            decision is True and self.aware_count % self.refresh_every != 0 and self._has_stale()
        )
        #: whether the current (or last) step ascended along the stale gradient
        self.last_step_stale = self._stale_now

    @torch.no_grad()
    def _pre_pass1_perturb(self) -> None:
        txn = self._open_step()
        txn.pre_pass1_done = True
        groups = []
        for group in self.param_groups:
            pairs = [
                (p, self.state[p]["stale_grad"])
                for p in group["params"]
                if p.requires_grad and "stale_grad" in self.state.get(p, {})
            ]
            if pairs:
                groups.append((self._rho(group), pairs))
        bufs = [s for _, pairs in groups for _, s in pairs]
        denom = float(global_norm(bufs, self.foreach)) + self.eps_denominator
        txn.perturbed = []
        for rho, pairs in groups:
            for p, s in pairs:
                backup = self._backup(p)
                backup.copy_(p)
                p.add_(s.to(p.dtype), alpha=rho / denom)
                txn.perturbed.append((p, backup))

    def _end_step(self) -> None:
        super()._end_step()
        self._stale_now = False


class KeepUpdate(PassThrough):
    """StaleSAM's update: the gradient each step's update used is kept, per parameter
    (``stale_grad`` in the optimizer's state), for the next step's stale ascent; it is
    committed only once the base step has succeeded. Counts the sharpness-aware steps."""

    name = "keep-update"

    def __init__(self) -> None:
        self.aware_count = 0

    @torch.no_grad()
    def on_update(self, state, params, step) -> None:  # type: ignore[override]
        # p.grad: the gradient this step's update uses (finite, unscaled, clipped); kept
        # aside until the base step has succeeded (a failing base step changes nothing)
        step.pending["update"] = [
            None if p.grad is None else p.grad.detach().clone() for p in params
        ]

    def after_update(self, state, params, step) -> None:  # type: ignore[override]
        pending = step.pending.pop("update", None)
        if pending is None:
            return
        for p, g in zip(params, pending):
            if g is None:
                state[p].pop("stale_grad", None)
            else:
                state[p]["stale_grad"] = g
        if step.decision:
            self.aware_count += 1

    def state_dict(self, state, params) -> dict[str, Any]:  # type: ignore[override]
        return {
            "stale_grad": [state.get(p, {}).get("stale_grad") for p in params],
            "stale_aware_count": self.aware_count,
        }

    def load_state_dict(self, ours, state, params) -> None:  # type: ignore[override]
        saved = ours.get("stale_grad")
        if saved is None:
            return
        if len(saved) != len(params):
            raise ValueError(
                f"StaleSAM state has {len(saved)} stale gradients for {len(params)} parameters"
            )
        for p, s in zip(params, saved):
            if s is not None and (not isinstance(s, Tensor) or s.shape != p.shape):
                raise ValueError("StaleSAM state: a stale gradient does not match its parameter")
        for p, s in zip(params, saved):
            if s is None:
                state[p].pop("stale_grad", None)
            else:
                state[p]["stale_grad"] = s.detach().to(p.device, p.dtype).clone()
        self.aware_count = int(ours.get("stale_aware_count", 0))
