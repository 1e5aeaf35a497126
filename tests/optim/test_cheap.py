"""The cheap ascents, in float64 against their formulas written out here: the reduced-batch
ascent (a slice of f·b samples, the noise, BN from pass 2), the partial-layer ascent (the
skipped tensors get no pass-1 weight gradient), the stale ascent (last step's gradient,
a true ascent every k-th step) and ESAM's BN repair (pass 2 normalised with the whole
batch's statistics)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.optim._random import stream_seed
from effsam.optim.cheap import PartialSAM, StaleSAM, last_layer_params, norm_params

RHO, LR, DELTA = 0.3, 0.1, 1e-12


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(i: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(50 + i)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def grads_at(model, params, x, y):
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, params)


def gnorm(gs):
    return torch.sqrt(sum((g**2).sum() for g in gs))


def sam_reference(model, x1, y1, x2, y2, noise=None):
    """One plain-SGD SAM step by hand: ascent on (x1, y1), descent on (x2, y2)."""
    ps = list(model.parameters())
    g = list(grads_at(model, ps, x1, y1))
    if noise is not None:
        sigma, zs = noise
        coef = sigma * gnorm(g) / gnorm(zs)
        g = [gi + coef * z for gi, z in zip(g, zs)]
    n = gnorm(g)
    theta = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(RHO * gi / (n + DELTA))
    g2 = grads_at(model, ps, x2, y2)
    with torch.no_grad():
        for p, t, gi in zip(ps, theta, g2):
            p.copy_(t - LR * gi)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR)


# ------------------------------------------------------------------ reduced-batch ascent
def expected_slice(seed: int, b: int, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(stream_seed(seed, "ascent-slice"))
    return torch.randperm(b, generator=gen)[:k].sort().values


@pytest.mark.parametrize("api", ["step", "closure", "two-phase"])
def test_slice_is_f_b_samples_and_the_update_is_the_formula(api):
    x, y = data()
    ref = mlp()
    idx = expected_slice(7, 8, 2)  # f = 1/4 of 8: k = 2, the generator's first draw
    sam_reference(ref, x[idx], y[idx], x, y)

    model = mlp()
    opt = effsam.SAM(sgd(model), rho=RHO, ascent_fraction=0.25, ascent_seed=7)
    seen = []

    def loss_fn(m, b):
        seen.append(len(b[0]))
        return ce(m, b)

    if api == "step":
        res = effsam.sharpness_aware_step(model, opt, (x, y), loss_fn)
        assert res.ascent_samples == 2 and res.selected == 8
    elif api == "closure":

        def closure():
            opt.zero_grad()
            part = opt.ascent_batch((x, y))
            loss = loss_fn(model, part).mean()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        with opt.first_pass():
            loss_fn(model, opt.ascent_batch((x, y))).mean().backward()
        assert opt.first_step(zero_grad=True)
        loss_fn(model, opt.ascent_batch((x, y))).mean().backward()  # pass 2: the batch
        opt.second_step(zero_grad=True)
    assert seen == [2, 8]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_slice_noise_is_the_written_out_draw():
    x, y = data()
    sigma = 0.5
    gen = torch.Generator().manual_seed(stream_seed(3, "ascent-slice"))
    idx = torch.randperm(8, generator=gen)[:4].sort().values  # f = 1/2
    ref = mlp()
    zs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ref.parameters()]
    sam_reference(ref, x[idx], y[idx], x, y, noise=(sigma, zs))

    model = mlp()
    opt = effsam.SAM(sgd(model), rho=RHO, ascent_fraction=0.5, ascent_noise=sigma, ascent_seed=3)
    effsam.sharpness_aware_step(model, opt, (x, y), ce)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # and the noise matters: without it the step differs
    plain = mlp()
    effsam.sharpness_aware_step(
        plain, effsam.SAM(sgd(plain), rho=RHO, ascent_fraction=0.5, ascent_seed=3), (x, y), ce
    )
    assert not torch.allclose(plain[0].weight, model[0].weight)


def test_slice_bn_statistics_are_pass_two_of_the_whole_batch():
    x, y = data(n=12)
    model = bn_net()
    opt = effsam.SAM(sgd(model), rho=RHO, ascent_fraction=0.25, ascent_seed=1)
    start = [b.clone() for b in model.buffers()]
    # by hand: the slice's ascent (its own batch statistics), then the running statistics
    # updated once, by the whole batch's forward at θ + ε
    ref = bn_net()
    idx = expected_slice(1, 12, 3)
    ps = list(ref.parameters())
    g = grads_at(ref, ps, x[idx], y[idx])
    for buf, s in zip(ref.buffers(), start):
        buf.copy_(s)  # the slice leaves no trace in the running statistics
    n = gnorm(g)
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(RHO * gi / (n + DELTA))
        h = ref[0](x)
        mean, var = h.mean(0), h.var(0, unbiased=True)
    m = 0.1
    effsam.sharpness_aware_step(model, opt, (x, y), ce)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, (1 - m) * start[0] + m * mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(bn.running_var, (1 - m) * start[1] + m * var, rtol=1e-12, atol=0)
    assert int(bn.num_batches_tracked) == 1


def test_slice_under_accumulation_slices_each_micro_batch():
    x, y = data(n=9)  # micro-batches of 4 and 5: slices of 2 and 3 (⌊2.5 + ½⌋)
    gen = torch.Generator().manual_seed(stream_seed(5, "ascent-slice"))
    i0 = torch.randperm(4, generator=gen)[:2].sort().values
    i1 = torch.randperm(5, generator=gen)[:3].sort().values + 4
    idx = torch.cat([i0, i1])
    ref = mlp()
    sam_reference(ref, x[idx], y[idx], x, y)  # the mean over the five sliced samples

    model = mlp()
    opt = effsam.SAM(sgd(model), rho=RHO, ascent_fraction=0.5, ascent_seed=5)
    seen = []

    def loss_fn(m, b):
        seen.append(len(b[0]))
        return ce(m, b)

    res = effsam.sharpness_aware_step(model, opt, (x, y), loss_fn, accumulation_steps=2)
    assert seen == [2, 3, 4, 5] and res.ascent_samples == 5
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_slice_under_bf16_autocast_runs_on_the_slice():
    x, y = data(n=16)
    model = mlp().float()
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, ascent_fraction=0.25)
    seen = []

    def loss_fn(m, b):
        seen.append(len(b[0]))
        return F.cross_entropy(m(b[0].float()), b[1], reduction="none")

    res = effsam.sharpness_aware_step(model, opt, (x, y), loss_fn, autocast="bf16")
    assert seen == [4, 16] and not res.skipped


def test_slice_with_a_schedule_and_a_skipped_step():
    """RST × slice × a skipped step: plain steps' pass 1 is the whole batch, sharpness-aware
    ones slice; a skipped step (in either kind) leaves weights and base state unchanged, and
    the steps after it are the formula again (checked by hand on the step after)."""
    model = mlp()
    opt = effsam.create_optimizer(
        model, "rst-slice", lr=LR, total_steps=8, rho=RHO, ascent_fraction=0.5,
        probability_schedule="constant", probability=0.5, seed=1,
    )  # fmt: skip
    sizes: list[int] = []

    def loss_fn(m, b):
        sizes.append(len(b[0]))
        return ce(m, b)

    kinds = set()
    for i in range(8):
        x, y = data(i)
        before = [p.detach().clone() for p in model.parameters()]
        mom = copy.deepcopy(opt.base.state_dict())
        with pytest.warns(RuntimeWarning, match="non-finite"):
            res = effsam.sharpness_aware_step(model, opt, (x * float("nan"), y), loss_fn)
        assert res.skipped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert str(opt.base.state_dict()) == str(mom)
        del sizes[:]
        # the next step, by hand from the same weights (plain SGD has no momentum here)
        ref = copy.deepcopy(model)
        gen = copy.deepcopy(opt.ascent_slice.generator)
        res = effsam.sharpness_aware_step(model, opt, (x, y), loss_fn)
        kinds.add(res.sharpness_aware)
        if res.sharpness_aware:
            idx = torch.randperm(8, generator=gen)[:4].sort().values
            sam_reference(ref, x[idx], y[idx], x, y)
            assert sizes == [4, 8]
        else:
            g = grads_at(ref, list(ref.parameters()), x, y)
            with torch.no_grad():
                for p, gi in zip(ref.parameters(), g):
                    p.sub_(LR * gi)
            assert sizes == [8]
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert kinds == {True, False}


def test_plain_scheduled_steps_do_not_slice():
    model = mlp()
    opt = effsam.create_optimizer(model, "late-slice", lr=LR, total_steps=8, rho=RHO)
    sizes = []

    def loss_fn(m, b):
        sizes.append(len(b[0]))
        return ce(m, b)

    for i in range(8):
        effsam.sharpness_aware_step(model, opt, data(i), loss_fn)
    # late start 0.875 of 8: step 7 is sharpness-aware (a slice of 2, then 8)
    assert sizes == [8] * 7 + [2, 8]


def test_a_pass_one_that_was_not_sliced_is_refused_and_changes_nothing():
    x, y = data()
    model = mlp()
    opt = effsam.SAM(sgd(model), rho=RHO, ascent_fraction=0.5)
    before = [p.clone() for p in model.parameters()]
    gen_before = opt.ascent_slice.generator.get_state()
    with opt.first_pass():
        ce(model, (x, y)).mean().backward()  # the whole batch: not what was asked
    with pytest.raises(RuntimeError, match="ascent_batch"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert torch.equal(opt.ascent_slice.generator.get_state(), gen_before)
    assert opt.steps == 0 and not opt.perturbed


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda m: effsam.create_optimizer(m, "sam", ascent_fraction=0.0), "ascent_fraction"),
        (lambda m: effsam.create_optimizer(m, "sam", ascent_fraction=1.5), "ascent_fraction"),
        (lambda m: effsam.create_optimizer(m, "sam", ascent_noise=-1.0), "ascent_noise"),
        (lambda m: effsam.create_optimizer(m, "sam", ascent_noise=float("nan")), "ascent_noise"),
        (lambda m: effsam.create_optimizer(m, "esam", ascent_fraction=0.5), "ascent_fraction"),
        (lambda m: effsam.ESAM(sgd(m), ascent_fraction=0.5), "sample selection"),
        (
            lambda m: effsam.create_optimizer(
                m, "sam", schedule="adaptive", total_steps=5, ascent_fraction=0.5
            ),
            "schedule",
        ),
        (
            lambda m: effsam.MSAM(
                torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), ascent_fraction=0.5
            ),
            "ascent pass",
        ),
    ],
)
def test_slice_refusals_name_the_value(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(mlp())


def test_slice_state_round_trip_and_another_fraction_refused():
    def make():
        model = mlp()
        return model, effsam.SAM(sgd(model), rho=RHO, ascent_fraction=0.5, ascent_noise=0.2)

    ref_model, ref_opt = make()
    for i in range(6):
        effsam.sharpness_aware_step(ref_model, ref_opt, data(i), ce)
    model, opt = make()
    for i in range(3):
        effsam.sharpness_aware_step(model, opt, data(i), ce)
    buf = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buf)
    buf.seek(0)
    ms, os_ = torch.load(buf, weights_only=False)
    model2, opt2 = make()
    model2.load_state_dict(ms)
    opt2.load_state_dict(os_)
    for i in range(3, 6):
        effsam.sharpness_aware_step(model2, opt2, data(i), ce)
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    other = effsam.SAM(sgd(mlp()), rho=RHO, ascent_fraction=0.25, ascent_noise=0.2)
    with pytest.raises(ValueError, match="ascent_fraction"):
        other.load_state_dict(os_)


@pytest.mark.parametrize("name", ["sam-slice", "sam-on", "sam-layers", "sam-stale"])
def test_rho_zero_is_the_base_step(name):
    model, ref = bn_net(), bn_net()
    opt = effsam.create_optimizer(model, name, lr=LR, momentum=0.9, rho=0.0)
    base = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    for i in range(4):
        effsam.sharpness_aware_step(model, opt, data(i), ce)
        base.zero_grad()
        ce(ref, data(i)).mean().backward()
        base.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


# ------------------------------------------------------------------ partial-layer ascent
def _pass1_grads(model, opt, x, y):
    """Which parameters got a weight gradient in pass 1 (two-phase API)."""
    with opt.first_pass():
        ce(model, opt.ascent_batch((x, y))).mean().backward()
    got = [p.grad is not None for p in model.parameters()]
    return got


def test_sam_on_perturbs_only_the_norm_layers_and_skips_the_others_gradients():
    x, y = data()
    model = bn_net()
    opt = effsam.create_optimizer(model, "sam-on", lr=LR, rho=RHO)
    assert [id(p) for p in norm_params(model)] == [id(model[1].weight), id(model[1].bias)]
    got = _pass1_grads(model, opt, x, y)
    assert got == [False, False, True, True, False, False]
    # ε = ρ g_S / ‖g_S‖ on S = {BN weight, BN bias}; nothing else moves
    gs = [model[1].weight.grad.clone(), model[1].bias.grad.clone()]
    n = gnorm(gs)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.first_step(zero_grad=True)
    moved = [p.detach() - b for p, b in zip(model.parameters(), before)]
    torch.testing.assert_close(moved[2], RHO * gs[0] / (n + DELTA), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(moved[3], RHO * gs[1] / (n + DELTA), rtol=1e-12, atol=1e-15)
    for i in (0, 1, 4, 5):
        assert torch.equal(moved[i], torch.zeros_like(moved[i]))
    # pass 2 is dense
    with effsam.preserve_bn_stats(model):
        ce(model, (x, y)).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.second_step(zero_grad=True)


def test_last_layers_stop_the_backward_and_random_layers_keep_unit_radius():
    x, y = data()
    model = bn_net()
    assert [id(p) for p in last_layer_params(model, 1)] == [id(model[3].weight), id(model[3].bias)]
    assert len(last_layer_params(model, 0.5)) == 4  # 3 layers: the last ⌈1.5⌉ = 2
    opt = effsam.create_optimizer(model, "sam-layers", lr=LR, rho=RHO, layers="last:1")
    assert _pass1_grads(model, opt, x, y) == [False, False, False, False, True, True]
    opt.abort_step()
    # random: each tensor with probability F, ‖ε‖ = ρ (no 1/β); no BN here (a bias before a
    # BN layer has a zero gradient, so its ε would be ~0)
    model = mlp()
    opt = effsam.create_optimizer(model, "sam-layers", lr=LR, rho=RHO, layers="random:0.5", seed=2)
    got = _pass1_grads(model, opt, x, y)
    assert 0 < sum(got) < 4
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    eps = [p.detach() - b for p, b in zip(model.parameters(), before)]
    torch.testing.assert_close(
        gnorm(eps), torch.tensor(RHO, dtype=torch.float64), rtol=1e-9, atol=0
    )
    opt.abort_step()


def test_partial_layers_with_a_slice_update_by_hand():
    x, y = data()
    model, ref = bn_net(), bn_net()
    opt = PartialSAM(sgd(model), rho=RHO, perturb=[model[3].weight], ascent_fraction=0.5,
                     ascent_seed=4)  # fmt: skip
    idx = expected_slice(4, 8, 4)
    w = ref[3].weight
    g = grads_at(ref, [w], x[idx], y[idx])[0]
    # the slice leaves the running statistics as they were (fresh: 0, 1, 0)
    ref[1].running_mean.zero_()
    ref[1].running_var.fill_(1.0)
    ref[1].num_batches_tracked.zero_()
    theta = [p.detach().clone() for p in ref.parameters()]
    with torch.no_grad():
        w.add_(RHO * g / (g.norm() + DELTA))
    g2 = grads_at(ref, list(ref.parameters()), x, y)
    with torch.no_grad():
        for p, t, gi in zip(ref.parameters(), theta, g2):
            p.copy_(t - LR * gi)
    effsam.sharpness_aware_step(model, opt, (x, y), ce)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for a, b in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers": "norm"}, "needs the model"),
        ({"layers": "last:0"}, "Invalid layers"),
        ({"layers": "random:1.5"}, "Invalid layers"),
        ({"layers": "top"}, "Invalid layers"),
        ({"layers": 3}, "Invalid layers"),
    ],
)
def test_partial_layer_refusals(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PartialSAM(sgd(mlp()), **kwargs)


def test_sam_on_needs_norm_layers_and_the_registry_needs_the_model():
    with pytest.raises(ValueError, match="no normalisation layer"):
        effsam.create_optimizer(mlp(), "sam-on")
    with pytest.raises(TypeError, match="needs the model"):
        effsam.create_optimizer(list(bn_net().parameters()), "sam-on")


# ------------------------------------------------------------------ stale ascent
def stale_reference(steps: int, k: int):
    """Plain SGD, stale ascent with refresh every k: written out."""
    model = mlp()
    ps = list(model.parameters())
    stale = None
    passes = []
    for t in range(steps):
        x, y = data(t)
        theta = [p.detach().clone() for p in ps]
        if stale is None or t % k == 0:
            g = grads_at(model, ps, x, y)
            n = gnorm(g)
            with torch.no_grad():
                for p, gi in zip(ps, g):
                    p.add_(RHO * gi / (n + DELTA))
            passes.append(2)
        else:
            n = gnorm(stale)
            with torch.no_grad():
                for p, s in zip(ps, stale):
                    p.add_(RHO * s / (n + DELTA))
            passes.append(1)
        g2 = grads_at(model, ps, x, y)
        with torch.no_grad():
            for p, th, gi in zip(ps, theta, g2):
                p.copy_(th - LR * gi)
        stale = [gi.clone() for gi in g2]
    return model, stale, passes


@pytest.mark.parametrize("api", ["step", "closure"])
def test_stale_ascent_is_last_steps_gradient_with_a_refresh_every_k(api):
    ref, ref_stale, ref_passes = stale_reference(7, 3)
    assert ref_passes == [2, 1, 1, 2, 1, 1, 2]
    model = mlp()
    opt = StaleSAM(sgd(model), rho=RHO, refresh_every=3)
    passes = []
    for t in range(7):
        b = data(t)
        calls = []
        if api == "step":

            def loss_fn(m, bb):
                calls.append(1)
                return ce(m, bb)

            effsam.sharpness_aware_step(model, opt, b, loss_fn)
        else:

            def closure():
                calls.append(1)
                opt.zero_grad()
                loss = ce(model, b).mean()
                loss.backward()
                return loss

            opt.step(closure)
        passes.append(len(calls))
    assert passes == ref_passes
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for p, s in zip(model.parameters(), ref_stale):
        torch.testing.assert_close(opt.state[p]["stale_grad"], s, rtol=1e-12, atol=1e-14)


def test_stale_with_a_schedule_and_a_skipped_step():
    """RST × stale × a skipped step: the skipped step changes neither the weights, nor the
    stale buffer, nor the count of sharpness-aware steps; a plain step's gradient becomes
    the stale direction."""
    model = mlp()
    opt = effsam.create_optimizer(
        model, "rst-stale", lr=LR, rho=RHO, total_steps=8, refresh_every=2,
        probability_schedule="constant", probability=0.7, seed=3,
    )  # fmt: skip
    stale_steps = 0
    for t in range(8):
        effsam.sharpness_aware_step(model, opt, data(t), ce)
        stale_steps += int(opt.last_step_stale)
        before = [p.detach().clone() for p in model.parameters()]
        bufs = [opt.state[p]["stale_grad"].clone() for p in model.parameters()]
        count = opt.aware_count
        x, y = data(t)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            assert effsam.sharpness_aware_step(model, opt, (x * float("nan"), y), ce).skipped
        assert opt.aware_count == count
        for p, b, s in zip(model.parameters(), before, bufs):
            assert torch.equal(p, b) and torch.equal(opt.state[p]["stale_grad"], s)
    assert stale_steps > 0
    # after a plain step the buffer is that step's gradient (written out)
    model = mlp()
    opt = effsam.create_optimizer(model, "rst-stale", lr=LR, rho=RHO, total_steps=100)
    res = effsam.sharpness_aware_step(model, opt, data(0), ce)  # p = 0 at step 0: plain
    assert not res.sharpness_aware
    ref = mlp()
    g = grads_at(ref, list(ref.parameters()), *data(0))
    for p, gi in zip(model.parameters(), g):
        torch.testing.assert_close(opt.state[p]["stale_grad"], gi, rtol=1e-12, atol=1e-15)


def test_stale_state_round_trip_and_refusals():
    def make():
        model = mlp()
        return model, StaleSAM(sgd(model), rho=RHO, refresh_every=3)

    ref_model, ref_opt = make()
    for t in range(6):
        effsam.sharpness_aware_step(ref_model, ref_opt, data(t), ce)
    model, opt = make()
    for t in range(2):
        effsam.sharpness_aware_step(model, opt, data(t), ce)
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2, opt2 = make()
    model2.load_state_dict(state[0])
    opt2.load_state_dict(state[1])
    for t in range(2, 6):
        effsam.sharpness_aware_step(model2, opt2, data(t), ce)
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="refresh_every"):
        StaleSAM(sgd(mlp()), refresh_every=2).load_state_dict(state[1])
    for bad in (0, -1):
        with pytest.raises(ValueError, match="refresh_every"):
            StaleSAM(sgd(mlp()), refresh_every=bad)
    with pytest.raises(TypeError, match="refresh_every"):
        StaleSAM(sgd(mlp()), refresh_every=1.5)


def test_stale_refresh_every_one_is_sam():
    model, ref = mlp(), mlp()
    opt = StaleSAM(sgd(model), rho=RHO, refresh_every=1)
    sam = effsam.SAM(sgd(ref), rho=RHO)
    for t in range(4):
        effsam.sharpness_aware_step(model, opt, data(t), ce)
        effsam.sharpness_aware_step(ref, sam, data(t), ce)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ ESAM's BN repair
def renorm(h, mean_b, var_b, bn):
    """Batch Renormalization toward (mean_b, var_b): the value (h − μ_B)/σ_B, the gradient
    through the subset's own μ_S, σ_S; then BN's affine."""
    mu_s = h.mean(0)
    sd_s = torch.sqrt(h.var(0, unbiased=False) + bn.eps)
    sd_b = torch.sqrt(var_b + bn.eps)
    r = (sd_s / sd_b).detach()
    d = ((mu_s - mean_b) / sd_b).detach()
    return ((h - mu_s) / sd_s * r + d) * bn.weight + bn.bias


def _esam_bn_reference(x, y, k, stats_at_perturbed: bool):
    """ESAM (β = 1, γ = k/b) by hand: pass 2 on the top-k sharpness samples, normalised
    with the whole batch's BN statistics (at θ + ε, or at θ from pass 1)."""
    ref = bn_net()
    lin0, bn, lin3 = ref[0], ref[1], ref[3]
    ps = list(ref.parameters())
    losses0 = F.cross_entropy(ref(x), y, reduction="none")
    g = torch.autograd.grad(losses0.mean(), ps)
    with torch.no_grad():
        h0 = lin0(x)
        stats0 = (h0.mean(0), h0.var(0, unbiased=False))
    n = gnorm(g)
    theta = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(RHO * gi / (n + DELTA))
        h1 = lin0(x)
        stats1 = (h1.mean(0), h1.var(0, unbiased=False))
        hn = (h1 - stats1[0]) / torch.sqrt(stats1[1] + bn.eps) * bn.weight + bn.bias
        after = F.cross_entropy(lin3(torch.tanh(hn)), y, reduction="none")
    score = after - losses0.detach()
    idx = torch.sort(score, descending=True, stable=True).indices[:k].sort().values
    mean, var = stats1 if stats_at_perturbed else stats0
    hs = renorm(lin0(x[idx]), mean, var, bn)
    with torch.no_grad():  # its value is the whole batch's normalisation
        direct = (lin0(x[idx]) - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(hs, direct, rtol=1e-12, atol=1e-13)
    loss = F.cross_entropy(lin3(torch.tanh(hs)), y[idx])
    g2 = torch.autograd.grad(loss, ps)
    with torch.no_grad():
        for p, t, gi in zip(ps, theta, g2):
            p.copy_(t - LR * gi)
    return ref, idx


def test_esam_bn_repair_normalises_pass_two_with_the_whole_batch_statistics():
    x, y = data(n=12)
    ref, idx = _esam_bn_reference(x, y, 6, stats_at_perturbed=True)
    model = bn_net()
    opt = effsam.create_optimizer(model, "esam-bn", lr=LR, rho=RHO, beta=1.0, gamma=0.5)
    bn_before = bn_net()
    bn_before(x)  # pass 1's training-mode forward: what the buffers must be after the step
    res = effsam.sharpness_aware_step(model, opt, (x, y), ce)
    assert res.selected == 6
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-14)
    for a, b in zip(model.buffers(), bn_before.buffers()):
        assert torch.equal(a, b)  # BN buffers as pass 1 left them
    # and the paper's ESAM (the subset's own statistics) differs
    paper = bn_net()
    popt = effsam.create_optimizer(paper, "esam", lr=LR, rho=RHO, beta=1.0, gamma=0.5)
    effsam.sharpness_aware_step(paper, popt, (x, y), ce)
    assert not torch.allclose(paper[0].weight, model[0].weight, rtol=1e-6, atol=1e-9)


def test_esam_bn_repair_with_a_loss_selection_uses_pass_ones_statistics():
    x, y = data(n=12)
    model = bn_net()
    opt = effsam.create_optimizer(
        model, "esam-loss", lr=LR, rho=RHO, beta=1.0, gamma=0.5, sds_bn="batch"
    )
    # by hand: the top-6 pass-1 losses, normalised with pass 1's whole-batch statistics
    ref = bn_net()
    ps = list(ref.parameters())
    losses0 = F.cross_entropy(ref(x), y, reduction="none")
    g = torch.autograd.grad(losses0.mean(), ps)
    with torch.no_grad():
        h0 = ref[0](x)
        mean, var = h0.mean(0), h0.var(0, unbiased=False)
    idx = torch.sort(losses0.detach(), descending=True, stable=True).indices[:6].sort().values
    n = gnorm(g)
    theta = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(RHO * gi / (n + DELTA))
    hs = renorm(ref[0](x[idx]), mean, var, ref[1])
    g2 = torch.autograd.grad(F.cross_entropy(ref[3](torch.tanh(hs)), y[idx]), ps)
    with torch.no_grad():
        for p, t, gi in zip(ps, theta, g2):
            p.copy_(t - LR * gi)
    effsam.sharpness_aware_step(model, opt, (x, y), ce)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-14)


def test_esam_bn_repair_refusals():
    with pytest.raises(ValueError, match="sds_bn"):
        effsam.ESAM(sgd(bn_net()), sds_bn="whole")
    with pytest.raises(ValueError, match="sds_bn"):
        effsam.ESAM(sgd(bn_net()), sds_bn="batch", sds_pass2="batch")
