"""The step transaction (effsam/optim/_transaction.py) on its own: everything a step
changes is undone by one rollback, at whatever point the step fails, with every stateful
policy in play at once (an SWP mask's draw, a random schedule, a reduced-batch ascent's
generator, a method's own undo, BatchNorm buffers); and a rolled-back step, taken again,
is the step an uninterrupted run takes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.optim._transaction import Snapshot, StepTransaction
from effsam.optim.masks import RandomTensorSubset
from effsam.optim.schedule import Randomized
from helpers import assert_same


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3)
    ).double()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def _opt(model: nn.Module) -> effsam.SharpnessAware:
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return effsam.SharpnessAware(
        base,
        rho=0.3,
        mask=RandomTensorSubset(beta=0.5, seed=7),
        schedule=Randomized(probability=0.6, seed=7),
        ascent_fraction=0.5,
        ascent_seed=7,
    )


def _everything(model: nn.Module, opt: effsam.SharpnessAware) -> dict:
    """Weights, BN buffers, the optimizer's whole state (policies' generators included)."""
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "slice": opt.ascent_slice.generator.get_state(),
        }
    )


def _same(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["slice"], b["slice"])
    # counters, schedule, mask (its generator's state), slice, update: every value
    assert_same(a["opt"]["effsam"], b["opt"]["effsam"], "effsam")
    for pa, pb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in pa:
            if k != "theta":  # the backup buffer's content is scratch between steps
                assert torch.equal(pa[k], pb[k]), k


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _step_until(model, opt, batch, stop: str) -> None:
    """A two-phase step by hand, interrupted at ``stop``."""
    opt.zero_grad()
    opt.begin_step()
    opt.watch_bn(model)
    with opt.first_pass():
        x, y = opt.ascent_batch(batch)
        F.cross_entropy(model(x), y).backward()
    if stop == "after pass 1":
        return
    if opt.first_step(zero_grad=True):
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    if stop == "after pass 2":
        return
    raise AssertionError(stop)


@pytest.mark.parametrize("stop", ["after pass 1", "after pass 2"])
def test_a_rollback_at_any_point_leaves_everything_as_before_and_the_rerun_is_uninterrupted(stop):
    model, ref = _net(), _net()
    opt, ref_opt = _opt(model), _opt(ref)
    for i in range(3):  # some history: momentum, the generators moved, BN statistics
        effsam.sharpness_aware_step(model, opt, _batch(i), _ce)
        effsam.sharpness_aware_step(ref, ref_opt, _batch(i), _ce)
    before = _everything(model, opt)
    _step_until(model, opt, _batch(3), stop)
    assert opt._txn is not None and opt._txn.begun
    moved = _everything(model, opt)
    assert not torch.equal(moved["slice"], before["slice"]) or opt._txn.decision is not True
    opt.abort_step()
    assert opt._txn is None
    assert all(p.grad is None for p in model.parameters())
    _same(before, _everything(model, opt))
    # taken again, the step is the one an uninterrupted run takes, and so are the next
    for i in range(3, 7):
        effsam.sharpness_aware_step(model, opt, _batch(i), _ce)
        effsam.sharpness_aware_step(ref, ref_opt, _batch(i), _ce)
    for p, q in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(p, q)
    assert opt.sharpness_aware_steps == ref_opt.sharpness_aware_steps > 0
    assert opt.steps - opt.sharpness_aware_steps > 0  # the schedule took plain steps too


def test_method_undos_run_latest_first_and_the_policies_come_back_after_them():
    model = _net()
    opt = _opt(model)
    effsam.sharpness_aware_step(model, opt, _batch(0), _ce)
    schedule_before = copy.deepcopy(opt.schedule.state_dict())
    txn = StepTransaction()
    txn.begin(opt)  # asks the schedule: its generator moves
    opt.schedule.commit()
    assert not torch.equal(opt.schedule.state_dict()["generator"], schedule_before["generator"])
    order: list[str] = []
    txn.on_rollback(lambda: order.append("first"))
    txn.on_rollback(lambda: order.append("second"))
    txn.record_selection(3, 8)
    txn.record_selection(1, 8)
    assert txn.selected_fraction == 4 / 16
    txn.rollback(opt)
    assert order == ["second", "first"]
    assert_same(opt.schedule.state_dict(), schedule_before, "schedule")
    assert StepTransaction().selected_fraction is None


def _looksam(model: nn.Module) -> effsam.SharpnessAware:
    return effsam.create_optimizer(model.parameters(), "looksam", lr=0.1, momentum=0.9, k=3)


@pytest.mark.parametrize("make", [_opt, _looksam], ids=["swp-random-slice", "looksam"])
def test_a_whole_snapshot_puts_back_what_a_load_replaces(make):
    """What ``load_state_dict`` replaces (the base's state and groups, the counters, the
    mask, the update's state — LookSAM's g_v — and the policies' states) comes back from a
    whole snapshot, after a load of another run's state went through."""
    model, other = _net(), _net()
    opt, other_opt = make(model), make(other)
    effsam.sharpness_aware_step(model, opt, _batch(0), _ce)
    for i in range(1, 5):
        effsam.sharpness_aware_step(other, other_opt, _batch(i), _ce)
    before = _everything(model, opt)
    snap = Snapshot(opt, whole=True)
    opt.load_state_dict(other_opt.state_dict())
    assert opt.steps == 4  # the load went in
    snap.rollback(opt)
    _same(before, _everything(model, opt))
