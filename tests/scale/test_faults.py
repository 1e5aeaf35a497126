"""A step that fails part-way leaves everything as it was before the step: weights,
BatchNorm buffers, optimizer state, the SWP generator, frozen flags, the GradScaler."""

from __future__ import annotations

import copy

import pytest
import torch

import effsam
from helpers import assert_same
from scale._common import LR, MOMENTUM, RHO, bn_mlp, ce, data


class Boom(Exception):
    pass


def _build() -> tuple[torch.nn.Module, effsam.ESAM]:
    model = bn_mlp(0)
    model[0].bias.requires_grad_(False)  # a user's frozen tensor must stay frozen
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        rho=RHO,
        beta=0.5,
        gamma=0.5,
        seed=3,
    )
    return model, opt


def _failing(opt: effsam.SharpnessAware, where: str, armed: dict):
    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        losses = ce(model, batch)
        if not armed["on"]:
            return losses
        phase = "sds" if not torch.is_grad_enabled() else ("pass2" if opt.perturbed else "pass1")
        if where == phase:
            raise Boom(where)
        if where == f"{phase}_shape":
            return losses[:-1]
        return losses

    return loss_fn


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize(
    "where, error",
    [
        ("pass1", Boom),
        ("pass1_shape", ValueError),
        ("sds", Boom),
        ("pass2", Boom),
        ("pass2_shape", ValueError),
    ],
)
def test_failed_step_changes_nothing(where: str, error: type, scaled: bool) -> None:
    model, opt = _build()
    twin_model, twin_opt = _build()
    armed = {"on": False}
    loss_fn = _failing(opt, where, armed)

    def scaler() -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3) if scaled else None

    s, twin_s = scaler(), scaler()
    batches = [data(seed=900 + i, n=8) for i in range(4)]
    for batch in batches[:2]:  # momentum buffers, BN statistics, SWP draws all non-trivial
        effsam.sharpness_aware_step(model, opt, batch, loss_fn, scaler=s)
        effsam.sharpness_aware_step(twin_model, twin_opt, batch, ce, scaler=twin_s)

    model_before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    flags_before = [p.requires_grad for p in model.parameters()]
    scaler_before = copy.deepcopy(s.state_dict()) if s else None

    armed["on"] = True
    with pytest.raises(error):
        effsam.sharpness_aware_step(model, opt, batches[2], loss_fn, scaler=s)
    armed["on"] = False

    assert_same(model.state_dict(), model_before, "model")  # weights and BN buffers
    assert_same(opt.state_dict(), opt_before, "optimizer")  # moments, counters, SWP generator
    assert [p.requires_grad for p in model.parameters()] == flags_before
    assert all(p.grad is None for p in model.parameters())
    assert not opt.perturbed
    if s is not None:
        assert_same(s.state_dict(), scaler_before, "scaler")

    # The run continues exactly as one that never saw the failure.
    for batch in batches[2:]:
        effsam.sharpness_aware_step(model, opt, batch, loss_fn, scaler=s)
        effsam.sharpness_aware_step(twin_model, twin_opt, batch, ce, scaler=twin_s)
    assert_same(model.state_dict(), twin_model.state_dict(), "model after")
    assert_same(opt.state_dict(), twin_opt.state_dict(), "optimizer after")
    if s is not None:
        assert_same(s.state_dict(), twin_s.state_dict(), "scaler after")


def test_failed_plain_step_changes_nothing() -> None:
    model = bn_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    s = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    effsam.sharpness_aware_step(model, opt, data(seed=1, n=8), ce, scaler=s)
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    def wrong_shape(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return ce(m, batch)[:-1]

    with pytest.raises(ValueError, match="shape"):
        effsam.sharpness_aware_step(model, opt, data(seed=2, n=8), wrong_shape, scaler=s)
    # The forward ran, so BN statistics moved; they must be put back.
    assert_same(model.state_dict(), before[0])
    assert_same(opt.state_dict(), before[1])
    effsam.sharpness_aware_step(model, opt, data(seed=3, n=8), ce, scaler=s, clip_grad_norm=1.0)
