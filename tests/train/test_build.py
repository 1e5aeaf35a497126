"""Builders: LR schedule, scheduler sharing param groups with the wrapper, loss function,
run-dependent optimizer arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effsam.optim import SharpnessAware
from effsam.optim.registry import accepted_kwargs
from effsam.train.build import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    make_loss_fn,
    optimizer_args,
)
from effsam.train.config import load_config


def test_cosine_with_warmup():
    f = lr_factor("cosine", warmup_steps=4, total_steps=20)
    assert [f(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(12) == pytest.approx(0.5)  # halfway through the cosine part
    assert f(20) == pytest.approx(0.0, abs=1e-12)
    assert f(19) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_constant_schedule_after_warmup():
    f = lr_factor("constant", warmup_steps=2, total_steps=10)
    assert [f(t) for t in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_scheduler_moves_the_lr_the_wrapper_uses():
    cfg = load_config(None, {"optim.name": "esam", "optim.lr": 0.1, "train.epochs": 2})
    model = nn.Linear(3, 2)
    opt = build_optimizer(cfg, model, steps_per_epoch=5)
    assert isinstance(opt, SharpnessAware)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(5):
        sched.step()
    # halfway through 10 steps of cosine: the base and the wrapper see the same lr
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_optimizer_args_fill_run_dependent_values_only_when_missing():
    cfg = load_config(None, {"optim.name": "ssam-d", "optim.args": {"rho": 0.1}})
    args = optimizer_args(cfg.optim, steps_per_epoch=7, epochs=3, seed=5)
    assert args == {"rho": 0.1, "total_steps": 21, "update_interval": 7, "seed": 5}
    cfg = load_config(None, {"optim.name": "ssam-f", "optim.args": {"update_interval": 2}})
    assert optimizer_args(cfg.optim, 7, 3, 0)["update_interval"] == 2
    cfg = load_config(None, {"optim.name": "esam"})
    assert optimizer_args(cfg.optim, 7, 3, 4) == {"seed": 4}
    assert optimizer_args(load_config(None, {"optim.name": "sgd"}).optim, 7, 3, 4) == {}


def test_the_run_seed_goes_only_to_optimizers_that_draw_at_random():
    for name in ("ssam-f", "ssam-f-tensor"):  # SSAM-F's mask comes from the Fisher alone
        assert "seed" not in accepted_kwargs(name)
        cfg = load_config(None, {"optim.name": name})
        assert "seed" not in optimizer_args(cfg.optim, 7, 3, 4)
    cfg = load_config(None, {"optim.name": "ssam-f", "optim.args": {"seed": 1}})
    with pytest.raises(TypeError, match=r"unknown arguments \['seed'\]"):
        build_optimizer(cfg, nn.Linear(3, 2), steps_per_epoch=7)


def test_accepted_kwargs():
    assert accepted_kwargs("sgd") == set()
    assert {"rho", "beta", "gamma", "seed"} <= accepted_kwargs("esam")
    assert "gamma" not in accepted_kwargs("esam-swp")  # fixed by the registry
    assert not {"params", "defaults", "base"} & accepted_kwargs("sam")


def test_loss_fn_gives_per_sample_losses_and_logits():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    losses, logits = make_loss_fn()(model, (x, y))
    assert losses.shape == (5,) and logits.shape == (5, 3)
    assert torch.allclose(losses, nn.functional.cross_entropy(model(x), y, reduction="none"))
    smoothed, _ = make_loss_fn(0.2)(model, (x, y))
    expected = nn.functional.cross_entropy(model(x), y, reduction="none", label_smoothing=0.2)
    assert torch.allclose(smoothed, expected) and not torch.allclose(smoothed, losses)
    assert not logits.requires_grad
