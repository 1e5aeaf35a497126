"""Mixed precision: bf16 autocast, fp16 with a GradScaler, and overflow in either pass.

The scaler's bookkeeping is checked exactly on float64 models without autocast: scales
are powers of two, so a scaled-then-unscaled gradient is bit-identical to the plain one
and any deviation is a bug, not rounding.
"""

from __future__ import annotations

import copy
import warnings

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
    data,
    grad,
    mlp,
    weights_of,
)


def _sam(model: torch.nn.Module, **kwargs) -> effsam.SAM:
    return effsam.SAM(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO, **kwargs
    )


def _batches(n: int, dtype: torch.dtype = torch.float64) -> list[dict]:
    return [data(seed=50 + i, n=8, dtype=dtype) for i in range(n)]


def _quiet(fn, *args, **kwargs):
    # Skipped steps warn by design; these tests look at the outcome instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def test_scaled_float64_run_is_the_unscaled_run() -> None:
    """eps_denominator = 1 makes ε depend on the gradient's scale (ε = ρ g / (‖g‖ + 1)):
    an ascent computed before unscaling would be ~ρ g/‖g‖ instead and fail the check."""
    plain_model, scaled_model = mlp(0), mlp(0)
    plain, scaled = _sam(plain_model, eps_denominator=1.0), _sam(scaled_model, eps_denominator=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    ref = SGDMomentum()
    w = weights_of(mlp(0))
    for batch in _batches(3):
        effsam.sharpness_aware_step(plain_model, plain, batch, ce)
        result = effsam.sharpness_aware_step(scaled_model, scaled, batch, ce, scaler=scaler)
        assert not result.skipped
        eps = ascent(grad(mlp(0), w, batch), RHO, delta=1.0)
        w = ref.step(w, grad(mlp(0), add(w, eps), batch))
        assert_close(weights_of(scaled_model), w)
        assert_close(weights_of(scaled_model), weights_of(plain_model), atol=0)
    assert scaler.get_scale() == 2.0**16  # no overflow, growth interval not reached


def _inject(opt: effsam.SharpnessAware, where: str, active: dict):
    """loss_fn that turns the losses to inf in pass 1 (``opt.perturbed`` False) or in
    pass 2 only (``opt.perturbed`` True), while ``active["on"]``."""

    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        losses = ce(model, batch)
        hit = opt.perturbed if where == "pass2" else not opt.perturbed
        if active["on"] and hit and torch.is_grad_enabled():
            return losses * float("inf")
        return losses

    return loss_fn


def test_a_scaled_sliced_ascent_is_the_unscaled_one() -> None:
    """The reduced-batch ascent under a GradScaler: the same steps as without it (float64,
    ε scale-dependent through eps_denominator = 1, so an unscaled ascent would show)."""
    plain_model, scaled_model = mlp(0), mlp(0)
    kw = {"eps_denominator": 1.0, "ascent_fraction": 0.5, "ascent_seed": 4}
    plain, scaled = _sam(plain_model, **kw), _sam(scaled_model, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for batch in _batches(3):
        effsam.sharpness_aware_step(plain_model, plain, batch, ce)
        result = effsam.sharpness_aware_step(scaled_model, scaled, batch, ce, scaler=scaler)
        assert not result.skipped and result.ascent_samples == 4
        assert_close(weights_of(scaled_model), weights_of(plain_model), atol=0)


@pytest.mark.parametrize("variant", ["sam", "esam", "sam-slice"])
@pytest.mark.parametrize("where", ["pass1", "pass2"])
def test_overflow_skips_the_whole_step_and_backs_off(where: str, variant: str) -> None:
    model = mlp(0)
    if variant == "sam":
        opt = _sam(model)
    elif variant == "sam-slice":
        opt = _sam(model, ascent_fraction=0.5)
    else:
        opt = effsam.ESAM(
            torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
            rho=RHO,
            beta=0.5,
            gamma=0.5,
        )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    active = {"on": False}
    loss_fn = _inject(opt, where, active)
    batches = _batches(4)

    effsam.sharpness_aware_step(model, opt, batches[0], loss_fn, scaler=scaler)
    w0, state0 = weights_of(model), copy.deepcopy(opt.base.state_dict())

    active["on"] = True
    with pytest.warns(RuntimeWarning, match=where.replace("pass", "pass ")):
        result = effsam.sharpness_aware_step(model, opt, batches[1], loss_fn, scaler=scaler)
    active["on"] = False
    assert result.skipped
    assert_close(weights_of(model), w0, atol=0)  # weights restored exactly
    assert opt.steps == 1 and opt.skipped_steps == 1
    state1 = opt.base.state_dict()
    for i, s in state0["state"].items():  # the base optimizer was not stepped
        assert torch.equal(s["momentum_buffer"], state1["state"][i]["momentum_buffer"])
    assert scaler.get_scale() == 2.0**9  # backed off (growth interval 2 not reached)
    assert scaler._growth_tracker.item() == 0

    # The next steps work (no "unscale_() has already been called") and grow the scale
    # after two clean steps.
    for batch in batches[2:]:
        assert not effsam.sharpness_aware_step(model, opt, batch, loss_fn, scaler=scaler).skipped
    assert scaler.get_scale() == 2.0**10

    if variant == "sam":  # (ESAM's skipped step consumed an SWP draw: no simple reference)
        # A run that never saw the bad batch: scaling is exact in float64, so equal.
        ref_model = mlp(0)
        ref_opt = _sam(ref_model)
        ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        for batch in (batches[0], batches[2], batches[3]):
            effsam.sharpness_aware_step(ref_model, ref_opt, batch, ce, scaler=ref_scaler)
        assert_close(weights_of(model), weights_of(ref_model), atol=0)


def test_fp16_step_matches_fp32_and_scale_grows() -> None:
    model32, model16 = mlp(0, torch.float32), mlp(0, torch.float32)
    opt32, opt16 = _sam(model32), _sam(model16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    dtypes = []

    def loss16(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["x"])
        dtypes.append(logits.dtype)
        return torch.nn.functional.cross_entropy(logits.float(), batch["y"], reduction="none")

    start = weights_of(model32)
    for batch in _batches(4, torch.float32):
        effsam.sharpness_aware_step(model32, opt32, batch, ce)
        r = effsam.sharpness_aware_step(
            model16, opt16, batch, loss16, scaler=scaler, autocast="fp16"
        )
        assert not r.skipped
    assert set(dtypes) == {torch.float16}
    assert scaler.get_scale() == 2.0**10  # grew twice: 4 clean steps, growth interval 2
    # fp16 has ~3 decimal digits: compare the total update, relative to its size.
    w32, w16 = weights_of(model32), weights_of(model16)
    for n in w32:
        update32, update16 = w32[n] - start[n], w16[n] - start[n]
        err = (update16 - update32).norm() / update32.norm()
        assert err < 2e-2, (n, float(err))


def test_fp16_real_overflow_backs_off_until_the_steps_go_through() -> None:
    """No injection: a huge initial scale overflows fp16's backward for real."""
    model = mlp(0, torch.float32)
    opt = _sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    start = weights_of(model)
    skipped = []
    for batch in _batches(40, torch.float32):
        r = _quiet(
            effsam.sharpness_aware_step, model, opt, batch, ce, scaler=scaler, autocast="fp16"
        )
        skipped.append(r.skipped)
        if not r.skipped:
            break
    n_skipped = skipped.index(False)
    assert n_skipped > 0, "2^40 did not overflow fp16: the test exercised nothing"
    assert scaler.get_scale() == 2.0 ** (40 - n_skipped)
    assert opt.skipped_steps == n_skipped and opt.steps == 1
    w = weights_of(model)
    assert all(torch.isfinite(t).all() for t in w.values())
    assert any(not torch.equal(w[n], start[n]) for n in w)


def test_bf16_autocast_step_is_close_to_fp32() -> None:
    model32, model16 = mlp(0, torch.float32), mlp(0, torch.float32)
    opt32, opt16 = _sam(model32), _sam(model16)
    dtypes = []

    def loss_bf16(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["x"])
        dtypes.append(logits.dtype)
        return torch.nn.functional.cross_entropy(logits.float(), batch["y"], reduction="none")

    start = weights_of(model32)
    for batch in _batches(3, torch.float32):
        effsam.sharpness_aware_step(model32, opt32, batch, ce)
        r = effsam.sharpness_aware_step(model16, opt16, batch, loss_bf16, autocast="bf16")
        assert not r.skipped and r.loss.dtype == torch.float32
    assert set(dtypes) == {torch.bfloat16}
    for p in model16.parameters():
        assert p.dtype == torch.float32  # autocast leaves the master weights alone
    w32, w16 = weights_of(model32), weights_of(model16)
    for n in w32:
        update32, update16 = w32[n] - start[n], w16[n] - start[n]
        err = (update16 - update32).norm() / update32.norm()
        assert err < 5e-2, (n, float(err))


def test_plain_optimizer_with_scaler_skips_on_overflow() -> None:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    w0 = weights_of(model)

    def bad(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return ce(m, batch) * float("inf")

    r = effsam.sharpness_aware_step(model, opt, _batches(1)[0], bad, scaler=scaler)
    assert r.skipped and scaler.get_scale() == 2.0**9
    assert_close(weights_of(model), w0, atol=0)
    r = effsam.sharpness_aware_step(model, opt, _batches(1)[0], ce, scaler=scaler)
    assert not r.skipped


def _own_loop_step(model, opt, batch, scaler, inject: str | None) -> None:
    """The by-hand fp16 recipe of docs/scaling.md (without autocast: float64 is exact)."""

    def loss(perturbed: bool) -> torch.Tensor:
        value = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        bad = inject == ("pass2" if perturbed else "pass1")
        return value * float("inf") if bad else value

    with opt.first_pass():
        scaler.scale(loss(False)).backward()
    scaler.unscale_(opt)
    if opt.first_step(zero_grad=True):
        with effsam.preserve_bn_stats(model):
            scaler.scale(loss(True)).backward()
        scaler.unscale_(opt.base)
    opt.second_step(zero_grad=True)
    scaler.update()


def test_own_loop_recipe_from_the_docs_matches_the_step() -> None:
    mine, theirs = mlp(0), mlp(0)
    opt_mine, opt_theirs = _sam(mine), _sam(theirs)
    s_mine = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    s_theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    plan = [None, "pass1", None, "pass2", None, None]
    for i, inject in enumerate(plan):
        batch = data(seed=70 + i, n=8)
        _quiet(_own_loop_step, mine, opt_mine, batch, s_mine, inject)
        active = {"on": inject is not None}
        loss_fn = _inject(opt_theirs, inject or "pass1", active)
        _quiet(effsam.sharpness_aware_step, theirs, opt_theirs, batch, loss_fn, scaler=s_theirs)
        assert s_mine.get_scale() == s_theirs.get_scale()
        assert_close(weights_of(mine), weights_of(theirs), atol=0)
    assert opt_mine.skipped_steps == opt_theirs.skipped_steps == 2
