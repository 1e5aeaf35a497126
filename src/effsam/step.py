"""One training step of any optimizer, sharpness-aware or not, done right.

:func:`sharpness_aware_step` is the per-batch orchestration that needs the model:

* pass 1 under :meth:`SharpnessAware.first_pass` (SWP skips weight gradients of tensors
  it does not perturb) and, for a DDP model, under ``no_sync`` — forward AND backward —
  so each worker ascends with its own gradient (m-sharpness); ``sync_ascent=True``
  all-reduces the pass-1 gradient instead;
* BatchNorm statistics exactly as pass 1 left them;
* SDS: a no-grad forward at θ + ε, top-k selection, pass 2 on the sliced subset only;
* AMP: autocast (bf16/fp16) and a GradScaler unscaled once per pass; the whole step is
  skipped (weights restored, base not stepped, scaler backed off) if either pass overflows
  — under DDP on every worker together, even when only one worker's pass 1 overflowed;
* gradient accumulation over micro-batches, clipping of the final gradient;
* a failure part-way leaves weights, BN buffers, optimizer state and the GradScaler as
  they were;
* under DDP, the settings (ρ, β, γ, seed, …) are compared across workers at the first step.

The recipes (and what torch.compile does with SWP) are in docs/scaling.md.

With a plain ``torch.optim`` optimizer it is an ordinary training step with the same
AMP/accumulation/clipping handling, so one loop serves SGD and every SAM variant.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .batching import batch_size, index_batch, split_batch
from .bn import capture_bn_stats, restore_bn, snapshot_bn, use_bn_stats
from .optim.policy import PLAIN_STEP, StepPlan
from .optim.sharpness_aware import KeptFraction, SharpnessAware
from .parallel import (
    ObjectMemory,
    check_ddp_settings,
    find_ddp,
    is_compiled,
    mean_grad_sq_norm,
    step_settings,
    sync_ascent_grads,
    unwrap_model,
)

LossFn = Callable[[nn.Module, Any], Any]

_AUTOCAST = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class StepResult:
    """What one step did.

    Attributes:
        loss: mean pass-1 loss over the batch (detached 0-d tensor; no device sync).
        batch_size: samples in the batch.
        selected: samples pass 2 used (= batch_size without SDS; 0 if skipped early).
        kept_fraction: SWP's share of perturbed tensors / elements (None for plain steps).
        skipped: the update was skipped (non-finite gradients or AMP overflow).
        mask_refreshed: a data-dependent mask (SSAM) was refreshed before this step.
        aux: what ``loss_fn`` returned beside the losses in pass 1 (e.g. logits).
        sharpness_aware: the step was sharpness-aware (False: a plain base step, by the
            optimizer's schedule, or a plain optimizer).
        ascent_samples: samples pass 1 ran on in a two-pass step (< batch_size with a
            reduced-batch ascent); None for a step without a separate ascent pass.

    With a reduced-batch ascent (``ascent_fraction`` < 1) pass 1 sees only a slice, so
    ``loss`` and ``aux`` are pass 2's: the whole batch at θ + ε.
    """

    loss: Tensor
    batch_size: int
    selected: int
    kept_fraction: KeptFraction | None
    skipped: bool
    mask_refreshed: bool = False
    aux: Any = None
    sharpness_aware: bool = False
    ascent_samples: int | None = None


def _autocast_dtype(autocast: Any) -> torch.dtype | None:
    if autocast in (None, False, "off", "none", "fp32"):
        return None
    if isinstance(autocast, torch.dtype):
        if autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"Invalid autocast dtype: {autocast} (bfloat16 or float16)")
        return autocast
    if autocast in _AUTOCAST:
        return _AUTOCAST[autocast]
    raise ValueError(f"Invalid autocast: {autocast!r} (choose 'bf16', 'fp16' or 'off')")


def _split_loss(out: Any, n: int, per_sample: bool, micro: bool = False) -> tuple[Tensor, Any]:
    aux = None
    if isinstance(out, tuple) and len(out) == 2:
        out, aux = out
    if not isinstance(out, Tensor):
        raise TypeError(
            f"loss_fn must return a tensor of per-sample losses, got {type(out).__name__}"
        )
    if out.dim() == 0:
        # A scalar is the batch's loss as the caller normalises it (e.g. by its token
        # count): right for one pass over the whole batch, ambiguous otherwise.
        if per_sample or micro:
            need = "sample selection needs" if per_sample else "accumulation_steps > 1 needs"
            raise ValueError(
                f"loss_fn returned a scalar, but {need} per-sample losses of shape [{n}] "
                "(use reduction='none')"
            )
        return out, aux
    if out.shape != (n,):
        raise ValueError(f"loss_fn returned losses of shape {list(out.shape)}, expected [{n}]")
    return out, aux


#: The optimizers :func:`_warn_if_compiled` has warned about.
_COMPILE_WARNED = ObjectMemory()


def _warn_if_compiled(model: nn.Module, optimizer: SharpnessAware) -> None:
    """Once per optimizer: SWP and torch.compile work together but rarely pay off."""
    if optimizer in _COMPILE_WARNED or not is_compiled(model):
        return
    _COMPILE_WARNED.add(optimizer)
    warnings.warn(
        "effsam: SWP switches requires_grad per tensor in pass 1, and a torch.compile'd "
        "model is guarded on those flags: each new mask pattern recompiles, and once "
        "torch._dynamo.config.recompile_limit is reached an unseen pattern runs eagerly. "
        "Results stay right; see docs/scaling.md (torch.compile) for the trade-offs.",
        RuntimeWarning,
        stacklevel=3,
    )


def _reset_scaler(scaler: torch.amp.GradScaler, *optimizers: Any) -> None:
    """Forget this step's ``unscale_`` records after a failed step.

    Otherwise the next step's ``unscale_`` raises "unscale_() has already been called on
    this optimizer since the last update()". GradScaler has no public call for this
    (``update`` would also move the scale, which a failed step must not do).
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if isinstance(states, dict):
        for opt in optimizers:
            states.pop(id(opt), None)


def sharpness_aware_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: LossFn,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Any = None,
    accumulation_steps: int = 1,
    clip_grad_norm: float | None = None,
    sync_ascent: bool = False,
) -> StepResult:
    """One training step on ``batch``.

    Args:
        model: the module (plain, DDP-wrapped or compiled).
        optimizer: a :class:`SharpnessAware` optimizer, or any ``torch.optim`` optimizer
            (then: one forward/backward and a step).
        batch: a tensor, tuple/list or dict of tensors, all indexed on dim 0.
        loss_fn: ``loss_fn(model, batch)`` → per-sample losses of shape [b], or
            ``(losses, aux)``. A scalar is taken as the batch's loss only where nothing
            needs per-sample losses (no sample selection, no accumulation).
        scaler: a ``torch.amp.GradScaler`` for fp16.
        autocast: ``"bf16"``, ``"fp16"`` or ``None``.
        accumulation_steps: split the batch into this many micro-batches per pass.
        clip_grad_norm: clip the final (pass-2) gradient to this global norm.
        sync_ascent: under DDP, all-reduce the pass-1 gradient (one global ε) instead of
            each worker ascending with its own (m-sharpness, the default).

    Returns:
        A :class:`StepResult`.
    """
    step = _Step.prepare(
        model=model,
        optimizer=optimizer,
        batch=batch,
        loss_fn=loss_fn,
        scaler=scaler,
        autocast=autocast,
        accumulation_steps=accumulation_steps,
        clip_grad_norm=clip_grad_norm,
        sync_ascent=sync_ascent,
    )
    bn_start = snapshot_bn(model)
    try:
        # the step begins before a due mask refresh, so that a failure undoes the refresh
        # (and only it: a refresh made by hand before this call stays)
        decision = step.decide()  # sharpness-aware (True), plain (False), after pass 1 (None)
        if step.sam:
            # a skipped step (non-finite gradients or BN statistics) puts them back
            step.optimizer.watch_bn(bn_start)
        step.refresh_mask()
        step.preselect(decision, bn_start)  # K-SAM: both passes on the top k
        step.pass1(decision, bn_start)
        step.check_gradients()
        if not step.sam:
            result = step.torch_step()
            if result.skipped:  # a GradScaler's overflow: the batch left no trace
                restore_bn(bn_start)
            return result
        if decision is None:
            decision = step.decide_after_pass1()  # AE-SAM
        if not decision or step.plan.one_pass:
            return step.one_pass_step()
        skipped = step.ascend()
        if skipped is not None:
            return skipped
        selected = step.pass2()
        return step.descend(selected)
    except BaseException:
        step.rollback(bn_start)
        raise


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter is (the CPU for a model without any): the
    device of the autocast region and of the step's loss accumulators."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclass
class _Step:
    """One call of :func:`sharpness_aware_step`: its inputs, and what the phases leave for
    the next (the pass-1 losses, the reported loss and aux, the poison flag)."""

    model: nn.Module
    optimizer: Any
    batch: Any
    loss_fn: LossFn
    scaler: torch.amp.GradScaler | None  # None unless enabled
    amp_dtype: torch.dtype | None
    accumulation_steps: int
    clip_grad_norm: float | None
    sync_ascent: bool
    sam: bool
    b: int
    micro: list[Any]
    ddp: Any
    device_type: str
    refreshed: bool = False
    b_run: int = 0
    losses_1: list[Tensor] = field(default_factory=list)
    total: Tensor | None = None
    aux: Any = None
    poison: bool = False
    sliced: bool = False
    ascent_samples: int | None = None
    #: the step's shape, from the optimizer's policies (read once the step has begun)
    plan: StepPlan = PLAIN_STEP
    bn_stats_1: list[dict[Any, Any]] = field(default_factory=list)

    @classmethod
    def prepare(
        cls,
        *,
        model: nn.Module,
        optimizer: Any,
        batch: Any,
        loss_fn: LossFn,
        scaler: torch.amp.GradScaler | None,
        autocast: Any,
        accumulation_steps: int,
        clip_grad_norm: float | None,
        sync_ascent: bool,
    ) -> _Step:
        """Validate the arguments (nothing has changed yet) and build the context."""
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(
                f"Invalid accumulation_steps: {accumulation_steps!r} (must be an int >= 1)"
            )
        if clip_grad_norm is not None and not (clip_grad_norm > 0):
            raise ValueError(f"Invalid clip_grad_norm: {clip_grad_norm!r} (must be > 0)")
        amp_dtype = _autocast_dtype(autocast)
        use_scaler = scaler is not None and scaler.is_enabled()
        sam = isinstance(optimizer, SharpnessAware)
        if use_scaler and sam and not optimizer.check_finite:
            raise ValueError("a GradScaler needs the optimizer's check_finite=True")
        b = batch_size(batch)
        if b == 0:
            raise ValueError("sharpness_aware_step got an empty batch (0 samples)")
        micro = split_batch(batch, accumulation_steps) if accumulation_steps > 1 else [batch]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not any(p.requires_grad for p in params):
            raise ValueError(
                f"the optimizer holds no trainable parameter ({len(params)} parameters, every "
                "one with requires_grad=False): there is nothing to train"
            )
        mine = {id(p) for p in params}
        if not any(id(p) in mine for p in model.parameters()):
            raise ValueError(
                f"the model ({type(model).__name__}) holds none of the optimizer's "
                f"{len(params)} parameters: pass the model the optimizer was built for"
            )
        ddp = find_ddp(model)
        if ddp is not None:
            if getattr(ddp, "static_graph", False) and (sam or accumulation_steps > 1):
                # DDP's static-graph mode asserts inside its reducer on a no_sync backward
                # in its first iteration, and SWP changes the set of used tensors every step.
                raise ValueError(
                    "DistributedDataParallel(static_graph=True) cannot run pass 1 (or "
                    "accumulation micro-batches) under no_sync: build the DDP model without "
                    "static_graph"
                )
            settings = step_settings(optimizer, sync_ascent, accumulation_steps)
            check_ddp_settings(optimizer, settings)
        device_type = _model_device(model).type
        return cls(
            model=model,
            optimizer=optimizer,
            batch=batch,
            loss_fn=loss_fn,
            scaler=scaler if use_scaler else None,
            amp_dtype=amp_dtype,
            accumulation_steps=accumulation_steps,
            clip_grad_norm=clip_grad_norm,
            sync_ascent=sync_ascent,
            sam=sam,
            b=b,
            micro=micro,
            ddp=ddp,
            device_type=device_type,
        )

    # ------------------------------------------------------------------ passes
    def forward(self, mb: Any) -> tuple[Tensor, Any]:
        dtype = self.amp_dtype
        with torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None):
            out = self.loss_fn(self.model, mb)
        per_sample = self.plan.per_sample
        return _split_loss(out, batch_size(mb), per_sample, self.accumulation_steps > 1)

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def no_sync(self, local: bool) -> Any:
        return self.ddp.no_sync() if self.ddp is not None and local else contextlib.nullcontext()

    # ------------------------------------------------------------------ phases
    def refresh_mask(self) -> None:
        if self.sam and self.optimizer.mask_refresh_due():
            model = unwrap_model(self.model)
            self.refreshed = self.optimizer.refresh_mask(model, self.batch, self.loss_fn)
        self.optimizer.zero_grad(set_to_none=True)

    def decide(self) -> bool | None:
        """Begin the step: the schedule's decision, and the step's plan."""
        if not self.sam:
            return False
        decision = self.optimizer.begin_step()
        self.plan = self.optimizer.step_plan()
        return decision

    def preselect(self, decision: bool | None, bn_start: Any) -> None:
        """K-SAM: a no-grad forward ranks each micro-batch, both passes see its top k (the
        step reports the whole batch's loss and aux)."""
        if decision is not False and self.plan.preselect:
            self.micro, self.total, self.aux = _preselect(
                self.optimizer, self.micro, self.forward, self.b
            )
            restore_bn(bn_start)  # the ranking forward must not move BN statistics
        self.b_run = sum(batch_size(mb) for mb in self.micro)

    def pass1(self, decision: bool | None, bn_start: Any) -> None:
        """Pass 1 at θ: local to this worker (no_sync, forward AND backward) when a second
        pass may follow (m-sharpness; sync_ascent reduces it by hand later) or between
        accumulation micro-batches; synced on the last micro-batch of a one-pass step.

        A reduced-batch ascent runs on each micro-batch's slice, weighted by the slices'
        sizes, and leaves no trace in the BN running statistics (pass 2 updates them)."""
        opt = self.optimizer
        plan = self.plan
        two_pass = self.sam and decision is not False and not plan.one_pass
        total = torch.zeros((), device=_model_device(self.model))
        aux = None
        with opt.first_pass() if self.sam else contextlib.nullcontext():
            parts = self.micro
            if two_pass and plan.pass1_slice:
                # a slice on a sharpness-aware step (first_step checks that it was taken);
                # a step deciding after pass 1 (AE-SAM) runs it on the whole batch
                parts = [opt.ascent_batch(mb) for mb in self.micro]
                self.sliced = decision is True
            n1 = sum(batch_size(mb) for mb in parts) if self.sliced else self.b_run
            capture = two_pass and plan.bn_whole_batch and not plan.rank_at_perturbed
            for i, mb in enumerate(parts):
                last = i == len(parts) - 1
                stats: dict[Any, Any] = {}
                self.bn_stats_1.append(stats)
                with (
                    self.no_sync(two_pass or not last),
                    capture_bn_stats(self.model, stats) if capture else contextlib.nullcontext(),
                ):
                    losses, aux_i = self.forward(mb)
                    loss = _mean(losses) * (batch_size(mb) / n1)
                    self.backward(loss)
                self.losses_1.append(losses.detach())
                total = total + loss.detach()
                aux = aux_i if len(parts) == 1 else _merge_aux(aux, aux_i)
        if two_pass:
            self.ascent_samples = n1
        if self.sliced:
            restore_bn(bn_start)  # the slice's statistics must not reach the running ones
            # pass 2 reports the whole batch's loss and aux; until then (a step skipped by
            # a non-finite pass 1 ends here) the slice's loss, and no aux
            self.total, self.aux = total, None
            return
        if self.total is None:  # (K-SAM has set the whole batch's already)
            self.total, self.aux = total, aux
        if self.sam and opt.pass1_keep is not None and not all(opt.pass1_keep):
            _warn_if_compiled(self.model, opt)

    def check_gradients(self) -> None:
        """Pass 1 must have left a gradient on some parameter of the optimizer: otherwise
        the loss does not depend on them and the step would train nothing (and still be
        counted). An error; :meth:`rollback` leaves everything as it was."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not any(p.grad is not None for p in params):
            raise RuntimeError(
                f"no parameter of the optimizer received a gradient in pass 1 ({len(params)} "
                "parameters): loss_fn's loss does not depend on them (is the model the one "
                "the optimizer was built for?). Nothing was changed"
            )

    # ------------------------------------------------------------------ the step's end
    def finish(
        self,
        base_step: Callable[[], Any],
        *,
        unscale: Any = None,
        before_clip: Callable[[], Any] | None = None,
        clip: bool = True,
    ) -> Any:
        """The end of every step, written once: unscale (``unscale``: the object the
        GradScaler keys this gradient by; None: no unscaling here) → ``before_clip`` →
        clip the final gradient (unless ``clip`` is False) → ``base_step()`` → the
        scaler's update. Returns what ``base_step`` returns."""
        if self.scaler is not None and unscale is not None:
            self.scaler.unscale_(unscale)
        if before_clip is not None:
            before_clip()
        if clip and self.clip_grad_norm is not None:
            # After unscaling and DDP's all-reduce: the final gradient, the same on every
            # worker. (Clipping pass 1 would do nothing: the ascent normalises it away.)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        out = base_step()
        if self.scaler is not None:
            self.scaler.update()  # backs off if a pass recorded an overflow
        return out

    def result(
        self,
        *,
        selected: int,
        skipped: bool,
        sharpness_aware: bool,
        kept_fraction: KeptFraction | None = None,
        ascent_samples: int | None = None,
    ) -> StepResult:
        return StepResult(
            loss=self.total,  # type: ignore[arg-type]
            batch_size=self.b,
            selected=selected,
            kept_fraction=kept_fraction,
            skipped=skipped,
            mask_refreshed=self.refreshed,
            aux=self.aux,
            sharpness_aware=sharpness_aware,
            ascent_samples=ascent_samples,
        )

    def torch_step(self) -> StepResult:
        """A plain ``torch.optim`` optimizer: its step (through the GradScaler, which
        unscales by itself unless clipping needed it first)."""
        opt, scaler = self.optimizer, self.scaler
        if scaler is None:
            self.finish(opt.step)
            skipped = False
        else:
            scale = scaler.get_scale()
            unscale = opt if self.clip_grad_norm is not None else None
            self.finish(lambda: scaler.step(opt), unscale=unscale)
            skipped = scaler.get_scale() < scale
        return self.result(selected=self.b, skipped=skipped, sharpness_aware=False)

    def decide_after_pass1(self) -> bool:
        """AE-SAM: from pass 1's gradient norm; under m-sharpness from the mean over workers
        of the local ‖g‖², so that every worker takes the same branch."""
        opt = self.optimizer
        decision = opt.decide_after_pass1(mean_grad_sq_norm(opt, self.ddp, self.scaler))
        if not decision and self.ddp is not None:
            sync_ascent_grads(opt)  # pass 1 was local: reduce it by hand
        return decision

    def one_pass_step(self) -> StepResult:
        """A plain step of a sharpness-aware optimizer (its schedule said so, or a
        single-pass method): pass 1's gradient, unscaled (keyed by the wrapper), after
        ``first_step`` recorded the plain step (MSAM: restores θ), clipped, goes to the
        base optimizer."""
        opt = self.optimizer
        ok = self.finish(opt.second_step, unscale=opt, before_clip=opt.first_step)
        aware = bool(opt.last_step_sharpness_aware)  # MSAM: its one pass moved θ
        return self.result(selected=self.b_run, skipped=not ok, sharpness_aware=aware)

    def ascend(self) -> StepResult | None:
        """θ ← θ + ε; a StepResult if the step ends here (a non-finite pass 1)."""
        opt = self.optimizer
        if self.ddp is not None and self.sync_ascent:
            sync_ascent_grads(opt)
        if self.scaler is not None:
            self.scaler.unscale_(opt)  # pass 1, keyed by the wrapper
        if opt.first_step(zero_grad=True):
            return None
        # A non-finite pass 1 skips the step. Under m-sharpness only this worker may know:
        # returning early would leave the others waiting in pass 2's all-reduce (and in
        # DDP's buffer broadcasts). So this worker runs pass 2 anyway, at θ, with a NaN
        # loss; the all-reduce hands the NaN to every worker and all of them skip (and
        # back their scalers off) together. With sync_ascent or one process everyone
        # already saw the same gradient, and stopping here is safe.
        if self.ddp is None or self.sync_ascent:
            # nothing to unscale or clip: second_step restores nothing, counts the skip
            self.finish(opt.second_step, clip=False)
            return self.result(
                selected=0,
                skipped=True,
                sharpness_aware=True,
                kept_fraction=opt.last_kept,
                ascent_samples=self.ascent_samples,
            )
        self.poison = True
        return None

    def pass2(self) -> int:
        """Pass 2 at θ + ε (SDS: on the selected samples), BN statistics kept as pass 1
        left them. Returns the number of samples it used."""
        opt = self.optimizer
        if self.sliced:
            return self._pass2_after_slice()
        bn_after_pass1 = snapshot_bn(self.model)
        selected = 0
        plan = self.plan
        sds = plan.pass2 != "batch"
        try:
            for i, mb in enumerate(self.micro):
                sub = mb
                if plan.pass2 == "ranked-in-pass2":
                    selected += self._pass2_whole_batch(i, mb)
                    continue
                stats = self.bn_stats_1[i] if plan.bn_whole_batch else None
                if sds:
                    after = None
                    if plan.rank_at_perturbed:
                        if stats is not None:
                            stats = {}  # the whole batch's statistics, at θ + ε
                        with (
                            torch.no_grad(),
                            (
                                capture_bn_stats(self.model, stats)
                                if stats is not None
                                else contextlib.nullcontext()
                            ),
                        ):
                            after, _ = self.forward(mb)
                    if after is not None and not bool(torch.isfinite(after).all()):
                        # a non-finite loss at θ + ε: no ranking (it would select too few
                        # samples, or none); the whole micro-batch, poisoned, skips the step
                        self.poison, idx = True, None
                    else:
                        idx = opt.select(self.losses_1[i], after)
                    if idx is not None:
                        sub = index_batch(mb, idx)
                    else:
                        stats = None  # the whole batch: its own statistics
                with (
                    self.no_sync(i < len(self.micro) - 1),
                    use_bn_stats(self.model, stats) if stats else contextlib.nullcontext(),
                ):
                    losses, _ = self.forward(sub)
                    loss = _mean(losses) * (batch_size(mb) / self.b_run)
                    self.backward(loss * float("nan") if self.poison else loss)
                selected += batch_size(sub)
        finally:
            restore_bn(bn_after_pass1)
        return selected

    def _pass2_after_slice(self) -> int:
        """Pass 2 after a reduced-batch ascent: the whole batch at θ + ε, which also
        updates the BN running statistics (once per micro-batch, as a plain step would)
        and gives the step's reported loss and aux."""
        total = torch.zeros((), device=_model_device(self.model))
        aux = None
        for i, mb in enumerate(self.micro):
            with self.no_sync(i < len(self.micro) - 1):
                losses, aux_i = self.forward(mb)
                loss = _mean(losses) * (batch_size(mb) / self.b_run)
                self.backward(loss * float("nan") if self.poison else loss)
            total = total + loss.detach()
            aux = aux_i if len(self.micro) == 1 else _merge_aux(aux, aux_i)
        self.total, self.aux = total, aux
        return self.b_run

    def _pass2_whole_batch(self, i: int, mb: Any) -> int:
        """The control's pass 2 on one micro-batch: the whole of it forwarded at θ + ε,
        the samples ranked from that forward, only the selected ones' mean loss
        back-propagated (weighted as SDS weighs its subset)."""
        opt = self.optimizer
        with self.no_sync(i < len(self.micro) - 1):
            losses, _ = self.forward(mb)
            if bool(torch.isfinite(losses.detach()).all()):
                idx = opt.select(self.losses_1[i], losses.detach())
            else:  # no ranking of non-finite losses: the whole batch's NaN skips the step
                idx = None
            chosen = losses if idx is None else losses[idx]
            loss = _mean(chosen) * (batch_size(mb) / self.b_run)
            self.backward(loss * float("nan") if self.poison else loss)
        return chosen.numel()

    def descend(self, selected: int) -> StepResult:
        """θ restored, the final gradient unscaled and clipped, the base optimizer steps."""
        opt = self.optimizer
        ok = self.finish(opt.second_step, unscale=opt.base)  # pass 2, keyed by the base
        return self.result(
            selected=selected,
            skipped=not ok,
            sharpness_aware=True,
            kept_fraction=opt.last_kept,
            ascent_samples=self.ascent_samples,
        )

    def rollback(self, bn_start: Any) -> None:
        """A failure part-way: weights, BN buffers, optimizer state and the scaler as they
        were before the step."""
        restore_bn(bn_start)
        if self.sam:
            self.optimizer.abort_step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            _reset_scaler(
                self.scaler, self.optimizer, getattr(self.optimizer, "base", self.optimizer)
            )


def _preselect(
    optimizer: SharpnessAware, micro: list[Any], forward: Callable, b: int
) -> tuple[list[Any], Tensor, Any]:
    """K-SAM: rank each micro-batch's samples by a no-grad forward at θ and keep the top k
    of each. Returns the subsets, the whole batch's mean loss and its aux (e.g. logits)."""
    subsets, total, aux = [], None, None
    with torch.no_grad():
        for mb in micro:
            losses, aux_i = forward(mb)
            # ρ = 0: the whole batch; non-finite losses are not ranked (the whole batch's
            # pass 1 then skips the step)
            finite = bool(torch.isfinite(losses.detach()).all())
            idx = optimizer.select(losses.detach(), None) if finite else None
            subsets.append(mb if idx is None else index_batch(mb, idx))
            part = _mean(losses) * (batch_size(mb) / b)
            total = part if total is None else total + part
            aux = aux_i if len(micro) == 1 else _merge_aux(aux, aux_i)
    return subsets, total, aux


def _mean(losses: Tensor) -> Tensor:
    # Half-precision losses (autocast) are averaged in float32; others in their own dtype.
    if losses.dtype in (torch.float16, torch.bfloat16):
        losses = losses.float()
    return losses.mean()


def _merge_aux(acc: Any, new: Any) -> Any:
    """Concatenate tensor aux outputs (e.g. logits) of micro-batches."""
    if acc is None:
        return new
    if isinstance(acc, Tensor) and isinstance(new, Tensor):
        return torch.cat([acc, new])
    return new
