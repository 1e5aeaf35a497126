"""sharpness_aware_step with a torch.compile'd model, every variant.

The default run uses the ``aot_eager`` backend (Dynamo tracing and AOTAutograd, which is
where SWP's requires_grad switching matters, without C++ code generation); the slow run
uses inductor. Results are compared with the same steps on an eager model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import effsam
from scale._common import LR, MOMENTUM, RHO, assert_close, ce, data, mlp, weights_of

VARIANTS = {
    "sam": lambda base: effsam.SAM(base, rho=RHO),
    "asam": lambda base: effsam.ASAM(base, rho=1.0),
    "esam": lambda base: effsam.ESAM(base, rho=RHO, beta=0.5, gamma=0.5, seed=4),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _run(variant: str, backend: str | None, steps: int) -> tuple[dict, list]:
    model = mlp(0)
    opt = VARIANTS[variant](torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    net = torch.compile(model, backend=backend) if backend else model
    selected = []
    with warnings.catch_warnings():
        # SWP past the recompile limit: Dynamo's and effsam's warnings are expected here.
        warnings.simplefilter("ignore")
        for step in range(steps):
            result = effsam.sharpness_aware_step(net, opt, data(seed=20 + step, n=8), ce)
            selected.append(result.selected)
    return weights_of(model), selected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_model_matches_eager_aot_eager(variant: str) -> None:
    # 12 steps: ESAM's SWP goes past Dynamo's recompile limit (8), so both the compiled
    # and the eager-fallback regimes are covered.
    eager_w, eager_sel = _run(variant, None, 12)
    compiled_w, compiled_sel = _run(variant, "aot_eager", 12)
    assert compiled_sel == eager_sel
    assert_close(compiled_w, eager_w, atol=1e-12)
    graphs = counters["stats"]["unique_graphs"]
    if variant in ("sam", "asam"):
        # Both passes have the same shapes and flags: one graph serves every step.
        assert graphs == 1, f"{variant}: {graphs} graphs for 12 steps"
    else:
        assert graphs >= 3  # pass 2, SDS's no-grad forward, and SWP patterns


def test_swp_with_compiled_model_warns_once() -> None:
    model = mlp(0)
    opt = VARIANTS["esam"](torch.optim.SGD(model.parameters(), lr=LR))
    net = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            effsam.sharpness_aware_step(net, opt, data(seed=step, n=8), ce)
    ours = [w for w in caught if "recompile" in str(w.message) and "effsam" in str(w.message)]
    assert len(ours) == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_model_matches_eager_inductor(variant: str) -> None:
    eager_w, eager_sel = _run(variant, None, 10)
    compiled_w, compiled_sel = _run(variant, "inductor", 10)
    assert compiled_sel == eager_sel
    # Inductor fuses and reorders float64 arithmetic: equal up to rounding.
    assert_close(compiled_w, eager_w, atol=1e-10)
