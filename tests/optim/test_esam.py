"""ESAM: SWP (stochastic weight perturbation) and SDS (sharpness-sensitive data selection)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import effsam
from effsam.optim.selection import TopLoss, TopSharpness
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

LR, MOM, RHO = 0.1, 0.9, 0.2


def _steps(model, opt, n, start=0, loss_fn=per_sample_ce):
    results = []
    for i in range(start, start + n):
        results.append(effsam.sharpness_aware_step(model, opt, tiny_data(seed=100 + i), loss_fn))
    return results


def test_esam_through_its_swp_and_sds_code_paths_is_sam_when_both_keep_everything():
    # β and γ just below 1: every tensor is kept (u < β), k = round(γ b) = b, yet the SWP
    # draw, the pass-1 flags and SDS's perturbed forward and selection all run; with
    # swp_scaling="unit" ε is SAM's, so the weights must be SAM's bit for bit
    sam_model, esam_model = tiny_bn_net(), tiny_bn_net()
    sam = effsam.SAM(torch.optim.SGD(sam_model.parameters(), lr=LR, momentum=MOM), rho=RHO)
    esam = effsam.ESAM(
        torch.optim.SGD(esam_model.parameters(), lr=LR, momentum=MOM),
        rho=RHO,
        beta=1 - 1e-12,
        gamma=1 - 1e-12,
        swp_scaling="unit",
    )
    assert esam.selection.needs_perturbed_loss and esam.mask.beta < 1
    _steps(sam_model, sam, 5)
    _steps(esam_model, esam, 5)
    a, b = clone_state(sam_model), clone_state(esam_model)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_esam_with_beta_and_gamma_one_is_sam():
    sam_model, esam_model = tiny_bn_net(), tiny_bn_net()
    sam = effsam.SAM(torch.optim.SGD(sam_model.parameters(), lr=LR, momentum=MOM), rho=RHO)
    esam = effsam.ESAM(
        torch.optim.SGD(esam_model.parameters(), lr=LR, momentum=MOM), rho=RHO, beta=1, gamma=1
    )
    _steps(sam_model, sam, 5)
    _steps(esam_model, esam, 5)
    a, b = clone_state(sam_model), clone_state(esam_model)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _weight_nodes(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors autograd will compute a gradient for (AccumulateGrad nodes)."""
    seen, stack, leaves = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves.add(id(node.variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


def test_swp_dropped_tensors_get_no_pass_one_gradient():
    model = tiny_bn_net()
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, beta=0.5, gamma=1, seed=1
    )
    params = list(model.parameters())
    checked_dropped = 0
    for i in range(6):
        with opt.first_pass():
            loss = per_sample_ce(model, tiny_data(seed=i)).mean()
            in_graph = _weight_nodes(loss)
            loss.backward()
        keep = opt.pass1_keep
        for p, k in zip(params, keep):
            assert (p.grad is not None) == k
            # not in the autograd graph at all: no weight-gradient kernel ran for it
            assert (id(p) in in_graph) == k
            checked_dropped += not k
        assert all(p.requires_grad for p in params)
        opt.first_step(zero_grad=True)
        per_sample_ce(model, tiny_data(seed=i)).mean().backward()
        opt.second_step(zero_grad=True)
    assert checked_dropped > 0


def test_swp_kept_fraction_averages_beta():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])  # 20 tensors
    opt = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=0.1), beta=0.6, gamma=1, seed=0)
    fractions = []
    for _ in range(300):
        opt._draw()
        fractions.append(opt.last_kept.tensors)
        opt._end_step()  # the next draw is the next step's
    mean = sum(fractions) / len(fractions)
    # 6,000 Bernoulli(0.6) draws: standard error 0.0063
    assert abs(mean - 0.6) < 0.025
    assert min(fractions) < 0.6 < max(fractions)


@pytest.mark.parametrize("scaling, factor", [("authors", 1 / 0.5), ("unit", 1.0)])
def test_swp_perturbation_norm(scaling, factor):
    model = tiny_bn_net()
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR),
        rho=RHO,
        beta=0.5,
        gamma=1,
        seed=5,
        swp_scaling=scaling,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with opt.first_pass():
        per_sample_ce(model, tiny_data()).mean().backward()
    kept = [p.grad is not None for p in model.parameters()]
    kept_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.first_step()
    eps = [p.detach() - q for p, q in zip(model.parameters(), before)]
    # ‖ε‖ = ρ·factor·‖g_kept‖/(‖g_kept‖ + δ), i.e. ρ/β (authors) or ρ (unit) unless the
    # kept gradients vanish (e.g. a bias right before BatchNorm has zero gradient).
    norm = float(torch.cat([g.flatten() for g in kept_grads]).norm())
    assert norm > 1e-6  # this seed keeps tensors with real gradients
    assert math.isclose(
        float(torch.cat([e.flatten() for e in eps]).norm()),
        RHO * factor * norm / (norm + 1e-12),
        rel_tol=1e-10,
    )
    for e, k in zip(eps, kept):
        if not k:
            assert e.abs().sum() == 0
    for e, g in zip([e for e, k in zip(eps, kept) if k], kept_grads):
        torch.testing.assert_close(e, RHO * factor * g / norm, rtol=1e-9, atol=1e-15)


def test_sds_selects_exactly_the_top_k_sharpness():
    before = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64)
    after = before + torch.tensor([0.5, -1.0, 3.0, 0.1, 2.0, 2.5, 0.0], dtype=torch.float64)
    sel = TopSharpness(0.5)
    assert sel.num_selected(7) == 4  # round half up: 3.5 -> 4
    assert sel.select(before, after).tolist() == [0, 2, 4, 5]
    assert TopSharpness(0.01).select(before, after).tolist() == [2]  # at least one sample
    assert TopSharpness(1.0).select(before, after) is None
    assert TopLoss(0.3).select(before, None).tolist() == [5, 6]


class CountingNet(nn.Module):
    """Records the batch size of every forward and whether grad mode was on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = tiny_bn_net()
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.body(x)


@pytest.mark.parametrize(
    "gamma, selection, expected",
    [
        (1.0, "sharpness", [(12, True), (12, True)]),
        (0.5, "sharpness", [(12, True), (12, False), (6, True)]),
        (0.25, "loss", [(12, True), (3, True)]),
    ],
)
def test_forward_counts_and_pass_two_slices_the_subset(gamma, selection, expected):
    model = CountingNet()
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR),
        rho=RHO,
        beta=0.6,
        gamma=gamma,
        selection=selection,
    )
    result = effsam.sharpness_aware_step(model, opt, tiny_data(n=12), per_sample_ce)
    assert model.calls == expected
    assert result.selected == expected[-1][0]


def test_sds_trains_on_the_sharpest_samples():
    """End to end: the pass-2 gradient equals the gradient of the selected subset at θ+ε."""
    model = tiny_bn_net()
    batch = tiny_data(n=10)
    opt = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=1.0), rho=RHO, beta=1, gamma=0.4)
    w0 = [p.detach().clone() for p in model.parameters()]
    # the expected subset, computed by hand

    probe = copy.deepcopy(model)
    l1 = per_sample_ce(probe, batch).detach()
    probe.zero_grad()
    per_sample_ce(probe, batch).mean().backward()
    g = [p.grad for p in probe.parameters()]
    norm = torch.cat([x.flatten() for x in g]).norm()
    with torch.no_grad():
        for p, gi in zip(probe.parameters(), g):
            p.add_(RHO * gi / norm)
    probe.zero_grad()
    l2 = per_sample_ce(probe, batch).detach()
    top = torch.topk(l2 - l1, 4).indices.sort().values
    x, y = batch
    per_sample_ce(probe, (x[top], y[top])).mean().backward()
    expected = [w - p.grad for w, p in zip(w0, probe.parameters())]
    effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_esam_keeps_bn_buffers_of_pass_one_and_frozen_parameters_frozen():
    model = tiny_bn_net(momentum=None)
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    batch = tiny_data()

    after_pass1 = copy.deepcopy(model)
    per_sample_ce(after_pass1, batch)
    opt = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, beta=0.5, gamma=0.5)
    effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    for b, b1 in zip(model.buffers(), after_pass1.buffers()):
        assert torch.equal(b, b1)
    for _ in range(5):
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
        assert model[0].bias.requires_grad is False
        assert model[0].bias.grad is None
    assert torch.equal(model[0].bias.detach(), frozen)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"beta": 0.0}, "0.0"),
        ({"beta": 1.5}, "1.5"),
        ({"beta": float("nan")}, "nan"),
        ({"gamma": 0}, "gamma: 0"),
        ({"gamma": 2}, "gamma: 2"),
        ({"gamma": float("nan")}, "nan"),
        ({"selection": "bogus"}, "'bogus'"),
        ({"swp_scaling": "paper"}, "'paper'"),
    ],
)
def test_bad_esam_hyperparameters(kwargs, fragment):
    model = tiny_bn_net()
    with pytest.raises(ValueError, match=fragment):
        effsam.ESAM(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def _scalar_loss(model, batch):
    return per_sample_ce(model, batch).mean()


def _short_loss(model, batch):
    return per_sample_ce(model, batch)[:-1]


@pytest.mark.parametrize(
    "batch_fn, loss_fn, exc, fragment",
    [
        (lambda: tiny_data(), _scalar_loss, ValueError, "scalar"),
        (lambda: tiny_data(), _short_loss, ValueError, r"\[11\], expected \[12\]"),
        (lambda: (tiny_data()[0], tiny_data()[1][:5]), per_sample_ce, ValueError, "disagree"),
    ],
)
def test_bad_input_raises_before_anything_changes(batch_fn, loss_fn, exc, fragment):
    model = tiny_bn_net()
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM), rho=RHO, beta=0.5, gamma=0.5
    )
    _steps(model, opt, 2)
    state = clone_state(model)
    gen = opt.mask.generator.get_state().clone()
    opt_state = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc, match=fragment):
        effsam.sharpness_aware_step(model, opt, batch_fn(), loss_fn)
    for k, v in clone_state(model).items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(opt.mask.generator.get_state(), gen)
    assert opt.steps == opt_state["effsam"]["steps"]
    after = opt.state_dict()
    assert after["effsam"]["steps"] == opt_state["effsam"]["steps"]
    for k, v in opt_state["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])
    # and the optimizer is usable afterwards
    assert not _steps(model, opt, 1)[0].skipped


def test_closure_api_works_for_swp_and_refuses_sds():
    model = tiny_bn_net()
    batch = tiny_data()
    opt = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, beta=0.5, gamma=1)

    def closure():
        opt.zero_grad()
        loss = per_sample_ce(model, batch).mean()
        loss.backward()
        return loss

    ref_model = tiny_bn_net()
    ref = effsam.ESAM(torch.optim.SGD(ref_model.parameters(), lr=LR), rho=RHO, beta=0.5, gamma=1)
    before = clone_state(model)
    for _ in range(3):
        opt.step(closure)
        effsam.sharpness_aware_step(ref_model, ref, batch, per_sample_ce)
    after, expected = clone_state(model), clone_state(ref_model)
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    # the closure API is the step function (the BN buffers differ: this closure does not
    # protect them, sharpness_aware_step does; the weights do not depend on them)
    for name, _ in model.named_parameters():
        assert torch.equal(after[name], expected[name]), name
    sds = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.5)
    with pytest.raises(RuntimeError, match="sharpness_aware_step"):
        sds.step(closure)


def test_dict_and_list_batches_are_sliced():
    model = tiny_bn_net()
    x, y = tiny_data(n=8)
    opt = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=LR), gamma=0.5)

    def dict_loss(m, batch):
        return per_sample_ce(m, (batch["x"], batch["y"]))

    r = effsam.sharpness_aware_step(model, opt, {"x": x, "y": y, "tag": "ignored"}, dict_loss)
    assert r.selected == 4 and r.batch_size == 8
    r = effsam.sharpness_aware_step(model, opt, [x, y], per_sample_ce)
    assert r.selected == 4


def plain_net():
    """tiny_bn_net without its BatchNorm: a sample's loss does not depend on the others."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _wholebatch_by_hand(model, batch, rho, k, lr):
    """The whole-batch control, written out: ε from pass 1 on the batch; at θ + ε the whole
    batch forwarded (BN batch statistics of every sample), the k samples with the largest
    ℓ_i(θ + ε) − ℓ_i(θ) from that forward, their mean loss back-propagated; θ − lr·g."""
    probe = copy.deepcopy(model)
    w0 = [p.detach().clone() for p in probe.parameters()]
    l1 = per_sample_ce(probe, batch)
    grads = torch.autograd.grad(l1.mean(), list(probe.parameters()))
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    with torch.no_grad():
        for p, g in zip(probe.parameters(), grads):
            p.add_(rho * g / norm)
    l2 = per_sample_ce(probe, batch)
    top = torch.topk((l2 - l1).detach(), k).indices
    g2 = torch.autograd.grad(l2[top].mean(), list(probe.parameters()))
    return [w - lr * g for w, g in zip(w0, g2)], top


def test_wholebatch_control_backpropagates_the_subset_of_a_whole_batch_forward():
    model = tiny_bn_net()
    batch = tiny_data(n=10)
    expected, top = _wholebatch_by_hand(model, batch, RHO, 4, lr=1.0)
    bn_ref = copy.deepcopy(model)
    per_sample_ce(bn_ref, batch)  # BN buffers as pass 1 leaves them
    opt = effsam.create_optimizer(model, "esam-wholebatch", lr=1.0, rho=RHO, beta=1, gamma=0.4)
    res = effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    assert res.selected == 4 and opt.selection.last_fraction == 0.4
    assert opt.selection.last_indices.tolist() == sorted(top.tolist())
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
    for b, b1 in zip(model.buffers(), bn_ref.buffers()):
        assert torch.equal(b, b1)


def test_wholebatch_control_differs_from_esam_only_through_batchnorm():
    batch = tiny_data(n=10)
    runs = {}
    for name, net in [("esam", tiny_bn_net()), ("esam-wholebatch", tiny_bn_net())]:
        opt = effsam.create_optimizer(net, name, lr=1.0, rho=RHO, gamma=0.4, beta=1)
        effsam.sharpness_aware_step(net, opt, batch, per_sample_ce)
        runs[name] = [p.detach().clone() for p in net.parameters()]
    # with BN the subset's own forward normalises by the subset's statistics: not the same
    assert any(not torch.allclose(a, b) for a, b in zip(*runs.values()))

    # without BN a sample's loss does not depend on the others: the control is ESAM
    nets = [plain_net(), plain_net()]
    for name, net in zip(["esam", "esam-wholebatch"], nets):
        opt = effsam.create_optimizer(net, name, lr=1.0, rho=RHO, gamma=0.4, beta=1)
        for i in range(3):
            effsam.sharpness_aware_step(net, opt, tiny_data(seed=50 + i, n=10), per_sample_ce)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_wholebatch_control_forwards_whole_batches_only():
    model = CountingNet()
    opt = effsam.create_optimizer(model, "esam-wholebatch", lr=LR, rho=RHO, gamma=0.5)
    result = effsam.sharpness_aware_step(model, opt, tiny_data(n=12), per_sample_ce)
    assert model.calls == [(12, True), (12, True)]  # SAM's passes, no ranking forward
    assert result.selected == 6


def test_wholebatch_control_under_accumulation_selects_per_micro_batch():
    model = tiny_bn_net()
    opt = effsam.create_optimizer(model, "esam-wholebatch", lr=LR, rho=RHO, beta=1, gamma=0.5)
    x, y = tiny_data(seed=9, n=13)  # micro-batches of 5, 4, 4: k = 3, 2, 2
    res = effsam.sharpness_aware_step(model, opt, (x, y), per_sample_ce, accumulation_steps=3)
    assert res.selected == 7 and opt.last_selected_fraction == 7 / 13

    # without BN the micro-batches' subsets are weighted as ESAM's: the same step
    nets = [plain_net(), plain_net()]
    for name, net in zip(["esam", "esam-wholebatch"], nets):
        opt = effsam.create_optimizer(net, name, lr=1.0, rho=RHO, gamma=0.5, beta=1)
        effsam.sharpness_aware_step(net, opt, (x, y), per_sample_ce, accumulation_steps=3)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_bad_sds_pass2_is_refused():
    model = tiny_bn_net()
    with pytest.raises(ValueError, match="sds_pass2: 'all'"):
        effsam.ESAM(torch.optim.SGD(model.parameters(), lr=LR), sds_pass2="all")
