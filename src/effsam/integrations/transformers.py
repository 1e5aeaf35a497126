"""The Hugging Face ``transformers`` Trainer.

:class:`SharpnessAwareTrainer` is a drop-in ``Trainer`` subclass. Give it an effsam
optimizer either as an instance or through ``optimizer_cls_and_kwargs``::

    trainer = SharpnessAwareTrainer(
        model=model, args=args, train_dataset=ds,
        optimizer_cls_and_kwargs=(effsam.SAM, {"base": torch.optim.AdamW, "lr": 5e-5,
                                               "rho": 0.05}),
    )

Per optimizer step (``gradient_accumulation_steps`` micro-batches): pass 1 over every
micro-batch of the step (under ``first_pass``, gradients accumulated), one ε from the
accumulated gradient, pass 2 over the same micro-batches at θ + ε, BatchNorm statistics
kept as pass 1 left them; then the Trainer clips the pass-2 gradient (``max_grad_norm``)
and calls ``optimizer.step()``, which restores θ and steps the base optimizer. This is
:func:`effsam.sharpness_aware_step` with ``accumulation_steps`` = the Trainer's. The loss
is the Trainer's ``compute_loss`` (``num_items_in_batch`` token normalisation included);
bf16 autocast comes from the Trainer; checkpoints keep effsam's state, so
``train(resume_from_checkpoint=...)`` continues exactly.

With several processes (DDP) each pass is all-reduced once, on its last micro-batch: ε is
the global one (``sharpness_aware_step(sync_ascent=True)``).

Step-skipping methods (the schedules, LookSAM, MSAM, the stale ascent) run as in
:func:`effsam.sharpness_aware_step`: on a plain step ``first_step`` returns False, pass 2
is skipped, and the Trainer clips pass 1's gradient (after the method's own transform)
and calls ``optimizer.step()``, which finishes the plain step.

Refused with a clear error: DeepSpeed and FSDP through the Trainer, fp16 with a
GradScaler (use ``bf16=True``), sample selection (ESAM ``gamma < 1``, K-SAM: the
Trainer's loss is a batch mean), SSAM-F (its Fisher mask needs per-sample losses) and
the reduced-batch ascent (``ascent_fraction < 1``).
Any other optimizer gets the Trainer's own ``training_step``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..bn import restore_bn, snapshot_bn
from ..optim.sharpness_aware import SharpnessAware

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "effsam.integrations.transformers needs transformers: pip install 'effsam[transformers]'"
    ) from e

__all__ = ["SharpnessAwareTrainer"]


class SharpnessAwareTrainer(Trainer):
    """A ``transformers.Trainer`` that runs effsam's two passes per optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(
                "SharpnessAwareTrainer does not support DeepSpeed: its engine owns the "
                "backward and the optimizer step, so the two passes cannot be interleaved"
            )
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "SharpnessAwareTrainer with FSDP is not supported (untested); shard with "
                "torch.distributed.fsdp.fully_shard and a hand-written loop instead"
            )
        self._effsam_batches: list[Any] = []
        self._effsam_seen = 0

    # ------------------------------------------------------------------ helpers
    def _effsam_optimizer(self) -> SharpnessAware | None:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        return opt if isinstance(opt, SharpnessAware) else None

    def _effsam_check(self, opt: SharpnessAware) -> None:
        plan = opt.step_plan()
        if plan.per_sample:
            raise ValueError(
                f"sample selection ({opt.selection.name}, gamma={opt.selection.gamma}) needs "
                "per-sample losses, and the Trainer's compute_loss returns a batch mean: "
                "use gamma=1 (SWP only), or effsam.sharpness_aware_step in your own loop"
            )
        if opt.mask.needs_data:
            raise ValueError(
                f"the {opt.mask.name!r} mask is computed from per-sample losses, which the "
                "Trainer's compute_loss does not give: use SSAM's mask='dynamic'"
            )
        if plan.pass1_slice:
            raise ValueError(
                f"ascent_fraction={opt.ascent_slice.fraction}: pass 1 would run on a slice "
                "of each micro-batch, which the Trainer's compute_loss cannot be given: use "
                "ascent_fraction=1, or effsam.sharpness_aware_step in your own loop"
            )
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            raise ValueError(
                "SharpnessAwareTrainer does not support fp16 with a GradScaler: use bf16=True"
            )

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._effsam_batches = list(batch_samples)  # this optimizer step's micro-batches
        self._effsam_seen = 0
        return batch_samples, num_items

    def _effsam_backward(self, model: Any, inputs: Any, num_items_in_batch: Any) -> torch.Tensor:
        """The Trainer's loss and backward for one micro-batch."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        return loss.detach()

    def _effsam_sync(self, model: Any, last: bool) -> Any:
        """Several processes: gradients are all-reduced once per pass, on its last
        micro-batch (so pass 1 is synchronised too: one global ε, as
        ``sharpness_aware_step(sync_ascent=True)``)."""
        if last or self.args.world_size <= 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    # ------------------------------------------------------------------ the step
    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        opt = self._effsam_optimizer()
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._effsam_check(opt)
        micro = self._effsam_batches
        self._effsam_seen += 1
        if self._effsam_seen > len(micro) or inputs is not micro[self._effsam_seen - 1]:
            raise RuntimeError(
                "SharpnessAwareTrainer.training_step was called outside the Trainer's "
                "training loop (it needs the micro-batches of the whole optimizer step)"
            )
        if self._effsam_seen < len(micro):
            # The last micro-batch of the step runs both passes over all of them.
            return torch.zeros((), device=self.args.device)
        model.train()
        prepared = [self._prepare_inputs(b) for b in micro]
        bn_start = snapshot_bn(model)
        try:
            if opt.mask_refresh_due():
                opt.refresh_mask(model, None, None)  # data-free masks only (checked above)
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=self.args.device)
            with opt.first_pass():
                for i, b in enumerate(prepared):
                    with self._effsam_sync(model, last=i == len(prepared) - 1):
                        total = total + self._effsam_backward(model, b, num_items_in_batch)
            bn_after_pass1 = snapshot_bn(model)
            try:
                if opt.first_step(zero_grad=True):
                    for i, b in enumerate(prepared):
                        with self._effsam_sync(model, last=i == len(prepared) - 1):
                            self._effsam_backward(model, b, num_items_in_batch)
            finally:
                restore_bn(bn_after_pass1)
        except BaseException:
            restore_bn(bn_start)
            opt.abort_step()
            raise
        # The Trainer now clips the pass-2 gradient and calls optimizer.step(), which
        # finishes the step (second_step).
        return total
