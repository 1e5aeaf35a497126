"""A step of :class:`~effsam.optim.sharpness_aware.SharpnessAware` as one transaction.

Everything a step carries from one call to the next (the pass-1 flags, the θ backup while
θ + ε is loaded, the schedule's decision, the plain-step hooks, the watched BatchNorm
buffers, ...) lives in one :class:`StepTransaction`, created when the step begins and
dropped when it ends. Everything a failed step must undo is recorded in it as well, so
that :meth:`StepTransaction.rollback` is the one way back. A failing ``load_state_dict``
puts the optimizer back the same way, through a :class:`Snapshot`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..bn import BNSnapshot, bn_finite, restore_bn


def copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of a policy's state dict (tensors cloned)."""
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


def load_quietly(policy: Any, state: dict[str, Any]) -> None:
    """Put a policy's earlier state back (its load-time warnings are for users' loads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy.load_state_dict(state)


class Snapshot:
    """The optimizer's restorable state at one moment: the schedule, the selection and the
    ascent slice's generator; with ``whole=True`` also the mask, the counters, the base
    optimizer's state and the method's own entries (what ``load_state_dict`` replaces)."""

    def __init__(self, opt: Any, *, whole: bool) -> None:
        self.schedule = copy_state(opt.schedule.state_dict())
        self.selection = copy_state(opt.selection.state_dict())
        self.slice = opt.ascent_slice.generator.get_state()
        self.whole = whole
        if whole:
            self.base = (opt.base.state, opt.base.param_groups)
            self.counters = (opt.steps, opt.skipped_steps, opt.sharpness_aware_steps)
            self.mask = copy_state(opt.mask.state_dict())
            self.update = opt.update.state_dict(opt.state, opt.params)

    def rollback(self, opt: Any) -> None:
        if self.whole:
            opt.base.state, opt.base.param_groups = self.base
            opt.param_groups = opt.base.param_groups
            opt.steps, opt.skipped_steps, opt.sharpness_aware_steps = self.counters
            opt.update.load_state_dict(self.update, opt.state, opt.params)
            load_quietly(opt.mask, self.mask)
        opt.schedule.load_state_dict(self.schedule)
        if self.selection:
            opt.selection.load_state_dict(self.selection)  # a random subset's draw
        opt.ascent_slice.generator.set_state(self.slice)


class StepTransaction:
    """One step's state, from its beginning to its end (or its rollback).

    Attributes:
        begun: :meth:`SharpnessAware.begin_step` asked the schedule (``before`` holds the
            policies' states from then).
        decision: its answer: True, False, or None (decided after pass 1).
        drawn: the mask policy drew this step's pass-1 flags (``keep``).
        keep: those flags, one per parameter (None: every tensor).
        in_pass1: inside :meth:`SharpnessAware.first_pass`.
        sliced: ``ascent_batch`` sliced this step's pass 1.
        ascended: ``first_step`` ran (``second_step`` requires it).
        perturbed: (parameter, θ backup) pairs while θ + ε (or a single-pass method's
            moved point) is loaded.
        pass1_skipped: ``first_step`` refused a non-finite pass 1 (``second_step`` skips).
        pre_pass1_done: a single-pass method moved θ (or chose not to) before pass 1.
        single_pass_moved: that move was made (the plain step is sharpness-aware).
        plain_hooks: hook handles while a plain step waits for ``second_step``.
        plain_backward: a backward ran during that wait (a pass 2 that must not run).
        bn_watch: BatchNorm buffers as they were at the start of pass 1.
        pending: what the update policy keeps for this step only (ESAM-mix's pass-1
            gradients, StaleSAM's update until the base step succeeds).
        selected / offered: samples pass 2 used, of those the selection was offered,
            summed over the step's micro-batches (0 / 0: no selection this step).
        refresh_undo: the mask's state before this step's first mask refresh.
    """

    def __init__(self) -> None:
        self.begun = False
        self.decision: bool | None = None
        self.before: Snapshot | None = None
        self.drawn = False
        self.keep: list[bool] | None = None
        self.in_pass1 = False
        self.sliced = False
        self.ascended = False
        self.perturbed: list[tuple[Tensor, Tensor]] = []
        self.pass1_skipped = False
        self.pre_pass1_done = False
        self.single_pass_moved = False
        self.plain_hooks: list[Any] | None = None
        self.plain_backward = False
        self.bn_watch: list[BNSnapshot] = []
        self.pending: dict[str, Any] = {}
        self.selected = 0
        self.offered = 0
        self.refresh_undo: dict[str, Any] | None = None
        self._undo: list[Callable[[], None]] = []

    def begin(self, opt: Any) -> None:
        """Take the policies' states and ask the schedule (once per step)."""
        self.before = Snapshot(opt, whole=False)
        self.decision = None if opt.schedule.needs_grad_norm else opt.schedule.decide(None)
        self.begun = True

    def record_selection(self, selected: int, offered: int) -> None:
        """One ``select`` call of this step: ``selected`` of ``offered`` samples kept."""
        self.selected += selected
        self.offered += offered

    @property
    def selected_fraction(self) -> float | None:
        """The share of the batch pass 2 used over the whole step (None: no selection)."""
        return self.selected / self.offered if self.offered else None

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Register a method's own undo (run by :meth:`rollback`, latest first)."""
        self._undo.append(undo)

    def restore_bn(self) -> None:
        for snapshot in reversed(self.bn_watch):  # the earliest snapshot wins
            restore_bn(snapshot)

    def bn_finite(self) -> bool:
        return all(bn_finite(snapshot) for snapshot in self.bn_watch)

    def end(self) -> None:
        """The step is over (stepped, skipped or rolled back): remove its hooks."""
        for handle in self.plain_hooks or []:
            handle.remove()
        self.plain_hooks = None

    def rollback(self, opt: Any) -> None:
        """Undo the step: θ restored, BN buffers put back, the mask's draw and refresh,
        the schedule, the selection and the ascent slice as before the step, and every
        method's own undo."""
        opt.restore()
        self.restore_bn()
        for undo in reversed(self._undo):
            undo()
        if self.drawn:
            opt.mask.rollback_draw()
        if self.refresh_undo is not None:
            load_quietly(opt.mask, self.refresh_undo)
        if self.before is not None:
            self.before.rollback(opt)
