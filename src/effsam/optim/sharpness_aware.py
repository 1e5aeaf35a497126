"""The one skeleton every sharpness-aware method here is built on: ascend, evaluate, restore,
descend."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..batching import batch_size, batch_tensors, index_batch
from ..bn import BNSnapshot, snapshot_bn, watching_bn
from ._contract import (
    UNPICKLED,
    SkipStep,
    checked_closure,
    checks_sharding,
    eager,
    eager_frame,
    entered,
    fires_step_hooks,
    runs_load_state_dict_hooks,
    runs_state_dict_hooks,
    step_without_closure,
)
from ._dtensor import is_dtensor
from ._transaction import Snapshot, StepTransaction
from ._validate import check_non_negative
from .ascent import L2Ascent, _copy_, ascend_, global_norm, group_by_device_and_dtype
from .masks import PerturbationMask, kept_fraction
from .policy import (
    AscentPolicy,
    InPlaceAscent,
    MaskPolicy,
    Schedule,
    SelectionPolicy,
    StepPlan,
    UpdatePolicy,
)
from .schedule import EveryStep
from .selection import AllSamples
from .slicing import AscentSlice
from .update import PassThrough

_WRAPPER_KEY = "effsam"


@dataclass(frozen=True)
class KeptFraction:
    """Share of the trainable parameters the perturbation covers this step.

    ``tensors``: trainable tensors with at least one perturbed element, over all trainable
    tensors; ``elements``: perturbed elements over all trainable elements. It counts both
    SWP's tensor draw and SSAM's element mask (SSAM-F at s = 0.5: about 0.5 elements).
    """

    tensors: float
    elements: float


#: Where the core library's own frames are: a warning about a step points past them, at
#: the line of the caller's code that drove the step (torch's own wrappers skipped too).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CORE = tuple(
    os.path.join(_PACKAGE, name)
    for name in ("optim" + os.sep, "step.py", "bn.py", "parallel.py", "batching.py")
)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the function calling this one
    point at the first frame outside the core library and torch: the user's line."""
    frame = sys._getframe(1)  # the function that issues the warning: stacklevel 1
    level = 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(_CORE) or name.startswith(_TORCH)):
            return level
        frame = frame.f_back
        level += 1
    return 1


def _nonfinite_hyperparameters(places: list[tuple[str, Any]]) -> None:
    """Refuse a NaN or infinite float among the base optimizer's hyper-parameters (lr,
    momentum, weight_decay, betas, eps, ...): torch.optim accepts them, and the first step
    then makes every weight non-finite."""

    def bad(value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, float):
            return not math.isfinite(value)
        if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
            return not bool(torch.isfinite(value))
        if isinstance(value, (tuple, list)):
            return any(bad(v) for v in value if not isinstance(v, Tensor) or v.numel() == 1)
        return False

    for where, values in places:
        for key, value in (values or {}).items():
            if key != "params" and bad(value):
                raise ValueError(
                    f"Invalid {key}: {value!r} in {where} (a hyper-parameter must be finite)"
                )


def refuse_nonfinite(who: str, **values: Any) -> None:
    """A NaN or infinite float among ``values`` (arguments that may go unused by the
    chosen mode, e.g. ``eta`` without ``adaptive``) is a ValueError naming it."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Invalid {who} {key}: {value!r} (must be finite)")


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

    A schedule policy may make a step a plain base step (``interval``, ``late``, RST,
    AE-SAM): :meth:`first_step` then returns False, leaves pass 1's gradient in place and
    :meth:`second_step` steps the base optimizer with it — one forward and one backward.
    Pass 2 must not run after a False (a backward then is detected and raises; it is never
    silently applied).

    Non-finite gradients in either pass, or non-finite BatchNorm running statistics: the
    step changes nothing (weights restored, base optimizer not stepped, the BN buffers the
    optimizer sees put back — see :meth:`watch_bn`), ``skipped_steps`` counts it,
    ``last_step_skipped`` is set and a warning points at the caller's line.

    The ``torch.optim`` contract frameworks rely on (hooks, ``step()`` without a closure,
    pickling, defaults, ``torch.compile``, FSDP) is kept by the decorators on the methods
    below, from :mod:`effsam.optim._contract`. The methods marked ``@final`` carry it: a
    subclass changes a step through its policies (the update policy forms the final
    gradient) and the hooks those methods call (``_on_begin_step``, ``_pre_pass1_perturb``,
    ``_on_restore``), which run under the same contract.

    Args:
        base: the optimizer instance to make sharpness-aware.
        rho: neighbourhood radius ρ ≥ 0 (ρ = 0 is exactly the base optimizer's step).
        ascent: ascent policy (:class:`L2Ascent` default, :class:`AdaptiveAscent` for ASAM).
        mask: mask policy (default: perturb everything).
        selection: sample-selection policy (default: all samples).
        schedule: which steps are sharpness-aware (default: every step); any
            :class:`~effsam.optim.policy.Schedule`.
        update: how the gradient the base optimizer steps with is formed from the
            passes' (default: pass 2's as it is; see :mod:`effsam.optim.update`).
        foreach: use ``torch._foreach_*`` kernels (default: True on every device).
        check_finite: check both passes' gradients for inf/NaN (one device sync per pass).
        eps_denominator: δ in the normalisation.
        ascent_fraction: f in (0, 1]: pass 1 (the ascent) runs on a random slice of
            ⌊f·b + ½⌋ samples, pass 2 on the whole batch (reduced-batch ascent; see
            :meth:`ascent_batch` and :mod:`effsam.optim.slicing`). 1: the whole batch.
        ascent_noise: σ ≥ 0: noise of norm σ‖g‖ added to pass 1's gradient before the
            ascent (Wei et al., 2025, for small slices). 0: none.
        ascent_seed: seed of the slice and noise generator (saved in ``state_dict``).
    """

    def __init__(
        self,
        base: Optimizer,
        rho: float = 0.05,
        *,
        ascent: AscentPolicy | None = None,
        mask: MaskPolicy | None = None,
        selection: SelectionPolicy | None = None,
        schedule: Schedule | None = None,
        update: UpdatePolicy | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
        eps_denominator: float = 1e-12,
        ascent_fraction: float = 1.0,
        ascent_noise: float = 0.0,
        ascent_seed: int = 0,
    ) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(
                f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}: "
                f"{base!r:.80}"
            )
        if isinstance(base, SharpnessAware):
            raise TypeError("base is already sharpness-aware; wrap the plain optimizer instead")
        if "rho" in base.defaults:
            raise ValueError(
                f"base optimizer {type(base).__name__} has its own 'rho' hyper-parameter "
                f"(rho={base.defaults['rho']!r}) in its param groups, where effsam keeps ρ: "
                "this base cannot be wrapped"
            )
        rho = check_non_negative(rho, "rho")
        who = f"the {type(base).__name__} optimizer's"
        _nonfinite_hyperparameters(
            [(f"{who} defaults", base.defaults)]
            + [(f"{who} param group {i}", g) for i, g in enumerate(base.param_groups)]
        )
        if not any(p.requires_grad for g in base.param_groups for p in g["params"]):
            raise ValueError(
                f"the {type(base).__name__} optimizer holds no trainable parameter (every "
                "one has requires_grad=False): there is nothing to train"
            )
        if not (eps_denominator > 0 and math.isfinite(eps_denominator)):
            raise ValueError(f"Invalid eps_denominator: {eps_denominator!r} (must be > 0)")
        self.base = base
        self.ascent: AscentPolicy = ascent if ascent is not None else L2Ascent()
        self.mask: MaskPolicy = mask if mask is not None else PerturbationMask()
        self.selection: SelectionPolicy = selection if selection is not None else AllSamples()
        self.update: UpdatePolicy = update if update is not None else PassThrough()
        for what, policy, protocol in (
            ("ascent", self.ascent, AscentPolicy),
            ("mask", self.mask, MaskPolicy),
            ("selection", self.selection, SelectionPolicy),
            ("update", self.update, UpdatePolicy),
        ):
            if not isinstance(policy, protocol):
                raise TypeError(
                    f"Invalid {what} policy: {policy!r} does not implement "
                    f"effsam.optim.policy.{protocol.__name__}"
                )
        self.schedule: Schedule = schedule if schedule is not None else EveryStep()
        if not isinstance(self.schedule, Schedule):
            raise TypeError(
                f"schedule must be a schedule policy, got {schedule!r:.80}: it does not "
                "implement effsam.optim.policy.Schedule"
            )
        self.ascent_slice = AscentSlice(ascent_fraction, ascent_noise, ascent_seed)
        if self.ascent_slice.slices:
            self._check_sliceable()
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
        #: the share of the batch the last step's pass 2 used (None: no selection)
        self.last_selected_fraction: float | None = None
        #: steps that were sharpness-aware (the rest were plain base steps)
        self.sharpness_aware_steps = 0
        self.last_step_sharpness_aware: bool | None = None
        # The step in progress (None between steps): its state and its undo, see
        # StepTransaction.
        self._txn: StepTransaction | None = None
        # The base's hyper-parameters (momentum, betas, …) visible under effsam's own
        # (OneCycleLR and CyclicLR look for momentum / betas in the defaults); ρ on top.
        self.defaults = {**base.defaults, **self.defaults}

    #: (a class default too: instances unpickled from before the transaction have none)
    _txn: StepTransaction | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a subclass that overrides a ``@final`` method of this class: those
        carry the torch.optim contract, which the override would silently lose (its
        hooks run under it instead). Nothing in the subclass is changed."""
        super().__init_subclass__(**kwargs)
        finals = {n for n, v in vars(SharpnessAware).items() if getattr(v, "__final__", False)}
        overridden = sorted(finals & set(vars(cls)))
        if overridden:
            raise TypeError(
                f"{cls.__name__} overrides {', '.join(overridden)} of SharpnessAware, which "
                "keep the torch.optim contract (hooks, torch.compile, sharding checks): "
                "give it a policy (e.g. an update policy, effsam.optim.update) or override "
                "the hooks they call instead (_on_begin_step, _pre_pass1_perturb, _on_restore)"
            )

    # ------------------------------------------------------------------ torch.optim
    @property
    def foreach(self) -> bool:
        """Whether the ascent and the restore use ``torch._foreach_*`` kernels: as set
        (default True), but never on DTensor parameters (FSDP2): DTensor has no sharding
        rule for ``_foreach_copy_``, and the per-tensor kernels give the same result."""
        return self._foreach and not any(is_dtensor(p) for p in self.params)

    @foreach.setter
    def foreach(self, value: bool) -> None:
        self._foreach = bool(value)

    _foreach = True

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy`` take the whole wrapper (the base optimizer and
        the policies travel along) but the hooks, as torch's ``Optimizer.__getstate__``
        leaves them out; ``Optimizer.__setstate__`` makes them anew."""
        return {k: v for k, v in self.__dict__.items() if k not in UNPICKLED}

    def _open_step(self) -> StepTransaction:
        """The step in progress, opened if none is (by begin_step, or by watch_bn or the
        mask's draw coming first)."""
        if self._txn is None:
            self._txn = StepTransaction()
        return self._txn

    @property
    def _ascended(self) -> bool:
        """first_step ran in the step in progress (second_step is pending)."""
        return self._txn is not None and self._txn.ascended

    def _check_sliceable(self) -> None:
        """A sliced pass 1 is only an ascent: refuse methods whose pass 1 is more."""
        f = self.ascent_slice.fraction
        if self.single_pass:
            raise ValueError(
                f"ascent_fraction={f} needs a separate ascent pass; {type(self).__name__} "
                "has none (its one pass is the descent)"
            )
        if self.schedule.needs_grad_norm:
            raise ValueError(
                f"ascent_fraction={f} cannot be combined with the {self.schedule.name!r} "
                "schedule: it decides from pass 1's gradient after pass 1, and a plain step "
                "then descends with that gradient, which must be the whole batch's"
            )
        if self.selection.needs_per_sample:
            raise ValueError(
                f"ascent_fraction={f} cannot be combined with sample selection "
                f"({self.selection.name}): it ranks every sample by pass 1's loss"
            )

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rho" in param_group:
            check_non_negative(param_group["rho"], "rho of the param group")
        _nonfinite_hyperparameters([("the param group being added", param_group)])
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if any(param_group is g for g in self.base.param_groups):
            return  # during __init__: the base already holds this group
        self.base.add_param_group(param_group)

    @property
    def params(self) -> list[Tensor]:
        """Every parameter of every group, in the optimizer's order."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def pass1_keep(self) -> list[bool] | None:
        """This step's pass-1 flags, one per parameter in :attr:`params` order: which
        tensors get a weight gradient in pass 1 (``None``: all). Set by :meth:`first_pass`
        (or :meth:`first_step`) and valid until :meth:`second_step`."""
        return None if self._txn is None else self._txn.keep

    def _rho(self, group: dict[str, Any]) -> float:
        return group["rho"]  # add_param_group fills it in on every group

    def trainable_grads(self) -> list[Tensor]:
        """The current gradients of the wrapped parameters, in the optimizer's order
        (parameters without a gradient left out)."""
        return [p.grad for p in self.params if p.grad is not None]

    @final
    @eager
    @torch.no_grad()
    def grad_sq_norm(self) -> float:
        """‖g‖² of the current gradients: one global norm, squared (what AE-SAM decides by)."""
        gs = self.trainable_grads()
        return float(global_norm(gs, self.foreach)) ** 2 if gs else 0.0

    # ------------------------------------------------------------------ the decision
    #: True for methods whose only pass runs at a point moved before pass 1 (MSAM); a
    #: declaration read by :meth:`step_plan` (and the skeleton's own one-pass branch).
    single_pass = False

    def step_plan(self) -> StepPlan:
        """The shape of the step in progress (of the next one, before it begins), from the
        policies' declarations: see :class:`effsam.optim.policy.StepPlan`. Read it after
        :meth:`begin_step` (a stale ascent decides per step whether it is one pass)."""
        sel = self.selection
        per_sample = bool(sel.needs_per_sample)
        preselect = per_sample and bool(sel.before_pass1)
        if not per_sample or preselect:
            pass2 = "batch"
        elif sel.pass2_whole_batch:
            pass2 = "ranked-in-pass2"
        else:
            pass2 = "subset"
        return StepPlan(
            one_pass=bool(self.single_pass),
            pass1_slice=self.ascent_slice.slices,
            per_sample=per_sample,
            preselect=preselect,
            pass2=pass2,
            rank_at_perturbed=pass2 == "subset" and bool(sel.needs_perturbed_loss),
            bn_whole_batch=pass2 == "subset" and bool(sel.pass2_bn_whole_batch),
        )

    @final
    @eager
    def begin_step(self) -> bool | None:
        """Start a step (idempotent until it ends): ask the schedule whether it is
        sharpness-aware. Returns True (sharpness-aware), False (a plain base step: one
        forward and backward, then :meth:`second_step`) or None (the schedule decides from
        pass 1's gradient, in :meth:`first_step` or :meth:`decide_after_pass1`)."""
        txn = self._open_step()
        if not txn.begun:
            txn.begin(self)
            self._on_begin_step(txn.decision)
        return txn.decision

    def _on_begin_step(self, decision: bool | None) -> None:
        """A step has begun (once per step), with the schedule's decision."""

    @final
    @eager
    @torch.no_grad()
    def decide_after_pass1(self, grad_sq_norm: Tensor | float | None = None) -> bool:
        """For a schedule that needs pass 1's gradient (AE-SAM): decide from ‖g‖² (the
        squared global norm of the current gradients unless given — under data parallel
        the caller passes the workers' mean, so that all decide alike)."""
        decision = self.begin_step()
        if decision is not None:
            return decision
        if grad_sq_norm is None:
            grad_sq_norm = self.grad_sq_norm()
        txn = self._open_step()
        txn.decision = bool(self.schedule.decide(float(grad_sq_norm)))
        return txn.decision

    # ------------------------------------------------------------------ pass 1
    def _draw(self) -> list[bool] | None:
        txn = self._open_step()
        if not txn.drawn:
            if self.mask.needs_data and not self.mask.ready:
                raise RuntimeError(
                    f"the {self.mask.name!r} mask has not been computed yet: call "
                    "opt.refresh_mask(model, batch, loss_fn) before the first step "
                    "(effsam.sharpness_aware_step does this on schedule)"
                )
            params = self.params
            if not self.mask.needs_data and self.mask_refresh_due():
                # A data-free refresh (SSAM-D) needs no model or batch: schedule it here,
                # so the closure and two-phase APIs get it too.
                self.refresh_mask(None, None, None)  # type: ignore[arg-type]
            txn.keep = self.mask.draw(params)
            txn.drawn = True
            tensors, elements = kept_fraction(params, txn.keep, self.mask.element_counts())
            self.last_kept = KeptFraction(tensors, elements)
        return txn.keep

    def watch_bn(self, model: nn.Module | BNSnapshot) -> None:
        """Keep this step's BatchNorm buffers of ``model`` as they are now (call it before
        pass 1's forward; :meth:`first_pass` with a model does). If the step is skipped
        (non-finite gradients, or non-finite running statistics, which skip the step too)
        or fails, they are put back exactly — running_mean, running_var and
        num_batches_tracked — as if the batch had never been seen. Until the step ends."""
        snapshot = model if isinstance(model, list) else snapshot_bn(model)
        self._open_step().bn_watch.append(snapshot)

    @contextlib.contextmanager
    def first_pass(self, model: nn.Module | None = None) -> Iterator[None]:
        """Wrap pass 1's forward AND backward: tensors the mask does not keep get no
        weight gradients (``requires_grad`` off for this pass only; each tensor's own flag
        is restored, so frozen parameters stay frozen). On a plain scheduled step, or one
        decided after pass 1, pass 1 is dense. Single-pass methods (MSAM) move θ here.

        ``model``: its BatchNorm buffers are kept (:meth:`watch_bn`), so that a skipped
        step leaves them as they were. ``effsam.preserve_bn_stats(model, ...)`` entered
        inside the block does the same."""
        decision = self.begin_step()
        if model is not None:
            self.watch_bn(model)
        with watching_bn(self.watch_bn), self._first_pass(decision):
            yield

    @contextlib.contextmanager
    def _first_pass(self, decision: bool | None) -> Iterator[None]:
        txn, switched = self._enter_pass1(decision)
        try:
            yield
        except BaseException:
            if txn is None:  # a single-pass method: put its moved θ back
                self.restore()
            raise
        finally:
            self._exit_pass1(txn, switched)

    @eager
    def _enter_pass1(self, decision: bool | None) -> tuple[StepTransaction | None, list[Tensor]]:
        """Pass 1 begins. A single-pass method moves θ (no transaction flag: None);
        otherwise the tensors the mask does not keep get ``requires_grad`` off (returned,
        to be switched back on)."""
        if self.single_pass:
            if decision:
                self._pre_pass1_perturb()
            return None, []
        keep = self._draw() if decision else None
        switched: list[Tensor] = []
        if keep is not None:
            for p, k in zip(self.params, keep):
                if not k and p.requires_grad:
                    p.requires_grad_(False)
                    switched.append(p)
        txn = self._open_step()
        txn.in_pass1 = True
        return txn, switched

    @eager
    def _exit_pass1(self, txn: StepTransaction | None, switched: list[Tensor]) -> None:
        if txn is not None:
            txn.in_pass1 = False
        for p in switched:
            p.requires_grad_(True)

    def ascent_batch(self, batch: Any) -> Any:
        """The part of ``batch`` pass 1 runs on: a random slice of ⌊f·b + ½⌋ samples when
        this step is a sharpness-aware ascent and ``ascent_fraction`` f < 1, else ``batch``
        itself (a plain scheduled step's pass 1 is its descent: the whole batch).

        Call it inside ``with opt.first_pass():`` (the closure: on its first call), once
        per micro-batch; outside pass 1 it returns ``batch`` unchanged, so one closure
        serves both passes::

            def closure():
                opt.zero_grad()
                x, y = opt.ascent_batch((inputs, targets))
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

        With f < 1 a sharpness-aware step whose pass 1 did not come through here is
        refused in :meth:`first_step` (it would silently ascend on the whole batch).
        """
        txn = self._txn
        if txn is None or not txn.in_pass1 or not self.ascent_slice.slices:
            return batch
        if txn.decision is not True or self.single_pass:
            return batch
        idx = self.ascent_slice.draw(batch_size(batch))
        txn.sliced = True
        first = next(iter(batch_tensors(batch)), None)
        if first is not None and first.device.type != "cpu":
            idx = idx.to(first.device)
        return index_batch(batch, idx)

    def _pre_pass1_perturb(self) -> None:
        """Single-pass methods: move θ before pass 1 (see :class:`effsam.MSAM`); called
        from :meth:`first_pass`, eagerly."""
        raise NotImplementedError

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` (θ + ε is loaded). A
        single-pass method's moved point (MSAM) is its pass 1, not a perturbed pass 2."""
        txn = self._txn
        if txn is None:
            return False
        return (bool(txn.perturbed) and not self.single_pass) or txn.pass1_skipped

    # ------------------------------------------------------------------ the steps
    @final
    @eager
    @checks_sharding
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Ascend: θ ← θ + ε from the current gradients. Returns False if the gradients were
        not finite (then nothing is perturbed and :meth:`second_step` will not step).

        No parameter-sized temporary is made, on the first call as on later ones: the
        only extra memory is the θ backup (allocated once). With ``zero_grad=True`` (what
        every caller of the sharpness-aware step wants) ε is formed in the pass-1
        gradients, which are cleared afterwards; with ``zero_grad=False`` it is formed in
        the parameters after the backup took θ, and the gradients are left as they were
        (the same θ + ε bit for bit; with ``ascent_noise`` > 0 it works on a copy).

        Raises RuntimeError, changing nothing, if no parameter has a gradient.
        """
        self._check_pass1()
        decision = self.begin_step()
        txn = self._open_step()
        if self.check_finite and txn.bn_watch and not txn.bn_finite():
            return self._skip_pass1("BatchNorm running statistics after pass 1", None, zero_grad)
        if self.single_pass:
            txn.ascended = True
            return self._single_pass_done() if decision else self._start_plain()
        if decision is None:  # AE-SAM: from pass 1's norm, taken once
            norm = self._pass1_norm()
            value = float(norm)
            if self.check_finite and not math.isfinite(value):
                return self._skip_pass1("pass 1", norm, zero_grad)
            decision = self.decide_after_pass1(value**2)
        if not decision:
            txn.ascended = True
            return self._start_plain()
        self._check_sliced(txn)
        ps, gs, coefs = self._collect(self._draw())
        txn.ascended = True
        if not ps:
            txn.pass1_skipped = False
            txn.perturbed = []
            return True  # nothing to perturb: pass 2 is a plain step
        return self._ascend(txn, ps, gs, coefs, zero_grad)

    def _check_pass1(self) -> None:
        """first_step is due: not twice in a step, and only after a pass 1 that left a
        gradient (else the step is undone and a RuntimeError raised)."""
        if self._txn is not None and (self._txn.pass1_skipped or self._txn.ascended):
            raise RuntimeError("first_step called twice without second_step in between")
        if not any(p.grad is not None for p in self.params):
            self.abort_step()
            raise RuntimeError(
                f"first_step: no parameter of the optimizer has a gradient ({len(self.params)} "
                "parameters): run pass 1's forward and backward on the model whose "
                "parameters this optimizer holds first. Nothing was changed"
            )

    def _pass1_norm(self) -> Tensor:
        """‖g‖ of pass 1: one global norm over the current gradients (0 without any)."""
        gs = self.trainable_grads()
        return global_norm(gs, self.foreach) if gs else torch.zeros(())

    def _check_sliced(self, txn: StepTransaction) -> None:
        """A reduced-batch ascent must have run pass 1 on ``ascent_batch``'s slice."""
        if self.ascent_slice.slices and not txn.sliced:
            self.abort_step()
            raise RuntimeError(
                f"ascent_fraction={self.ascent_slice.fraction}: pass 1 must run on "
                "opt.ascent_batch(batch), called inside `with opt.first_pass():` (or inside "
                "the closure); it did not, so the ascent would have used the whole batch. "
                "Nothing was changed (effsam.sharpness_aware_step slices by itself)"
            )

    def _collect(self, keep: list[bool] | None) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """The tensors to perturb (kept by the mask, with a gradient), their pass-1
        gradients and their coefficients ρ · scale (ρ of their param group)."""
        params = self.params
        self.mask.prepare(params)
        ps: list[Tensor] = []
        gs: list[Tensor] = []
        coefs: list[float] = []
        scale = self.mask.scale
        index = 0
        for group in self.param_groups:
            rho = self._rho(group)
            for p in group["params"]:
                kept = keep is None or keep[index]
                index += 1
                if p.grad is None or not kept:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("sharpness-aware optimizers do not support sparse gradients")
                ps.append(p)
                gs.append(p.grad)
                coefs.append(rho * scale)
        return ps, gs, coefs

    def _ascend(
        self,
        txn: StepTransaction,
        ps: list[Tensor],
        gs: list[Tensor],
        coefs: list[float],
        zero_grad: bool,
    ) -> bool:
        """θ ← θ + ε by the kernel (which takes its own norm: of T·g, masked), θ kept in
        the backups; a non-finite norm skips the step."""
        self.update.on_ascent(self.state, self.params, ps, gs, txn)
        masks = self.mask.element_masks(ps)
        if masks is not None and all(m is None for m in masks):
            masks = None
        # zero_grad=False leaves the gradients: ε is then formed in the parameters (after
        # the backup took θ), unless noise must be added to g or the ascent policy cannot
        # apply T in place: then on a copy of the gradients
        keep = not zero_grad
        if keep and (self.ascent_slice.noise or not isinstance(self.ascent, InPlaceAscent)):
            gs, keep = [g.clone() for g in gs], False
        self.ascent_slice.add_noise_(gs, self.foreach)
        backups = [self._backup(p) for p in ps]
        done, norm = ascend_(
            ps,
            gs,
            backups,
            coefs=coefs,
            ascent=self.ascent,
            masks=masks,
            normalise_masked=self.mask.normalise_masked,
            eps_denominator=self.eps_denominator,
            foreach=self.foreach,
            check_finite=self.check_finite,
            keep_grads=keep,
        )
        if not done:
            return self._skip_pass1("pass 1", norm, zero_grad)
        txn.perturbed = list(zip(ps, backups))
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return True

    def _skip_pass1(self, where: str, norm: Tensor | None, zero_grad: bool) -> bool:
        """Pass 1 was not finite: nothing is perturbed (a single-pass method's moved θ is
        put back), BN buffers are put back, and :meth:`second_step` will not step."""
        self.restore()
        txn = self._open_step()
        txn.ascended = True
        txn.pass1_skipped = True
        txn.restore_bn()
        self._skip(where, norm)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return False

    def _start_plain(self) -> bool:
        """A plain step: pass 1's gradient (after the method's own transform) is the
        update. Until :meth:`second_step`, a backward into the parameters (a pass 2 that
        should not have run) is detected by a post-accumulate-grad hook; edits such as
        clipping are allowed."""
        txn = self._open_step()
        self.update.plain_update(self.state, self.params, txn)
        txn.plain_backward = False

        def hook(_: Tensor) -> None:
            txn.plain_backward = True

        txn.plain_hooks = [
            p.register_post_accumulate_grad_hook(hook) for p in self.params if p.requires_grad
        ]
        return False

    def _single_pass_done(self) -> bool:
        txn = self._open_step()
        if not txn.pre_pass1_done:
            txn.ascended = False
            raise RuntimeError(
                f"{type(self).__name__} moves the weights before pass 1: run pass 1 inside "
                "`with opt.first_pass():` (or use opt.step(closure) or "
                "effsam.sharpness_aware_step)"
            )
        txn.single_pass_moved = bool(txn.perturbed)
        self.restore()
        txn.pre_pass1_done = False
        return self._start_plain()

    def _on_restore(self) -> None:
        """θ is being restored: undo a perturbation kept outside the weights (Flat-LoRA's
        patched forwards)."""

    def _backup(self, p: Tensor) -> Tensor:
        state = self.state[p]
        buf = state.get("theta")
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = state["theta"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf

    @final
    @eager
    @torch.no_grad()
    def restore(self) -> None:
        """Load back the exact pre-ascent weights (a copy, never θ + ε − ε)."""
        self._on_restore()
        txn = self._txn
        if txn is None:
            return
        if txn.perturbed:
            ps = [p for p, _ in txn.perturbed]
            backups = [b for _, b in txn.perturbed]
            for idx in group_by_device_and_dtype(ps):
                _copy_([ps[i] for i in idx], [backups[i] for i in idx], self.foreach)
        txn.perturbed = []

    @final
    @eager
    @fires_step_hooks
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restore θ and step the base optimizer with the current (pass-2) gradients — or,
        after a plain scheduled step, with pass 1's. Returns False if the step was skipped
        (non-finite gradients in either pass)."""
        txn = self._txn
        if txn is None or not txn.ascended:
            raise RuntimeError(
                "second_step called without first_step: call first_step() after pass 1's "
                "backward (or use opt.step(closure) / effsam.sharpness_aware_step)"
            )
        plain = txn.plain_hooks is not None
        if plain and txn.plain_backward:
            self.abort_step()
            raise RuntimeError(
                "a backward ran after a plain scheduled step: first_step() returned False, "
                "so this step is one forward/backward and pass 2 must not run (check the "
                "return value: `if opt.first_step(): <pass 2>`); nothing was stepped"
            )
        self.restore()
        skipped = txn.pass1_skipped
        if not skipped and self.check_finite:
            gs = self.trainable_grads()
            if gs:
                norm = global_norm(gs, self.foreach)
                if not bool(torch.isfinite(norm)):
                    self._skip("pass 2", norm)
                    skipped = True
            if not skipped and txn.bn_watch and not txn.bn_finite():
                # (a reduced-batch ascent's statistics come from pass 2)
                self._skip("BatchNorm running statistics", None)
                skipped = True
        if skipped:
            txn.restore_bn()
        if not skipped:
            update, state, params = self.update, self.state, self.params
            if not plain:
                update.before_descent(state, params, txn, txn.selected_fraction)
            self.last_selected_fraction = txn.selected_fraction
            update.on_update(state, params, txn)
            self.base.step()
            update.after_update(state, params, txn)
            self.steps += 1
        self.last_step_skipped = skipped
        aware = not plain or txn.single_pass_moved
        self.last_step_sharpness_aware = aware
        self.sharpness_aware_steps += int(aware)
        self.schedule.commit()
        self._end_step()
        # LR schedulers attached to the wrapper check that its step() was called.
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return not skipped

    def _end_step(self) -> None:
        """The step is over: drop its transaction."""
        if self._txn is not None:
            self._txn.end()
        self._txn = None

    @final
    @eager
    def abort_step(self) -> None:
        """Undo a step that failed part-way: weights restored, mask draw, mask refresh and
        schedule rolled back, watched BN buffers put back, gradients cleared. The base
        optimizer has not been stepped."""
        if self._txn is not None:
            self._txn.rollback(self)
        self._end_step()
        self.zero_grad(set_to_none=True)

    def _skip(self, where: str, norm: Tensor | None) -> None:
        self.skipped_steps += 1
        what = f"gradient norm ({float(norm)}) in {where}" if norm is not None else where
        warnings.warn(
            f"effsam: non-finite {what}; step skipped, weights and BatchNorm statistics "
            f"restored, base optimizer not stepped (skipped so far: {self.skipped_steps})",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )

    @final
    @eager_frame
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One sharpness-aware step with a torch-standard closure (zero grads, forward,
        backward, return loss), called twice. Returns the pass-1 loss.

        The closure must leave gradients (else a RuntimeError; a first call returning None
        with no gradient skips the step, as a framework's skipped batch). Without a
        closure, ``step()`` finishes a step begun with :meth:`first_step` (a framework ran
        pass 2's backward itself) and is an error otherwise. The step hooks fire once,
        from torch's wrapper of ``step``."""
        with entered(self, "step"):  # (second_step inside fires no hooks of its own)
            if closure is None:
                return step_without_closure(self)
            closure = checked_closure(self, closure)
            if self.selection.needs_per_sample:
                raise RuntimeError(
                    f"sample selection ({self.selection.name}, gamma={self.selection.gamma}) "
                    "cannot work through a closure: use effsam.sharpness_aware_step(model, "
                    "opt, batch, loss_fn) with a per-sample loss_fn"
                )
            if self.mask.needs_data and self.mask_refresh_due():
                raise RuntimeError(
                    f"the {self.mask.name!r} mask is due for a refresh from data at step "
                    f"{self.steps}, which step(closure) cannot do: call opt.refresh_mask("
                    "model, batch, loss_fn) when opt.mask_refresh_due() before "
                    "opt.step(closure), or use effsam.sharpness_aware_step"
                )
            try:
                with torch.enable_grad(), self.first_pass():
                    loss = closure()
                if self.first_step(zero_grad=True):
                    with torch.enable_grad():
                        closure()
            except SkipStep:
                self.abort_step()
                return None  # the closure skipped the batch: nothing was changed
            except BaseException:
                self.abort_step()
                raise
            self.second_step()
            return loss

    # ------------------------------------------------------------------ sample selection
    def select(self, loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        """Indices of the samples pass 2 uses (``None``: all), by the selection policy.

        At ρ = 0 in every param group there is no perturbation, so there is no sharpness
        to select by (every ℓ_i(θ + ε) − ℓ_i(θ) is 0): the whole batch is used and the
        step is exactly the base optimizer's, for every selection policy."""
        if all(self._rho(g) == 0 for g in self.param_groups):
            return None
        idx = self.selection.select(loss_before, loss_after)
        offered = loss_before if loss_before is not None else loss_after
        if offered is not None:  # the step's share selected, over its micro-batches
            self._open_step().record_selection(
                offered.numel() if idx is None else idx.numel(), offered.numel()
            )
        return idx

    # ------------------------------------------------------------------ masks needing data
    @final
    @eager
    def mask_refresh_due(self) -> bool:
        """Whether the mask policy wants :meth:`refresh_mask` before the next step."""
        return self.mask.refresh_due(self.steps)

    @final
    @eager
    @checks_sharding
    def refresh_mask(
        self, model: torch.nn.Module | None, batch: Any, loss_fn: Callable | None
    ) -> bool:
        """Recompute a data-dependent mask (SSAM-F's Fisher, SSAM-D's drop/grow). Inside a
        step (after :meth:`begin_step`, as :func:`effsam.sharpness_aware_step` and the
        data-free refreshes do) it is part of the step: :meth:`abort_step` undoes it too.
        Called between steps (by hand, before ``opt.step(closure)``), it is an operation of
        its own: a later step that fails rolls back to the state after it."""
        txn = self._txn
        if txn is None or not (txn.begun or txn.ascended):
            # Outside a step (a manual refresh before it): a finished operation of its own,
            # which a later failed step must not undo.
            return self.mask.refresh(model, self.params, batch, loss_fn, self.steps)
        undo = self.mask.state_dict() if txn.refresh_undo is None else txn.refresh_undo
        changed = self.mask.refresh(model, self.params, batch, loss_fn, self.steps)
        txn.refresh_undo = undo
        return changed

    # ------------------------------------------------------------------ state
    def _policy_names(self) -> dict[str, str]:
        return {
            "optimizer": type(self).__name__,
            "ascent": f"{type(self.ascent).__name__}:{self.ascent.name}",
            "mask": f"{type(self.mask).__name__}:{self.mask.name}" + f":{self.mask.granularity}",
            "selection": f"{type(self.selection).__name__}:{self.selection.name}",
            "schedule": f"{type(self.schedule).__name__}:{self.schedule.name}",
            "update": f"{type(self.update).__name__}:{self.update.name}",
        }

    @final
    @runs_state_dict_hooks
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus an ``"effsam"`` entry with the wrapper's
        counters, the names of its policies and every policy's state."""
        state = self.base.state_dict()
        state[_WRAPPER_KEY] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "policies": self._policy_names(),
            "sharpness_aware_steps": self.sharpness_aware_steps,
            "mask": self.mask.state_dict(),
            "selection": self.selection.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ascent_slice": self.ascent_slice.state_dict(),
            **self.settings,
            **self.update.state_dict(self.state, self.params),
        }
        return state

    #: settings a saved state must have been made with (checked on load, by key, where
    #: the saved state has them; e.g. Flat-LoRA's noise seed)
    settings: dict[str, Any] = {}

    def _check_settings(self, ours: dict[str, Any]) -> None:
        for key, mine in self.settings.items():
            if key in ours and ours[key] != mine:
                raise ValueError(
                    f"cannot load a {type(self).__name__} state saved with {key} = "
                    f"{ours[key]} into one with {mine}. Nothing was loaded."
                )

    def _check_compatible(self, ours: Any) -> None:
        if not isinstance(ours, dict) or not {"steps", "skipped_steps", "mask"} <= set(ours):
            raise ValueError("state_dict's 'effsam' entry is malformed (not saved by effsam?)")
        saved = ours.get("policies")
        mine = self._policy_names()
        if saved is not None:
            keys: tuple[str, ...] = ("optimizer", "ascent", "mask", "selection", "schedule")
            if self.update.state_dict(self.state, self.params):
                # a stateful update policy loads only its own kind's state (a stateless one,
                # ESAM-mix's, is a setting: ESAM's states load either way)
                keys += ("update",)
            differ = [k for k in keys if k in saved and saved.get(k) != mine[k]]
            if differ:
                detail = "; ".join(f"{k}: saved {saved.get(k)!r}, here {mine[k]!r}" for k in differ)
                raise ValueError(
                    f"cannot load the state of another optimizer ({saved.get('optimizer')}) "
                    f"into this {mine['optimizer']}: {detail}. Nothing was loaded."
                )
            return
        # States saved before the policy names were recorded (effsam 0.2.0 as released, and
        # earlier): run checkpoints of that time have no digest, and the toolkit still
        # resumes them (effsam.train.checkpoint, legacy=True). Compare the mask's fields.
        legacy = {"next_masks"}
        have = set(self.mask.state_dict()) - legacy
        got = set(ours["mask"]) - legacy
        if have != got:
            raise ValueError(
                f"cannot load this state into {mine['optimizer']}: it holds a mask policy "
                f"state with fields {sorted(got)}, this optimizer's {mine['mask']} has "
                f"{sorted(have)}. Nothing was loaded."
            )

    @final
    @runs_load_state_dict_hooks
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state saved by :meth:`state_dict` of the same kind of optimizer.

        Atomic: a state of another optimizer (other mask or selection policy, or a plain
        optimizer's) raises a ValueError naming the difference, and a failure part-way
        leaves this optimizer as it was.
        """
        state_dict = dict(state_dict)
        ours = state_dict.pop(_WRAPPER_KEY, None)
        if ours is None:
            raise ValueError(
                "state_dict has no 'effsam' entry: it was not saved by a SharpnessAware "
                "optimizer (load a plain optimizer's state into opt.base instead)"
            )
        self._check_compatible(ours)
        self._check_settings(ours)
        counters = {
            key: _saved_count(ours, key)
            for key in ("steps", "skipped_steps", "sharpness_aware_steps")
            if key in ours
        }
        for key in ("mask", "selection", "schedule", "ascent_slice"):
            if ours.get(key) is not None and not isinstance(ours[key], dict):
                raise ValueError(
                    f"state_dict['effsam'][{key!r}] is damaged: expected a dict, got "
                    f"{type(ours[key]).__name__} {ours[key]!r:.60}. Nothing was loaded."
                )
        before = Snapshot(self, whole=True)
        try:
            self.base.load_state_dict(state_dict)
            self.param_groups = self.base.param_groups
            self.steps = counters["steps"]
            self.skipped_steps = counters["skipped_steps"]
            self.sharpness_aware_steps = counters.get("sharpness_aware_steps", self.steps)
            _load_part("mask", self.mask.load_state_dict, ours["mask"])
            _load_part("selection", self.selection.load_state_dict, ours.get("selection") or {})
            if "schedule" in ours:
                _load_part("schedule", self.schedule.load_state_dict, ours["schedule"])
            self._check_slice_state(ours.get("ascent_slice"))
            slice_state = ours.get("ascent_slice") or {}
            _load_part("ascent_slice", self.ascent_slice.load_state_dict, slice_state)
            _load_part(
                "the update policy's entries",
                lambda saved: self.update.load_state_dict(saved, self.state, self.params),
                ours,
            )
        except Exception:
            before.rollback(self)
            raise

    def _check_slice_state(self, saved: Any) -> None:
        """A state saved with another ascent fraction or noise is refused by name."""
        if not saved:
            if self.ascent_slice.slices or self.ascent_slice.noise:
                raise ValueError(
                    "the saved state has no reduced-batch ascent, this optimizer has "
                    f"ascent_fraction={self.ascent_slice.fraction}, "
                    f"ascent_noise={self.ascent_slice.noise}. Nothing was loaded."
                )
            return
        for key in ("fraction", "noise"):
            mine = getattr(self.ascent_slice, key)
            if key in saved and float(saved[key]) != mine:
                raise ValueError(
                    f"cannot load a state saved with ascent_{key}={saved[key]} into an "
                    f"optimizer with ascent_{key}={mine}. Nothing was loaded."
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        parts = [f"rho={self.defaults['rho']}", f"ascent={self.ascent.name}"]
        if self.ascent_slice.slices or self.ascent_slice.noise:
            parts.append(f"ascent_slice({self.ascent_slice.extra_repr()})")
        for policy in (self.ascent, self.mask, self.selection, self.schedule, self.update):
            extra_repr = getattr(policy, "extra_repr", None)  # (a Policy's; optional)
            extra = extra_repr() if extra_repr is not None else ""
            if extra:
                parts.append(f"{policy.name}({extra})")
        return f"{type(self).__name__}({', '.join(parts)}, base={type(self.base).__name__})"


def _saved_count(ours: dict[str, Any], key: str) -> int:
    """A saved counter: a non-negative integer (a 0-d integer tensor too, as a
    checkpointing framework may store it), else a ValueError naming it."""
    value = ours[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"state_dict['effsam'][{key!r}] is damaged: {value!r:.60} is not a non-negative "
            "integer. Nothing was loaded."
        )
    return value


class DamagedStateError(ValueError, TypeError):
    """A damaged part of a saved ``"effsam"`` entry (a ValueError; also a TypeError, as
    the policies' own type checks raised before)."""


def _load_part(key: str, load: Callable[[Any], None], state: Any) -> None:
    """Load one part of the ``"effsam"`` entry; a damaged part is a ValueError naming it
    (the caller then puts everything back)."""
    try:
        load(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise DamagedStateError(
            f"state_dict['effsam'][{key!r}] is damaged ({type(err).__name__}: {err}). Nothing "
            "was loaded."
        ) from err


# ---------------------------------------------------------------------- params-first
def _wrapper_keywords() -> set[str]:
    """The keyword-only arguments of :class:`SharpnessAware` (``foreach``, …)."""
    sig = inspect.signature(SharpnessAware.__init__)
    return {n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def resolve_base(
    params: Any, base: Any, kwargs: dict[str, Any], who: str
) -> tuple[Optimizer, dict[str, Any]]:
    """The base optimizer instance and the keywords left for the wrapper: the
    params-first constructor form shared by the methods' constructors
    (``effsam.SAM(model.parameters(), base=torch.optim.SGD, lr=0.1, rho=0.05)``).

    Two forms: ``who(optimizer_instance, ...)`` (or ``base=optimizer_instance``), and
    ``who(params, base=OptimizerClass, **kwargs)``: then the keywords the wrapper takes
    (``foreach``, ``check_finite``, …) stay with it, every other one — and everything in
    ``base_kwargs={...}`` — goes to ``OptimizerClass(params, ...)``.
    """
    base_kwargs = kwargs.pop("base_kwargs", None)
    if isinstance(params, Optimizer):
        if base is not None:
            raise TypeError(
                f"{who}: got an optimizer instance and base={base!r}: give either the instance, "
                "or params with base=<an optimizer class>"
            )
        base, params = params, None
    if isinstance(base, Optimizer):
        if params is not None:
            raise TypeError(
                f"{who}: base is an optimizer instance, which already holds its parameters: "
                "drop the params argument (or pass base=<the optimizer class>)"
            )
        if base_kwargs:
            raise TypeError(f"{who}: base_kwargs needs base=<an optimizer class>, not an instance")
        return base, kwargs
    if params is None:
        raise TypeError(
            f"{who} needs an optimizer: {who}(torch.optim.SGD(params, lr=...)) or "
            f"{who}(params, base=torch.optim.SGD, lr=...)"
        )
    if not (isinstance(base, type) and issubclass(base, Optimizer)):
        raise TypeError(
            f"{who}: the first argument is a {type(params).__name__}, not an optimizer "
            f"instance, so base must be a torch.optim.Optimizer subclass, got {base!r:.80} "
            f"(e.g. {who}(params, base=torch.optim.SGD, lr=0.1))"
        )
    ours = _wrapper_keywords()
    wrapper_kw = {k: v for k, v in kwargs.items() if k in ours}
    base_kw = {k: v for k, v in kwargs.items() if k not in ours}
    if base_kwargs:
        base_kw.update(base_kwargs)
    return base(params, **base_kw), wrapper_kw
