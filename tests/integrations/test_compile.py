"""torch.compile of a WHOLE training step (the optimizer call inside the compiled function)
gives the eager result: the wrapper's per-step state changes run outside the graph."""

from __future__ import annotations

import pytest
import torch

import effsam
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

RHO = 0.2


def _make(kind, model):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "sam":
        return effsam.SAM(base, rho=RHO)
    if kind == "asam":
        return effsam.ASAM(base, rho=1.0)
    if kind == "esam_swp":
        return effsam.ESAM(base, rho=RHO, beta=0.5, gamma=1.0, seed=1)
    if kind == "sam_interval":  # plain and sharpness-aware steps alternate
        return effsam.SAM(base, rho=RHO, schedule=effsam.Interval(2))
    if kind == "looksam":
        return effsam.LookSAM(base, rho=RHO, k=2)
    if kind == "msam":
        return effsam.MSAM(base, rho=RHO)
    return effsam.ESAM(base, rho=RHO, beta=0.5, gamma=0.5, seed=1)  # SWP + SDS


def _train(kind, drive, backend, steps=4):
    torch._dynamo.reset()
    model = tiny_bn_net()
    opt = _make(kind, model)

    def train_step(x, y):
        if drive == "closure":

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = per_sample_ce(model, (x, y)).mean()
                loss.backward()
                return loss

            return opt.step(closure)
        return effsam.sharpness_aware_step(model, opt, (x, y), per_sample_ce).loss

    step = train_step if backend is None else torch.compile(train_step, backend=backend)
    losses = [step(*tiny_data(seed=50 + i)).detach() for i in range(steps)]
    assert opt.steps == steps and not opt.perturbed
    return clone_state(model), torch.stack(losses)


@pytest.mark.parametrize(
    "kind, drive",
    [
        ("sam", "closure"),
        ("asam", "closure"),
        ("esam_swp", "closure"),
        ("esam_sds", "sharpness_aware_step"),
        ("sam_interval", "closure"),
        ("sam_interval", "sharpness_aware_step"),
        ("looksam", "sharpness_aware_step"),
        ("msam", "closure"),
    ],
)
def test_compiled_whole_step_equals_eager(kind, drive):
    eager_state, eager_loss = _train(kind, drive, None)
    state, loss = _train(kind, drive, "eager")
    assert torch.equal(loss, eager_loss)
    for k in eager_state:
        assert torch.equal(state[k], eager_state[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("kind, drive", [("sam", "closure"), ("esam_sds", "sharpness_aware_step")])
def test_compiled_whole_step_with_inductor_matches_eager(kind, drive):
    eager_state, _ = _train(kind, drive, None)
    state, _ = _train(kind, drive, "inductor")
    for k in eager_state:
        torch.testing.assert_close(state[k], eager_state[k], rtol=0, atol=1e-12)
