"""The policy interfaces of the :class:`~effsam.SharpnessAware` skeleton, and their base.

A sharpness-aware optimizer is the skeleton plus its policies: an ascent (how ε is
shaped), a mask (which weights ε perturbs), a selection (which samples each pass sees), a
schedule (which steps are sharpness-aware) and an update (how the gradient the base
optimizer steps with is formed from the passes', :mod:`effsam.optim.update`). Their
interfaces are the :class:`typing.Protocol` classes below; the built-in policies derive
from :class:`Policy` for the naming and state plumbing. A method is a set of policies and
a registry entry; the skeleton calls each policy in one place. The shape of a step that
the policies declare (one pass or two, which samples each pass sees) reaches the per-batch
orchestration as one :class:`StepPlan` (``SharpnessAware.step_plan``).

The order of the calls in one step, for every API (``sharpness_aware_step``,
``step(closure)``, ``first_pass``/``first_step``/``second_step``)::

    schedule.state_dict()                             begin_step: the step's undo point
    schedule.decide(None)                             begin_step, unless needs_grad_norm:
                                                       False makes it a plain base step
    mask.refresh_due(steps) → mask.refresh(...)       when due: by the training loop for
                                                       data masks (needs_data), by the
                                                       optimizer itself otherwise
    mask.draw(params)                                 pass-1 flags, on a sharpness-aware
                                                       step (needs_grad_norm: after its
                                                       decision, pass 1 dense)
    <pass 1: forward, backward>
    schedule.decide(‖g‖²)                             instead of decide(None), for a
                                                       needs_grad_norm schedule: first_step
                                                       or decide_after_pass1
    mask.prepare(params)                              first_step, gradients present
    update.on_ascent(state, params, ps, gs, step)     sharpness-aware steps, before ε
    mask.element_masks(ps)                            a getter: changes nothing
    ascent.scales_(ps, buffers, foreach)              T, inside the ascent kernel
    <selection.select(loss_before, loss_after)>       sharpness_aware_step, SDS only
    <pass 2: forward, backward>
    update.before_descent(state, params, step, f)     f: the share pass 2 selected
    update.plain_update(state, params, step)          instead, on a plain scheduled step
    update.on_update(...) → base.step() → update.after_update(...)
                                                       second_step (unless skipped)
    schedule.commit()                                 second_step, stepped or skipped
    mask.rollback_draw(),                             instead, if the step failed
    schedule.load_state_dict(...)                     (abort_step)

``state_dict``/``load_state_dict`` of each policy are saved with the optimizer's state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
class InPlaceAscent(AscentPolicy, Protocol):
    """An ascent that can also apply T in place, a chunk at a time (no parameter-sized
    temporary): ``first_step(zero_grad=False)`` then forms ε in the parameters and leaves
    the gradients; with an ascent without it, ε is formed in a copy of the gradients."""

    def mul_scales_(
        self, params: Sequence[Tensor], tensors: Sequence[Tensor], thetas: Sequence[Tensor]
    ) -> bool:
        """``tensors[i] ← tensors[i] ⊙ T_i``, T from ``thetas[i]``; False when T = 1."""
        ...


@runtime_checkable
class MaskPolicy(Protocol):
    """Which weights ε perturbs: per-tensor pass-1 flags and per-element bool masks."""

    name: str
    #: the unit the mask keeps or drops, part of the method's identity in a saved state
    #: (SSAM: ``"element"`` or ``"tensor"``; ``""`` for masks with a single layout)
    granularity: str
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
class UpdatePolicy(Protocol):
    """How the gradient the base optimizer steps with is formed (a gradient transform
    with state; :class:`effsam.optim.update.PassThrough` for SAM). ``state``: the
    optimizer's per-parameter state, where per-parameter buffers live; ``step``: the step
    in progress (its ``pending`` dict for what lasts one step, ``on_rollback`` for what a
    failed step must undo)."""

    name: str

    def on_ascent(
        self, state: Any, params: Sequence[Tensor], ascended: Sequence[Tensor],
        grads: Sequence[Tensor], step: Any,
    ) -> None: ...  # fmt: skip

    def before_descent(
        self, state: Any, params: Sequence[Tensor], step: Any, selected_fraction: float | None
    ) -> None: ...

    def plain_update(self, state: Any, params: Sequence[Tensor], step: Any) -> None: ...

    def on_update(self, state: Any, params: Sequence[Tensor], step: Any) -> None: ...

    def after_update(self, state: Any, params: Sequence[Tensor], step: Any) -> None: ...

    def state_dict(self, state: Any, params: Sequence[Tensor]) -> dict[str, Any]: ...

    def load_state_dict(
        self, saved: dict[str, Any], state: Any, params: Sequence[Tensor]
    ) -> None: ...


@runtime_checkable
class SelectionPolicy(Protocol):
    """Which samples each pass sees: a pure function of the per-sample losses."""

    name: str
    gamma: float
    #: whether it needs a no-grad forward at θ + ε (ℓ_i(θ + ε))
    needs_perturbed_loss: bool
    #: whether it needs per-sample losses (then the closure API cannot run it)
    needs_per_sample: bool
    #: True: the samples are chosen before pass 1 (a no-grad ranking forward at θ) and
    #: both passes use them (K-SAM)
    before_pass1: bool
    #: True: pass 2 forwards the whole batch at θ + ε (BN batch statistics of every
    #: sample), ranks the samples from that forward and back-propagates only the selected
    #: ones' mean loss (the ESAM whole-batch control); False: pass 2 forwards the selection
    pass2_whole_batch: bool
    #: True: pass 2 on the selection is normalised with the whole batch's BN statistics,
    #: taken at θ + ε (ESAM's BN repair)
    pass2_bn_whole_batch: bool
    #: diagnostics of the last ``select`` call, never read by the optimizer: k / b, and
    #: the chosen indices (None: the whole batch)
    last_fraction: float | None
    last_indices: Tensor | None

    def num_selected(self, batch_size: int) -> int: ...

    def select(self, loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        """Sorted indices of the chosen samples (None: all)."""
        ...


@runtime_checkable
class Schedule(Protocol):
    """Whether a step is sharpness-aware (True) or a plain base-optimizer step (False).

    The skeleton asks once per step: ``decide(None)`` before pass 1, or, when
    ``needs_grad_norm`` is True, ``decide(grad_sq_norm)`` after it with ‖g‖² of pass 1's
    gradient (the workers' mean under data parallel). ``commit`` follows once the step is
    over (stepped or skipped). A step that fails part-way is undone by loading the
    ``state_dict`` taken before ``decide``, so that state must hold everything a decision
    depends on and changes (a step counter, a generator, running statistics); it is also
    what a checkpoint saves, so a resumed run decides as an uninterrupted one.
    :class:`effsam.optim.schedule.EveryStep` is the default and a base to derive from.
    """

    name: str
    #: True: ``decide`` needs this step's pass-1 ‖g‖² (pass 1 is then dense).
    needs_grad_norm: bool

    def decide(self, grad_sq_norm: float | None) -> bool:
        """This step: sharpness-aware (True) or plain (False). ``grad_sq_norm`` is None
        before pass 1, pass 1's ‖g‖² after it (only for ``needs_grad_norm``)."""
        ...

    def commit(self) -> None:
        """The step decided last has finished (stepped or skipped)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: how pass 2 uses the batch (:attr:`StepPlan.pass2`)
PASS2_MODES = ("batch", "subset", "ranked-in-pass2")


@dataclass(frozen=True)
class StepPlan:
    """The shape of one step, as the optimizer's policies make it.

    :meth:`effsam.SharpnessAware.step_plan` builds it once per step, after the schedule
    was asked: the one place where the skeleton reads the policies' declarations
    (``Selection.needs_per_sample``, ``before_pass1``, ``pass2_whole_batch``, ...; the
    ascent slice; a one-pass method's ``single_pass``). The per-batch orchestration
    (:func:`effsam.sharpness_aware_step`) and the framework integrations execute the plan
    and read nothing else of the policies, so a method that changes the shape of a step
    changes the plan its policies declare, not the orchestration.

    Attributes:
        one_pass: a sharpness-aware step is ONE forward/backward, at a point moved before
            it, whose gradient is the update (MSAM, a stale ascent, Flat-LoRA).
        pass1_slice: a sharpness-aware pass 1 runs on a random slice of each micro-batch
            (``ascent_fraction`` < 1; ``SharpnessAware.ascent_batch``).
        per_sample: ``loss_fn`` must return per-sample losses (a sample selection).
        preselect: a no-grad forward at θ ranks the samples and both passes see the
            chosen ones (K-SAM).
        pass2: ``"batch"``: pass 2 on what pass 1 saw (the whole batch, or K-SAM's
            choice); ``"subset"``: the samples are ranked (from pass 1's losses, and a
            no-grad forward at θ + ε when ``rank_at_perturbed``) and pass 2 runs on the
            chosen ones (ESAM's SDS); ``"ranked-in-pass2"``: pass 2 forwards the whole
            batch at θ + ε, ranks from that forward and back-propagates the chosen
            samples' loss (the whole-batch control).
        rank_at_perturbed: the ``"subset"`` ranking needs the losses at θ + ε.
        bn_whole_batch: pass 2 on a subset is normalised with the whole batch's BatchNorm
            statistics (ESAM's BN repair).
    """

    one_pass: bool = False
    pass1_slice: bool = False
    per_sample: bool = False
    preselect: bool = False
    pass2: str = "batch"
    rank_at_perturbed: bool = False
    bn_whole_batch: bool = False

    def __post_init__(self) -> None:
        if self.pass2 not in PASS2_MODES:
            raise ValueError(f"Invalid StepPlan pass2: {self.pass2!r} (one of {PASS2_MODES})")
        if self.pass2 != "batch" and not self.per_sample:
            raise ValueError(f"StepPlan pass2={self.pass2!r} needs per-sample losses")


#: a plain optimizer's step: one pass on the whole batch
PLAIN_STEP = StepPlan()
