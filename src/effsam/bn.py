"""BatchNorm statistics: keep the ones pass 1 produced.

The original SAM keeps BatchNorm running statistics from the unperturbed pass only.
Setting the momentum to 0 during pass 2 (a common trick) still increments
``num_batches_tracked`` and, for layers built with ``momentum=None`` (cumulative
average), still changes the statistics. Here the buffers are copied before and copied
back after, which is exact for every flavour of BatchNorm (and InstanceNorm with
``track_running_stats``) and costs a few kilobytes of copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase


def norm_buffers(model: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every normalisation layer in ``model``."""
    buffers: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(module, name, None)
                if isinstance(buf, Tensor):
                    buffers.append(buf)
    return buffers


def snapshot_bn(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, copy) pairs for :func:`restore_bn`."""
    with torch.no_grad():
        return [(b, b.detach().clone()) for b in norm_buffers(model)]


def restore_bn(snapshot: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, saved in snapshot:
            buf.copy_(saved)


@contextlib.contextmanager
def preserve_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Leave every BatchNorm buffer exactly as it was on entry.

    Use it around pass 2 when driving the optimizer by hand::

        with effsam.preserve_bn_stats(model):
            loss_fn(model, batch).mean().backward()
        opt.second_step(zero_grad=True)
    """
    snapshot = snapshot_bn(model) if enabled else []
    try:
        yield
    finally:
        restore_bn(snapshot)
