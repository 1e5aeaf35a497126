"""MSAM's relative radius, LookSAM's relative and adaptive α, and the BatchNorm statistics
recomputed at θ before an evaluation: every quantity written out here in float64."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import effsam
from effsam.bn import recompute_bn_stats
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

LR, MOM, DELTA = 0.1, 0.9, 1e-12


def _batches(n: int, size: int = 12):
    return [tiny_data(seed=60 + i, n=size) for i in range(n)]


def _train(model, opt, batches, loss_fn=per_sample_ce):
    return [effsam.sharpness_aware_step(model, opt, b, loss_fn) for b in batches]


def _grad_at(model: nn.Module, weights: dict, batch) -> dict:
    """∇ of the mean cross-entropy at ``weights`` (train mode: BN uses the batch's
    statistics, so the running buffers, passed as copies, do not enter)."""
    params = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = functional_call(model, {**params, **buffers}, (batch[0],))
    loss = F.cross_entropy(out, batch[1])
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _norm(d: dict) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))


def _dot(a: dict, b: dict) -> float:
    return sum(float((a[n] * b[n]).sum()) for n in a)


def _weights(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_weights(model: nn.Module, expected: dict, rtol=1e-12, atol=1e-13) -> None:
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=rtol, atol=atol)


def _round_trip(make, batches, split):
    """Weights after all ``batches`` straight, and after a save/load at ``split``."""
    model, opt = make()
    _train(model, opt, batches)
    straight = (clone_state(model), opt)
    model, opt = make()
    _train(model, opt, batches[:split])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    return straight, (model2, opt2)


# ====================================================================== MSAM, relative ρ


def _msam(model, rho=0.05, mode="relative", **kw):
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
    return effsam.MSAM(base, rho=rho, rho_mode=mode, **kw)


def test_msam_relative_pass_runs_at_theta_minus_rho_norm_theta_along_v():
    rho = 0.05
    batches = _batches(4)
    model = tiny_bn_net()
    opt = _msam(model, rho)
    ref = copy.deepcopy(model)
    seen: list[dict] = []

    def capturing(m, batch):
        seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return per_sample_ce(m, batch)

    _train(model, opt, batches, capturing)
    # by hand: v ← μ v + g (SGD's buffer, v = g on the first step), θ ← θ − lr v, and the
    # pass of step t > 0 at θ̃ = θ − ρ ‖θ‖ v / (‖v‖ + δ), ‖θ‖ and ‖v‖ global norms
    w = _weights(ref)
    v: dict = {}
    for t, batch in enumerate(batches):
        if t == 0:
            point = dict(w)  # no momentum yet: a plain step at θ
        else:
            radius = rho * _norm(w)
            point = {n: w[n] - radius * v[n] / (_norm(v) + DELTA) for n in w}
        for n in w:
            torch.testing.assert_close(seen[t][n], point[n], rtol=1e-12, atol=1e-14)
        g = _grad_at(ref, point, batch)
        v = {n: g[n].clone() if t == 0 else MOM * v[n] + g[n] for n in g}
        w = {n: w[n] - LR * v[n] for n in w}
    _assert_weights(model, w)
    # the radius really is relative: ρ‖θ‖, not ρ (‖θ‖ of this net is far from 1)
    assert abs(_norm(_weights(ref)) - 1) > 0.5
    assert opt.last_radius is not None


def test_msam_relative_norm_spans_all_groups_and_skips_frozen_tensors():
    """One global ‖θ‖ over the trainable parameters of every group (frozen ones out), each
    group's radius its own ρ times that norm; ‖v‖ global too."""
    rhos = (0.08, 0.03)
    batches = _batches(3)
    model = tiny_bn_net()
    model[3].bias.requires_grad_(False)  # frozen: in a group, not in ‖θ‖
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    first = [p for n, p in model.named_parameters() if n.startswith("0.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    base = torch.optim.SGD(
        [{"params": first, "rho": rhos[0]}, {"params": rest, "rho": rhos[1]}],
        lr=LR,
        momentum=MOM,
    )
    opt = effsam.MSAM(base, rho_mode="relative")
    seen: list[dict] = []

    def capturing(m, batch):
        seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return per_sample_ce(m, batch)

    _train(model, opt, batches, capturing)
    trainable = [n for n in names if n != "3.bias"]
    w = _weights(ref)
    v: dict = {}
    for t, batch in enumerate(batches):
        point = dict(w)
        if t > 0:
            theta = _norm({n: w[n] for n in trainable})
            vn = _norm(v)
            for n in trainable:
                rho = rhos[0] if n.startswith("0.") else rhos[1]
                point[n] = w[n] - rho * theta * v[n] / (vn + DELTA)
        for n in names:
            torch.testing.assert_close(seen[t][n], point[n], rtol=1e-12, atol=1e-14)
        g = _grad_at(ref, point, batch)
        v = {n: g[n].clone() if t == 0 else MOM * v[n] + g[n] for n in trainable}
        for n in trainable:
            w[n] = w[n] - LR * v[n]


def test_msam_absolute_mode_is_unchanged_by_the_option():
    """``rho_mode="absolute"`` (the default) moves by ρ itself, whatever ‖θ‖."""
    rho = 0.5
    batches = _batches(3)
    model = tiny_bn_net()
    opt = _msam(model, rho, mode="absolute")
    default = effsam.MSAM(torch.optim.SGD(tiny_bn_net().parameters(), lr=1, momentum=MOM))
    assert default.rho_mode == "absolute"
    ref = copy.deepcopy(model)
    w, v = _weights(ref), {}
    for t, batch in enumerate(batches):
        point = dict(w) if t == 0 else {n: w[n] - rho * v[n] / (_norm(v) + DELTA) for n in w}
        g = _grad_at(ref, point, batch)
        v = {n: g[n].clone() if t == 0 else MOM * v[n] + g[n] for n in g}
        w = {n: w[n] - LR * v[n] for n in w}
    _train(model, opt, batches)
    _assert_weights(model, w)


def test_msam_relative_rho_zero_is_the_base_step():
    batches = _batches(5)
    model = tiny_bn_net()
    _train(model, _msam(model, rho=0.0), batches)
    ref = tiny_bn_net()
    _train(ref, torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM), batches)
    for k, v in clone_state(ref).items():
        assert torch.equal(clone_state(model)[k], v), k


def test_msam_relative_state_round_trip_continues_bit_identically():
    def make():
        model = tiny_bn_net()
        return model, _msam(model, rho=0.05)

    batches = _batches(7)
    (straight, _), (model2, opt2) = _round_trip(make, batches, 3)
    _train(model2, opt2, batches[3:])
    for k, v in straight.items():
        assert torch.equal(clone_state(model2)[k], v), k


def test_msam_relative_three_ways_of_driving_a_step_agree():
    batches = _batches(4)

    def make():
        model = tiny_bn_net()
        return model, _msam(model, rho=0.05)

    model_a, opt_a = make()
    _train(model_a, opt_a, batches)

    model_b, opt_b = make()
    for b in batches:

        def closure(b=b):
            opt_b.zero_grad()
            loss = per_sample_ce(model_b, b).mean()
            loss.backward()
            return loss

        opt_b.step(closure)

    model_c, opt_c = make()
    for b in batches:
        opt_c.zero_grad()
        with opt_c.first_pass():
            per_sample_ce(model_c, b).mean().backward()
        assert opt_c.first_step(zero_grad=True) is False  # MSAM: its one pass was the descent
        opt_c.second_step(zero_grad=True)

    for other in (model_b, model_c):
        for k, v in clone_state(model_a).items():
            assert torch.equal(clone_state(other)[k], v), k


# ====================================================================== LookSAM, relative α


def _looksam(model, **kw):
    return effsam.LookSAM(torch.optim.SGD(model.parameters(), lr=LR), **kw)


def _looksam_by_hand(model, batches, *, rho, k, alpha, mode, beta=0.9):
    """LookSAM with plain SGD, written out: the weights, and r, r̄ after ``batches``."""
    w = _weights(model)
    g_v: dict = {}
    ratio = average = None
    for t, batch in enumerate(batches):
        g = _grad_at(model, w, batch)
        if t % k == 0:  # refresh: SAM's step, g_v and r = ‖g_v‖/‖g‖ measured
            gn = _norm(g)
            g_s = _grad_at(model, {n: w[n] + rho * g[n] / (gn + DELTA) for n in w}, batch)
            coef = _dot(g_s, g) / gn**2
            g_v = {n: g_s[n] - coef * g[n] for n in g}
            ratio = _norm(g_v) / gn
            average = ratio if average is None else beta * average + (1 - beta) * ratio
            w = {n: w[n] - LR * g_s[n] for n in w}
        else:  # reuse: g + a ‖g‖ g_v/‖g_v‖
            a = {"absolute": alpha, "relative": alpha * ratio, "adaptive": alpha * average}[mode]
            scale = a * _norm(g) / _norm(g_v)
            w = {n: w[n] - LR * (g[n] + scale * g_v[n]) for n in w}
    return w, ratio, average


def test_looksam_refresh_records_the_ratio_written_out():
    rho = 0.3
    batch = _batches(1)[0]
    model = tiny_bn_net()
    ref = copy.deepcopy(model)
    opt = _looksam(model, rho=rho, k=3, alpha=1.0, alpha_mode="relative")
    _train(model, opt, [batch])
    w0 = _weights(ref)
    g = _grad_at(ref, w0, batch)
    g_s = _grad_at(ref, {n: w0[n] + rho * g[n] / (_norm(g) + DELTA) for n in w0}, batch)
    g_v = {n: g_s[n] - _dot(g_s, g) / _norm(g) ** 2 * g[n] for n in g}
    ratio = _norm(g_v) / _norm(g)
    assert 0 < ratio < 1
    assert opt.last_ratio == pytest.approx(ratio, rel=1e-12)
    assert opt.ratio_average == pytest.approx(ratio, rel=1e-12)  # r̄ = r at the first refresh
    assert opt.reuse_weight == pytest.approx(ratio, rel=1e-12)  # α_rel = 1
    _assert_weights(model, {n: w0[n] - LR * g_s[n] for n in w0})


def test_looksam_relative_reuse_step_is_g_plus_alpha_ratio_norm_g_along_g_v():
    rho, alpha = 0.3, 1.5
    batches = _batches(2)
    model = tiny_bn_net()
    ref = copy.deepcopy(model)
    opt = _looksam(model, rho=rho, k=2, alpha=alpha, alpha_mode="relative")
    _train(model, opt, batches)
    # step 0 (refresh): g, g_s, g_v = g_s − (⟨g_s, g⟩/‖g‖²) g, r = ‖g_v‖/‖g‖, θ1 = θ0 − lr g_s
    w0 = _weights(ref)
    g = _grad_at(ref, w0, batches[0])
    g_s = _grad_at(ref, {n: w0[n] + rho * g[n] / (_norm(g) + DELTA) for n in w0}, batches[0])
    g_v = {n: g_s[n] - _dot(g_s, g) / _norm(g) ** 2 * g[n] for n in g}
    r = _norm(g_v) / _norm(g)
    w1 = {n: w0[n] - LR * g_s[n] for n in w0}
    # step 1 (reuse): θ2 = θ1 − lr (g1 + α_rel · r · ‖g1‖ · g_v/‖g_v‖)
    g1 = _grad_at(ref, w1, batches[1])
    w2 = {n: w1[n] - LR * (g1[n] + alpha * r * _norm(g1) * g_v[n] / _norm(g_v)) for n in w1}
    _assert_weights(model, w2)
    assert opt.sharpness_aware_steps == 1


@pytest.mark.parametrize("mode", ["relative", "adaptive", "absolute"])
def test_looksam_trajectory_over_three_refreshes(mode):
    """Refreshes at steps 0, 2, 4 (k = 2); in adaptive mode the reuse steps after the second
    and third refreshes use r̄ = β r̄ + (1 − β) r, which differs from the last r."""
    rho, alpha, beta = 0.3, 0.8, 0.7
    batches = _batches(6)
    model = tiny_bn_net()
    ref = copy.deepcopy(model)
    opt = _looksam(model, rho=rho, k=2, alpha=alpha, alpha_mode=mode, ratio_ema=beta)
    _train(model, opt, batches)
    w, ratio, average = _looksam_by_hand(
        ref, batches, rho=rho, k=2, alpha=alpha, mode=mode, beta=beta
    )
    _assert_weights(model, w, rtol=1e-11, atol=1e-12)
    assert opt.last_ratio == pytest.approx(ratio, rel=1e-11)
    assert opt.ratio_average == pytest.approx(average, rel=1e-11)
    assert abs(average - ratio) > 1e-6 * ratio  # the average is not the last ratio


def test_looksam_adaptive_ema_is_written_out():
    """r̄ over refreshes: r̄_1 = r_1, r̄_j = β r̄_{j−1} + (1 − β) r_j (β = 0.9 by default)."""
    model = tiny_bn_net()
    opt = _looksam(model, rho=0.3, k=1, alpha=1.0, alpha_mode="adaptive")
    assert opt.ratio_ema == 0.9
    ratios, averages = [], []
    for b in _batches(4):
        _train(model, opt, [b])
        ratios.append(opt.last_ratio)
        averages.append(opt.ratio_average)
    expected = ratios[0]
    assert averages[0] == expected
    for r, got in zip(ratios[1:], averages[1:]):
        expected = 0.9 * expected + 0.1 * r
        assert got == pytest.approx(expected, rel=1e-14)
    assert len(set(ratios)) == 4


@pytest.mark.parametrize("mode", ["relative", "adaptive"])
def test_looksam_ratio_state_round_trip_continues_bit_identically(mode):
    def make():
        model = tiny_bn_net()
        return model, _looksam(model, rho=0.3, k=2, alpha=0.9, alpha_mode=mode, ratio_ema=0.6)

    batches = _batches(8)
    # saved after step 2 (a refresh) and 4: step 3 reuses the saved r / r̄, step 4 continues r̄
    (straight, opt), (model2, opt2) = _round_trip(make, batches, 3)
    saved = opt2.state_dict()["effsam"]
    assert saved["looksam_ratio"] == opt2.last_ratio is not None
    assert saved["looksam_ratio_average"] == opt2.ratio_average is not None
    _train(model2, opt2, batches[3:])
    for k, v in straight.items():
        assert torch.equal(clone_state(model2)[k], v), k
    assert opt2.last_ratio == opt.last_ratio and opt2.ratio_average == opt.ratio_average


def test_looksam_failed_refresh_step_leaves_the_ratio_as_it_was(monkeypatch):
    batches = _batches(5)

    def make():
        model = tiny_bn_net()
        return model, _looksam(model, rho=0.3, k=2, alpha=0.9, alpha_mode="adaptive")

    ref_model, ref_opt = make()
    _train(ref_model, ref_opt, batches)
    model, opt = make()
    _train(model, opt, batches[:2])
    before = (opt.last_ratio, opt.ratio_average)

    def boom(*a, **k):
        raise KeyError("base step")

    monkeypatch.setattr(opt.base, "step", boom)
    with pytest.raises(KeyError):
        _train(model, opt, [batches[2]])  # step 2: a refresh, failing after r was measured
    monkeypatch.undo()
    assert (opt.last_ratio, opt.ratio_average) == before
    _train(model, opt, batches[2:])
    for k, v in clone_state(ref_model).items():
        assert torch.equal(clone_state(model)[k], v), k
    assert (opt.last_ratio, opt.ratio_average) == (ref_opt.last_ratio, ref_opt.ratio_average)


def test_looksam_relative_state_without_a_ratio_is_refused_by_name():
    model = tiny_bn_net()
    old = _looksam(model, rho=0.3, k=2)
    _train(model, old, _batches(1))
    state = old.state_dict()
    del state["effsam"]["looksam_ratio"]  # as saved before the ratio was recorded
    new = _looksam(tiny_bn_net(), rho=0.3, k=2, alpha_mode="relative")
    with pytest.raises(ValueError, match="alpha_mode='relative'"):
        new.load_state_dict(state)
    assert new.last_ratio is None and new.steps == 0


# ====================================================================== bad values


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda p: effsam.MSAM(torch.optim.SGD(p, lr=1, momentum=MOM), rho_mode="x"), "'x'"),
        (
            lambda p: effsam.MSAM(
                torch.optim.SGD(p, lr=1, momentum=MOM), rho=-0.1, rho_mode="relative"
            ),
            "-0.1",
        ),
        (
            lambda p: effsam.MSAM(torch.optim.SGD(p, lr=1, momentum=MOM), bn_recompute="yes"),
            "'yes'",
        ),
        (
            lambda p: effsam.MSAM(torch.optim.SGD(p, lr=1, momentum=MOM), bn_recompute_batches=0),
            "bn_recompute_batches: 0",
        ),
        (lambda p: effsam.LookSAM(torch.optim.SGD(p, lr=1), alpha_mode="x"), "'x'"),
        (
            lambda p: effsam.LookSAM(torch.optim.SGD(p, lr=1), alpha=-0.5, alpha_mode="relative"),
            "-0.5",
        ),
        (lambda p: effsam.LookSAM(torch.optim.SGD(p, lr=1), ratio_ema=1.0), "ratio_ema: 1.0"),
        (lambda p: effsam.LookSAM(torch.optim.SGD(p, lr=1), ratio_ema=-0.1), "ratio_ema: -0.1"),
    ],
)
def test_bad_values_are_a_clear_error_naming_the_value(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(tiny_bn_net().parameters())


def test_bad_values_through_the_registry():
    with pytest.raises(ValueError, match="rho_mode: 'x'"):
        effsam.create_optimizer(tiny_bn_net(), "msam-rel", momentum=MOM, rho_mode="x")
    with pytest.raises(ValueError, match="alpha_mode: 'x'"):
        effsam.create_optimizer(tiny_bn_net(), "looksam-rel", alpha_mode="x")


# ====================================================================== registry


def test_registry_entries_and_their_defaults():
    names = effsam.available_optimizers()
    assert names[names.index("msam") + 1] == "msam-rel"
    assert names[names.index("looksam") + 1] == "looksam-rel"
    msam = effsam.create_optimizer(tiny_bn_net(), "msam", momentum=MOM)
    assert (msam.rho_mode, msam.defaults["rho"], msam.recompute_bn_before_eval) == (
        "absolute",
        3.0,
        True,
    )
    rel = effsam.create_optimizer(tiny_bn_net(), "msam-rel", momentum=MOM)
    assert (rel.rho_mode, rel.defaults["rho"], rel.recompute_bn_before_eval) == (
        "relative",
        0.041,
        True,
    )
    # 0.041: the authors' ρ = 3 over their WRN-16-4's ‖θ‖ at initialisation, 73.24
    assert round(3 / 73.24, 3) == 0.041
    look = effsam.create_optimizer(tiny_bn_net(), "looksam-rel")
    assert (look.alpha_mode, look.alpha, look.k) == ("relative", 1.0, 5)
    assert effsam.create_optimizer(tiny_bn_net(), "looksam").alpha_mode == "absolute"


# ====================================================================== BN recomputed at θ


def _bn_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(5, 7),
        nn.BatchNorm1d(7),  # momentum 0.1
        nn.Tanh(),
        nn.Linear(7, 4),
        nn.BatchNorm1d(4, momentum=None),  # a cumulative average of its own
        nn.Dropout(0.5),  # after the last BN: draws from the generator in train mode only
    ).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        model.train()
        for i in range(3):  # statistics that are not the initial ones
            model(tiny_data(seed=90 + i, n=9)[0] * 3)
    return model


def _bn_stats_by_hand(model: nn.Module, xs: list[torch.Tensor]):
    """Per BN layer: the mean over the batches of the batch mean and of the unbiased batch
    variance of its input, the forward in train mode (BN normalises with the batch's
    biased variance), in float64."""
    lin1, bn1, lin2 = model[0], model[1], model[3]
    means1, vars1, means2, vars2 = [], [], [], []
    for x in xs:
        h1 = x @ lin1.weight.detach().T + lin1.bias.detach()
        n = h1.shape[0]
        m1 = h1.sum(0) / n
        ss1 = ((h1 - m1) ** 2).sum(0)
        means1.append(m1)
        vars1.append(ss1 / (n - 1))
        a1 = torch.tanh(
            (h1 - m1) / torch.sqrt(ss1 / n + bn1.eps) * bn1.weight.detach() + bn1.bias.detach()
        )
        h2 = a1 @ lin2.weight.detach().T + lin2.bias.detach()
        m2 = h2.sum(0) / n
        means2.append(m2)
        vars2.append(((h2 - m2) ** 2).sum(0) / (n - 1))
    k = len(xs)
    return [
        (sum(means1) / k, sum(vars1) / k),
        (sum(means2) / k, sum(vars2) / k),
    ]


@pytest.mark.parametrize("max_batches", [None, 2])
def test_recompute_bn_stats_is_the_average_of_the_batch_statistics(max_batches):
    model = _bn_model()
    model.eval()
    model[4].train()  # a mixed model: each module's own flag comes back
    batches = [tiny_data(seed=70 + i, n=n) for i, n in enumerate((8, 12, 10))]
    weights = [p.detach().clone() for p in model.parameters()]
    counts = [int(model[i].num_batches_tracked) for i in (1, 4)]
    rng = torch.get_rng_state()
    fetched = []

    def stream():
        for b in batches:
            fetched.append(1)
            yield b

    used = recompute_bn_stats(model, stream(), max_batches)
    k = 3 if max_batches is None else max_batches
    assert used == k and len(fetched) == k  # a bounded pass does not build one more batch
    expected = _bn_stats_by_hand(model, [x for x, _ in batches[:k]])
    for bn, (mean, var) in zip((model[1], model[4]), expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-14)
    # weights untouched, layers' momentum, counters, flags and the generator restored
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert (model[1].momentum, model[4].momentum) == (0.1, None)
    assert [int(model[i].num_batches_tracked) for i in (1, 4)] == counts
    assert [m.training for m in model] == [False, False, False, False, True, False]
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_recompute_bn_stats_leaves_everything_as_it_was_without_bn_or_batches():
    mlp = nn.Sequential(nn.Linear(5, 3)).double()
    assert recompute_bn_stats(mlp, iter(_batches(1))) == 0
    model = _bn_model()
    before = clone_state(model)
    assert recompute_bn_stats(model, []) == 0
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="max_batches"):
        recompute_bn_stats(model, [], 0)


def test_a_failing_recompute_leaves_the_buffers_as_they_were():
    model = _bn_model()
    before = clone_state(model)

    def bad():
        yield tiny_data(seed=1, n=6)
        raise KeyError("loader")

    with pytest.raises(KeyError):
        recompute_bn_stats(model, bad())
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model[1].momentum == 0.1


# ---------------------------------------------------------------------- the training loop


def _run(tmp_path, name, monkeypatch, calls, **args):
    import effsam.train.loop as loop
    from effsam.train.checkpoint import load_checkpoint
    from train.tiny_runs import tiny_config

    def recording(model, batches, max_batches=None, **kw):
        used = recompute_bn_stats(model, batches, max_batches, **kw)
        calls.append((max_batches, used))
        return used

    monkeypatch.setattr(loop, "recompute_bn_stats", recording)
    cfg = tiny_config(
        tmp_path / name, optim__name=name.split("+")[0], optim__args=args, train__epochs=2
    )
    summary = loop.train(cfg, quiet=True, run_dir=tmp_path / name)
    return summary, load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]


def test_the_loop_recomputes_bn_before_each_evaluation_for_msam_only(tmp_path, monkeypatch):
    calls: list = []
    _run(tmp_path, "msam", monkeypatch, calls)
    assert calls == [(None, 6), (None, 6)]  # 2 epochs of 6 batches, before each evaluation
    calls.clear()
    _run(tmp_path, "msam-rel", monkeypatch, calls, bn_recompute_batches=2)
    assert calls == [(2, 2), (2, 2)]
    calls.clear()
    _, without = _run(tmp_path, "msam+off", monkeypatch, calls, bn_recompute=False)
    _run(tmp_path, "sam", monkeypatch, calls)
    _run(tmp_path, "looksam", monkeypatch, calls)
    assert calls == []
    # the pass changes the BN statistics only: the trained weights are the same
    _, with_ = _run(tmp_path, "msam+on", monkeypatch, calls)
    assert len(calls) == 2
    stats = [k for k in with_ if "running_" in k]
    assert stats
    for k, v in with_.items():
        if "running_" in k:
            assert not torch.equal(v, without[k]), k
        else:
            assert torch.equal(v, without[k]), k
