"""One epoch of training and one evaluation, with the metrics reduced over workers once."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from effsam.step import sharpness_aware_step

from . import distributed as ddp
from .progress import RunProgress


def train_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Any,
    loss_fn: Any,
    step_kwargs: dict[str, Any],
    epoch: int,
    untimed: int,
    ctx: ddp.DistContext,
    progress: RunProgress,
    diagnostics: Any = None,
) -> tuple[dict[str, Any], int]:
    """One pass over this worker's shard of the training set.

    Args:
        net: the model as trained (plain, compiled and/or DDP-wrapped).
        optimizer, scheduler: stepped once per batch.
        loader: this worker's ``BatchLoader``.
        loss_fn: per-sample losses and logits, for :func:`effsam.sharpness_aware_step`.
        step_kwargs: the step's options (scaler, autocast, accumulation, clipping, …).
        epoch: this epoch (0-based).
        untimed: steps still to leave out of the timing (process warm-up).
        ctx: the worker's place in the process group.
        progress: the run's progress display (quiet on workers other than rank 0).
        diagnostics: an :class:`effsam.analysis.sds.SDSDiagnostics` (or None), probed and
            fed outside the timed step.

    Non-finite steps are counted in the record's ``skipped_steps`` rather than warned
    about one by one (the loop reports them per epoch and stops a run that skips too many);
    ``nonfinite_steps`` counts the steps whose loss was not finite and whose update was
    applied all the same (a plain optimizer does not skip), which the loop treats as a
    divergence.

    Returns:
        The epoch's record, summed over all workers, and the remaining ``untimed`` count.
    """
    net.train()
    loader.set_epoch(epoch)
    device = ctx.device
    # loss, correct and applied non-finite steps stay on the device (no sync per step); the
    # rest are Python numbers
    on_device = torch.zeros(3, dtype=torch.float64, device=device)
    seen = timed_images = selected = skipped = refreshes = sa_steps = 0
    kept_sum = 0.0
    train_time = 0.0
    rates: list[float] = []  # per timed step, for a median robust to busy machines

    def postfix() -> str:
        rate = f"{timed_images / train_time:.0f}" if train_time > 0 else "-"
        return (
            f"loss {float(on_device[0]) / max(seen, 1):.3f}, "
            f"acc {100 * float(on_device[1]) / max(seen, 1):.1f}%, {rate} img/s"
        )

    ids = loader.indices() if diagnostics is not None else None
    for i, (x, y) in enumerate(loader):
        if diagnostics is not None and diagnostics.due(i):
            diagnostics.probe(net, (x, y), loss_fn)
        _sync(device)  # time the step alone: the batch was built before this point
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SKIP_WARNING, category=RuntimeWarning)
            res = sharpness_aware_step(net, optimizer, (x, y), loss_fn, **step_kwargs)
        scheduler.step()
        _sync(device)
        elapsed = time.perf_counter() - start
        n = res.batch_size
        if untimed == 0:
            train_time += elapsed
            timed_images += n
            rates.append(n / max(elapsed, 1e-9))
        else:
            untimed -= 1
        if res.aux is not None:
            correct = res.aux.argmax(dim=1) == y
        else:  # a step skipped before any whole-batch forward (a sliced pass 1 overflowed)
            correct = torch.zeros_like(y, dtype=torch.bool)
        on_device[0] += res.loss.detach().double() * n
        on_device[1] += correct.sum()
        if not res.skipped:
            on_device[2] += (~torch.isfinite(res.loss.detach())).double()
        if diagnostics is not None:
            bs = loader.batch_size
            diagnostics.record(ids[i * bs : i * bs + n], optimizer.selection.last_indices, correct)
        seen += n
        selected += res.selected
        skipped += int(res.skipped)
        refreshes += int(res.mask_refreshed)
        sa_steps += int(res.sharpness_aware)
        if res.kept_fraction is not None:
            kept_sum += res.kept_fraction.elements
        progress.step(postfix)
    steps = len(loader)
    tracks_kept = getattr(optimizer, "last_kept", None) is not None
    # one reduction of the sums and one of the time per epoch: totals over all workers
    sums = torch.cat(
        [
            on_device,
            torch.tensor(
                [
                    seen,
                    timed_images,
                    selected,
                    skipped,
                    kept_sum,
                    refreshes,
                    sa_steps,
                    len(rates),
                ],  # fmt: skip
                dtype=torch.float64,
                device=device,
            ),
        ]
    )
    ddp.all_reduce(sums, ctx)
    slowest = ddp.all_reduce(
        torch.tensor([train_time], dtype=torch.float64, device=device), ctx, op="max"
    )
    (
        loss_sum, correct, nonfinite, seen, timed_images, selected, skipped, kept_sum,
        refreshes, sa_steps, timed_steps,
    ) = sums.tolist()  # fmt: skip
    train_time = float(slowest[0])
    record = {
        "epoch": epoch + 1,
        "lr": scheduler.get_last_lr()[0],
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "steps": steps,
        "skipped_steps": int(round(skipped / ctx.world_size)),
        "nonfinite_steps": int(round(nonfinite / ctx.world_size)),
        "selected_fraction": selected / seen,
        "kept_fraction": kept_sum / (steps * ctx.world_size) if tracks_kept else None,
        "mask_refreshes": int(round(refreshes / ctx.world_size)),
        "sharpness_aware_steps": int(round(sa_steps / ctx.world_size)),
        "timed_images": int(timed_images),
        "timed_steps": int(round(timed_steps / ctx.world_size)),
        "train_time_s": train_time,
        "images_per_s": timed_images / train_time if train_time > 0 else None,
        "images_per_s_median": world_size_rate(rates, ctx.world_size),
    }
    return record, untimed


#: The wrappers' per-step warnings about a skipped step (counted in the record instead).
_SKIP_WARNING = "effsam: non-finite"


def world_size_rate(rates: list[float], world_size: int) -> float | None:
    """This worker's median per-step images/s, times the number of workers."""
    return float(np.median(rates)) * world_size if rates else None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    amp: str,
    ctx: ddp.DistContext,
    progress: RunProgress | None = None,
) -> tuple[float, float]:
    """Test loss and accuracy over this worker's share, summed over workers once."""
    model.eval()
    device = ctx.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    batches = loader if progress is None else progress.evaluating(loader, len(loader))
    for x, y in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == y).sum()
        sums[2] += y.numel()
    ddp.all_reduce(sums, ctx)
    loss_sum, correct, total = sums.tolist()
    return loss_sum / total, correct / total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
