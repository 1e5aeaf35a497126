"""PyTorch Lightning (``lightning.pytorch``, 2.x).

Automatic optimisation — ``configure_optimizers`` returns an effsam optimizer; Lightning
calls ``opt.step(closure)`` and effsam calls the closure twice::

    trainer = L.Trainer(callbacks=[SharpnessAwareCallback()], ...)
    # fp16 (GradScaler): plugins=[SharpnessAwarePrecision("16-mixed", "cuda")]

:class:`SharpnessAwareCallback` is required (without it the first step raises). It runs
each step of an effsam optimizer itself, in :func:`effsam.sharpness_aware_step`'s order:
Lightning's gradient clipping (norm or value) applies once, to the gradient the base
optimizer steps with, so ε comes from the unclipped pass-1 gradient and AE-SAM decides
on it. It keeps BatchNorm statistics exactly as pass 1 left them (Lightning runs pass
2's forward in the same train mode), schedules the refresh of data-dependent masks
(SSAM), and refuses, when training starts, what automatic optimisation cannot do right:

* ``accumulate_grad_batches > 1`` (Lightning's closure covers only the last micro-batch:
  pass 2 would see one micro-batch while pass 1 saw all of them);
* sample selection (ESAM's SDS, K-SAM: pass 2 runs on a subset the closure cannot
  choose) and the reduced-batch ascent (``ascent_fraction < 1``);
* precision plugins that step the optimizer their own way (DeepSpeed, FSDP, XLA);
* fp16 with a GradScaler through Lightning's own plugin (it steps the optimizer without
  a closure); :class:`SharpnessAwarePrecision` does it: the scaler unscales each pass and
  the step is skipped if either pass overflows;
* SSAM-F (Fisher mask) without a ``loss_fn`` to compute the Fisher information.

Manual optimisation (``automatic_optimization = False``): ``opt.step(closure)`` with
``manual_backward`` inside the closure works with the callback as above; for SDS,
accumulation or m-sharpness use :func:`manual_step`, which runs
:func:`effsam.sharpness_aware_step` and counts the step in ``trainer.global_step``.
``manual_backward(loss); opt.step()`` (a do-nothing closure) raises: effsam cannot
evaluate pass 2 from a gradient that already exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..bn import restore_bn, snapshot_bn
from ..optim.sharpness_aware import SharpnessAware
from ..step import StepResult, _reset_scaler, sharpness_aware_step

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "effsam.integrations.lightning needs Lightning: pip install 'effsam[lightning]'"
    ) from e

__all__ = ["SharpnessAwareCallback", "SharpnessAwarePrecision", "manual_step"]


def _raw(optimizer: Any) -> Any:
    """The optimizer behind a LightningOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def _sam_optimizers(trainer: pl.Trainer) -> list[SharpnessAware]:
    return [o for o in map(_raw, trainer.optimizers) if isinstance(o, SharpnessAware)]


class SharpnessAwareCallback(Callback):
    """BatchNorm guard, mask refresh and refusals for effsam optimizers in Lightning.

    Args:
        loss_fn: ``loss_fn(module, batch)`` → per-sample losses; needed only for a mask
            computed from data (SSAM-F's Fisher information).
    """

    def __init__(self, loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None) -> None:
        self.loss_fn = loss_fn
        self._bn: dict[int, list] = {}

    # ---------------------------------------------------------------- refusals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opts = _sam_optimizers(trainer)
        if not opts:
            warnings.warn(
                "SharpnessAwareCallback: no effsam optimizer among trainer.optimizers; the "
                "callback does nothing",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        automatic = pl_module.automatic_optimization
        plugin = trainer.precision_plugin
        for opt in opts:
            if opt.mask.needs_data and self.loss_fn is None:
                raise ValueError(
                    f"the {opt.mask.name!r} mask is computed from data: give "
                    "SharpnessAwareCallback(loss_fn=...) (loss_fn(module, batch) → "
                    "per-sample losses)"
                )
            if not automatic:
                continue
            if trainer.accumulate_grad_batches > 1:
                raise ValueError(
                    f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) "
                    "cannot work with an effsam optimizer under automatic optimisation: "
                    "Lightning's closure covers only the last micro-batch, so pass 2 would "
                    "see one micro-batch while pass 1 saw all of them. Use a larger batch, "
                    "or manual optimisation with "
                    "effsam.integrations.lightning.manual_step(..., accumulation_steps=n)"
                )
            if opt.step_plan().per_sample:
                raise ValueError(
                    f"sample selection ({opt.selection.name}, gamma={opt.selection.gamma}) "
                    "cannot run through Lightning's closure: use manual optimisation with "
                    "effsam.integrations.lightning.manual_step"
                )
            if opt.step_plan().pass1_slice:
                raise ValueError(
                    f"ascent_fraction={opt.ascent_slice.fraction}: pass 1 runs on a slice "
                    "of the batch, which Lightning's closure (training_step on the whole "
                    "batch) cannot choose: use manual optimisation with "
                    "effsam.integrations.lightning.manual_step"
                )
            if (
                isinstance(plugin, MixedPrecision)
                and plugin.scaler is not None
                and not isinstance(plugin, SharpnessAwarePrecision)
            ):
                raise ValueError(
                    "fp16 with a GradScaler: Lightning's MixedPrecision plugin steps the "
                    "optimizer without a closure. Pass "
                    "plugins=[effsam.integrations.lightning.SharpnessAwarePrecision("
                    "'16-mixed', device)] instead of precision='16-mixed' (or use "
                    "'bf16-mixed', which needs no scaler)"
                )
        if automatic:
            _take_over_the_step(plugin)
        if automatic and trainer.world_size > 1:
            warnings.warn(
                "effsam under Lightning's automatic optimisation with several processes: "
                "each closure call is a synchronised forward+backward, so pass 1's gradient "
                "is all-reduced (one global ε, as sharpness_aware_step(sync_ascent=True)). "
                "For per-worker ε (m-sharpness) use manual optimisation",
                RuntimeWarning,
                stacklevel=2,
            )

    # ---------------------------------------------------------------- masks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not pl_module.automatic_optimization:
            return  # manual_step refreshes, as sharpness_aware_step does
        for opt in _sam_optimizers(trainer):
            if opt.mask_refresh_due():
                opt.refresh_mask(pl_module, batch, self.loss_fn)

    # ---------------------------------------------------------------- BatchNorm
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # Lightning calls this after each call of the closure: after pass 1 (nothing
        # perturbed yet) keep the statistics; after pass 2 (θ + ε loaded) put them back.
        opt = _raw(optimizer)
        if not isinstance(opt, SharpnessAware):
            return
        if opt.perturbed:
            snap = self._bn.pop(id(opt), None)
            if snap is not None:
                restore_bn(snap)
        else:
            self._bn[id(opt)] = snapshot_bn(pl_module)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._bn.clear()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        plugin = trainer.precision_plugin
        if getattr(plugin.__dict__.get("optimizer_step"), "_effsam", False):
            del plugin.optimizer_step


def _clip(model: pl.LightningModule, plugin: Any, opt: Any) -> None:
    """Lightning's gradient clipping (``gradient_clip_val`` / ``_algorithm``, or the
    module's ``configure_gradient_clipping``), once, on the gradient the base steps with."""
    trainer = model.trainer
    plugin._clip_gradients(
        model,
        opt,
        trainer.gradient_clip_val,
        gradient_clip_algorithm=trainer.gradient_clip_algorithm,
    )


def _hooks(model: pl.LightningModule, opt: Any) -> None:
    """Lightning's ``on_before_optimizer_step`` (callbacks, then the module), after a pass."""
    from lightning.pytorch.trainer import call

    trainer = model.trainer
    call._call_callback_hooks(trainer, "on_before_optimizer_step", opt)
    call._call_lightning_module_hook(trainer, "on_before_optimizer_step", opt)


def _two_pass_step(
    plugin: Any,
    opt: SharpnessAware,
    model: pl.LightningModule,
    closure: Callable[[], Any],
    scaler: torch.amp.GradScaler | None = None,
) -> Any:
    """One effsam step from Lightning's closure (training_step + backward), as
    :func:`effsam.sharpness_aware_step` orders it: pass 1, ``on_before_optimizer_step``,
    ``first_step`` (the schedule's decision from the unclipped pass-1 gradient); pass 2
    and ``on_before_optimizer_step`` again on a sharpness-aware step; then Lightning's
    gradient clipping, once, on the final gradient (on a plain step: pass 1's, after the
    method's own transform — LookSAM's g_v, MSAM's); ``second_step``."""
    try:
        with torch.enable_grad(), opt.first_pass():
            loss = closure()
        if loss is None and model.automatic_optimization:
            opt.abort_step()  # training_step returned None: skip, as Lightning does
            return None
        if scaler is not None:
            scaler.unscale_(opt)  # pass 1, keyed by the wrapper
        _hooks(model, opt)
        if opt.first_step(zero_grad=True):
            with torch.enable_grad():
                closure()
            if scaler is not None:
                scaler.unscale_(opt.base)  # pass 2, keyed by the base
            _hooks(model, opt)
        _clip(model, plugin, opt)
        opt.second_step()
    except BaseException:
        opt.abort_step()
        if scaler is not None:
            _reset_scaler(scaler, opt, opt.base)
        raise
    if scaler is not None:
        scaler.update()  # backs off if either pass overflowed (the step was skipped)
    return loss


def _take_over_the_step(plugin: Any) -> None:
    """Run effsam optimizers' automatic-optimisation steps through :func:`_two_pass_step`
    (Lightning's own plugin clips after each closure call: pass 1's clipped gradient
    would make ε — value clipping turns it, and AE-SAM would decide on it)."""
    if isinstance(plugin, SharpnessAwarePrecision):
        return  # runs the two passes itself
    current = plugin.__dict__.get("optimizer_step")
    if getattr(current, "_effsam", False):
        return
    own = type(plugin).optimizer_step
    plain = own is Precision.optimizer_step or (
        own is MixedPrecision.optimizer_step and getattr(plugin, "scaler", None) is None
    )
    if not plain:
        raise ValueError(
            f"effsam under Lightning's automatic optimisation with the "
            f"{type(plugin).__name__} precision plugin is not supported (it steps the "
            "optimizer its own way). Use manual optimisation with "
            "effsam.integrations.lightning.manual_step, or a 32/64-bit or 'bf16-mixed' "
            "precision"
        )
    original = plugin.optimizer_step

    def optimizer_step(
        optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        opt = _raw(optimizer)
        if not isinstance(opt, SharpnessAware) or not model.automatic_optimization:
            return original(optimizer, model=model, closure=closure, **kwargs)
        if kwargs:
            raise TypeError(f"effsam's step takes no extra arguments, got {sorted(kwargs)}")
        return _two_pass_step(plugin, opt, model, closure)

    optimizer_step._effsam = True  # type: ignore[attr-defined]
    plugin.optimizer_step = optimizer_step


class SharpnessAwarePrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` for effsam optimizers under fp16 with a GradScaler.

    Runs the two passes itself: pass 1 under ``first_pass``, unscale (keyed by the
    wrapper), ``first_step``; pass 2, unscale (keyed by the base), ``second_step``; then
    ``scaler.update()``, which backs off if either pass overflowed (the step is then
    skipped: weights restored, base not stepped). Lightning's ``on_before_optimizer_step``
    runs after each pass, and its gradient clipping once, on the unscaled final
    gradient. Other optimizers get Lightning's behaviour.
    """

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Any,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        opt = _raw(optimizer)
        if self.scaler is None or not isinstance(opt, SharpnessAware):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if kwargs:
            raise TypeError(f"effsam's step takes no extra arguments, got {sorted(kwargs)}")
        if opt.step_plan().per_sample:
            raise ValueError("sample selection cannot run through Lightning's closure")
        return _two_pass_step(self, opt, model, closure, self.scaler)


_AUTOCAST = {"bf16-mixed": "bf16", "16-mixed": "fp16"}


def manual_step(
    module: pl.LightningModule,
    batch: Any,
    loss_fn: Callable[[torch.nn.Module, Any], Any],
    *,
    optimizer: Any = None,
    **kwargs: Any,
) -> StepResult:
    """One :func:`effsam.sharpness_aware_step` from a manual-optimisation
    ``training_step``, counted by Lightning (``trainer.global_step``, ``max_steps``,
    step-interval schedulers, step-based checkpoints).

    The trainer's mixed precision is applied (``"bf16-mixed"`` → bf16 autocast,
    ``"16-mixed"`` → fp16 autocast and the precision plugin's GradScaler) unless
    ``autocast`` / ``scaler`` are given. Every other keyword goes to
    ``sharpness_aware_step`` (``accumulation_steps``, ``clip_grad_norm``, …).

    Args:
        module: the LightningModule (``self`` in ``training_step``).
        batch: the batch.
        loss_fn: ``loss_fn(module, batch)`` → per-sample losses.
        optimizer: the LightningOptimizer (default: ``module.optimizers()``, which must
            then be a single one).
    """
    trainer = module.trainer
    if module.automatic_optimization:
        raise RuntimeError(
            "manual_step is for manual optimisation (self.automatic_optimization = False); "
            "under automatic optimisation Lightning already calls opt.step(closure)"
        )
    if trainer.world_size > 1:
        raise NotImplementedError(
            "manual_step with several processes: Lightning's DDP wrapper routes forward() "
            "to training_step, so sharpness_aware_step cannot drive it; call "
            "opt.step(closure) with self.manual_backward inside the closure instead"
        )
    lopt = optimizer if optimizer is not None else module.optimizers()
    if isinstance(lopt, list):
        raise ValueError("several optimizers: pass optimizer=<the effsam one>")
    opt = _raw(lopt)
    if not isinstance(opt, SharpnessAware):
        raise TypeError(f"manual_step needs an effsam optimizer, got {type(opt).__name__}")
    precision = str(trainer.precision)
    if "autocast" not in kwargs and precision in _AUTOCAST:
        kwargs["autocast"] = _AUTOCAST[precision]
    if "scaler" not in kwargs:
        kwargs["scaler"] = getattr(trainer.precision_plugin, "scaler", None)
    before = getattr(lopt, "_on_before_step", None)
    after = getattr(lopt, "_on_after_step", None)
    if before is None or after is None:
        raise RuntimeError(
            "this Lightning version's LightningOptimizer has no step-progress hooks "
            "(_on_before_step/_on_after_step): manual_step cannot count the step"
        )
    before()  # Lightning's "ready" count, and its optimizer_step profiler section
    try:
        result = sharpness_aware_step(module, opt, batch, loss_fn, **kwargs)
    except BaseException:
        trainer.profiler.stop("optimizer_step")
        raise
    after()  # "completed": trainer.global_step
    return result
