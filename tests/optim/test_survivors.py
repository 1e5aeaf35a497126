"""Behaviour the rest of the suite left unchecked: the second branch of a kernel (ASAM's η on
the foreach path, the unchunked half-precision norm), policies in combination (AE-SAM × SWP,
a schedule × a skipped step), a failure part-way through a load, ESAM-mix's update at a
weight other than ½, and AE-SAM's statistics themselves. Each check is against the formula
written out here, in float64."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import effsam
from effsam.optim.schedule import AdaptiveSchedule

RHO = 0.2


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(seed: int = 1, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _losses(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _grads(model: nn.Module, params: dict[str, torch.Tensor], x, y) -> list[torch.Tensor]:
    live = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    loss = F.cross_entropy(functional_call(model, live, (x,)), y)
    return list(torch.autograd.grad(loss, list(live.values())))


# ------------------------------------------------------------------ ASAM's η, both kernels


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_asam_with_eta_perturbs_every_tensor_by_the_formula(foreach: bool) -> None:
    """ε = ρ T² g / (‖T g‖ + δ), T = |θ| + η on every tensor (no ``adaptive_only``)."""
    model, eta = _net(), 0.05
    opt = effsam.ASAM(
        torch.optim.SGD(model.parameters(), lr=0.1), rho=RHO, eta=eta, foreach=foreach
    )
    _losses(model, _batch()).mean().backward()
    theta = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.detach().clone() for p in model.parameters()]
    t = [th.abs() + eta for th in theta]
    norm = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g)))
    opt.first_step(zero_grad=True)
    for p, th, ti, gi in zip(model.parameters(), theta, t, g):
        expected = th + RHO * ti**2 * gi / (norm + 1e-12)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=1e-15)
    # η matters here: without it the perturbation differs
    t0 = [th.abs() for th in theta]
    norm0 = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t0, g)))
    without = theta[0] + RHO * t0[0] ** 2 * g[0] / (norm0 + 1e-12)
    assert (without - next(model.parameters()).detach()).abs().max() > 1e-6


# ------------------------------------------------------------- half-precision norms


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("n", [1000, 70_000], ids=["unchunked", "chunked"])
def test_a_half_precision_gradient_whose_norm_exceeds_fp16_range_is_not_skipped(
    foreach: bool, n: int
) -> None:
    """‖g‖ = 3000 √n > 65 504 although every element is finite: the step is taken and
    ε = ρ g/‖g‖ = ρ/√n per element."""
    p = nn.Parameter(torch.zeros(n, dtype=torch.float16))
    opt = effsam.SAM(torch.optim.SGD([p], lr=0.1), rho=RHO, foreach=foreach)
    p.grad = torch.full_like(p, 3000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.first_step(zero_grad=True)
    expected = torch.full((n,), RHO / math.sqrt(n), dtype=torch.float64)
    torch.testing.assert_close(p.detach().double(), expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("zero_grad", [True, False], ids=["zero-grad", "keep-grads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["sam", "asam"])
def test_half_precision_ascent_is_the_formula(method: str, dtype, zero_grad: bool) -> None:
    """ε = ρ T² g / ‖T g‖ (T = 1 for SAM, |θ| + η for ASAM) on half-precision tensors of
    several sizes (one element, an odd count, one above a norm chunk), the norm accumulated
    in float32 — through the θ backups used as the upcast's work space where they are free
    (SAM) and not where they hold T (ASAM). Against the formula in float64 on the same
    half-precision θ and g, to half precision's rounding."""
    torch.manual_seed(0)
    shapes = [(1,), (7, 3), (300, 250)]
    ps = [nn.Parameter((torch.randn(s) * 0.5).to(dtype)) for s in shapes]
    opt = effsam.create_optimizer(ps, method, lr=0.1, rho=RHO)
    for p in ps:
        p.grad = torch.randn_like(p, dtype=torch.float32).mul_(0.01).to(dtype)
    theta = [p.detach().double() for p in ps]
    g = [p.grad.double() for p in ps]
    eta = opt.ascent.eta if method == "asam" else 0.0
    t = [th.abs() + eta for th in theta] if method == "asam" else [torch.ones_like(x) for x in g]
    norm = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g)))
    assert opt.first_step(zero_grad=zero_grad)
    for p, th, ti, gi in zip(ps, theta, t, g):
        eps = RHO * ti**2 * gi / norm
        got = p.detach().double() - th
        # θ + ε rounds to the half-precision grid of θ: compare within one ulp of θ + ε
        ulp = (th.abs() + eps.abs()) * (2**-7 if dtype == torch.bfloat16 else 2**-10)
        assert bool(((got - eps).abs() <= ulp + 1e-12).all()), float((got - eps).abs().max())
    opt.restore()
    for p, th in zip(ps, theta):
        assert torch.equal(p.detach().double(), th)


# ----------------------------------------------------------- AE-SAM's statistics


def test_adaptive_schedule_mean_and_variance_follow_their_recurrences() -> None:
    """μ ← δμ + (1−δ)x, then σ² ← δσ² + (1−δ)(x − μ)² with the NEW μ; checked on the
    statistics, not only on the decisions (which can agree under both orders)."""
    delta = 0.8
    xs = [3.0, 0.5, 7.0, 1.5, 2.0, 12.0, 0.25, 4.0]
    sched = AdaptiveSchedule(total_steps=len(xs), delta=delta)
    mu = var = 0.0
    for x in xs:
        mu = delta * mu + (1 - delta) * x
        var = delta * var + (1 - delta) * (x - mu) ** 2
        sched.decide(x)
        sched.commit()
        assert sched.mean == pytest.approx(mu, rel=1e-14, abs=1e-300)
        assert sched.var == pytest.approx(var, rel=1e-14, abs=1e-300)


# ------------------------------------------------ a load that fails part-way


def test_a_load_failing_after_the_base_loaded_leaves_everything_as_it_was(monkeypatch) -> None:
    """The failure comes after the base optimizer's state, the counters and the mask were
    replaced: all of it is rolled back, and the optimizer then continues as if the load had
    never been tried."""
    model = _net()
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=RHO, beta=0.5, gamma=1.0
    )
    for i in range(2):
        effsam.sharpness_aware_step(model, opt, _batch(seed=i), _losses)
    saved = copy.deepcopy(opt.state_dict())
    for i in range(2, 4):
        effsam.sharpness_aware_step(model, opt, _batch(seed=i), _losses)
    twin_model = copy.deepcopy(model)
    twin = effsam.ESAM(
        torch.optim.SGD(twin_model.parameters(), lr=0.1, momentum=0.9), rho=RHO, beta=0.5, gamma=1.0
    )
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))

    calls = {"n": 0}
    real = opt.selection.load_state_dict

    def fail_once(state):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure after the base state was loaded")
        return real(state)

    monkeypatch.setattr(opt.selection, "load_state_dict", fail_once)
    with pytest.raises(RuntimeError, match="injected"):
        opt.load_state_dict(saved)
    assert opt.steps == 4
    # the momentum buffers are those after step 4, not the saved ones after step 2
    for a, b in zip(opt.base.state.values(), twin.base.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # and the optimizer (mask generator included) continues exactly as its twin does
    for i in range(4, 7):
        effsam.sharpness_aware_step(model, opt, _batch(seed=i), _losses)
        effsam.sharpness_aware_step(twin_model, twin, _batch(seed=i), _losses)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------- AE-SAM × SWP


def test_swp_leaves_pass_one_dense_while_ae_sam_has_not_decided() -> None:
    """AE-SAM decides from pass 1's gradient norm, so pass 1 must see every tensor even with
    SWP; a plain (non-sharpness-aware) AE-SAM step then updates every tensor with the whole
    gradient, as SGD would."""
    model = _net()
    ref = copy.deepcopy(model)
    opt = effsam.create_optimizer(
        model, "esam", lr=0.1, schedule="adaptive", total_steps=50, beta=0.5, gamma=1.0, seed=3
    )
    batch = _batch()
    with opt.first_pass():
        _losses(model, batch).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()

    # steps until AE-SAM takes a plain step; that step is SGD on the whole gradient
    model2 = copy.deepcopy(ref)
    opt2 = effsam.create_optimizer(
        model2, "esam", lr=0.1, schedule="adaptive", total_steps=50, beta=0.5, gamma=1.0, seed=3
    )
    for i in range(20):
        b = _batch(seed=10 + i)
        before = {n: p.detach().clone() for n, p in model2.named_parameters()}
        r = effsam.sharpness_aware_step(model2, opt2, b, _losses)
        if not r.sharpness_aware:
            g = _grads(model2, before, *b)
            for (_, p), gi, th in zip(model2.named_parameters(), g, before.values()):
                torch.testing.assert_close(p.detach(), th - 0.1 * gi, rtol=1e-12, atol=1e-14)
            return
    pytest.fail("AE-SAM took no plain step in 20 steps")


# -------------------------------------------------- a schedule × a skipped step


def test_a_skipped_step_still_advances_the_schedule_and_changes_nothing() -> None:
    """docs/algorithms.md: t counts the steps decided so far, skipped ones included. With
    SAM every 2nd step (t = 1, 3, ...), a skipped step at t = 0 makes t = 1 sharpness-aware;
    the skipped step changes no weight."""
    model = _net()
    opt = effsam.create_optimizer(model, "sam-interval", lr=0.1, every=2)
    before = [p.detach().clone() for p in model.parameters()]

    def nan_losses(m, b):
        return _losses(m, b) * float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r0 = effsam.sharpness_aware_step(model, opt, _batch(), nan_losses)
    assert r0.skipped
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    r1 = effsam.sharpness_aware_step(model, opt, _batch(seed=2), _losses)
    assert r1.sharpness_aware and not r1.skipped
    r2 = effsam.sharpness_aware_step(model, opt, _batch(seed=3), _losses)
    assert not r2.sharpness_aware


# ----------------------------------------------------- ESAM-mix at w ≠ ½


def test_esam_mix_update_is_the_weighted_blend_of_both_passes() -> None:
    """γ = 1/4 on 12 samples: k = 3, w = 1/4. g = w ∇L_{B+}(θ+ε) + (1 − w) ∇L_B(θ), with B+
    the k samples whose loss rises most under ε; SGD at lr 1 (no BN, β = 1)."""
    model, lr = _net(), 1.0
    ref = copy.deepcopy(model)
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=lr), rho=RHO, beta=1.0, gamma=0.25, sds_update="mix"
    )
    x, y = _batch(n=12)
    effsam.sharpness_aware_step(model, opt, (x, y), _losses)

    theta = {n: p.detach().clone() for n, p in ref.named_parameters()}
    g = _grads(ref, theta, x, y)
    norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
    perturbed = {n: theta[n] + RHO * gi / (norm + 1e-12) for n, gi in zip(theta, g)}

    def per_sample(params):
        return F.cross_entropy(functional_call(ref, params, (x,)), y, reduction="none")

    with torch.no_grad():
        rise = per_sample(perturbed) - per_sample(theta)
    top = torch.topk(rise, 3).indices.sort().values
    g_top = _grads(ref, perturbed, x[top], y[top])
    w = 3 / 12
    for (_, p), th, gi, gt in zip(model.named_parameters(), theta.values(), g, g_top):
        torch.testing.assert_close(
            p.detach(), th - lr * (w * gt + (1 - w) * gi), rtol=1e-11, atol=1e-13
        )


# ------------------------------------------------ a user's ascent without the in-place kernel


class _TwiceAscent:
    """A user's ascent policy with T = 2 everywhere and only the required ``scales_``."""

    name = "twice"

    def scales_(self, params, out, foreach):
        for o in out:
            o.fill_(2.0)
        return True


@pytest.mark.parametrize("zero_grad", [True, False], ids=["zero-grad", "keep-grads"])
def test_an_ascent_with_only_scales_is_the_formula_and_keeps_the_gradients(zero_grad) -> None:
    """ε = ρ T² g / ‖T g‖ = 2ρ g/‖g‖ for T = 2; without ``mul_scales_`` (not an
    InPlaceAscent) ``first_step(zero_grad=False)`` forms ε in a copy and leaves g."""
    from effsam.optim.policy import AscentPolicy, InPlaceAscent

    ascent = _TwiceAscent()
    assert isinstance(ascent, AscentPolicy) and not isinstance(ascent, InPlaceAscent)
    model = _net()
    opt = effsam.SharpnessAware(torch.optim.SGD(model.parameters(), lr=0.1), RHO, ascent=ascent)
    _losses(model, _batch()).mean().backward()
    theta = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.detach().clone() for p in model.parameters()]
    norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
    assert opt.first_step(zero_grad=zero_grad)
    for p, th, gi in zip(model.parameters(), theta, g):
        torch.testing.assert_close(p.detach(), th + 2 * RHO * gi / norm, rtol=1e-12, atol=1e-12)
        if zero_grad:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, gi)
