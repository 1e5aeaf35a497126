"""Data-parallel plumbing: set up from torchrun's environment, reduce metrics, tear down."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → this worker's GPU if there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device


def setup(device_name: str) -> DistContext:
    """Joins the process group when launched by torchrun (``RANK``/``WORLD_SIZE`` set).

    gloo on CPU, nccl on CUDA. A single process without those variables runs alone.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(0, 1, 0, resolve_device(device_name))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30)
        )
    return DistContext(rank, world_size, local_rank, device)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """Reduces ``tensor`` in place over workers (a no-op alone); returns it."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every worker (so all take the same branch)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every worker.

    Each worker's last training forward updated its own running statistics; rank 0's are
    the ones checkpointed, so evaluation everywhere uses those.
    """
    if not ctx.enabled:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
