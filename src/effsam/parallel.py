"""Data-parallel support for :func:`effsam.sharpness_aware_step`: walking the DDP/compile
wrapper chain, the hand-made pass-1 all-reduce of ``sync_ascent``, AE-SAM's statistic
averaged over the workers, the check that every worker runs the same step, and the memory
of what was done once per optimizer (held weakly: nothing is written on the optimizer)."""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .optim.ascent import group_by_device_and_dtype
from .optim.sharpness_aware import SharpnessAware


def wrapper_chain(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module it wraps through DDP (``.module``) and ``torch.compile``
    (``._orig_mod``), outermost first: the one walk of the wrapper chain."""
    while True:
        yield model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return


class ObjectMemory:
    """The objects (optimizers) something was done for once, held weakly: remembering one
    writes nothing on it, and a collected one is forgotten. An object that cannot be weakly
    referenced (or hashed) is never remembered, so whatever was done is done again."""

    def __init__(self) -> None:
        self._objects: weakref.WeakSet[Any] = weakref.WeakSet()

    def __contains__(self, obj: Any) -> bool:
        try:
            return obj in self._objects
        except TypeError:  # unhashable
            return False

    def add(self, obj: Any) -> None:
        with contextlib.suppress(TypeError):  # no weak reference to it
            self._objects.add(obj)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and/or ``torch.compile`` wrappers."""
    *_, inner = wrapper_chain(model)
    return inner


def find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper in ``model``'s wrapper chain (None: not data-parallel)."""
    return next((m for m in wrapper_chain(model) if isinstance(m, DistributedDataParallel)), None)


def is_compiled(model: nn.Module) -> bool:
    """``torch.compile(model)`` (a wrapper) or ``model.compile()`` (in place), DDP or not."""
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod")
        for m in wrapper_chain(model)
    )


def allreduce_mean(grads: list[Tensor]) -> None:
    """Average gradients over workers: one flat buffer (one collective) per device and
    dtype, in the order of first appearance (the same on every worker)."""
    for idx in group_by_device_and_dtype(grads):
        group = [grads[i] for i in idx]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def sync_ascent_grads(optimizer: SharpnessAware) -> None:
    """All-reduce pass 1 by hand (DDP's hooks were off for it, see ``no_sync`` below).

    The list of tensors must be the same on every worker, or the flat buffers differ in
    length and the collective fails or hangs: it is fixed by the (shared) SWP mask and the
    trainable flags, never by which tensors happened to receive a gradient locally; a
    missing local gradient takes part as zeros.
    """
    keep = optimizer.pass1_keep
    grads = []
    with torch.no_grad():
        for i, p in enumerate(optimizer.params):
            if not p.requires_grad or (keep is not None and not keep[i]):
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        allreduce_mean(grads)


def mean_grad_sq_norm(
    optimizer: SharpnessAware, ddp: Any, scaler: torch.amp.GradScaler | None
) -> float:
    """‖g‖² of pass 1 (unscaled) for a schedule that decides from it (AE-SAM): under data
    parallel the mean over the workers of their local ‖g‖², so that all decide alike."""
    sq = optimizer.grad_sq_norm()
    if scaler is not None and scaler.is_enabled():
        sq = sq / float(scaler.get_scale()) ** 2
    if ddp is not None:
        device = next((g.device for g in optimizer.trainable_grads()), torch.device("cpu"))
        t = torch.tensor([sq], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        sq = float(t) / dist.get_world_size()
    return sq


def _digest(data: bytes) -> str:
    # Python's hash() of bytes is salted per process, so it cannot be compared across
    # workers; a cryptographic digest can.
    return hashlib.sha256(data).hexdigest()[:16]


#: The optimizers whose workers were found to agree (:func:`check_ddp_settings`).
_DDP_CHECKED = ObjectMemory()


def check_ddp_settings(optimizer: Any, settings: dict[str, str]) -> None:
    """Once per optimizer: every worker must run the same step (same ρ, β, γ, seed, …).

    Different settings would not fail loudly on their own: the workers would compute
    different collectives (a hang) or silently train different models. One
    ``all_gather_object`` at the first step turns that into a RuntimeError on every rank.
    """
    if optimizer in _DDP_CHECKED:
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, settings)
    keys = sorted({k for g in gathered for k in g})
    differ = [k for k in keys if any(g.get(k) != settings.get(k) for g in gathered)]
    if differ:
        lines = "\n".join(
            f"  {k}: "
            + ", ".join(f"rank {r} {g.get(k, '<missing>')}" for r, g in enumerate(gathered))
            for k in differ
        )
        raise RuntimeError(
            f"effsam: data-parallel workers disagree on {', '.join(differ)}; every rank must "
            f"build the optimizer and call sharpness_aware_step with the same settings:\n{lines}"
        )
    _DDP_CHECKED.add(optimizer)


def step_settings(optimizer: Any, sync_ascent: bool, accumulation_steps: int) -> dict[str, str]:
    base = optimizer.base if isinstance(optimizer, SharpnessAware) else optimizer
    shapes = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]]
    s: dict[str, str] = {
        "optimizer": type(optimizer).__name__,
        "base optimizer": type(base).__name__,
        "parameter shapes": _digest(repr(shapes).encode()),
        "sync_ascent": repr(sync_ascent),
        "accumulation_steps": repr(accumulation_steps),
    }
    if isinstance(optimizer, SharpnessAware):
        s["rho"] = repr([g.get("rho") for g in optimizer.param_groups])
        s["ascent"] = f"{optimizer.ascent.name}({optimizer.ascent.extra_repr()})"
        s["mask"] = f"{optimizer.mask.name}({optimizer.mask.extra_repr()})"
        s["selection"] = f"{optimizer.selection.name}({optimizer.selection.extra_repr()})"
        s["pass 2 on the whole batch"] = repr(optimizer.selection.pass2_whole_batch)
        s["update"] = f"{optimizer.update.name}({optimizer.update.extra_repr()})"
        s["sds_bn"] = repr(optimizer.selection.pass2_bn_whole_batch)
        s["ascent slice"] = optimizer.ascent_slice.extra_repr()
        s["ascent slice generator state"] = _digest(
            optimizer.ascent_slice.generator.get_state().numpy().tobytes()
        )
        gen = getattr(optimizer.mask, "generator", None)
        if isinstance(gen, torch.Generator):
            s["mask generator state"] = _digest(gen.get_state().numpy().tobytes())
    return s
