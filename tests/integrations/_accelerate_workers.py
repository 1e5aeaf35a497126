"""Worker for the 2-process accelerate test (spawned processes import it by name)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import effsam

STEPS, B = 3, 6


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(900 + 10 * step + rank)
    return torch.randn(B, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (B,), generator=g
    )


def make_opt(params):
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return effsam.ESAM(base, rho=0.2, beta=0.5, gamma=1.0, seed=5)


def per_sample(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def accelerate_ddp(rank: int, world: int, out: str) -> None:
    import accelerate

    from effsam.integrations.accelerate import sharpness_aware_step

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    acc = accelerate.Accelerator(cpu=True)
    model = mlp()
    model, opt = acc.prepare(model, make_opt(model.parameters()))
    for step in range(STEPS):
        sharpness_aware_step(acc, model, opt, batch(step, rank), per_sample, sync_ascent=True)
    if rank == 0:
        torch.save(
            {
                "weights": [p.detach().clone() for p in acc.unwrap_model(model).parameters()],
                "ddp": type(model).__name__,
                "world": acc.num_processes,
            },
            Path(out) / "accelerate_ddp.pt",
        )
