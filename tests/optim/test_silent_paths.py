"""Paths that used to be silently wrong or unclear: a skipped step's BatchNorm statistics
(every step API, schedules, accumulation), a rollback after a manual SSAM-F refresh, bad
hyper-parameters and mismatched model/optimizer, damaged state dicts, scalar losses,
``first_step`` without gradients, and where the non-finite warnings point. In float64."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.optim.registry import REGISTRY

LR, MOM, RHO = 0.1, 0.9, 0.05


def conv_bn(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def scaled(b, factor):
    return (b[0] * factor, b[1])


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def build(name: str, model: nn.Module, **kwargs):
    return effsam.create_optimizer(model, name, lr=LR, momentum=MOM, **kwargs)


# the optimizers and the kwargs: plain steps of a schedule, single-pass steps and the
# two-pass step, with SWP and SDS
METHODS = {
    "sam": {},
    "esam": {"beta": 0.5, "gamma": 0.5, "seed": 3},
    "sam-interval": {"every": 2},  # t = 0 plain, t = 1 sharpness-aware
    "rst": {"total_steps": 10},
    "looksam": {"k": 2},  # t = 0 SAM, t = 1 the reused direction (one pass)
    "msam": {},  # one pass at the moved point
}


# ---------------------------------------------------------------------- N4: BN on a skip
def _step_api(api: str, model, opt, b, loss_fn=ce, accumulation_steps: int = 1):
    """One step of ``opt`` on ``b`` through ``api``; returns whether it was skipped."""
    if api == "sas":
        r = effsam.sharpness_aware_step(
            model, opt, b, loss_fn, accumulation_steps=accumulation_steps
        )
        return r.skipped
    if api == "closure":

        def closure():
            opt.zero_grad()
            with effsam.preserve_bn_stats(model, enabled=opt.perturbed):
                loss = loss_fn(model, b).mean()
                loss.backward()
            return loss

        opt.step(closure)
        return opt.last_step_skipped
    assert api == "two-phase"
    opt.zero_grad()
    with opt.first_pass(model):
        loss_fn(model, b).mean().backward()
    if opt.first_step(zero_grad=True):
        with effsam.preserve_bn_stats(model):
            loss_fn(model, b).mean().backward()
    return not opt.second_step(zero_grad=True)


def _skip_then_continue(name, kwargs, api, bad_at, bad, momentum=0.1):
    """Train ``bad_at`` good steps, one bad step, one good step; the same run with the
    BN buffers put back by hand after the bad step is the reference."""
    if api == "closure" and name in ("esam",):
        kwargs = {**kwargs, "gamma": 1.0}  # sample selection needs sharpness_aware_step
    model = conv_bn(momentum)
    opt = build(name, model, **kwargs)
    for i in range(bad_at):
        assert not _step_api(api, model, opt, batch(10 + i))
    ref_model, ref_opt = copy.deepcopy((model, opt))
    before = buffers(model)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _step_api(api, model, opt, bad)  # skipped
        assert _step_api(api, ref_model, ref_opt, bad)
    assert any("non-finite" in str(w.message) for w in caught)
    after = buffers(model)
    assert same(after, before), {k: (before[k], after[k]) for k in before}
    assert same({k: v.detach() for k, v in model.named_parameters()}, weights)
    ref_model.load_state_dict({**state(ref_model), **before})  # put back by hand
    assert not _step_api(api, model, opt, batch(99))
    assert not _step_api(api, ref_model, ref_opt, batch(99))
    assert same(state(model), state(ref_model))
    assert opt.skipped_steps == 1
    return model, opt


@pytest.mark.parametrize("bad_at", [0, 1])
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("api", ["sas", "closure", "two-phase"])
def test_a_skipped_step_leaves_every_bn_buffer_as_before(api, name, bad_at):
    if api != "sas" and name == "msam":
        pytest.skip("MSAM through a closure is tested by its own tests")
    nan_batch = scaled(batch(5), float("nan"))  # NaN statistics and gradients
    _skip_then_continue(name, METHODS[name], api, bad_at, nan_batch)


@pytest.mark.parametrize("where", ["pass1", "pass2"])
@pytest.mark.parametrize("bad_at", [0, 1])
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("api", ["sas", "two-phase"])
def test_a_step_skipped_for_its_gradients_alone_leaves_bn_as_before(api, name, bad_at, where):
    """Finite statistics (pass 1 moved them), a NaN loss in one pass: the step is skipped
    by its gradients, and pass 1's statistics are taken back all the same."""
    if api != "sas" and name == "msam":
        pytest.skip("MSAM through a closure is tested by its own tests")
    holder: list = []

    def nan_loss(m, b):
        losses = ce(m, b)
        perturbed = holder[0].perturbed if holder else False
        return losses * float("nan") if (where == "pass2") == perturbed else losses

    model = conv_bn()
    opt = build(name, model, **METHODS[name])
    holder.append(opt)
    for i in range(bad_at):
        _step_api(api, model, opt, batch(10 + i))
    before, weights = buffers(model), state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        skipped = _step_api(api, model, opt, batch(5), nan_loss)
    if where == "pass2" and not skipped:
        assert opt.last_step_sharpness_aware is not True or name == "msam"
        return  # a one-pass step has no pass 2 to poison
    assert skipped
    assert same(buffers(model), before)
    assert same(state(model), weights)


@pytest.mark.parametrize("name", ["sam", "esam", "sam-interval", "msam"])
def test_a_finite_but_huge_batch_whose_running_var_overflows_is_skipped(name):
    # x · 1e200 in float64: the batch variance is ~1e400 = inf in running_var (the
    # gradients may well be finite): the step is skipped, the statistics put back
    huge = scaled(batch(5), 1e200)
    _skip_then_continue(name, METHODS[name], "sas", 1, huge)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_a_skipped_sam_step_equals_never_seeing_the_batch(momentum):
    """SAM (every step sharpness-aware): after a NaN batch the run is exactly the run that
    never saw it — weights, momentum, BN running_mean/var and num_batches_tracked."""
    model, ref = conv_bn(momentum), conv_bn(momentum)
    opt, ref_opt = build("sam", model, rho=RHO), build("sam", ref, rho=RHO)
    for i in range(2):
        effsam.sharpness_aware_step(model, opt, batch(10 + i), ce)
        effsam.sharpness_aware_step(ref, ref_opt, batch(10 + i), ce)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        r = effsam.sharpness_aware_step(model, opt, scaled(batch(5), float("nan")), ce)
    assert r.skipped
    assert same(buffers(model), buffers(ref))
    for i in range(2):
        effsam.sharpness_aware_step(model, opt, batch(20 + i), ce)
        effsam.sharpness_aware_step(ref, ref_opt, batch(20 + i), ce)
    assert same(state(model), state(ref))
    for a, b in zip(opt.base.state.values(), ref_opt.base.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # the statistics are the reference's own, finite: evaluation works
    model.eval()
    assert bool(torch.isfinite(model(batch(1)[0])).all())


@pytest.mark.parametrize("name", ["sam", "esam"])
def test_accumulation_with_a_bad_second_micro_batch_leaves_bn_as_before(name):
    """Two micro-batches: the first (finite) updates BN, the second is NaN. The step is
    skipped and BN is as it was before the step, not after the first micro-batch."""
    model = conv_bn()
    opt = build(name, model, **METHODS[name])
    effsam.sharpness_aware_step(model, opt, batch(1), ce, accumulation_steps=2)
    before = buffers(model)
    x, y = batch(2)
    x = x.clone()
    x[4:] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        r = effsam.sharpness_aware_step(model, opt, (x, y), ce, accumulation_steps=2)
    assert r.skipped
    assert same(buffers(model), before)


def test_a_plain_optimizer_step_skipped_by_its_scaler_leaves_bn_as_before():
    model = conv_bn().float()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = buffers(model)
    x, y = batch(3)
    r = effsam.sharpness_aware_step(model, opt, (x.float() * math.nan, y), ce, scaler=scaler)
    assert r.skipped
    assert same(buffers(model), before)


# ---------------------------------------------------------------------- N5
def _ssam_f(model):
    return effsam.create_optimizer(
        model, "ssam-f", lr=LR, num_samples=4, update_interval=100, sparsity=0.5
    )


def test_a_failed_step_keeps_a_manual_ssam_f_refresh_made_before_it():
    model = conv_bn()
    opt = _ssam_f(model)
    opt.refresh_mask(model, batch(1), ce)
    masks = [m.clone() for m in opt.mask.masks]
    weights = state(model)

    def boom_in_pass2(m, b):
        if opt.perturbed:
            raise RuntimeError("boom in pass 2")
        return ce(m, b)

    with pytest.raises(RuntimeError, match="boom in pass 2"):
        effsam.sharpness_aware_step(model, opt, batch(2), boom_in_pass2)
    assert same(state(model), weights)
    assert opt.mask.masks is not None and all(
        torch.equal(a, b) for a, b in zip(opt.mask.masks, masks)
    )
    assert opt.mask.refreshes == 1 and not opt.mask_refresh_due()
    # the closure path, which needs the refreshed mask, still works
    x, y = batch(3)

    def closure():
        opt.zero_grad()
        with effsam.preserve_bn_stats(model, enabled=opt.perturbed):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        return loss

    opt.step(closure)
    assert opt.steps == 1


def test_a_failed_step_undoes_the_refresh_it_made_itself():
    model = conv_bn()
    opt = _ssam_f(model)

    def boom_in_pass2(m, b):
        if opt.perturbed:
            raise RuntimeError("boom in pass 2")
        return ce(m, b)

    with pytest.raises(RuntimeError, match="boom in pass 2"):
        effsam.sharpness_aware_step(model, opt, batch(2), boom_in_pass2)
    assert opt.mask.masks is None and opt.mask.refreshes == 0 and opt.mask_refresh_due()


# ---------------------------------------------------------------------- N11
def test_a_non_string_optimizer_name_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="must be a string, got int 123"):
        effsam.create_optimizer(conv_bn(), 123)


WRAPPERS = [n for n, s in REGISTRY.items() if s.factory is not None]


def _registry_kwargs(name: str) -> dict:
    spec = REGISTRY[name]
    return dict(spec.example)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_non_finite_base_hyper_parameters_are_refused_for_every_entry(name, key, value):
    model = conv_bn()
    with pytest.raises(ValueError, match=rf"Invalid {key}: -?(nan|inf)"):
        effsam.create_optimizer(model, name, **{"lr": LR, key: value}, **_registry_kwargs(name))


def _float_args(name: str) -> list[str]:
    """The float arguments an entry takes (its declared args with a float default)."""
    import inspect

    from effsam.optim.registry import schedule_args, schedule_class

    spec = REGISTRY[name]
    sig = inspect.signature(spec.factory)
    out = {
        k
        for k, p in sig.parameters.items()
        if isinstance(p.default, float) and k in spec.args and k not in spec.fixed
    }
    out |= {k for k, v in spec.defaults.items() if isinstance(v, float)}
    sched = schedule_class(name, {})
    if sched is not None:
        ssig = inspect.signature(sched.__init__)
        out |= {k for k in schedule_args(sched) if isinstance(ssig.parameters[k].default, float)}
    return sorted(out)


@pytest.mark.parametrize("name", WRAPPERS)
def test_non_finite_wrapper_arguments_are_refused_for_every_entry(name):
    args = _float_args(name)
    assert args or name in ("flat-lora",)
    for key in args:
        with pytest.raises(ValueError, match=rf"{key}.*nan"):
            effsam.create_optimizer(
                conv_bn(), name, lr=LR, **{**_registry_kwargs(name), key: float("nan")}
            )


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (effsam.SAM, {"rho": float("nan")}),
        (effsam.SAM, {"eta": float("nan")}),  # unused without adaptive: refused all the same
        (effsam.ASAM, {"eta": float("inf")}),
        (effsam.ESAM, {"beta": float("nan")}),
        (effsam.ESAM, {"gamma": float("nan")}),
        (effsam.ESAM, {"eta": float("nan")}),
        (effsam.SSAM, {"sparsity": float("nan")}),
        (effsam.SSAM, {"drop_rate": float("nan")}),  # SSAM-D's, unused by SSAM-F
        (effsam.LookSAM, {"alpha": float("nan")}),
        (effsam.MSAM, {"rho": float("inf")}),
        (effsam.KSAM, {"gamma": float("nan")}),
        (effsam.SAM, {"ascent_noise": float("nan")}),
        (effsam.SAM, {"eps_denominator": float("inf")}),
    ],
)
def test_direct_constructors_refuse_non_finite_arguments(cls, kwargs):
    model = conv_bn()
    with pytest.raises(ValueError, match=r"nan|inf"):
        cls(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM), **kwargs)


@pytest.mark.parametrize(
    "base_kwargs",
    [
        {"lr": float("nan")},
        {"lr": 0.1, "momentum": float("inf")},
        {"lr": 0.1, "dampening": math.nan},
    ],
)
@pytest.mark.parametrize("cls", [effsam.SAM, effsam.ESAM, effsam.SSAM, effsam.LookSAM])
def test_direct_constructors_refuse_a_base_with_non_finite_hyper_parameters(cls, base_kwargs):
    model = conv_bn()
    key = [k for k, v in base_kwargs.items() if not math.isfinite(v)][0]
    message = rf"Invalid {key}: (nan|inf) in the SGD optimizer's defaults"
    with pytest.raises(ValueError, match=message):
        cls(torch.optim.SGD(model.parameters(), **base_kwargs))
    with pytest.raises(ValueError, match=message):
        cls(model.parameters(), base=torch.optim.SGD, **base_kwargs)
    # a param group added later is checked too
    opt = effsam.SAM(torch.optim.SGD(model[0].parameters(), lr=LR))
    with pytest.raises(ValueError, match=rf"Invalid {key}: (nan|inf) in the param group being"):
        opt.add_param_group({"params": list(model[1].parameters()), **base_kwargs})


def test_a_model_without_trainable_parameters_is_a_clear_error():
    model = conv_bn()
    model.requires_grad_(False)
    for name in ("sgd", "sam", "esam"):
        with pytest.raises(ValueError, match="nothing to train"):
            effsam.create_optimizer(model, name, lr=LR)
    with pytest.raises(ValueError, match="nothing to train"):
        effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR))


@pytest.mark.parametrize("name", ["sgd", "sam", "esam", "sam-interval"])
def test_a_step_with_another_models_optimizer_is_refused_and_changes_nothing(name):
    model_a, model_b = conv_bn(), conv_bn()
    opt_b = build(name, model_b, **METHODS.get(name, {}))
    a, b = state(model_a), state(model_b)
    with pytest.raises(ValueError, match="holds none of the optimizer's"):
        effsam.sharpness_aware_step(model_a, opt_b, batch(1), ce)
    assert same(state(model_a), a) and same(state(model_b), b)
    if isinstance(opt_b, effsam.SharpnessAware):
        assert opt_b.steps == 0 and opt_b.skipped_steps == 0 and opt_b.schedule.t == 0


@pytest.mark.parametrize("name", ["sgd", "sam", "esam", "sam-interval"])
def test_a_step_whose_loss_gives_the_optimizer_no_gradient_is_refused(name):
    # the optimizer holds only the last layer, the loss uses only the first ones
    model = conv_bn()
    opt = build(name, model[4], **METHODS.get(name, {}))
    before = state(model)

    def loss_fn(m, b):
        return m[:3](b[0]).flatten(1).sum(1)

    with pytest.raises(RuntimeError, match="no parameter of the optimizer received a gradient"):
        effsam.sharpness_aware_step(model, opt, batch(1), loss_fn)
    assert same(state(model), before)  # BN buffers included
    if isinstance(opt, effsam.SharpnessAware):
        assert opt.steps == 0 and opt.schedule.t == 0 and not opt.perturbed


# ---------------------------------------------------------------------- N12
@pytest.mark.parametrize(
    "key, value",
    [
        ("steps", "abc"),
        ("skipped_steps", -1),
        ("sharpness_aware_steps", 1.5),
        ("mask", {"garbage": 1}),
        ("mask", 5),
        ("schedule", {"t": "x"}),
    ],
)
@pytest.mark.parametrize("name", ["esam", "sam-interval"])
def test_a_damaged_effsam_entry_is_a_value_error_naming_the_key(name, key, value):
    if name == "sam-interval" and key == "mask" and isinstance(value, dict):
        pytest.skip("the dense mask has no state: any dict is an empty one to it")
    model = conv_bn()
    opt = build(name, model, **METHODS[name])
    effsam.sharpness_aware_step(model, opt, batch(1), ce)
    saved = copy.deepcopy(opt.state_dict())  # (the live state holds the live buffers)
    damaged = copy.deepcopy(saved)
    for where in (damaged, damaged["param_groups"][0]):
        where["effsam"] = {**where["effsam"], key: value}
    with pytest.raises(ValueError, match=rf"\['effsam'\]\['{key}'\] is damaged"):
        opt.load_state_dict(damaged)
    after = opt.state_dict()
    assert after["effsam"]["steps"] == saved["effsam"]["steps"] == 1
    assert after["effsam"]["schedule"] == saved["effsam"]["schedule"]
    gen = after["effsam"]["mask"].get("generator")
    if gen is not None:
        assert torch.equal(gen, saved["effsam"]["mask"]["generator"])
    # and it goes on exactly as a copy that never saw the damaged state
    ref_model = conv_bn()
    ref_model.load_state_dict(model.state_dict())
    ref_opt = build(name, ref_model, **METHODS[name])
    ref_opt.load_state_dict(saved)
    effsam.sharpness_aware_step(model, opt, batch(2), ce)
    effsam.sharpness_aware_step(ref_model, ref_opt, batch(2), ce)
    assert same(state(model), state(ref_model))


# ---------------------------------------------------------------------- R1
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sam", {}),
        ("asam", {}),
        ("esam-swp", {"beta": 0.5}),
        ("ssam-d", {"total_steps": 10}),
        ("sam-interval", {"every": 2}),
        ("looksam", {"k": 2}),
        ("msam", {}),
        ("sam-slice", {}),
    ],
)
def test_a_scalar_loss_is_accepted_where_no_per_sample_loss_is_needed(name, kwargs):
    """The batch mean as a scalar gives exactly the per-sample step (float64, 3 steps)."""
    model, ref = conv_bn(), conv_bn()
    opt, ref_opt = build(name, model, **kwargs), build(name, ref, **kwargs)
    for i in range(3):
        r = effsam.sharpness_aware_step(model, opt, batch(i), lambda m, b: ce(m, b).mean())
        effsam.sharpness_aware_step(ref, ref_opt, batch(i), ce)
        assert not r.skipped
    assert same(state(model), state(ref))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("esam", {}),
        ("esam-sds", {}),
        ("esam-loss", {}),
        ("esam-mix", {}),
        ("esam-random", {}),
        ("ksam", {}),
    ],
)
def test_a_scalar_loss_is_refused_where_per_sample_losses_are_needed(name, kwargs):
    model = conv_bn()
    opt = build(name, model, **kwargs)
    before = state(model)
    with pytest.raises(ValueError, match=r"scalar, but sample selection needs per-sample"):
        effsam.sharpness_aware_step(model, opt, batch(1), lambda m, b: ce(m, b).mean())
    assert same(state(model), before)
    assert opt.steps == 0 and opt.skipped_steps == 0 and not opt.perturbed


# ---------------------------------------------------------------------- R2
@pytest.mark.parametrize("name", ["sam", "esam", "sam-interval", "msam"])
def test_first_step_without_gradients_raises_and_changes_nothing(name):
    model = conv_bn()
    opt = build(name, model, **METHODS[name])
    effsam.sharpness_aware_step(model, opt, batch(1), ce)
    opt.zero_grad(set_to_none=True)
    before = state(model)
    sched = copy.deepcopy(opt.schedule.state_dict())
    with opt.first_pass():
        pass  # no backward
    with pytest.raises(RuntimeError, match="no parameter of the optimizer has a gradient"):
        opt.first_step()
    assert same(state(model), before)
    assert opt.steps == 1 and opt.skipped_steps == 0 and not opt.perturbed
    assert opt.schedule.state_dict()["t"] == sched["t"]
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()  # nothing pending: no step can be counted
    assert opt.steps == 1
    assert not effsam.sharpness_aware_step(model, opt, batch(2), ce).skipped


# ---------------------------------------------------------------------- warnings
@pytest.mark.parametrize("api", ["sas", "closure", "two-phase"])
@pytest.mark.parametrize("where", ["pass1", "pass2"])
def test_the_non_finite_warning_points_at_the_callers_line(api, where):
    model = conv_bn()
    opt = build("sam", model)

    def loss_fn(m, b):
        losses = ce(m, b)
        if (where == "pass2") == opt.perturbed:
            losses = losses * float("nan")
        return losses

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _step_api(api, model, opt, batch(1), loss_fn)
    ours = [w for w in caught if "non-finite" in str(w.message)]
    assert ours, [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


@pytest.mark.parametrize(
    "name, where",
    [("esam", "pass2"), ("esam-wholebatch", "pass2"), ("esam-bn", "pass2"), ("ksam", "pass1")],
)
def test_non_finite_losses_in_a_ranking_forward_skip_the_step(name, where):
    """SDS ranks by the losses at θ + ε, K-SAM by those at θ: NaN ones used to select no
    sample, and the step went on with a zero gradient. Now it is skipped, nothing moved."""
    model = conv_bn()
    opt = build(name, model)
    effsam.sharpness_aware_step(model, opt, batch(1), ce)
    before = state(model)
    momenta = [v["momentum_buffer"].clone() for v in opt.base.state.values()]

    def nan_loss(m, b):
        losses = ce(m, b)
        return losses * float("nan") if (where == "pass2") == opt.perturbed else losses

    with pytest.warns(RuntimeWarning, match="non-finite"):
        r = effsam.sharpness_aware_step(model, opt, batch(5), nan_loss)
    assert r.skipped and opt.skipped_steps == 1 and opt.steps == 1
    assert same(state(model), before)
    assert all(
        torch.equal(a["momentum_buffer"], b) for a, b in zip(opt.base.state.values(), momenta)
    )


# ---------------------------------------------------------------------- memory: keep grads
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(
    "make",
    [
        lambda b, m: effsam.SAM(b, rho=RHO),
        lambda b, m: effsam.ASAM(b, eta=0.01),
        lambda b, m: effsam.ASAM(b, eta=0.01, adaptive_only=effsam.asam_reference_params(m)),
        lambda b, m: effsam.SSAM(b, sparsity=0.5, num_samples=4, normalisation="masked"),
        lambda b, m: effsam.SSAM(b, sparsity=0.5, num_samples=4),
    ],
    ids=["sam", "asam", "asam-reference", "ssam-masked", "ssam-authors"],
)
def test_first_step_keeping_the_gradients_is_the_same_ascent_bit_for_bit(make, foreach):
    """zero_grad=False forms ε in the parameters (no copy of the gradients): θ + ε is the
    one zero_grad=True forms in the gradients, bit for bit, and the gradients stay."""
    results = []
    for zero_grad in (True, False):
        model = conv_bn().to(memory_format=torch.channels_last)  # a non-contiguous weight
        opt = make(torch.optim.SGD(model.parameters(), lr=LR), model)
        opt.foreach = foreach
        if opt.mask_refresh_due():
            opt.refresh_mask(model, batch(1), ce)
        with opt.first_pass():
            ce(model, batch(2)).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        assert opt.first_step(zero_grad=zero_grad)
        results.append([p.detach().clone() for p in model.parameters()])
        if not zero_grad:
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert any(not torch.equal(a, b) for a, b in zip(results[0], conv_bn().parameters()))
