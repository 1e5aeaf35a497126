"""One training step of any optimizer, sharpness-aware or not, done right.

:func:`sharpness_aware_step` is the per-batch orchestration that needs the model:

* pass 1 under :meth:`SharpnessAware.first_pass` (SWP skips weight gradients of tensors
  it does not perturb) and, for a DDP model, under ``no_sync`` — forward AND backward —
  so each worker ascends with its own gradient (m-sharpness); ``sync_ascent=True``
  all-reduces the pass-1 gradient instead;
* BatchNorm statistics exactly as pass 1 left them;
* SDS: a no-grad forward at θ + ε, top-k selection, pass 2 on the sliced subset only;
* AMP: autocast (bf16/fp16) and a GradScaler unscaled once per pass; the whole step is
  skipped (weights restored, base not stepped, scaler backed off) if either pass overflows;
* gradient accumulation over micro-batches, clipping of the final gradient;
* a failure part-way leaves weights, BN buffers and optimizer state as they were.

With a plain ``torch.optim`` optimizer it is an ordinary training step with the same
AMP/accumulation/clipping handling, so one loop serves SGD and every SAM variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .batching import batch_size, index_batch, split_batch
from .bn import restore_bn, snapshot_bn
from .optim.sharpness_aware import KeptFraction, SharpnessAware

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
    """

    loss: Tensor
    batch_size: int
    selected: int
    kept_fraction: KeptFraction | None
    skipped: bool
    mask_refreshed: bool = False
    aux: Any = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _ddp(model: nn.Module) -> DistributedDataParallel | None:
    if isinstance(model, DistributedDataParallel):
        return model
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, DistributedDataParallel) else None


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


def _split_loss(out: Any, n: int, per_sample: bool) -> tuple[Tensor, Any]:
    aux = None
    if isinstance(out, tuple) and len(out) == 2:
        out, aux = out
    if not isinstance(out, Tensor):
        raise TypeError(
            f"loss_fn must return a tensor of per-sample losses, got {type(out).__name__}"
        )
    if out.dim() == 0:
        if per_sample:
            raise ValueError(
                "loss_fn returned a scalar, but sample selection needs per-sample losses of "
                f"shape [{n}] (use reduction='none')"
            )
        return out, aux
    if out.shape != (n,):
        raise ValueError(f"loss_fn returned losses of shape {list(out.shape)}, expected [{n}]")
    return out, aux


def _allreduce_mean(grads: list[Tensor]) -> None:
    """Average gradients over workers in one flat buffer (one collective)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _check_ddp_settings(optimizer: Any, settings: dict[str, Any]) -> None:
    """Once per optimizer: every worker must run the same step (same ρ, β, γ, …)."""
    if getattr(optimizer, "_effsam_ddp_checked", False):
        return
    mine = repr(sorted(settings.items()))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if any(g != mine for g in gathered):
        lines = "\n".join(f"  rank {r}: {g}" for r, g in enumerate(gathered))
        raise RuntimeError(f"effsam: workers disagree on the step's settings:\n{lines}")
    optimizer._effsam_ddp_checked = True


def _settings(optimizer: Any, sync_ascent: bool, accumulation_steps: int) -> dict[str, Any]:
    s: dict[str, Any] = {
        "optimizer": type(optimizer).__name__,
        "sync_ascent": sync_ascent,
        "accumulation_steps": accumulation_steps,
    }
    if isinstance(optimizer, SharpnessAware):
        s["rho"] = [g.get("rho") for g in optimizer.param_groups]
        s["ascent"] = repr(optimizer.ascent.extra_repr())
        s["mask"] = optimizer.mask.extra_repr()
        s["selection"] = optimizer.selection.extra_repr()
        gen = getattr(optimizer.mask, "generator", None)
        if gen is not None:
            s["mask_generator"] = hash(gen.get_state().numpy().tobytes())
    return s


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
        loss_fn: ``loss_fn(model, batch)`` → per-sample losses of shape [b] (a scalar is
            accepted when no sample selection is active), or ``(losses, aux)``.
        scaler: a ``torch.amp.GradScaler`` for fp16.
        autocast: ``"bf16"``, ``"fp16"`` or ``None``.
        accumulation_steps: split the batch into this many micro-batches per pass.
        clip_grad_norm: clip the final (pass-2) gradient to this global norm.
        sync_ascent: under DDP, all-reduce the pass-1 gradient (one global ε) instead of
            each worker ascending with its own (m-sharpness, the default).

    Returns:
        A :class:`StepResult`.
    """
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
    micro = split_batch(batch, accumulation_steps) if accumulation_steps > 1 else [batch]
    ddp = _ddp(model)
    if ddp is not None:
        _check_ddp_settings(optimizer, _settings(optimizer, sync_ascent, accumulation_steps))
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    per_sample = sam and optimizer.selection.needs_per_sample

    def forward(mb: Any) -> tuple[Tensor, Any]:
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = loss_fn(model, mb)
        return _split_loss(out, batch_size(mb), per_sample)

    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if use_scaler else loss).backward()

    bn_start = snapshot_bn(model)
    refreshed = False
    try:
        if sam and optimizer.mask_refresh_due():
            refreshed = optimizer.refresh_mask(unwrap_model(model), batch, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        # ---- pass 1: local to this worker unless sync_ascent (then reduced by hand below)
        local = ddp is not None and (sam or accumulation_steps > 1)
        first_pass = optimizer.first_pass() if sam else contextlib.nullcontext()
        losses_1: list[Tensor] = []
        total = torch.zeros((), device=next(iter(model.parameters())).device)
        aux = None
        with first_pass:
            for i, mb in enumerate(micro):
                last = i == len(micro) - 1
                sync = not sam and last
                with ddp.no_sync() if local and not sync else contextlib.nullcontext():
                    losses, aux_i = forward(mb)
                    loss = _mean(losses) * (batch_size(mb) / b)
                    backward(loss)
                losses_1.append(losses.detach())
                total = total + loss.detach()
                aux = aux_i if len(micro) == 1 else _merge_aux(aux, aux_i)
        if not sam:
            return _plain_step(
                optimizer, model, scaler if use_scaler else None, clip_grad_norm, total, b, aux
            )
        if ddp is not None and sync_ascent:
            with torch.no_grad():
                _allreduce_mean([p.grad for p in optimizer._params() if p.grad is not None])
        if use_scaler:
            scaler.unscale_(optimizer)  # pass 1, keyed by the wrapper
        if not optimizer.first_step(zero_grad=True):
            optimizer.second_step()  # restores nothing, counts the skip
            if use_scaler:
                scaler.update()
            return StepResult(total, b, 0, optimizer.last_kept, True, refreshed, aux)
        # ---- pass 2 at θ + ε, BN statistics kept as pass 1 left them
        bn_after_pass1 = snapshot_bn(model)
        selected = 0
        try:
            for i, mb in enumerate(micro):
                last = i == len(micro) - 1
                sub = mb
                if optimizer.selection.needs_per_sample:
                    after = None
                    if optimizer.selection.needs_perturbed_loss:
                        with torch.no_grad():
                            after, _ = forward(mb)
                    idx = optimizer.selection.select(losses_1[i], after)
                    if idx is not None:
                        sub = index_batch(mb, idx)
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    losses, _ = forward(sub)
                    backward(_mean(losses) * (batch_size(mb) / b))
                selected += batch_size(sub)
        finally:
            restore_bn(bn_after_pass1)
        if use_scaler:
            scaler.unscale_(optimizer.base)  # pass 2, keyed by the base optimizer
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(optimizer._params(), clip_grad_norm)
        ok = optimizer.second_step()
        if use_scaler:
            scaler.update()  # backs off if either pass recorded an overflow
        return StepResult(total, b, selected, optimizer.last_kept, not ok, refreshed, aux)
    except BaseException:
        restore_bn(bn_start)
        if sam:
            optimizer.abort_step()
        else:
            optimizer.zero_grad(set_to_none=True)
        raise


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


def _plain_step(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    scaler: torch.amp.GradScaler | None,
    clip_grad_norm: float | None,
    total: Tensor,
    b: int,
    aux: Any,
) -> StepResult:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        optimizer.step()
        skipped = False
    return StepResult(total, b, b, None, skipped, False, aux)
