"""Memory accounting: the peak bytes a call allocates, and the extra memory of the ascent.

On a CPU the peak comes from the profiler's allocation events: with ``profile_memory``,
every allocation and free through torch's CPU allocator is recorded — those of kernels'
internal temporaries included — so the running sum of the events in time order, at its
highest, is the most memory the call held at once beyond what was live before it. It is
deterministic (no sampling, no resident-set noise). On CUDA it is the caching allocator's
peak statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..bn import restore_bn, snapshot_bn
from ..optim.sharpness_aware import SharpnessAware


def peak_allocated_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int | None:
    """Most bytes ``fn()`` holds at once beyond what was allocated before it (None where
    the profiler's events are unavailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return None
    # allocations are positive, frees negative: the peak of their running sum in time order
    deltas = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensors in a (nested) dict / list / tuple."""
    seen: set[int] = set()
    total = 0

    def add(o: Any) -> None:
        nonlocal total
        if isinstance(o, Tensor):
            if id(o) not in seen:
                seen.add(id(o))
                total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                add(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                add(v)

    add(obj)
    return total


@dataclass(frozen=True)
class AscentMemory:
    """Extra memory of one ascent, in bytes: the wrapper's persistent buffers (θ backups,
    masks) and the transient peak of ``first_step`` above them."""

    persistent: int
    transient: int
    parameters: int

    @property
    def ratio(self) -> float:
        """(persistent + transient) / parameter bytes."""
        return (self.persistent + self.transient) / self.parameters if self.parameters else 0.0


def ascent_memory(
    opt: SharpnessAware, model: nn.Module, batch: Any, loss_fn: Callable[..., Tensor]
) -> AscentMemory | None:
    """Measure one ascent on ``batch`` and undo it: pass 1 under ``first_pass``, then
    ``first_step`` profiled, then ``abort_step`` (weights, mask draw and gradients as they
    were; BatchNorm buffers restored). A fresh optimizer allocates its θ backups inside
    ``first_step``: they then count as transient, the total is the same."""
    device = next(model.parameters()).device
    bn = snapshot_bn(model)
    try:
        opt.zero_grad(set_to_none=True)
        with opt.first_pass():
            loss_fn(model, batch).float().mean().backward()
        params = [p for p in opt.params if p.requires_grad]
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        # before first_step: a fresh optimizer allocates its backups inside it (transient)
        masks = getattr(opt.mask, "masks", None)
        persistent = tensor_bytes(list(opt.state.values())) + tensor_bytes(masks)
        transient = peak_allocated_bytes(lambda: opt.first_step(zero_grad=True), device)
    finally:
        opt.abort_step()
        restore_bn(bn)
    if transient is None:
        return None
    return AscentMemory(persistent, transient, param_bytes)
