"""The schedule's interface (effsam.optim.policy.Schedule): a schedule of one's own that does
not derive from EveryStep, asked decide(None) before pass 1 or decide(‖g‖²) after it."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import effsam
from effsam.optim.policy import Schedule
from effsam.optim.schedule import SCHEDULES, AdaptiveSchedule, EveryStep, Interval
from helpers import per_sample_ce, tiny_bn_net, tiny_data


class OddStepsPlain:
    """Sharpness-aware on even steps; records what it was asked and counts its decisions
    in its state (as a generator's draws would be). No Policy base, no extra_repr."""

    name = "odd-steps-plain"
    needs_grad_norm = False

    def __init__(self) -> None:
        self.t = 0
        self.decisions = 0
        self.asked: list[Any] = []

    def decide(self, grad_sq_norm: float | None) -> bool:
        self.asked.append(grad_sq_norm)
        self.decisions += 1
        return self.t % 2 == 0

    def commit(self) -> None:
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "decisions": self.decisions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.decisions = int(state["decisions"])


class AboveNorm(OddStepsPlain):
    """Sharpness-aware when pass 1's ‖g‖² is above a bound."""

    name = "above-norm"
    needs_grad_norm = True

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.bound = bound

    def decide(self, grad_sq_norm: float | None) -> bool:
        self.asked.append(grad_sq_norm)
        assert grad_sq_norm is not None
        return grad_sq_norm > self.bound


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_every_built_in_schedule_implements_the_protocol() -> None:
    for cls in SCHEDULES.values():
        assert issubclass(cls, EveryStep)
    assert isinstance(EveryStep(), Schedule) and isinstance(Interval(3), Schedule)
    assert isinstance(AdaptiveSchedule(total_steps=10), Schedule)
    assert isinstance(OddStepsPlain(), Schedule)


def test_a_schedule_of_ones_own_decides_before_pass_one() -> None:
    model = tiny_bn_net()
    schedule = OddStepsPlain()
    opt = effsam.SAM(_sgd(model), rho=0.05, schedule=schedule)
    assert "odd-steps-plain" not in repr(opt)  # no extra_repr: nothing to add, no error
    results = [
        effsam.sharpness_aware_step(model, opt, tiny_data(seed=i), per_sample_ce) for i in range(4)
    ]
    assert [r.sharpness_aware for r in results] == [True, False, True, False]
    assert schedule.asked == [None] * 4 and schedule.t == 4
    assert opt.sharpness_aware_steps == 2
    assert opt.state_dict()["effsam"]["schedule"] == {"t": 4, "decisions": 4}


def test_a_schedule_of_ones_own_decides_from_pass_ones_norm() -> None:
    model = tiny_bn_net()
    batch = tiny_data(seed=3)
    opt = effsam.SAM(_sgd(model), rho=0.05, schedule=AboveNorm(bound=math.inf))
    with opt.first_pass():
        per_sample_ce(model, batch).mean().backward()
    norm = opt.grad_sq_norm()
    assert opt.first_step(zero_grad=False) is False  # ‖g‖² ≤ ∞: a plain step
    opt.second_step(zero_grad=True)
    assert opt.schedule.asked == [pytest.approx(norm, rel=1e-12)] and opt.schedule.t == 1
    # through sharpness_aware_step: the norm, a float, after pass 1
    opt.schedule.bound = 0.0
    result = effsam.sharpness_aware_step(model, opt, batch, per_sample_ce)
    assert result.sharpness_aware and isinstance(opt.schedule.asked[-1], float)


def test_a_failed_step_rolls_a_schedule_of_ones_own_back() -> None:
    model = tiny_bn_net()
    opt = effsam.SAM(_sgd(model), rho=0.05, schedule=OddStepsPlain())
    effsam.sharpness_aware_step(model, opt, tiny_data(seed=0), per_sample_ce)

    def failing(model, batch):
        per_sample_ce(model, batch).mean().backward()
        raise KeyError("in the loss")

    with pytest.raises(KeyError):
        effsam.sharpness_aware_step(model, opt, tiny_data(seed=1), failing)
    assert len(opt.schedule.asked) == 2  # it was asked ...
    assert opt.schedule.state_dict() == {"t": 1, "decisions": 1}  # ... and put back


def test_an_object_without_the_schedules_calls_is_refused() -> None:
    class NoCommit:
        name = "no-commit"
        needs_grad_norm = False

        def decide(self, grad_sq_norm: float | None) -> bool:
            return True

    model = tiny_bn_net()
    with pytest.raises(TypeError, match=r"effsam\.optim\.policy\.Schedule"):
        effsam.SAM(_sgd(model), schedule=NoCommit())  # type: ignore[arg-type]


def test_adaptive_schedule_needs_the_norm() -> None:
    sched = AdaptiveSchedule(total_steps=4)
    with pytest.raises(RuntimeError, match="after pass 1"):
        sched.decide(None)
    assert sched.decide(2.0) is True  # μ, σ² start at 0: the first step is sharpness-aware
    assert EveryStep().decide(None) is True and EveryStep().decide(5.0) is True
