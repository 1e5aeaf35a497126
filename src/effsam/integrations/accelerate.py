"""Hugging Face ``accelerate``: a training loop with an effsam optimizer.

Two recipes, after ``model, opt, loader = accelerator.prepare(model, opt, loader)``:

* the closure — ``opt.step(closure)`` with ``accelerator.backward`` in the closure, for
  fp32 and bf16, with ``effsam.preserve_bn_stats(model, enabled=opt.optimizer.perturbed)``
  around the forward and backward (without it BatchNorm statistics are updated by both
  passes, as with any closure). Not for fp16: accelerate's GradScaler path unscales
  before it runs the closure, and torch's GradScaler then fails ("No inf checks were
  recorded"). With accelerate's gradient accumulation (``accelerator.accumulate``) it
  raises at the first step: accelerate does not step on the first micro-batches, so the
  closure would never see them;
* :func:`sharpness_aware_step` — effsam's full step (BatchNorm kept as pass 1 left it,
  SDS, accumulation, clipping) with the accelerator's mixed precision: ``"bf16"`` is bf16
  autocast, ``"fp16"`` is fp16 autocast with the accelerator's GradScaler, unscaled once
  per pass.

``accelerator.prepare`` moves the optimizer's state dict to the device and loads it back;
effsam loads its mask generators' state on the CPU, so that round trip is safe.
With several processes the prepared model is a ``DistributedDataParallel`` one, which
:func:`effsam.sharpness_aware_step` drives itself: per-worker ε by default (m-sharpness),
one global ε with ``sync_ascent=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..optim.sharpness_aware import SharpnessAware
from ..step import StepResult
from ..step import sharpness_aware_step as _sharpness_aware_step

__all__ = ["sharpness_aware_step"]

_AUTOCAST = {"bf16": "bf16", "fp16": "fp16", "no": None}


def sharpness_aware_step(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    batch: Any,
    loss_fn: Callable[[torch.nn.Module, Any], Any],
    **kwargs: Any,
) -> StepResult:
    """:func:`effsam.sharpness_aware_step` on accelerate's prepared model and optimizer,
    with the accelerator's mixed precision (unless ``autocast`` / ``scaler`` are given).
    Other keywords (``accumulation_steps``, ``clip_grad_norm``, …) are passed on."""
    ga = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
    if ga > 1:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={ga}): this call runs a whole step on "
            "every batch; pass accumulation_steps= here instead (the batch is split into "
            "that many micro-batches per pass), and do not wrap it in accelerator.accumulate"
        )
    opt = getattr(optimizer, "optimizer", optimizer)  # under AcceleratedOptimizer
    if not isinstance(opt, SharpnessAware):
        raise TypeError(f"expected an effsam optimizer, got {type(opt).__name__}")
    mode = str(getattr(accelerator, "mixed_precision", "no"))
    if mode not in _AUTOCAST:
        raise ValueError(f"unsupported accelerate mixed_precision={mode!r} (no, bf16, fp16)")
    kwargs.setdefault("autocast", _AUTOCAST[mode])
    if "scaler" not in kwargs and mode == "fp16":
        kwargs["scaler"] = accelerator.scaler
    return _sharpness_aware_step(model, opt, batch, loss_fn, **kwargs)
