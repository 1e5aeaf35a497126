"""The SharpnessAware skeleton, SAM and ASAM: exactness against the formulas, invariants,
state, schedulers, bad input and faults."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

import effsam
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

LR, MOM, WD, RHO = 0.1, 0.9, 1e-3, 0.3


def _batches(n_steps: int):
    return [tiny_data(seed=10 + i) for i in range(n_steps)]


def _reference_run(model, batches, adaptive: bool):
    """SGD-momentum SAM/ASAM written out from the formulas, on a copy of the model."""
    ref = copy.deepcopy(model)
    names = [n for n, _ in ref.named_parameters()]
    w = {n: p.detach().clone() for n, p in ref.named_parameters()}
    bufs: dict[str, torch.Tensor] = {}
    for x, y in batches:

        def loss_at(params, update_bn: bool):
            buffers = {n: b if update_bn else b.clone() for n, b in ref.named_buffers()}
            out = functional_call(ref, {**params, **buffers}, (x,))
            return F.cross_entropy(out, y)

        p1 = {n: w[n].clone().requires_grad_(True) for n in names}
        g = dict(zip(names, torch.autograd.grad(loss_at(p1, True), [p1[n] for n in names])))
        if adaptive:
            t = {n: w[n].abs() for n in names}
            norm = math.sqrt(sum(float(((t[n] * g[n]) ** 2).sum()) for n in names))
            eps = {n: RHO * t[n] ** 2 * g[n] / (norm + 1e-12) for n in names}
        else:
            norm = math.sqrt(sum(float((g[n] ** 2).sum()) for n in names))
            eps = {n: RHO * g[n] / (norm + 1e-12) for n in names}
        p2 = {n: (w[n] + eps[n]).requires_grad_(True) for n in names}
        g2 = dict(zip(names, torch.autograd.grad(loss_at(p2, False), [p2[n] for n in names])))
        for n in names:
            d = g2[n] + WD * w[n]
            bufs[n] = d.clone() if n not in bufs else MOM * bufs[n] + d
            w[n] = w[n] - LR * bufs[n]
    return w, {n: b.clone() for n, b in ref.named_buffers()}


def _mean_ce(model, batch):
    return per_sample_ce(model, batch)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_golden_three_steps_float64(adaptive, foreach):
    model = tiny_bn_net()
    batches = _batches(3)
    expected_w, expected_buffers = _reference_run(model, batches, adaptive)
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    opt = effsam.SAM(base, rho=RHO, adaptive=adaptive, foreach=foreach)
    for batch in batches:
        effsam.sharpness_aware_step(model, opt, batch, _mean_ce)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected_w[name], rtol=1e-12, atol=1e-13)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, expected_buffers[name], rtol=1e-12, atol=1e-13)
    assert opt.steps == 3


def _train(model, opt, batches):
    for batch in batches:
        if isinstance(opt, effsam.SharpnessAware):
            effsam.sharpness_aware_step(model, opt, batch, _mean_ce)
        else:
            opt.zero_grad()
            _mean_ce(model, batch).mean().backward()
            opt.step()


BASE_SETTINGS = {
    "sgd": {"lr": LR, "momentum": MOM, "weight_decay": WD},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-2},
}


@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("variant", ["sam", "asam", "esam"])
def test_rho_zero_is_the_base_step(base_name, variant):
    batches = _batches(3)
    plain = tiny_bn_net()
    _train(
        plain,
        effsam.create_optimizer(plain, "sgd", base=base_name, **BASE_SETTINGS[base_name]),
        batches,
    )
    model = tiny_bn_net()
    # ESAM with SDS (γ < 1): at ρ = 0 nothing is selected (every sharpness is 0)
    kwargs = {"gamma": 0.5, "beta": 0.5} if variant == "esam" else {}
    opt = effsam.create_optimizer(
        model, variant, base=base_name, rho=0.0, **BASE_SETTINGS[base_name], **kwargs
    )
    _train(model, opt, batches)
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["sam", "asam", "esam"])
def test_foreach_matches_loop(variant):
    results = []
    for foreach in (True, False):
        model = tiny_bn_net()
        kwargs = {"beta": 0.5, "gamma": 1.0, "seed": 3} if variant == "esam" else {}
        opt = effsam.create_optimizer(
            model, variant, lr=LR, momentum=MOM, foreach=foreach, rho=0.2, **kwargs
        )
        _train(model, opt, _batches(4))
        results.append(clone_state(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_bn_buffers_equal_pass_one_alone(momentum):
    model = tiny_bn_net(momentum=momentum)
    batch = tiny_data()
    after_pass1 = copy.deepcopy(model)
    _mean_ce(after_pass1, batch).mean()  # one training-mode forward: what pass 1 does
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    effsam.sharpness_aware_step(model, opt, batch, _mean_ce)
    for (name, b), b1 in zip(model.named_buffers(), after_pass1.buffers()):
        assert torch.equal(b, b1), name
    assert int(model[1].num_batches_tracked) == 1


def test_preserve_bn_stats_for_the_two_phase_api():
    model = tiny_bn_net(momentum=None)
    batch = tiny_data()
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    with opt.first_pass():
        _mean_ce(model, batch).mean().backward()
    expected = clone_state(model)
    opt.first_step(zero_grad=True)
    with effsam.preserve_bn_stats(model):
        _mean_ce(model, batch).mean().backward()
    opt.second_step(zero_grad=True)
    for name, b in model.named_buffers():
        assert torch.equal(b, expected[name]), name
    # Without the guard, pass 2 would have changed them (the guard is not a no-op).
    _mean_ce(model, batch).mean()
    assert not torch.equal(model[1].running_mean, expected["1.running_mean"])


def test_closure_two_phase_and_step_function_agree():
    batches = _batches(3)
    finals = []
    for mode in ("closure", "two-phase", "step"):
        model = tiny_bn_net()
        opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM), rho=RHO)
        for batch in batches:
            if mode == "closure":

                def closure(batch=batch):
                    opt.zero_grad()
                    with effsam.preserve_bn_stats(model, enabled=opt.perturbed):
                        loss = _mean_ce(model, batch).mean()
                        loss.backward()
                    return loss

                opt.step(closure)
            elif mode == "two-phase":
                with opt.first_pass():
                    _mean_ce(model, batch).mean().backward()
                opt.first_step(zero_grad=True)
                with effsam.preserve_bn_stats(model):
                    _mean_ce(model, batch).mean().backward()
                opt.second_step(zero_grad=True)
            else:
                effsam.sharpness_aware_step(model, opt, batch, _mean_ce)
        finals.append(clone_state(model))
    for other in finals[1:]:
        for k in finals[0]:
            assert torch.equal(finals[0][k], other[k]), k


@pytest.mark.parametrize(
    "base_factory",
    [
        lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOM, weight_decay=WD),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    ],
    ids=["sgd-momentum", "adamw"],
)
@pytest.mark.parametrize("variant", ["sam", "esam"])
def test_state_dict_round_trip_continues_bit_identically(base_factory, variant):
    batches = _batches(6)

    def make():
        model = tiny_bn_net()
        if variant == "sam":
            opt = effsam.SAM(base_factory(model.parameters()), rho=RHO)
        else:
            opt = effsam.ESAM(
                base_factory(model.parameters()), rho=RHO, beta=0.5, gamma=0.5, seed=7
            )
        return model, opt

    model, opt = make()
    _train(model, opt, batches)
    straight = clone_state(model)

    model, opt = make()
    _train(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == 3
    _train(model2, opt2, batches[3:])
    for k, v in straight.items():
        assert torch.equal(model2.state_dict()[k], v), k
    # The base optimizer's moments really are in the state dict (not an empty shell).
    assert len(saved["opt"]["state"]) == len(list(model.parameters()))


def test_lr_scheduler_and_param_groups_are_shared():
    model = tiny_bn_net()
    base = torch.optim.SGD(model.parameters(), lr=0.4)
    opt = effsam.SAM(base, rho=RHO)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()"
        effsam.sharpness_aware_step(model, opt, tiny_data(), _mean_ce)
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.2)
    sched_base = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    base.step()
    sched_base.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "rho": 0.0})
    assert base.param_groups[-1]["params"][0] is extra
    assert len(opt.param_groups) == len(base.param_groups) == 2
    assert base.param_groups[0]["rho"] == RHO


def test_per_group_rho_and_unused_parameters():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2).double()
    b = torch.nn.Linear(3, 2).double()
    unused = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    base = torch.optim.SGD(
        [{"params": a.parameters()}, {"params": b.parameters(), "rho": 0.0}, {"params": [unused]}],
        lr=0.1,
    )
    opt = effsam.SAM(base, rho=0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    (a(x).sum() + b(x).sum()).backward()
    opt.first_step(zero_grad=True)
    moved_a = [not torch.equal(p, q) for p, q in zip(a.parameters(), before[:2])]
    moved_b = [not torch.equal(p, q) for p, q in zip(b.parameters(), before[2:])]
    assert all(moved_a) and not any(moved_b)
    # One global norm over both groups, ρ per group: ‖ε_a‖ = ρ_a ‖g_a‖ / ‖(g_a, g_b)‖.
    ga = torch.autograd.grad(a(x).sum(), list(a.parameters()))
    gb = torch.autograd.grad(b(x).sum(), list(b.parameters()))
    na = math.sqrt(sum(float((g**2).sum()) for g in ga))
    nb = math.sqrt(sum(float((g**2).sum()) for g in gb))
    eps = torch.cat([(p - q).flatten() for p, q in zip(a.parameters(), before[:2])])
    assert float(eps.detach().norm()) == pytest.approx(0.5 * na / math.hypot(na, nb), rel=1e-10)
    (a(x).sum() + b(x).sum()).backward()
    opt.second_step(zero_grad=True)
    assert torch.equal(unused.detach(), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        ({"rho": -0.1}, ValueError, "-0.1"),
        ({"rho": float("nan")}, ValueError, "nan"),
        ({"rho": float("inf")}, ValueError, "inf"),
        ({"rho": "0.05"}, TypeError, "'0.05'"),
        ({"rho": True}, TypeError, "True"),
        ({"rho": 0.05, "eta": -1.0, "adaptive": True}, ValueError, "-1.0"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_value(kwargs, exc, fragment):
    model = tiny_bn_net()
    with pytest.raises(exc, match=fragment.replace("(", r"\(")):
        effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_bad_base_and_missing_closure():
    model = tiny_bn_net()
    with pytest.raises(TypeError, match="list"):
        effsam.SAM(list(model.parameters()))
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already sharpness-aware"):
        effsam.SAM(opt)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="-1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "rho": -1})
    with pytest.raises(ValueError, match="Unknown optimizer 'samm'"):
        effsam.create_optimizer(model, "samm")
    with pytest.raises(TypeError, match="betta"):
        effsam.create_optimizer(model, "esam", betta=0.5)


def _nonfinite_loss(where: str, opt_holder: list):
    def loss_fn(model, batch):
        losses = per_sample_ce(model, batch)
        perturbed = opt_holder[0].perturbed
        if (where == "pass1" and not perturbed) or (where == "pass2" and perturbed):
            losses = losses * torch.tensor(float("nan"), dtype=losses.dtype)
        return losses

    return loss_fn


@pytest.mark.parametrize("where", ["pass1", "pass2"])
def test_non_finite_gradients_skip_the_step(where):
    model = tiny_bn_net()
    batch = tiny_data()
    effsam.sharpness_aware_step(
        model,
        effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM), rho=RHO),
        batch,
        _mean_ce,
    )
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM), rho=RHO)
    effsam.sharpness_aware_step(model, opt, batch, _mean_ce)  # momentum buffers exist now
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    momenta = {k: v["momentum_buffer"].clone() for k, v in opt.base.state_dict()["state"].items()}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = effsam.sharpness_aware_step(model, opt, batch, _nonfinite_loss(where, [opt]))
    assert result.skipped and opt.last_step_skipped and opt.skipped_steps == 1
    assert opt.steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    for k, v in opt.base.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], momenta[k])
    # The next good step proceeds normally.
    assert not effsam.sharpness_aware_step(model, opt, batch, _mean_ce).skipped


def test_first_step_twice_is_an_error():
    model = tiny_bn_net()
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    _mean_ce(model, tiny_data()).mean().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
