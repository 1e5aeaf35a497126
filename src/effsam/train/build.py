"""Builders that turn a :class:`Config` into the objects of a run: data, loaders, model,
optimizer, LR schedule, loss function."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from effsam.optim import SharpnessAware, create_optimizer
from effsam.optim.registry import accepted_kwargs

from .config import Config, OptimConfig


def load_data(cfg: Config) -> Any:
    """The data set named by ``cfg.data`` (an ``effsam.data.ImageData``), with its label noise
    (``data.label_noise``) applied to the training labels."""
    from effsam.data import load_dataset

    d = cfg.data
    return load_dataset(
        d.dataset,
        data_dir=d.data_dir,
        train_subset=d.train_subset,
        seed=cfg.seed if d.subset_seed is None else d.subset_seed,
        download=d.download,
        allow_unverified=d.allow_unverified,
        image_size=d.image_size,
        synthetic_shape=tuple(d.synthetic_shape),
        synthetic_classes=d.synthetic_classes,
        synthetic_train=d.synthetic_train,
        synthetic_test=d.synthetic_test,
        label_noise=d.label_noise,
        label_noise_seed=d.label_noise_seed,  # never the run's seed: every run sees one noise
    )


def make_loaders(
    cfg: Config, data: Any, rank: int, world_size: int, device: torch.device
) -> tuple[Any, Any]:
    """The training loader (this worker's shard) and this worker's share of the test set.

    The test set is split by striding, without padding, so every image is evaluated exactly
    once across workers and the reduced accuracy is exact.
    """
    from effsam.data import BatchLoader

    d = cfg.data
    train = BatchLoader(
        data.train_x,
        data.train_y,
        d.batch_size,
        shuffle=True,
        drop_last=d.drop_last,
        seed=cfg.seed,
        augment=d.augment if d.augment is not None else data.augment,
        cutout=d.cutout,
        mean=data.mean,
        std=data.std,
        rank=rank,
        world_size=world_size,
        device=device,
    )
    test = BatchLoader(
        data.test_x[rank::world_size],
        data.test_y[rank::world_size],
        d.eval_batch_size,
        shuffle=False,
        drop_last=False,
        mean=data.mean,
        std=data.std,
        device=device,
    )
    return train, test


def build_model(cfg: Config, num_classes: int, in_channels: int) -> nn.Module:
    """The network named by ``cfg.model``."""
    from effsam.models import create_model

    m = cfg.model
    return create_model(
        m.name, num_classes=num_classes, in_channels=in_channels, width=m.width, **m.kwargs
    )


def optimizer_args(o: OptimConfig, steps_per_epoch: int, epochs: int, seed: int) -> dict[str, Any]:
    """The wrapper arguments with the run-dependent ones filled in when not given.

    This is the one place where a run's facts reach the optimizer: an optimizer (or policy)
    registered with one of these keyword arguments gets it from here, in every run, the
    dry-run estimate and the validation's dry build. An optimizer that needs the run's
    total number of optimizer steps takes ``total_steps``.

    * ``total_steps`` (SSAM-D's drop-rate schedule): epochs × steps per epoch;
    * ``update_interval`` (SSAM's mask refresh): one epoch, the SSAM authors' setting;
    * ``seed`` (ESAM's SWP mask generator): the run's seed, so seeds differ in masks too;
    * ``ascent_seed`` (the reduced-batch ascent's slices and noise): the run's seed.
    """
    args = dict(o.args)
    accepted = accepted_kwargs(o.name)
    if "total_steps" in accepted and "total_steps" not in args:
        args["total_steps"] = max(1, epochs * steps_per_epoch)
    if "update_interval" in accepted and "update_interval" not in args:
        args["update_interval"] = max(1, steps_per_epoch)
    if "seed" in accepted and "seed" not in args:
        args["seed"] = seed
    if "ascent_seed" in accepted and "ascent_seed" not in args:
        args["ascent_seed"] = seed  # the reduced-batch ascent's slices and noise
    return args


def build_optimizer(
    cfg: Config, params: Any, steps_per_epoch: int, *, args: dict[str, Any] | None = None
) -> Optimizer:
    """The optimizer named by ``cfg.optim`` over ``params`` (a module or parameters)."""
    if args is None:
        args = optimizer_args(cfg.optim, steps_per_epoch, cfg.train.epochs, cfg.seed)
    return optimizer_from(cfg.optim, params, args)


def optimizer_from(o: OptimConfig, params: Any, args: dict[str, Any]) -> Optimizer:
    """``create_optimizer`` with the optimizer section's base settings and ``args``."""
    return create_optimizer(
        params,
        o.name,
        base=o.base,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        **args,
    )


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up to 1, then cosine to 0 or constant.

    Step t of the warm-up uses (t + 1) / warmup_steps so the first step already moves.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(cfg: Config, optimizer: Optimizer, steps_per_epoch: int) -> LambdaLR:
    """A per-step LambdaLR on the base optimizer (a wrapper shares its param_groups)."""
    base = optimizer.base if isinstance(optimizer, SharpnessAware) else optimizer
    total = cfg.train.epochs * steps_per_epoch
    warmup = round(cfg.train.warmup_epochs * steps_per_epoch)
    return LambdaLR(base, lr_factor(cfg.train.schedule, warmup, total))


def make_loss_fn(label_smoothing: float = 0.0) -> Callable[[nn.Module, Any], tuple[Tensor, Tensor]]:
    """Per-sample cross-entropy (what ESAM's data selection needs) and the logits."""

    def loss_fn(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = model(x)
        # float32 losses under autocast: per-sample sharpness differences are small
        losses = F.cross_entropy(
            logits.float(), y, reduction="none", label_smoothing=label_smoothing
        )
        return losses, logits.detach()

    return loss_fn
