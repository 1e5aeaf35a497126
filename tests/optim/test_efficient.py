"""Schedules (interval, late, RST, AE-SAM), LookSAM, MSAM and K-SAM: decisions and updates
against the formulas written out here (float64), pass counts, ρ = 0, resume, BatchNorm."""

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
from effsam.optim._random import stream_seed
from effsam.optim.registry import accepted_kwargs
from effsam.optim.schedule import AdaptiveSchedule, Interval, Late, Randomized
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

LR, MOM = 0.1, 0.9
NEW = [
    "sam-interval",
    "sam-late",
    "esam-late",
    "rst",
    "ae-sam",
    "looksam",
    "msam",
    "ksam",
    "esam-mix",
    "esam-random",
    "esam-wholebatch",
]


def _batches(n: int, size: int = 12):
    return [tiny_data(seed=30 + i, n=size) for i in range(n)]


def _make(name: str, model: nn.Module, total: int = 8, **kw):
    if "total_steps" in accepted_kwargs(name):
        kw.setdefault("total_steps", total)
    return effsam.create_optimizer(model, name, lr=LR, momentum=MOM, **kw)


def _train(model, opt, batches):
    return [effsam.sharpness_aware_step(model, opt, b, per_sample_ce) for b in batches]


def _flat_grad(model, params, batch, buffers):
    out = functional_call(model, {**params, **buffers}, (batch[0],))
    loss = F.cross_entropy(out, batch[1])
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return dict(zip(names, grads))


def _norm(d):
    return math.sqrt(sum(float((v**2).sum()) for v in d.values()))


# ----------------------------------------------------------------------- decisions


def _decisions(schedule, n, grad_sq=None):
    out = []
    for t in range(n):
        d = schedule.decide(grad_sq[t] if grad_sq is not None else None)
        schedule.commit()
        out.append(d)
    return out


def test_interval_and_late_boundaries():
    # composer: SAM when (t + 1) mod k == 0
    assert _decisions(Interval(4), 12) == [(t + 1) % 4 == 0 for t in range(12)]
    assert _decisions(Interval(3, offset=0), 7) == [t % 3 == 0 for t in range(7)]
    # late: switch at round_half_up(start * T); 0.875 * 20 = 17.5 -> 18
    assert _decisions(Late(0.875, total_steps=20), 20) == [t >= 18 for t in range(20)]
    assert _decisions(Late(0.0, total_steps=5), 5) == [True] * 5
    assert _decisions(Late(1.0, total_steps=5), 5) == [False] * 5


@pytest.mark.parametrize("kind", ["constant", "linear", "step"])
def test_random_schedule_draws_the_written_out_probabilities(kind):
    T, seed = 40, 5
    sched = Randomized(
        0.8, probability_schedule=kind, min_probability=0.2, total_steps=T, seed=seed
    )
    gen = torch.Generator().manual_seed(stream_seed(seed, "rst"))  # RST's own stream
    expected = []
    for t in range(T):
        x = t / T
        p = {"constant": 0.8, "linear": 0.2 + 0.6 * x, "step": 0.2 if x < 0.5 else 0.8}[kind]
        expected.append(bool(torch.rand((), generator=gen, dtype=torch.float64) < p))
    assert _decisions(sched, T) == expected
    assert 0 < sum(expected) < T  # the test sees both branches


def test_adaptive_schedule_follows_the_recurrence():
    T, delta, l1, l2 = 10, 0.9, -1.0, 1.0
    xs = [4.0, 1.0, 9.0, 2.0, 2.5, 16.0, 0.5, 3.0, 3.0, 8.0]
    mu = var = 0.0
    expected = []
    for t, x in enumerate(xs):
        mu = delta * mu + (1 - delta) * x
        var = delta * var + (1 - delta) * (x - mu) ** 2
        c = (t / T) * l1 + (1 - t / T) * l2
        expected.append(x >= mu + c * math.sqrt(var))
    sched = AdaptiveSchedule(total_steps=T, delta=delta, lambda1=l1, lambda2=l2)
    assert _decisions(sched, T, xs) == expected
    assert 0 < sum(expected) < T


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Randomized(0.5, seed=3),
        lambda: AdaptiveSchedule(total_steps=12),
        lambda: Late(0.5, total_steps=12),
        lambda: Interval(3),
    ],
    ids=["random", "adaptive", "late", "interval"],
)
def test_schedule_state_round_trip_in_the_middle(factory):
    xs = [float(1 + (7 * t) % 5) for t in range(12)]
    needs = factory().needs_grad_norm
    straight = _decisions(factory(), 12, xs if needs else None)
    first = factory()
    head = _decisions(first, 5, xs[:5] if needs else None)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = factory()
    second.load_state_dict(torch.load(buf, weights_only=True))
    tail = _decisions(second, 7, xs[5:] if needs else None)
    assert head + tail == straight


def test_optimizer_decisions_match_the_schedule_and_counts():
    model = tiny_bn_net()
    opt = _make("sam-interval", model, every=3)
    res = _train(model, opt, _batches(7))
    assert [r.sharpness_aware for r in res] == [(t + 1) % 3 == 0 for t in range(7)]
    assert opt.sharpness_aware_steps == 2 and opt.steps == 7


# ----------------------------------------------------------------------- pass counts


class Counter(nn.Module):
    """A float64 MLP counting forwards (with their batch sizes) and backwards."""

    def __init__(self):
        super().__init__()
        self.net = tiny_bn_net()
        self.forwards: list[tuple[int, bool]] = []
        self.backwards = 0
        self.net[3].register_full_backward_hook(self._bw)

    def _bw(self, *_):
        self.backwards += 1

    def forward(self, x):
        self.forwards.append((x.shape[0], torch.is_grad_enabled()))
        return self.net(x)


@pytest.mark.parametrize(
    "name, kwargs, per_step",
    [
        ("sgd", {}, lambda t: ([(12, True)], 1)),
        ("sam", {}, lambda t: ([(12, True)] * 2, 2)),
        (
            "sam-interval",
            {"every": 2},
            lambda t: ([(12, True)] * (2 if t % 2 else 1), 2 if t % 2 else 1),
        ),
        ("sam-late", {"start": 0.5}, lambda t: ([(12, True)] * (2 if t >= 2 else 1), 1 + (t >= 2))),
        (
            "looksam",
            {"k": 2},
            lambda t: ([(12, True)] * (1 if t % 2 else 2), 1 if t % 2 else 2),
        ),
        ("msam", {"rho": 0.5}, lambda t: ([(12, True)], 1)),
        ("ksam", {"gamma": 0.5}, lambda t: ([(12, False), (6, True), (6, True)], 2)),
        ("esam-sds", {"gamma": 0.5}, lambda t: ([(12, True), (12, False), (6, True)], 2)),
        ("esam-random", {"gamma": 0.5, "beta": 1.0}, lambda t: ([(12, True), (6, True)], 2)),
        (
            "esam-mix",
            {"gamma": 0.5, "beta": 0.5},
            lambda t: ([(12, True), (12, False), (6, True)], 2),
        ),
    ],
)
def test_forward_backward_counts_per_step(name, kwargs, per_step):
    model = Counter()
    opt = _make(name, model, total=4, **kwargs)
    for t, batch in enumerate(_batches(4)):
        model.forwards.clear()
        model.backwards = 0
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
        forwards, backwards = per_step(t)
        assert model.forwards == forwards, (name, t)
        assert model.backwards == backwards, (name, t)


def test_closure_plain_step_is_one_call_and_two_phase_agrees():
    batches = _batches(6)
    weights = []
    for api in ("step_fn", "closure", "two_phase"):
        model = tiny_bn_net()
        opt = _make("sam-interval", model, every=3)
        calls = 0
        for batch in batches:
            if api == "step_fn":
                effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
                continue
            if api == "closure":

                def closure(batch=batch):
                    nonlocal calls
                    calls += 1
                    opt.zero_grad()
                    loss = per_sample_ce(model, batch).mean()
                    loss.backward()
                    return loss

                opt.step(closure)
                continue
            with opt.first_pass():
                per_sample_ce(model, batch).mean().backward()
            if opt.first_step(zero_grad=True):
                with effsam.preserve_bn_stats(model):
                    per_sample_ce(model, batch).mean().backward()
            opt.second_step(zero_grad=True)
        if api == "closure":
            assert calls == 6 + 2  # plain steps call the closure once
        # the parameters (the closure API leaves BatchNorm statistics to the caller)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for other in weights[1:]:
        for k, v in weights[0].items():
            assert torch.equal(other[k], v), k


def test_pass_two_after_a_plain_step_raises_and_changes_nothing():
    model = tiny_bn_net()
    opt = _make("sam-interval", model, every=5)
    x, y = _batches(1)[0]
    before = clone_state(model)
    with opt.first_pass():
        per_sample_ce(model, (x, y)).mean().backward()
    assert opt.first_step(zero_grad=True) is False
    per_sample_ce(model, (x, y)).mean().backward()  # the mistake
    with pytest.raises(RuntimeError, match="pass 2 must not run"):
        opt.second_step()
    after = clone_state(model)
    for k in ("0.weight", "3.weight"):
        assert torch.equal(before[k], after[k])
    assert opt.steps == 0 and opt.schedule.t == 0


def test_second_step_without_first_step_raises():
    opt = _make("sam", tiny_bn_net())
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


def test_clipping_on_a_plain_step_is_applied():
    batches = _batches(1)
    model = tiny_bn_net()
    opt = _make("sam-late", model, start=1.0)
    ref = tiny_bn_net()
    base = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM)
    effsam.sharpness_aware_step(model, opt, batches[0], per_sample_ce, clip_grad_norm=0.01)
    effsam.sharpness_aware_step(ref, base, batches[0], per_sample_ce, clip_grad_norm=0.01)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- updates by hand


def test_looksam_non_refresh_update_by_hand():
    rho, alpha = 0.3, 0.7
    batches = _batches(2)
    model = tiny_bn_net()
    opt = effsam.LookSAM(torch.optim.SGD(model.parameters(), lr=LR), rho=rho, k=2, alpha=alpha)
    ref = copy.deepcopy(model)
    w0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    _train(model, opt, batches)
    # step 0 (refresh): g at θ0, g_s at θ0 + ε, g_v = g_s − (<g_s, g>/‖g‖²) g, θ1 = θ0 − lr g_s
    bufs = {n: b.clone() for n, b in ref.named_buffers()}

    def grad_at(w, batch, state):
        params = {n: v.clone().requires_grad_(True) for n, v in w.items()}
        return _flat_grad(ref, params, batch, state)

    g = grad_at(w0, batches[0], bufs)
    norm = _norm(g)
    w_eps = {n: w0[n] + rho * g[n] / (norm + 1e-12) for n in w0}
    g_s = grad_at(w_eps, batches[0], {n: b.clone() for n, b in bufs.items()})
    dot = sum(float((g_s[n] * g[n]).sum()) for n in g)
    g_v = {n: g_s[n] - dot / norm**2 * g[n] for n in g}
    w1 = {n: w0[n] - LR * g_s[n] for n in w0}
    # step 1 (reuse): ONE gradient at θ1, update g + α (‖g‖/‖g_v‖) g_v
    g1 = grad_at(w1, batches[1], bufs)
    coef = alpha * _norm(g1) / _norm(g_v)
    w2 = {n: w1[n] - LR * (g1[n] + coef * g_v[n]) for n in w1}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w2[n], rtol=1e-12, atol=1e-13)
    assert opt.sharpness_aware_steps == 1


def test_msam_update_is_the_gradient_at_the_point_against_the_momentum():
    rho = 0.5
    batches = _batches(3)
    model = tiny_bn_net()
    opt = effsam.MSAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM), rho=rho)
    ref = copy.deepcopy(model)
    bufs = {n: b.clone() for n, b in ref.named_buffers()}
    w = {n: p.detach().clone() for n, p in ref.named_parameters()}
    v: dict[str, torch.Tensor] = {}
    for t, batch in enumerate(batches):
        if v:
            vn = _norm(v)
            point = {n: w[n] - rho * v[n] / (vn + 1e-12) for n in w}
        else:
            point = dict(w)  # no momentum yet: the first step is plain
        params = {n: x.clone().requires_grad_(True) for n, x in point.items()}
        g = _flat_grad(ref, params, batch, bufs)
        v = {n: g[n].clone() if t == 0 else MOM * v[n] + g[n] for n in g}
        w = {n: w[n] - LR * v[n] for n in w}
    _train(model, opt, batches)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n], rtol=1e-12, atol=1e-13)


def test_msam_refuses_a_base_without_momentum_and_missing_first_pass():
    model = tiny_bn_net()
    with pytest.raises(ValueError, match="momentum=0"):
        effsam.MSAM(torch.optim.SGD(model.parameters(), lr=LR))
    opt = effsam.MSAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM))
    batch = _batches(1)[0]
    per_sample_ce(model, batch).mean().backward()
    with pytest.raises(RuntimeError, match="first_pass"):
        opt.first_step()


def test_ksam_passes_see_exactly_the_top_k():
    model = tiny_bn_net()
    opt = _make("ksam", model, gamma=0.25, rho=0.2)
    x, y = _batches(1, size=12)[0]
    with torch.no_grad():
        ranking = F.cross_entropy(copy.deepcopy(model)(x), y, reduction="none")
    expected = torch.sort(ranking, descending=True, stable=True).indices[:3].sort().values
    seen = []

    def loss_fn(m, batch):
        seen.append((batch[0].clone(), torch.is_grad_enabled()))
        return per_sample_ce(m, batch)

    res = effsam.sharpness_aware_step(model, opt, (x, y), loss_fn)
    assert [g for _, g in seen] == [False, True, True]
    assert torch.equal(seen[0][0], x)
    for sub, _ in seen[1:]:
        assert torch.equal(sub, x[expected])
    assert res.selected == 3 and res.batch_size == 12
    assert res.aux is None or res.aux.shape[0] == 12


# ----------------------------------------------------------------------- invariants


def _rho0_reference(batches):
    """ρ = 0: the base step on the whole batch, for every method (with no perturbation there
    is no sharpness to select by, and K-SAM's and the random control's subsets are not
    taken either: effsam's ρ = 0 rule)."""
    model = tiny_bn_net()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
    for b in batches:
        effsam.sharpness_aware_step(model, base, b, per_sample_ce)
    return clone_state(model)


@pytest.mark.parametrize("name", NEW)
def test_rho_zero_is_the_base_step(name):
    batches = _batches(5)
    model = tiny_bn_net()
    kw = {"rho": 0.0}
    if "beta" in accepted_kwargs(name):
        kw["beta"] = 1.0
    if name in ("esam-late",):
        kw["gamma"] = 1.0
    if name == "esam-random":
        kw["seed"] = 0
    opt = _make(name, model, total=5, **kw)
    _train(model, opt, batches)
    ref = _rho0_reference(batches)
    for k, v in ref.items():
        assert torch.equal(clone_state(model)[k], v), (name, k)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sam-late", {"start": 1.0}),
        ("sam-interval", {"every": 100, "offset": 99}),
        ("rst", {"probability": 0.0}),
        ("esam-late", {"start": 1.0}),
    ],
)
def test_a_schedule_that_never_fires_is_the_base_step(name, kwargs):
    batches = _batches(4)
    model = tiny_bn_net()
    opt = _make(name, model, total=4, rho=0.5, **kwargs)
    res = _train(model, opt, batches)
    assert not any(r.sharpness_aware for r in res)
    ref = tiny_bn_net()
    _train(ref, torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM), batches)
    for k, v in clone_state(ref).items():
        assert torch.equal(clone_state(model)[k], v), k


@pytest.mark.parametrize("name", NEW)
def test_state_dict_round_trip_continues_bit_identically(name):
    batches = _batches(8)
    kw = {"rho": 0.3}
    if name == "sam-interval":
        kw["every"] = 3
    if name == "looksam":
        kw["k"] = 3

    def make():
        model = tiny_bn_net()
        return model, _make(name, model, total=8, **kw)

    model, opt = make()
    _train(model, opt, batches)
    straight = clone_state(model)
    model, opt = make()
    _train(model, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, batches[4:])
    for k, v in straight.items():
        assert torch.equal(clone_state(model2)[k], v), (name, k)


@pytest.mark.parametrize("name", NEW)
def test_bn_buffers_are_those_of_the_clean_pass(name):
    model = tiny_bn_net()
    opt = _make(name, model, total=4, rho=0.3)
    for batch in _batches(4):
        probe = copy.deepcopy(model)
        probe.train()
        x, y = batch
        if name == "ksam":
            with torch.no_grad():
                losses = F.cross_entropy(copy.deepcopy(model)(x), y, reduction="none")
            idx = torch.sort(losses, descending=True, stable=True).indices[:6].sort().values
            x = x[idx]
        if name == "msam" and opt.steps > 0:
            # MSAM's one pass runs at θ − ρ v/‖v‖: its BN statistics are that pass's
            v = [opt.base.state[p]["momentum_buffer"] for p in model.parameters()]
            vn = torch.sqrt(sum((b**2).sum() for b in v))
            with torch.no_grad():
                for p, b in zip(probe.parameters(), v):
                    p.sub_(0.3 * b / (vn + 1e-12))
        with torch.no_grad():
            probe(x)
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
        for (k, a), b in zip(model.named_buffers(), probe.buffers()):
            if name == "msam":  # θ̃ written out here rounds differently (a · (ρ/‖v‖) vs ρa/‖v‖)
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=f"{name} {k}")
            else:
                assert torch.equal(a, b), (name, k)


def test_late_needs_total_steps_and_registry_rejects_bad_schedule_args():
    model = tiny_bn_net()
    with pytest.raises(ValueError, match="total_steps"):
        effsam.create_optimizer(model, "sam-late", lr=LR)
    with pytest.raises(ValueError, match="late start"):
        effsam.create_optimizer(model, "sam-late", lr=LR, start=1.5, total_steps=10)
    with pytest.raises(ValueError, match="Unknown schedule"):
        effsam.create_optimizer(model, "sam", lr=LR, schedule="sometimes")
    with pytest.raises(TypeError, match="unknown arguments"):
        effsam.create_optimizer(model, "sam-interval", lr=LR, start=0.5)


def test_a_schedule_composes_with_any_method_by_name():
    model = tiny_bn_net()
    opt = effsam.create_optimizer(
        model, "ssam-d", lr=LR, schedule="interval", every=2, total_steps=4, sparsity=0.5
    )
    res = _train(model, opt, _batches(4))
    assert [r.sharpness_aware for r in res] == [False, True, False, True]
    assert isinstance(opt.schedule, Interval)


def test_an_aborted_step_rolls_the_schedule_back():
    model = tiny_bn_net()
    opt = _make("rst", model, total=6, probability=0.5, probability_schedule="constant")
    state = copy.deepcopy(opt.schedule.state_dict())

    def bad(m, batch):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        effsam.sharpness_aware_step(model, opt, _batches(1)[0], bad)
    assert opt.schedule.t == state["t"]
    assert torch.equal(opt.schedule.generator.get_state(), state["generator"])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


# (K-SAM, like SDS, ranks within each micro-batch under accumulation: another algorithm,
# documented in docs/algorithms.md)
@pytest.mark.parametrize("name", ["sam-interval", "looksam", "msam", "rst", "ae-sam"])
def test_accumulation_is_the_same_step(name):
    kw = {"every": 2} if name == "sam-interval" else {"k": 2} if name == "looksam" else {}
    out = []
    for accumulation in (1, 3):
        model = _mlp()
        opt = _make(name, model, rho=0.3, **kw)
        for b in _batches(4):
            effsam.sharpness_aware_step(
                model, opt, b, per_sample_ce, accumulation_steps=accumulation
            )
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_grad_scaler_on_plain_and_sharpness_aware_steps():
    batches = _batches(4)
    runs = []
    for use_scaler in (False, True):
        model = _mlp()
        opt = _make("sam-interval", model, every=2, rho=0.3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if use_scaler else None
        for b in batches:
            effsam.sharpness_aware_step(model, opt, b, per_sample_ce, scaler=scaler)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):  # a power-of-two scale is exact: the same weights
        assert torch.equal(a, b)
    # an overflow on a plain step: nothing moves, the scale backs off
    model = _mlp()
    opt = _make("sam-interval", model, every=2, rho=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = [p.detach().clone() for p in model.parameters()]

    def overflowing(m, b):
        return per_sample_ce(m, b) * torch.tensor(float("inf"), dtype=torch.float64)

    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = effsam.sharpness_aware_step(model, opt, batches[0], overflowing, scaler=scaler)
    assert res.skipped and not res.sharpness_aware
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**3


@pytest.mark.parametrize("key", ["mask", "selection", "schedule"])
def test_looksam_refuses_policies_its_projection_cannot_use(key):
    model = tiny_bn_net()
    policy = {
        "mask": effsam.RandomTensorSubset(0.5),
        "selection": effsam.TopSharpness(0.5),
        "schedule": Interval(3),
    }[key]
    with pytest.raises(ValueError, match=f"LookSAM sets its own {key}"):
        effsam.LookSAM(torch.optim.SGD(model.parameters(), lr=LR), **{key: policy})


def test_esam_mix_weight_is_the_share_selected_over_the_whole_batch():
    model = tiny_bn_net()
    opt = _make("esam-mix", model, beta=1.0, gamma=0.5, rho=0.3)
    # micro-batches of 5, 4, 4 (13 samples): k = 3, 2, 2 -> 7 of 13
    x, y = tiny_data(seed=9, n=13)
    effsam.sharpness_aware_step(model, opt, (x, y), per_sample_ce, accumulation_steps=3)
    assert opt.last_selected_fraction == 7 / 13
