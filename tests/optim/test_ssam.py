"""SSAM: sparse perturbation by Fisher (SSAM-F) and dynamic drop/grow (SSAM-D) masks."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.optim.masks import round_half_up
from effsam.optim.sparse import DynamicMask, FisherMask, empirical_fisher, largest_indices

LR, MOM, RHO = 0.1, 0.9, 0.2


# ---------------------------------------------------------------------- tiny models and data
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)
    ).double()  # 80 parameters


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()


def data(seed: int = 1, n: int = 12, conv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if conv else (n, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)


def flat_mask(opt: effsam.SSAM) -> torch.Tensor:
    return torch.cat([m.reshape(-1) for m in opt.mask.masks])


def run(model: nn.Module, opt: torch.optim.Optimizer, n: int, start: int = 0) -> list[bool]:
    """Drive the two-phase API by hand; refresh on the optimizer's schedule."""
    refreshed = []
    for i in range(start, start + n):
        batch = data(100 + i)
        due = isinstance(opt, effsam.SharpnessAware) and opt.mask_refresh_due()
        if due:
            opt.refresh_mask(model, batch, ce)
        refreshed.append(due)
        with opt.first_pass():
            ce(model, batch).mean().backward()
        opt.first_step(zero_grad=True)
        with effsam.preserve_bn_stats(model):
            ce(model, batch).mean().backward()
        opt.second_step(zero_grad=True)
    return refreshed


def reference_fisher(model: nn.Module, batch, n: int) -> list[torch.Tensor]:
    """Σ_i (∂ℓ_i/∂θ)² by a plain loop of single-sample backward passes, in eval mode."""
    x, y = batch
    was = model.training
    model.eval()
    acc = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(min(n, x.shape[0])):
        model.zero_grad(set_to_none=True)
        ce(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        for a, p in zip(acc, model.parameters()):
            a += p.grad.square()
    model.zero_grad(set_to_none=True)
    model.train(was)
    return acc


def top_k_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest scores, ties to the lower index (a full stable sort)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return out


# ---------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("normalisation", ["authors", "masked"])
@pytest.mark.parametrize("mask", ["fisher", "dynamic"])
def test_a_built_all_ones_mask_is_sam(mask, normalisation):
    # s = 1e-9: k = round((1 − s) N) = N, so a real mask is built and refreshed (not the
    # s = 0 short-circuit) and keeps every element: the weights must be SAM's bit for bit
    sam_model, ssam_model = mlp(), mlp()
    sam = effsam.SAM(sgd(sam_model), rho=RHO)
    ssam = effsam.SSAM(
        sgd(ssam_model),
        rho=RHO,
        sparsity=1e-9,
        mask=mask,
        update_interval=2,
        total_steps=6,
        normalisation=normalisation,
    )
    run(sam_model, sam, 6)
    run(ssam_model, ssam, 6)
    assert ssam.mask.masks is not None and ssam.mask.refreshes >= 3
    assert all(bool(m.all()) for m in ssam.mask.masks)
    a, b = sam_model.state_dict(), ssam_model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("normalisation", ["authors", "masked"])
@pytest.mark.parametrize("mask", ["fisher", "dynamic"])
def test_sparsity_zero_is_sam(mask, normalisation):
    sam_model, ssam_model = mlp(), mlp()
    sam = effsam.SAM(sgd(sam_model), rho=RHO)
    ssam = effsam.SSAM(
        sgd(ssam_model),
        rho=RHO,
        sparsity=0,
        mask=mask,
        update_interval=2,
        total_steps=6,
        normalisation=normalisation,
    )
    run(sam_model, sam, 6)
    run(ssam_model, ssam, 6)
    a, b = sam_model.state_dict(), ssam_model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ssam.density == 1.0


@pytest.mark.parametrize("normalisation", ["authors", "masked"])
def test_perturbation_is_masked_and_normalised(normalisation):
    model = mlp()
    batch = data()
    opt = effsam.SSAM(sgd(model), rho=RHO, sparsity=0.6, normalisation=normalisation)
    opt.refresh_mask(model, batch, ce)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.first_pass():
        ce(model, batch).mean().backward()
    m = [mk.double() for mk in opt.mask.masks]
    # "masked" needs no gradient where nothing is perturbed: pass 1 skips those tensors
    skipped = [p.grad is None for p in model.parameters()]
    if normalisation == "authors":
        assert not any(skipped)
    else:
        assert skipped == [not bool(mi.any()) for mi in m] and any(skipped)
    g = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    opt.first_step()
    if normalisation == "authors":
        norm = torch.cat([gi.flatten() for gi in g]).norm()
    else:
        norm = torch.cat([(mi * gi).flatten() for mi, gi in zip(m, g)]).norm()
    eps = [p.detach() - b for p, b in zip(model.parameters(), before)]
    for e, mi, gi in zip(eps, m, g):
        torch.testing.assert_close(e, mi * RHO * gi / norm, rtol=1e-9, atol=1e-15)
        assert torch.all(e[mi == 0] == 0)
    eps_norm = float(torch.cat([e.flatten() for e in eps]).norm())
    if normalisation == "authors":
        assert eps_norm < RHO  # ‖ε‖ = ρ ‖m ⊙ g‖/‖g‖ ≤ ρ
    else:
        assert math.isclose(eps_norm, RHO, rel_tol=1e-9)


# ---------------------------------------------------------------------- SSAM-F
@pytest.mark.parametrize("num_samples", [1, 3, 16])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_fisher_mask_is_top_k_of_reference_fisher(net, num_samples):
    conv = net == "conv"
    model = convnet() if conv else mlp()
    batch = data(7, n=12, conv=conv)
    params = list(model.parameters())
    expected = reference_fisher(model, batch, num_samples)
    got = empirical_fisher(model, params, batch, ce, num_samples, chunk_size=2)
    for e, f in zip(expected, got):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-14)
    for sparsity in (0.3, 0.5, 0.85):
        opt = effsam.SSAM(sgd(model), sparsity=sparsity, num_samples=num_samples)
        assert opt.refresh_mask(model, batch, ce)
        scores = torch.cat([e.flatten() for e in expected])
        k = round_half_up((1 - sparsity) * scores.numel())
        assert torch.equal(flat_mask(opt), top_k_stable(scores, k))
        assert opt.mask.last_num_samples == min(num_samples, 12)


def test_exact_density_after_every_refresh():
    model = mlp()
    n = sum(p.numel() for p in model.parameters())
    for sparsity in (0.1, 0.37, 0.5, 0.9, 0.99):
        opt = effsam.SSAM(sgd(model), sparsity=sparsity, update_interval=1, num_samples=4)
        k = round_half_up((1 - sparsity) * n)
        for i in range(3):
            assert opt.refresh_mask(model, data(i), ce)
            assert int(flat_mask(opt).sum()) == k
            assert opt.density == k / n
    model = mlp()
    opt = effsam.SSAM(sgd(model), sparsity=0.37, mask="dynamic", update_interval=1, total_steps=8)
    k = round_half_up(0.63 * n)
    for i in range(8):
        run(model, opt, 1, start=i)
        assert int(flat_mask(opt).sum()) == k
    assert opt.mask.refreshes == 8  # steps 0..7 (the authors refresh at t = 0 too)


def test_fisher_refresh_leaves_bn_buffers_grads_and_modes_untouched():
    model = mlp()
    model.train()
    model[3].eval()  # a mixed mode must survive too
    torch.manual_seed(3)
    for p in list(model.parameters())[:-1]:
        p.grad = torch.randn_like(p)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num" in k}
    modes = [m.training for m in model.modules()]
    opt = effsam.SSAM(torch.optim.SGD(model.parameters(), lr=LR), sparsity=0.5)
    opt.refresh_mask(model, data(), ce)
    for key, value in buffers.items():
        assert torch.equal(model.state_dict()[key], value), key
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes


def test_first_fisher_mask_exists_before_the_first_step():
    model = mlp()
    opt = effsam.SSAM(sgd(model), sparsity=0.5, update_interval=3)
    assert opt.mask_refresh_due() and not opt.mask.ready

    def closure():
        opt.zero_grad()
        loss = ce(model, data()).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="refresh_mask"):
        opt.step(closure)
    results = [effsam.sharpness_aware_step(model, opt, data(i), ce) for i in range(6)]
    assert [r.mask_refreshed for r in results] == [True, False, False, True, False, False]
    assert opt.mask.refreshes == 2 and opt.mask_refresh_due()
    # a refresh the loop already did at this step is not repeated
    opt.refresh_mask(model, data(), ce)
    assert not opt.mask_refresh_due()
    assert not effsam.sharpness_aware_step(model, opt, data(6), ce).mask_refreshed
    assert opt.mask.refreshes == 3


def test_fisher_refresh_works_on_dict_batches():
    model = mlp()
    x, y = data()

    def dict_ce(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")

    a = empirical_fisher(model, list(model.parameters()), {"x": x, "y": y}, dict_ce, 5)
    b = empirical_fisher(model, list(model.parameters()), (x, y), ce, 5)
    for fa, fb in zip(a, b):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)


def test_non_finite_fisher_keeps_the_previous_mask():
    model = mlp()
    opt = effsam.SSAM(sgd(model), sparsity=0.5, update_interval=1)
    bad_x, bad_y = data(5)
    bad_x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="no mask yet"):
        assert not opt.refresh_mask(model, (bad_x, bad_y), ce)
    assert not opt.mask.ready
    assert opt.refresh_mask(model, data(), ce)
    before = [m.clone() for m in opt.mask.masks]
    with pytest.warns(RuntimeWarning, match="previous mask is kept"):
        assert not opt.refresh_mask(model, (bad_x, bad_y), ce)
    for m, b in zip(opt.mask.masks, before):
        assert torch.equal(m, b)


def test_parameters_outside_the_model_are_never_perturbed():
    model = mlp()
    extra = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = effsam.SSAM(
        torch.optim.SGD([*model.parameters(), extra], lr=LR), sparsity=0.5, num_samples=2
    )
    with pytest.warns(RuntimeWarning, match="not parameters of the model"):
        opt.refresh_mask(model, data(), ce)
    assert not opt.mask.masks[-1].any()
    assert int(flat_mask(opt).sum()) == 40  # half of the model's 80, the extra 4 left out


# ---------------------------------------------------------------------- tensor granularity
def test_tensor_granularity_keeps_whole_tensors_by_fisher_mass():
    model = mlp()
    batch = data(4)
    opt = effsam.SSAM(
        torch.optim.SGD(model.parameters(), lr=LR),
        rho=RHO,
        sparsity=0.5,
        granularity="tensor",
        num_samples=6,
    )
    opt.refresh_mask(model, batch, ce)
    # the expected choice, from the independent Fisher and the documented greedy rule
    fisher = reference_fisher(model, batch, 6)
    sizes = [f.numel() for f in fisher]
    k = round_half_up(0.5 * sum(sizes))
    density = torch.tensor([float(f.sum() / f.numel()) for f in fisher])
    kept, expected = 0, [False] * len(sizes)
    for n in torch.sort(density, descending=True, stable=True).indices.tolist():
        if kept + sizes[n] / 2 < k:
            expected[n], kept = True, kept + sizes[n]
    masks = opt.mask.masks
    assert [bool(m.all()) for m in masks] == expected
    assert all(bool(m.all()) or not bool(m.any()) for m in masks)
    assert opt.density == kept / sum(sizes)
    assert 0 < opt.density < 1
    # pass 1 computes weight gradients of the kept tensors only; ε lives there, ‖ε‖ = ρ
    before = [p.detach().clone() for p in model.parameters()]
    with opt.first_pass():
        ce(model, batch).mean().backward()
    assert [p.grad is not None for p in model.parameters()] == expected
    assert all(p.requires_grad for p in model.parameters())
    assert opt.last_kept.elements == opt.density
    grads = [p.grad for p in model.parameters()]
    norm = torch.cat([g.flatten() for g in grads if g is not None]).norm()
    opt.first_step()
    eps = [p.detach() - b for p, b in zip(model.parameters(), before)]
    for e, keep, g in zip(eps, expected, grads):
        if keep:
            torch.testing.assert_close(e, RHO * g / norm, rtol=1e-9, atol=1e-15)
        else:
            assert not bool(e.any())
    assert math.isclose(float(torch.cat([e.flatten() for e in eps]).norm()), RHO, rel_tol=1e-9)


# ---------------------------------------------------------------------- SSAM-D
def test_drop_rate_follows_the_cosine_schedule():
    mask = DynamicMask(0.5, total_steps=100, drop_rate=0.5)
    assert mask.drop_rate_at(0) == 0.5
    assert math.isclose(mask.drop_rate_at(50), 0.25)
    assert math.isclose(mask.drop_rate_at(100), 0.0, abs_tol=1e-15)
    assert math.isclose(mask.drop_rate_at(150), 0.0, abs_tol=1e-15)  # clamped after T
    assert math.isclose(mask.drop_rate_at(25), 0.25 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_dynamic_drop_and_grow(grow):
    """The authors' rule: a refresh at every t with t % interval == 0 (t = 0 included)
    drops the n_t live elements with the smallest |g| of step t and grows n_t among the
    elements dead BEFORE the drop; step t perturbs with the old mask, t + 1 with the new."""
    model = mlp()
    total, interval = 8, 2
    opt = effsam.SSAM(
        sgd(model),
        rho=RHO,
        sparsity=0.6,
        mask="dynamic",
        update_interval=interval,
        total_steps=total,
        grow=grow,
        seed=3,
    )
    n_elems = sum(p.numel() for p in model.parameters())
    k = round_half_up(0.4 * n_elems)
    checked = 0
    expected_next = None
    for t in range(total):
        batch = data(200 + t)
        due = opt.mask_refresh_due()
        assert due == (t % interval == 0)
        if due:
            assert opt.refresh_mask(model, batch, ce)
        before = [p.detach().clone() for p in model.parameters()]
        with opt.first_pass():
            ce(model, batch).mean().backward()
        current = flat_mask(opt).clone()
        assert int(current.sum()) == k
        if expected_next is not None:
            assert torch.equal(current, expected_next)  # the mask of the last refresh
            expected_next = None
        score = torch.cat([p.grad.abs().flatten() for p in model.parameters()])
        opt.first_step(zero_grad=True)
        assert torch.equal(flat_mask(opt), current)  # step t perturbs with the old mask
        eps = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        assert bool((eps[~current] == 0).all()) and bool((eps[current] != 0).any())
        if due:
            r_t = 0.5 * (1 + math.cos(math.pi * t / total)) / 2
            n_drop = min(round_half_up(r_t * k), n_elems - k)
            assert opt.mask.last_drop_count == n_drop > 0
            new = torch.cat([m.reshape(-1) for m in opt.mask.next_masks])
            live = current.nonzero().flatten()
            dropped = live[torch.sort(score[live], stable=True).indices[:n_drop]]
            expected_drop = torch.zeros_like(current)
            expected_drop[dropped] = True
            assert torch.equal(current & ~new, expected_drop)  # exactly the smallest |g|
            grown = new & ~current
            assert int(grown.sum()) == n_drop
            assert not bool((grown & expected_drop).any())  # none comes straight back
            if grow == "gradient":
                dead = (~current).nonzero().flatten()
                best = dead[torch.sort(score[dead], descending=True, stable=True).indices]
                expected_grow = torch.zeros_like(current)
                expected_grow[best[:n_drop]] = True
                assert torch.equal(grown, expected_grow)
            expected_next = new
            checked += 1
        else:
            assert opt.mask.next_masks is None
        with effsam.preserve_bn_stats(model):
            ce(model, batch).mean().backward()
        opt.second_step(zero_grad=True)
    assert checked == 4  # t = 0, 2, 4, 6


def test_dynamic_growth_is_capped_by_the_dead_elements():
    # s = 0.2, r_0 = 1: round(r_0 · k) = 64 > N − k = 16 dead elements: 16 swap places
    model = mlp()
    opt = effsam.SSAM(
        sgd(model),
        sparsity=0.2,
        mask="dynamic",
        update_interval=1,
        total_steps=100,
        drop_rate=1.0,
        grow="gradient",
    )
    run(model, opt, 1)
    n = sum(p.numel() for p in model.parameters())
    assert opt.mask.last_drop_count == n - round_half_up(0.8 * n) == 16
    old = flat_mask(opt)
    new = torch.cat([m.reshape(-1) for m in opt.mask.next_masks])
    assert int(new.sum()) == int(old.sum())
    assert int((new & ~old).sum()) == 16  # the 16 dead ones, all regrown


def test_dynamic_refresh_runs_in_the_closure_api():
    model = mlp()
    opt = effsam.SSAM(sgd(model), sparsity=0.5, mask="dynamic", update_interval=2, total_steps=20)
    x, y = data()

    def closure():
        opt.zero_grad()
        with effsam.preserve_bn_stats(model, enabled=opt.perturbed):
            loss = ce(model, (x, y)).mean()
            loss.backward()
        return loss

    for _ in range(10):
        opt.step(closure)
    assert opt.mask.refreshes == 5  # t = 0, 2, 4, 6, 8
    assert opt.mask.last_refresh_step == 8


def test_dynamic_update_is_rolled_back_by_an_aborted_step():
    model = mlp()
    opt = effsam.SSAM(sgd(model), sparsity=0.5, mask="dynamic", update_interval=1, total_steps=4)
    run(model, opt, 1)
    run(model, opt, 1)  # installs step 0's update, computes step 1's
    masks, gen = list(opt.mask.masks), opt.mask.generator.get_state()
    pending = list(opt.mask.next_masks)
    refreshes = opt.mask.refreshes
    assert opt.mask_refresh_due()
    opt.refresh_mask(model, data(), ce)
    with opt.first_pass():
        ce(model, data()).mean().backward()
    # the draw installed step 1's update; first_step computes step 2's
    assert all(a is b for a, b in zip(opt.mask.masks, pending))
    opt.first_step(zero_grad=True)
    assert opt.mask.refreshes == refreshes + 1
    opt.abort_step()
    assert all(torch.equal(a, b) for a, b in zip(opt.mask.masks, masks))
    assert all(torch.equal(a, b) for a, b in zip(opt.mask.next_masks, pending))
    assert opt.mask.refreshes == refreshes
    assert torch.equal(opt.mask.generator.get_state(), gen)
    run(model, opt, 1)  # the scheduled update survives the abort and runs on retry
    assert opt.mask.refreshes == refreshes + 1


def test_dynamic_non_finite_gradient_keeps_the_mask():
    model = mlp()
    opt = effsam.SSAM(sgd(model), sparsity=0.5, mask="dynamic", update_interval=1, total_steps=4)
    run(model, opt, 1)
    x, y = data()
    x[0, 0] = float("nan")
    opt.refresh_mask(model, (x, y), ce)
    with opt.first_pass():
        ce(model, (x, y)).mean().backward()
    before = flat_mask(opt).clone()  # step 0's update, installed by this draw
    with pytest.warns(RuntimeWarning) as record:
        assert not opt.first_step(zero_grad=True)
    messages = " ".join(str(w.message) for w in record)
    assert "previous mask is kept" in messages and "step skipped" in messages
    opt.second_step()
    assert opt.mask.next_masks is None
    with opt.first_pass():
        ce(model, data()).mean().backward()
    assert torch.equal(flat_mask(opt), before)
    opt.abort_step()


# ---------------------------------------------------------------------- state
@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask": "fisher", "num_samples": 3},
        {"mask": "dynamic", "total_steps": 10},
        {"mask": "fisher", "granularity": "tensor"},
    ],
    ids=["fisher", "dynamic", "tensor"],
)
def test_state_dict_round_trip_continues_bit_identically(kwargs):
    def make():
        model = mlp()
        return model, effsam.SSAM(sgd(model), rho=RHO, sparsity=0.5, update_interval=2, **kwargs)

    model_a, opt_a = make()
    run(model_a, opt_a, 5)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(m.dtype == torch.bool for m in saved["opt"]["effsam"]["mask"]["masks"])
    model_b, opt_b = make()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    assert torch.equal(flat_mask(opt_a), flat_mask(opt_b))
    assert opt_b.mask_refresh_due() == opt_a.mask_refresh_due()
    assert opt_b.steps == opt_a.steps == 5
    refreshed_a = run(model_a, opt_a, 5, start=5)
    refreshed_b = run(model_b, opt_b, 5, start=5)
    assert refreshed_a == refreshed_b and any(refreshed_a)
    a, b = model_a.state_dict(), model_b.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(flat_mask(opt_a), flat_mask(opt_b))


# ---------------------------------------------------------------------- misc
def test_largest_indices_breaks_ties_by_lower_index():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert largest_indices(s, 2).tolist() == [1, 2]
    assert largest_indices(s, 4).tolist() == [1, 2, 3, 4]
    assert largest_indices(s, 0).tolist() == []
    assert largest_indices(s, 9).tolist() == [0, 1, 2, 3, 4]


def test_registry_entries():
    model = mlp()
    opt = effsam.create_optimizer(model, "ssam-f", lr=0.05, momentum=0.9)
    assert isinstance(opt, effsam.SSAM) and isinstance(opt.mask, FisherMask)
    assert (opt.sparsity, opt.mask.num_samples, opt.mask.update_interval) == (0.5, 16, 390)
    assert opt.defaults["rho"] == 0.1
    with pytest.raises(ValueError, match="total_steps"):
        effsam.create_optimizer(model, "ssam-d")
    opt = effsam.create_optimizer(model, "ssam-d", total_steps=1000, drop_rate=0.3)
    assert isinstance(opt.mask, DynamicMask) and opt.mask.drop_rate == 0.3
    opt = effsam.create_optimizer(model, "ssam-f-tensor", sparsity=0.25)
    assert opt.mask.granularity == "tensor" and opt.mask.normalisation == "masked"


@pytest.mark.parametrize(
    "kwargs, exc, value",
    [
        ({"sparsity": 1.0}, ValueError, 1.0),
        ({"sparsity": -0.1}, ValueError, -0.1),
        ({"sparsity": float("nan")}, ValueError, float("nan")),
        ({"sparsity": "0.5"}, TypeError, "0.5"),
        ({"sparsity": True}, TypeError, True),
        ({"num_samples": 0}, ValueError, 0),
        ({"num_samples": 2.5}, TypeError, 2.5),
        ({"update_interval": 0}, ValueError, 0),
        ({"update_interval": -3}, ValueError, -3),
        ({"mask": "sparse"}, ValueError, "sparse"),
        ({"mask": "dynamic"}, ValueError, None),
        ({"mask": "dynamic", "total_steps": 0}, ValueError, 0),
        ({"mask": "dynamic", "total_steps": 9, "drop_rate": 1.5}, ValueError, 1.5),
        ({"mask": "dynamic", "total_steps": 9, "grow": "magnitude"}, ValueError, "magnitude"),
        ({"mask": "dynamic", "total_steps": 9, "granularity": "tensor"}, ValueError, "tensor"),
        ({"granularity": "row"}, ValueError, "row"),
        ({"normalisation": "unit"}, ValueError, "unit"),
        ({"granularity": "tensor", "normalisation": "authors"}, ValueError, "authors"),
    ],
)
def test_bad_inputs_raise_naming_the_value(kwargs, exc, value):
    model = mlp()
    fragment = "total_steps" if value is None else re.escape(repr(value))
    with pytest.raises(exc, match=fragment):
        effsam.SSAM(sgd(model), **kwargs)


def test_a_policy_object_is_not_a_mask_name():
    with pytest.raises(TypeError, match="FisherMask"):
        effsam.SSAM(sgd(mlp()), mask=FisherMask(0.5))
