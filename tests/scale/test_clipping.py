"""Clipping by global norm applies to the final (pass-2) gradient, after unscaling and
accumulation; the expected update is computed here from the formulas."""

from __future__ import annotations

import pytest
import torch

import effsam
from scale._common import (
    LR,
    MOMENTUM,
    RHO,
    SGDMomentum,
    add,
    ascent,
    assert_close,
    ce,
    clip,
    data,
    grad,
    mlp,
    norm,
    weights_of,
)

MAX_NORM = 0.05  # well below these gradients' norms (~0.3-1), so clipping is active


@pytest.mark.parametrize("scaled, accumulation", [(False, 1), (True, 1), (False, 3), (True, 2)])
def test_update_is_the_base_step_on_the_clipped_pass_two_gradient(
    scaled: bool, accumulation: int
) -> None:
    """With a GradScaler (float64: exact), clipping before unscaling would clip
    2^12 · g to MAX_NORM and then shrink it by 2^12: the check would fail."""
    model = mlp(0)
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    w, ref = weights_of(model), SGDMomentum()
    for step in range(3):
        batch = data(seed=600 + step, n=12)
        eps = ascent(grad(model, w, batch), RHO)
        g2 = grad(model, add(w, eps), batch)
        assert float(norm(g2)) > 2 * MAX_NORM, "clipping would not be active"
        w = ref.step(w, clip(g2, MAX_NORM))
        effsam.sharpness_aware_step(
            model,
            opt,
            batch,
            ce,
            scaler=scaler,
            accumulation_steps=accumulation,
            clip_grad_norm=MAX_NORM,
        )
        assert_close(weights_of(model), w)


def test_clipping_leaves_small_gradients_alone() -> None:
    clipped, free = mlp(0), mlp(0)
    opt_c = effsam.SAM(torch.optim.SGD(clipped.parameters(), lr=LR), rho=RHO)
    opt_f = effsam.SAM(torch.optim.SGD(free.parameters(), lr=LR), rho=RHO)
    for step in range(2):
        batch = data(seed=700 + step, n=8)
        effsam.sharpness_aware_step(clipped, opt_c, batch, ce, clip_grad_norm=1e3)
        effsam.sharpness_aware_step(free, opt_f, batch, ce)
    assert_close(weights_of(clipped), weights_of(free), atol=0)


@pytest.mark.parametrize("scaled", [False, True])
def test_plain_optimizer_clips_after_unscaling(scaled: bool) -> None:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    w, ref = weights_of(model), SGDMomentum()
    for step in range(2):
        batch = data(seed=800 + step, n=12)
        w = ref.step(w, clip(grad(model, w, batch), MAX_NORM))
        effsam.sharpness_aware_step(
            model, opt, batch, ce, scaler=scaler, accumulation_steps=2, clip_grad_norm=MAX_NORM
        )
        assert_close(weights_of(model), w)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_clip_value_validation(bad: float) -> None:
    model = mlp(0)
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        effsam.sharpness_aware_step(model, opt, data(seed=0, n=4), ce, clip_grad_norm=bad)
