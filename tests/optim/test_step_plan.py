"""The step's plan (effsam.optim.policy.StepPlan): each method's declared shape, written
out here, and the orchestration (effsam/step.py) reading the plan and nothing else of the
policies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import effsam
from effsam.optim.policy import PLAIN_STEP, StepPlan
from helpers import per_sample_ce, tiny_bn_net, tiny_data

SUBSET = {"per_sample": True, "pass2": "subset"}
SHARPEST = {**SUBSET, "rank_at_perturbed": True}  # ESAM's ranking: ℓ(θ + ε) − ℓ(θ)

EXPECTED = [
    ("sam", {}, {}),
    ("esam-swp", {"beta": 0.5}, {}),
    ("esam", {"beta": 0.6, "gamma": 0.5}, SHARPEST),
    ("esam-random", {"beta": 0.6, "gamma": 0.5}, SUBSET),
    (
        "esam-wholebatch",
        {"beta": 0.6, "gamma": 0.5},
        {"per_sample": True, "pass2": "ranked-in-pass2"},
    ),
    ("esam-bn", {"beta": 0.6, "gamma": 0.5}, {**SHARPEST, "bn_whole_batch": True}),
    ("ksam", {}, {"per_sample": True, "preselect": True}),
    ("msam", {"rho": 0.5}, {"one_pass": True}),
    ("sam-slice", {}, {"pass1_slice": True}),
    ("rst-slice", {"total_steps": 10}, {"pass1_slice": True}),
    ("sam-stale", {}, {}),  # before its first step: a fresh (two-pass) ascent
    ("ae-sam", {"total_steps": 10}, {}),
    ("looksam", {"k": 2}, {}),
]


@pytest.mark.parametrize("name,kwargs,expected", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_each_method_declares_its_shape(name, kwargs, expected):
    model = tiny_bn_net()
    spec = effsam.optim.get_spec(name)
    where = model if spec.needs_model else model.parameters()
    opt = effsam.create_optimizer(where, name, lr=0.1, momentum=0.9, **kwargs)
    assert opt.step_plan() == StepPlan(**expected)


def test_a_ranking_by_pass_1_losses_alone_needs_no_forward_at_the_perturbed_point():
    model = tiny_bn_net()
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=0.1), beta=0.6, gamma=0.5, selection="loss"
    )
    assert opt.step_plan() == StepPlan(**SUBSET)


def test_a_stale_step_is_one_pass_and_a_fresh_one_two():
    model = tiny_bn_net()
    opt = effsam.create_optimizer(model.parameters(), "sam-stale", lr=0.1, refresh_every=2)
    shapes = []
    for i in range(4):
        opt.begin_step()
        shapes.append(opt.step_plan().one_pass)
        opt.abort_step()
        effsam.sharpness_aware_step(model, opt, tiny_data(seed=i), per_sample_ce)
    # abort_step undoes the begun step: the plan seen is the one the real step then takes
    assert shapes == [False, True, False, True]


def test_a_plan_that_cannot_be_run_is_refused():
    with pytest.raises(ValueError, match="pass2"):
        StepPlan(pass2="half")
    with pytest.raises(ValueError, match="per-sample"):
        StepPlan(pass2="subset")
    assert PLAIN_STEP == StepPlan()


def test_the_orchestration_reads_the_plan_and_no_policy():
    """effsam/step.py and the framework integrations never touch the policies' declarations
    or the skeleton's private step state: a method changes the plan, not them."""
    root = Path(effsam.__file__).parent
    forbidden = {
        "selection", "single_pass", "ascent_slice", "_txn", "before_pass1",
        "pass2_whole_batch", "pass2_bn_whole_batch", "needs_perturbed_loss", "needs_per_sample",
    }  # fmt: skip
    offending = []
    for path in [root / "step.py", *(root / "integrations").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in forbidden:
                # the integrations' error messages may name the selection and the slice
                if path.name != "step.py" and node.attr in ("selection", "ascent_slice"):
                    continue
                offending.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offending, offending
