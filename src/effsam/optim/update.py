"""Update policies: how the gradient the base optimizer steps with is formed.

The fifth policy of the :class:`~effsam.SharpnessAware` skeleton, beside the ascent, the
mask, the selection and the schedule. SAM steps with pass 2's gradient as it is
(:class:`PassThrough`); a method that reuses or blends gradients across passes or steps
(LookSAM's reused correction, ESAM-mix's blend with pass 1, StaleSAM's kept gradient) is
an update policy with its own state — a gradient transformation in the manner of optax,
whose per-parameter buffers live in the optimizer's per-parameter ``state`` as torch's
functional kernels keep theirs.

The skeleton calls it in one place per phase (see :mod:`effsam.optim.policy` for the
order); every call gets the optimizer's parameters in their order, the per-parameter
state, and the step in progress (:class:`~effsam.optim._transaction.StepTransaction`),
where a policy keeps what lives for one step (``step.pending``) and registers what a
failed step must undo (``step.on_rollback``).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .policy import Policy

if TYPE_CHECKING:
    from ._transaction import StepTransaction

State = MutableMapping[Tensor, dict[str, Any]]


class PassThrough(Policy):
    """The base optimizer steps with the gradient as the passes leave it (SAM)."""

    name = "pass-through"

    def on_ascent(
        self,
        state: State,
        params: Sequence[Tensor],
        ascended: Sequence[Tensor],
        grads: Sequence[Tensor],
        step: StepTransaction,
    ) -> None:
        """A sharpness-aware step, before the ascent: ``grads`` are pass 1's gradients of
        the tensors ``ascended`` (those ε perturbs)."""

    def before_descent(
        self,
        state: State,
        params: Sequence[Tensor],
        step: StepTransaction,
        selected_fraction: float | None,
    ) -> None:
        """A sharpness-aware step, before the base step: ``p.grad`` holds the final
        gradient (pass 2's); ``selected_fraction`` is the share of the batch pass 2 used
        (None: no sample selection this step)."""

    def plain_update(self, state: State, params: Sequence[Tensor], step: StepTransaction) -> None:
        """A plain scheduled step, before the base step: ``p.grad`` holds pass 1's."""

    def on_update(self, state: State, params: Sequence[Tensor], step: StepTransaction) -> None:
        """Every step that is not skipped, right before the base step: ``p.grad`` holds
        the gradient the base optimizer steps with (finite, unscaled, clipped)."""

    def after_update(self, state: State, params: Sequence[Tensor], step: StepTransaction) -> None:
        """Right after a successful base step (commit what :meth:`on_update` prepared)."""

    def state_dict(self, state: State, params: Sequence[Tensor]) -> dict[str, Any]:  # type: ignore[override]
        """The policy's entries of the optimizer's saved state (merged into its
        ``"effsam"`` entry, so their keys are the policy's own)."""
        return {}

    def load_state_dict(  # type: ignore[override]
        self, saved: dict[str, Any], state: State, params: Sequence[Tensor]
    ) -> None:
        """Load the entries :meth:`state_dict` saved (``saved``: the whole ``"effsam"``
        entry). Check everything before changing anything: the optimizer rolls a failed
        load back, but only through this policy's own entries."""
