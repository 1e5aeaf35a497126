"""Worker for the 2-process Hugging Face Trainer test (spawned processes import it)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import effsam

N, B, STEPS = 24, 4, 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def rows(rank: int):
    g = torch.Generator().manual_seed(700 + rank)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(N)]


class _Local(torch.utils.data.Dataset):
    """Each rank's own rows; the Trainer's distributed sampler is bypassed below."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def make_opt(params):
    return effsam.ESAM(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), rho=0.2, beta=0.5, gamma=1.0, seed=1
    )


def trainer_ddp(rank: int, world: int, out: str, accumulation: int) -> None:
    from integrations._torchvision import make_importable

    make_importable()
    import transformers

    from effsam.integrations.transformers import SharpnessAwareTrainer

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))

    class Trainer(SharpnessAwareTrainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(
                self.train_dataset,
                batch_size=B,
                sampler=self._get_train_sampler(),
                collate_fn=transformers.default_data_collator,
            )

    model = Tiny()
    args = transformers.TrainingArguments(
        output_dir=str(Path(out) / f"r{rank}"),
        per_device_train_batch_size=B,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_backend="gloo",
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Local(rows(rank)),
        optimizers=(make_opt(model.parameters()), None),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    if rank == 0:
        torch.save(
            {
                "weights": [p.detach().clone() for p in model.parameters()],
                "world": trainer.args.world_size,
                "steps": trainer.state.global_step,
            },
            Path(out) / "hf_ddp.pt",
        )
