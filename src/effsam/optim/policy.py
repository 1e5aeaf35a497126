"""The policy interfaces of the :class:`~effsam.SharpnessAware` skeleton, and their base.

A sharpness-aware optimizer is the skeleton plus three policies: an ascent (how ε is
shaped), a mask (which weights ε perturbs) and a selection (which samples pass 2 sees).
Their interfaces are the :class:`typing.Protocol` classes below; the built-in policies
derive from :class:`Policy` for the naming and state plumbing.

The order of the calls in one step, for every API (``sharpness_aware_step``,
``step(closure)``, ``first_pass``/``first_step``/``second_step``)::

    mask.refresh_due(steps) → mask.refresh(...)       when due: by the training loop for
                                                       data masks (needs_data), by the
                                                       optimizer itself otherwise
    mask.draw(params)                                 pass-1 flags, once per step
    <pass 1: forward, backward>
    mask.prepare(params)                              first_step, gradients present
    mask.element_masks(ps)                            a getter: changes nothing
    ascent.scales_(ps, buffers, foreach)              T, inside the ascent kernel
    <selection.select(loss_before, loss_after)>       sharpness_aware_step, SDS only
    <pass 2: forward, backward>
    base.step()                                       second_step
    mask.rollback_draw()                              instead, if the step failed

``state_dict``/``load_state_dict`` of each policy are saved with the optimizer's state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


class Policy:
    """A named, optionally stateful piece of a :class:`~effsam.SharpnessAware` optimizer.

    Stateful policies (SWP's generator, SSAM's mask) override ``state_dict`` and
    ``load_state_dict``; the optimizer saves them with its own state.
    """

    name = "policy"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return ""


@runtime_checkable
class AscentPolicy(Protocol):
    """The ascent's preconditioner T: norm terms T ⊙ g, direction T² ⊙ g (T = 1: SAM)."""

    name: str

    def scales_(self, params: Sequence[Tensor], out: Sequence[Tensor], foreach: bool) -> bool:
        """Write T of each parameter into ``out``; False when T = 1 (``out`` untouched)."""
        ...


@runtime_checkable
class MaskPolicy(Protocol):
    """Which weights ε perturbs: per-tensor pass-1 flags and per-element bool masks."""

    name: str
    #: with element masks: normalise ε by ‖m ⊙ g‖ (True) or by ‖g‖ (False)
    normalise_masked: bool
    #: whether ``refresh`` needs a model and a batch (else the optimizer runs it itself)
    needs_data: bool
    #: whether ``element_masks`` (if any) are laid out like the parameters, so that they
    #: shard with DTensor parameters (FSDP2); False refuses such parameters (SSAM-F)
    masks_follow_param_layout: bool

    @property
    def ready(self) -> bool:
        """Whether ``draw`` may run (a data mask must be computed first)."""
        ...

    @property
    def scale(self) -> float:
        """Multiplier on ε after normalisation (SWP: 1/β)."""
        ...

    def refresh_due(self, step: int) -> bool:
        """Whether ``refresh`` should run before step ``step`` (0-based, successful steps)."""
        ...

    def refresh(
        self,
        model: torch.nn.Module | None,
        params: Sequence[Tensor],
        batch: Any,
        loss_fn: Callable[..., Any] | None,
        step: int,
    ) -> bool:
        """Recompute (or schedule) the mask; True when something changed or was scheduled."""
        ...

    def draw(self, params: Sequence[Tensor]) -> list[bool] | None:
        """Start of a step: per-tensor pass-1 flags (None: all); snapshots for rollback."""
        ...

    def rollback_draw(self) -> None:
        """Undo everything since the last ``draw``."""
        ...

    def element_counts(self) -> list[int] | None:
        """Per parameter, the elements the current mask perturbs (None: all of each)."""
        ...

    def prepare(self, params: Sequence[Tensor]) -> None:
        """In ``first_step`` with the pass-1 gradients present, before ``element_masks``."""
        ...

    def element_masks(self, params: Sequence[Tensor]) -> list[Tensor | None] | None:
        """Per-element bool masks for ``params`` (None: no mask); changes no state."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class SelectionPolicy(Protocol):
    """Which samples pass 2 sees: a pure function of the per-sample losses."""

    name: str
    gamma: float
    #: whether it needs a no-grad forward at θ + ε (ℓ_i(θ + ε))
    needs_perturbed_loss: bool
    #: whether it needs per-sample losses (then the closure API cannot run it)
    needs_per_sample: bool

    def num_selected(self, batch_size: int) -> int: ...

    def select(self, loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        """Sorted indices of the chosen samples (None: all)."""
        ...
