"""The update policy: the fifth policy of the skeleton (how the gradient the base optimizer
steps with is formed). Called in one place per phase, handed the step's selected share
explicitly, composable with any selection, and saved and rolled back with the optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

import effsam
from effsam.optim.schedule import Interval
from effsam.optim.sds_variants import MixWithPass1
from effsam.optim.selection import TopSharpness
from effsam.optim.update import PassThrough
from helpers import per_sample_ce, tiny_bn_net, tiny_data

LR, RHO = 0.1, 0.2


class Recording(PassThrough):
    """Records every call the skeleton makes; scales the final gradient by ``c``."""

    name = "recording"

    def __init__(self, c: float = 1.0) -> None:
        self.c = c
        self.calls: list[tuple] = []
        self.updates = 0

    def on_ascent(self, state, params, ascended, grads, step):
        self.calls.append(("on_ascent", len(ascended)))

    def before_descent(self, state, params, step, selected_fraction):
        self.calls.append(("before_descent", selected_fraction))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.c)

    def plain_update(self, state, params, step):
        self.calls.append(("plain_update",))

    def on_update(self, state, params, step):
        self.calls.append(("on_update",))

    def after_update(self, state, params, step):
        self.calls.append(("after_update",))
        self.updates += 1

    def state_dict(self, state, params):
        return {"recording_updates": self.updates}

    def load_state_dict(self, saved, state, params):
        if "recording_updates" in saved:
            if saved["recording_updates"] < 0:
                raise ValueError("bad count")
            self.updates = int(saved["recording_updates"])


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR)


def test_the_skeleton_calls_the_update_policy_once_per_phase_and_not_on_a_skipped_step():
    model = tiny_bn_net()
    rec = Recording()
    opt = effsam.SharpnessAware(_sgd(model), rho=RHO, schedule=Interval(2, offset=0), update=rec)
    effsam.sharpness_aware_step(model, opt, tiny_data(seed=1), per_sample_ce)  # aware
    effsam.sharpness_aware_step(model, opt, tiny_data(seed=2), per_sample_ce)  # plain
    assert rec.calls == [
        ("on_ascent", 6),  # every tensor (two Linear, BN weight and bias)
        ("before_descent", None),
        ("on_update",),
        ("after_update",),
        ("plain_update",),
        ("on_update",),
        ("after_update",),
    ]
    rec.calls.clear()
    x, y = tiny_data(seed=3)
    x[0, 0] = float("nan")  # a non-finite pass 1: the step is skipped
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = effsam.sharpness_aware_step(model, opt, (x, y), per_sample_ce)
    assert res.skipped
    assert ("on_update",) not in rec.calls and ("after_update",) not in rec.calls


def test_the_final_gradient_is_the_update_policys_against_the_formula():
    # the policy scales pass 2's gradient by c: the step is θ ← θ − lr · c · ∇L(θ + ε)
    model, ref = tiny_bn_net(), tiny_bn_net()
    c = 0.37
    opt = effsam.SharpnessAware(_sgd(model), rho=RHO, update=Recording(c))
    batch = tiny_data(seed=5)
    effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    params = [p for p in ref.parameters()]
    loss = per_sample_ce(ref, batch).mean()
    g = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        theta = [p.clone() for p in params]
        for p, gi in zip(params, g):
            p.add_(gi, alpha=RHO / (float(norm) + 1e-12))
    loss2 = per_sample_ce(ref, batch).mean()
    g2 = torch.autograd.grad(loss2, list(ref.parameters()))
    for p, t, gi in zip(model.parameters(), theta, g2):
        torch.testing.assert_close(p, t - LR * c * gi, rtol=1e-12, atol=1e-14)


def test_the_selected_share_reaches_the_update_policy_explicitly_over_micro_batches():
    model = tiny_bn_net()
    rec = Recording()
    opt = effsam.SharpnessAware(_sgd(model), rho=RHO, selection=TopSharpness(0.5), update=rec)
    x, y = tiny_data(seed=9, n=13)  # micro-batches of 5, 4, 4: k = 3, 2, 2 -> 7 of 13
    effsam.sharpness_aware_step(model, opt, (x, y), per_sample_ce, accumulation_steps=3)
    assert ("before_descent", 7 / 13) in rec.calls
    assert opt.last_selected_fraction == 7 / 13
    # the selection's own record is its last call's (a diagnostic, not the channel)
    assert opt.selection.last_fraction == 2 / 4


def test_esam_mix_is_a_composition_of_policies():
    # the same update policy on a plain skeleton with SDS's selection is ESAM-mix
    a, b = tiny_bn_net(), tiny_bn_net()
    mix = effsam.create_optimizer(a, "esam-mix", lr=LR, rho=RHO, beta=1.0, gamma=0.25)
    composed = effsam.SharpnessAware(
        _sgd(b), rho=RHO, selection=TopSharpness(0.25), update=MixWithPass1(True)
    )
    for t in range(3):
        batch = tiny_data(seed=20 + t, n=13)
        effsam.sharpness_aware_step(a, mix, batch, per_sample_ce, accumulation_steps=2)
        effsam.sharpness_aware_step(b, composed, batch, per_sample_ce, accumulation_steps=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_update_policy_state_round_trips_and_a_failed_load_rolls_it_back():
    model = tiny_bn_net()
    opt = effsam.SharpnessAware(_sgd(model), rho=RHO, update=Recording())
    for t in range(3):
        effsam.sharpness_aware_step(model, opt, tiny_data(seed=t), per_sample_ce)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["effsam"]["recording_updates"] == 3
    assert saved["effsam"]["policies"]["update"] == "Recording:recording"
    other = effsam.SharpnessAware(_sgd(tiny_bn_net()), rho=RHO, update=Recording())
    other.load_state_dict(saved)
    assert other.update.updates == 3
    bad = copy.deepcopy(saved)
    bad["effsam"]["recording_updates"] = -1
    fresh = effsam.SharpnessAware(_sgd(tiny_bn_net()), rho=RHO, update=Recording())
    with pytest.raises(ValueError, match="bad count"):
        fresh.load_state_dict(bad)
    assert fresh.update.updates == 0 and fresh.steps == 0
    # a stateful update policy refuses a state saved with another update policy, by name
    plain = effsam.SharpnessAware(_sgd(tiny_bn_net()), rho=RHO)
    with pytest.raises(ValueError, match="update: saved 'PassThrough:pass-through'"):
        effsam.SharpnessAware(_sgd(tiny_bn_net()), rho=RHO, update=Recording()).load_state_dict(
            plain.state_dict()
        )


def test_an_object_that_is_not_an_update_policy_is_refused():
    with pytest.raises(TypeError, match="update policy"):
        effsam.SharpnessAware(_sgd(tiny_bn_net()), rho=RHO, update=object())
    with pytest.raises(ValueError, match="own update"):
        effsam.LookSAM(_sgd(tiny_bn_net()), update=Recording())
