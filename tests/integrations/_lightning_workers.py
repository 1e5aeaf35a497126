"""Worker for the 2-process Lightning DDP test (spawned processes import it by name).

Each rank runs a Lightning Trainer with ``strategy="ddp"`` on its own batches; the
processes are started by the test (Lightning sees ``LOCAL_RANK`` and does not launch
any). Rank 0 saves the trained weights.
"""

from __future__ import annotations

import os
import warnings
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
    g = torch.Generator().manual_seed(500 + 10 * step + rank)
    return torch.randn(B, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (B,), generator=g
    )


def make_opt(params):
    return effsam.SAM(torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.2)


def ddp_automatic(rank: int, world: int, out: str) -> None:
    from integrations._torchvision import make_importable

    make_importable()
    import lightning.pytorch as L

    from effsam.integrations.lightning import SharpnessAwareCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, b, i):
            return F.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return make_opt(self.net.parameters())

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
    module = Net()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[SharpnessAwareCallback()],
    )
    loader = torch.utils.data.DataLoader([batch(s, rank) for s in range(STEPS)], batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    if rank == 0:
        torch.save(
            {
                "weights": [p.detach().clone() for p in module.net.parameters()],
                "warned": any("pass 1's gradient" in str(w.message) for w in caught),
                "global_step": trainer.global_step,
            },
            Path(out) / "lightning_ddp.pt",
        )
