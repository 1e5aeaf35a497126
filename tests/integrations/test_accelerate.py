"""accelerate: the two documented loops against effsam driven by hand, and prepare()'s
optimizer state round trip."""

from __future__ import annotations

import pytest
import torch

import effsam
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

accelerate = pytest.importorskip("accelerate")
from effsam.integrations import accelerate as eacc  # noqa: E402

RHO, STEPS = 0.2, 3


def _opt(model):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return effsam.ESAM(base, rho=RHO, beta=0.5, gamma=0.5, seed=2)


def _batches(dtype=torch.float64):
    return [
        tuple(t.to(dtype) if t.is_floating_point() else t for t in tiny_data(seed=110 + i, n=8))
        for i in range(STEPS)
    ]


def _accelerator(mixed_precision="no", **kwargs):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision, **kwargs)


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)


@pytest.mark.parametrize(
    "mixed_precision, dtype, atol", [("no", torch.float64, 0.0), ("bf16", torch.float32, 1e-6)]
)
def test_sharpness_aware_step_recipe_equals_effsam_by_hand(mixed_precision, dtype, atol):
    batches = _batches(dtype)
    acc = _accelerator(mixed_precision)
    model = tiny_bn_net().to(dtype)
    model, opt, loader = acc.prepare(model, _opt(model), _loader(batches))
    for batch in loader:
        eacc.sharpness_aware_step(acc, model, opt, batch, per_sample_ce)
    ref = tiny_bn_net().to(dtype)
    ref_opt = _opt(ref)
    autocast = "bf16" if mixed_precision == "bf16" else None
    for batch in batches:
        effsam.sharpness_aware_step(ref, ref_opt, batch, per_sample_ce, autocast=autocast)
    got, want = clone_state(acc.unwrap_model(model)), clone_state(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)
    assert opt.optimizer.steps == STEPS


def test_closure_recipe_through_the_accelerated_optimizer_equals_sharpness_aware_step():
    """The closure recipe of docs/integrations.md, with its BatchNorm guard: weights AND
    BatchNorm buffers equal effsam's step (only pass 1 updates the statistics)."""
    batches = _batches()
    acc = _accelerator()
    model = tiny_bn_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt, loader = acc.prepare(model, effsam.SAM(base, rho=RHO), _loader(batches))
    for x, y in loader:

        def closure():
            opt.zero_grad()
            with effsam.preserve_bn_stats(model, enabled=opt.optimizer.perturbed):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                acc.backward(loss)
            return loss

        opt.step(closure)
    ref = tiny_bn_net()
    ref_opt = effsam.SAM(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), rho=RHO)
    for batch in batches:
        effsam.sharpness_aware_step(ref, ref_opt, batch, per_sample_ce)
    got, want = clone_state(model), clone_state(ref)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert int(model[1].num_batches_tracked) == STEPS


def test_closure_inside_accelerators_accumulation_is_refused():
    """Inside accelerator.accumulate accelerate skips step() on the first micro-batches,
    so the closure would never see them: refused at the first step, weights unchanged."""
    batches = _batches()
    acc = _accelerator(gradient_accumulation_steps=2)
    model = tiny_bn_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt, loader = acc.prepare(model, effsam.SAM(base, rho=RHO), _loader(batches))
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="gradient accumulation.*accumulation_steps=n"):
        for x, y in loader:
            with acc.accumulate(model):

                def closure():
                    opt.zero_grad()
                    with effsam.preserve_bn_stats(model, enabled=opt.optimizer.perturbed):
                        loss = torch.nn.functional.cross_entropy(model(x), y)
                        acc.backward(loss)
                    return loss

                opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_prepare_keeps_the_optimizer_state_and_the_mask_generator():
    model = tiny_bn_net()
    opt = _opt(model)
    batches = _batches()
    effsam.sharpness_aware_step(model, opt, batches[0], per_sample_ce)
    gen = opt.mask.generator.get_state()
    acc = _accelerator()
    model, opt2 = acc.prepare(model, opt)
    assert torch.equal(opt2.optimizer.mask.generator.get_state(), gen)
    assert opt2.optimizer.steps == 1


def test_unknown_optimizer_is_refused():
    acc = _accelerator()
    model = tiny_bn_net()
    with pytest.raises(TypeError, match="expected an effsam optimizer, got SGD"):
        eacc.sharpness_aware_step(
            acc, model, torch.optim.SGD(model.parameters(), lr=0.1), _batches()[0], per_sample_ce
        )


def test_accelerators_own_accumulation_is_refused_in_favour_of_accumulation_steps():
    acc = _accelerator(gradient_accumulation_steps=2)
    model = tiny_bn_net()
    model, opt = acc.prepare(model, _opt(model))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2.*accumulation_steps="):
        eacc.sharpness_aware_step(acc, model, opt, _batches()[0], per_sample_ce)
