"""The contract every registered optimizer keeps, checked over the whole registry.

Entries added to the registry later are covered automatically: a spec's ``example``
arguments are what a minimal instance needs (SSAM-D's ``total_steps``); the tests add only
a short refresh interval so masks change within a few steps. Everything runs in float64
and compares with ``torch.equal`` (bit-identical), unless said otherwise.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.optim.registry import accepted_kwargs, get_spec

NAMES = effsam.available_optimizers()
WRAPPERS = [n for n in NAMES if get_spec(n).factory is not None]
N_STEPS = 5


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(i: int, n: int = 12):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def make(name: str, **kwargs):
    model = net()
    extra = dict(get_spec(name).example)
    if "update_interval" in accepted_kwargs(name):
        extra["update_interval"] = 3  # refreshes at steps 0 and 3
    opt = effsam.create_optimizer(model, name, lr=0.1, momentum=0.9, **{**extra, **kwargs})
    return model, opt


def train(model, opt, steps, loss_fn=ce):
    for i in steps:
        effsam.sharpness_aware_step(model, opt, batch(i), loss_fn)


_REFERENCE: dict[str, tuple] = {}


def reference(name: str):
    """(model state, optimizer state) after N_STEPS uninterrupted steps (cached)."""
    if name not in _REFERENCE:
        model, opt = make(name)
        train(model, opt, range(N_STEPS))
        _REFERENCE[name] = copy.deepcopy((model.state_dict(), opt.state_dict()))
    return _REFERENCE[name]


def tensors_of(obj):
    """Every tensor and scalar of a nested state, flattened in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [x for k in sorted(obj, key=str) for x in [k, *tensors_of(obj[k])]]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in tensors_of(v)]
    return [obj]


def same(a, b) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def snapshot(model, opt):
    """Weights, buffers and the optimizer's whole state (gradients are not state: every
    step starts by clearing them)."""
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})


def test_the_registry_is_covered():
    assert len(WRAPPERS) >= 9 and "sgd" in NAMES


# ---------------------------------------------------------------------- ρ = 0
@pytest.mark.parametrize("name", NAMES)
def test_rho_zero_is_the_base_step(name):
    """ρ = 0 is exactly the base optimizer's step, for every entry. For ESAM's sample
    selection (SDS) this is a decision: with no perturbation every sharpness score is 0,
    so nothing is selected and pass 2 uses the whole batch (docs/algorithms.md)."""
    plain, sgd = make("sgd")
    train(plain, sgd, range(N_STEPS))
    kwargs = {"rho": 0.0} if name != "sgd" else {}
    model, opt = make(name, **kwargs)
    train(model, opt, range(N_STEPS))
    assert same(model.state_dict(), plain.state_dict())


# ---------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bit_identically(name):
    ref_model, ref_opt = reference(name)
    model, opt = make(name)
    train(model, opt, range(2))
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = make(name)
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    train(model, opt, range(2, N_STEPS))
    assert same(model.state_dict(), ref_model)
    assert same(opt.state_dict(), ref_opt)


# ---------------------------------------------------------------------- BatchNorm
#: entries whose statistics are by design not those of the whole batch at θ, each tested
#: against its own rule in tests/optim/test_efficient.py (test_bn_buffers_are_those_of_the_
#: clean_pass): MSAM's only pass runs at θ − ρ v/‖v‖; K-SAM's pass 1 sees the top k samples
# MSAM, K-SAM and the stale ascent run their one pass elsewhere; a reduced-batch ascent's
# statistics are pass 2's (the whole batch): each has its own BN test.
BN_OWN_RULE = {"msam", "ksam", "flat-lora"} | {
    n
    for n in WRAPPERS
    if get_spec(n).defaults.get("ascent_fraction", 1.0) < 1.0 or "stale" in n or "msam" in n
}


@pytest.mark.parametrize("name", [n for n in NAMES if n not in BN_OWN_RULE])
def test_bn_buffers_equal_pass_one_alone(name):
    model, opt = make(name)
    train(model, opt, range(2))
    ref = copy.deepcopy(model)
    ce(ref, batch(2))  # one training-mode forward of the batch: what pass 1 does
    train(model, opt, [2])
    assert same(list(model.buffers()), list(ref.buffers()))


# ---------------------------------------------------------------------- rollback
class Boom(RuntimeError):
    pass


def _count_loss_calls(name, step):
    model, opt = make(name)
    train(model, opt, range(step))
    calls = []

    def counting(m, b):
        calls.append(1)
        return ce(m, b)

    train(model, opt, [step], counting)
    return len(calls)


FAIL_STEP = 3  # a refresh step of every SSAM entry (interval 3)


def _ascends_at(name, step) -> bool:
    """Whether step ``step`` of ``name`` runs the ascent (not a plain scheduled step, not a
    single-pass method)."""
    model, opt = make(name)
    if not isinstance(opt, effsam.SharpnessAware) or opt.single_pass:
        return False
    train(model, opt, range(step + 1))
    return bool(opt.last_step_sharpness_aware)


def _phases(name):
    n = _count_loss_calls(name, FAIL_STEP)
    phases = [f"loss_fn call {i + 1} of {n}" for i in range(n)] + ["base step"]
    if _ascends_at(name, FAIL_STEP):
        phases.append("ascent")
    return phases


CASES = [(name, phase) for name in NAMES for phase in _phases(name)]


@pytest.mark.parametrize("name, phase", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_a_failure_in_any_phase_changes_nothing(name, phase, monkeypatch):
    ref_model, ref_opt = reference(name)
    model, opt = make(name)
    train(model, opt, range(FAIL_STEP))
    before = snapshot(model, opt)
    calls = []

    def failing(m, b):
        calls.append(1)
        if phase == f"loss_fn call {len(calls)} of {phase.split()[-1]}":
            raise Boom(phase)
        return ce(m, b)

    target = opt.base if isinstance(opt, effsam.SharpnessAware) else opt
    if phase == "base step":
        monkeypatch.setattr(target, "step", lambda *a, **k: (_ for _ in ()).throw(Boom(phase)))
    if phase == "ascent":
        monkeypatch.setattr(opt.ascent, "scales_", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        train(model, opt, [FAIL_STEP], failing)
    monkeypatch.undo()
    assert same(snapshot(model, opt), before)
    assert not getattr(opt, "perturbed", False)
    # and the run goes on exactly as if the failed attempt had never happened
    train(model, opt, range(FAIL_STEP, N_STEPS))
    assert same(model.state_dict(), ref_model)
    assert same(opt.state_dict(), ref_opt)


# ---------------------------------------------------------------------- closure API
def _closure_supported(opt) -> bool:
    return not opt.selection.needs_per_sample


@pytest.mark.parametrize("name", WRAPPERS)
def test_the_closure_api_is_the_step_function_or_refuses(name):
    model, opt = make(name)
    ref_model, ref_opt = reference(name)
    b0 = batch(0)

    def closure_for(b):
        def closure():
            opt.zero_grad()
            part = opt.ascent_batch(b)  # a reduced-batch ascent's slice in pass 1, else b
            # BN statistics as sharpness_aware_step keeps them: not from a slice, not from
            # pass 2 at θ + ε unless pass 1 was a slice (then pass 2's are the batch's)
            sliced = part is not b
            protect = sliced or (opt.perturbed and not opt.ascent_slice.slices)
            with effsam.preserve_bn_stats(model, enabled=protect):
                loss = ce(model, part).mean()
                loss.backward()
            return loss

        return closure

    if not _closure_supported(opt):
        before = snapshot(model, opt)
        with pytest.raises(RuntimeError, match="sharpness_aware_step"):
            opt.step(closure_for(b0))
        assert same(snapshot(model, opt), before)
        return
    for i in range(N_STEPS):
        b = batch(i)
        if opt.mask.needs_data and opt.mask_refresh_due():
            if i > 0:  # a data refresh that is due and not done: a clear error, no step
                before = snapshot(model, opt)
                with pytest.raises(RuntimeError, match="refresh_mask"):
                    opt.step(closure_for(b))
                assert same(snapshot(model, opt), before)
            opt.refresh_mask(model, b, ce)
        opt.step(closure_for(b))
    assert same(model.state_dict(), ref_model)
    assert same(opt.state_dict(), ref_opt)


@pytest.mark.parametrize("name", [n for n in WRAPPERS if n not in ("ksam",)])
def test_the_two_phase_api_is_the_step_function(name):
    """first_pass / first_step / second_step by hand, as docs/api.md writes it, gives the
    step function's result (selection methods excepted: they need per-sample losses)."""
    model, opt = make(name)
    if opt.selection.needs_per_sample:
        return
    ref_model, ref_opt = reference(name)
    for i in range(N_STEPS):
        b = batch(i)
        if opt.mask.needs_data and opt.mask_refresh_due():
            opt.refresh_mask(model, b, ce)
        with opt.first_pass():
            part = opt.ascent_batch(b)
            with effsam.preserve_bn_stats(model, enabled=part is not b):
                ce(model, part).mean().backward()
        if opt.first_step(zero_grad=True):
            part = opt.ascent_batch(b)  # outside pass 1: the batch itself
            assert part is b
            with effsam.preserve_bn_stats(model, enabled=not opt.ascent_slice.slices):
                ce(model, b).mean().backward()
        opt.second_step(zero_grad=True)
    assert same(model.state_dict(), ref_model)
    assert same(opt.state_dict(), ref_opt)


# ---------------------------------------------------------------------- another's state
#: pairs of entries whose states are interchangeable: the same policies (ESAM's SDS alone
#: is ESAM with β = 1, a setting; every other pair differs in a policy)
COMPATIBLE = {
    frozenset({"esam", "esam-sds"}),
    # ESAM-mix is ESAM with sds_update="mix", a setting of the same policies
    frozenset({"esam", "esam-mix"}),
    frozenset({"esam-sds", "esam-mix"}),
    # the whole-batch control is ESAM with sds_pass2="batch", a setting of the same policies
    frozenset({"esam", "esam-wholebatch"}),
    frozenset({"esam-sds", "esam-wholebatch"}),
    frozenset({"esam-mix", "esam-wholebatch"}),
    # the BN repair is ESAM with sds_bn="batch", a setting of the same policies
    *(
        frozenset({"esam-bn", other})
        for other in ("esam", "esam-sds", "esam-mix", "esam-wholebatch")
    ),
    # the relative forms are settings (rho_mode, alpha_mode) of the same policies and state
    frozenset({"msam", "msam-rel"}),
    frozenset({"looksam", "looksam-rel"}),
}


@pytest.fixture(scope="module")
def saved_states():
    states = {}
    for name in NAMES:
        model, opt = make(name)
        train(model, opt, range(2))
        states[name] = copy.deepcopy(opt.state_dict())
    return states


@pytest.mark.parametrize("name", WRAPPERS)
def test_loading_another_optimizers_state_raises_and_changes_nothing(name, saved_states):
    for other in NAMES:
        if other == name or frozenset({name, other}) in COMPATIBLE:
            continue
        model, opt = make(name)
        train(model, opt, range(1))
        before = snapshot(model, opt)
        with pytest.raises(ValueError, match="effsam|another optimizer|cannot load"):
            opt.load_state_dict(saved_states[other])
        assert same(snapshot(model, opt), before), other
        # the optimizer is still usable and goes on as if nothing happened
        ref_model, ref_opt = make(name)
        train(ref_model, ref_opt, range(2))
        train(model, opt, [1])
        assert same(model.state_dict(), ref_model.state_dict()), other


def test_compatible_states_load():
    for pair in COMPATIBLE:
        a, b = sorted(pair)
        model, opt = make(a)
        train(model, opt, range(2))
        _, other = make(b)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other.load_state_dict(opt.state_dict())
        assert other.steps == 2
