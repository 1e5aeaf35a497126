"""timm: effsam names in timm's optimizer factory, timm models and schedulers, and
the train_step recipe, against effsam built and driven by hand."""

from __future__ import annotations

import warnings

import pytest
import torch

import effsam

pytest.importorskip("timm")
import timm  # noqa: E402
import timm.optim  # noqa: E402, F811
import timm.scheduler  # noqa: E402

from effsam.integrations import timm as etimm  # noqa: E402

B = 6


def _model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model("test_resnet", num_classes=5, pretrained=False).double()


def _batches(n, soft=False):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (B,), generator=g)
        if soft:  # mixup-like soft targets
            lam = 0.7
            y1 = torch.nn.functional.one_hot(y, 5).double()
            y = lam * y1 + (1 - lam) * y1.flip(0)
        out.append((x, y))
    return out


def _ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_register_adds_names_without_underscores():
    names = etimm.register()
    assert {"samsgd", "asamadamw", "esammomentum", "ssamadam"} <= set(names)
    assert all("_" not in n for n in names)
    listed = timm.optim.list_optimizers()
    assert "samsgd" in listed


@pytest.mark.parametrize(
    "name, base_name, cls, kwargs",
    [
        ("samsgd", "sgd", effsam.SAM, {"rho": 0.1}),
        ("asammomentum", "momentum", effsam.ASAM, {"rho": 0.5}),
        ("esamsgd", "sgd", effsam.ESAM, {"rho": 0.1, "beta": 0.5, "gamma": 1.0, "seed": 1}),
        ("samadamw", "adamw", effsam.SAM, {"rho": 0.1}),
    ],
)
def test_factory_built_optimizer_equals_one_built_by_hand(name, base_name, cls, kwargs):
    etimm.register()
    batches = _batches(3)
    states = []
    for form in ("factory", "hand"):
        model = _model()
        if form == "factory":
            opt = timm.optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=5e-4, **kwargs)
        else:
            base = timm.optim.create_optimizer_v2(model, base_name, lr=0.05, weight_decay=5e-4)
            opt = cls(base, **kwargs)
        assert isinstance(opt, cls)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4]  # timm's groups
        for batch in batches:
            etimm.train_step(model, opt, batch, _ce)
        states.append(_state(model))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_timm_scheduler_drives_the_wrapper_like_a_plain_optimizer():
    etimm.register()
    model = _model()
    opt = timm.optim.create_optimizer_v2(model, "samsgd", lr=0.05, rho=0.1)
    sched = timm.scheduler.CosineLRScheduler(
        opt, t_initial=4, warmup_t=1, warmup_lr_init=1e-3, t_in_epochs=False
    )
    plain = timm.optim.create_optimizer_v2(_model(), "sgd", lr=0.05)
    plain_sched = timm.scheduler.CosineLRScheduler(
        plain, t_initial=4, warmup_t=1, warmup_lr_init=1e-3, t_in_epochs=False
    )
    lrs, plain_lrs = [], []
    for step, batch in enumerate(_batches(4)):
        etimm.train_step(model, opt, batch, _ce)
        sched.step_update(step + 1)
        plain_sched.step_update(step + 1)
        lrs.append([g["lr"] for g in opt.base.param_groups])
        plain_lrs.append([g["lr"] for g in plain.param_groups])
    assert lrs == plain_lrs and len({row[0] for row in lrs}) == 4
    assert opt.steps == 4


def test_train_step_with_soft_targets_equals_sharpness_aware_step():
    etimm.register()
    batches = _batches(3, soft=True)
    states = []
    for drive in ("recipe", "hand"):
        model = _model()
        opt = timm.optim.create_optimizer_v2(model, "samsgd", lr=0.05, rho=0.1)
        for batch in batches:
            if drive == "recipe":
                etimm.train_step(model, opt, batch, clip_grad=1.0, accumulation_steps=2)
            else:
                effsam.sharpness_aware_step(
                    model,
                    opt,
                    batch,
                    lambda m, b: -(b[1] * torch.log_softmax(m(b[0]), -1)).sum(-1),
                    clip_grad_norm=1.0,
                    accumulation_steps=2,
                )
        states.append(_state(model))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_timms_backward_then_step_loop_raises():
    """timm's own train_one_epoch block (loss.backward(); optimizer.step())."""
    etimm.register()
    model = _model()
    opt = timm.optim.create_optimizer_v2(model, "samsgd", lr=0.05)
    _ce(model, _batches(1)[0]).mean().backward()
    before = _state(model)
    with pytest.raises(RuntimeError, match="no step is pending.*effsam.integrations.timm.train_st"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_timms_native_scaler_names_train_step():
    from timm.utils import NativeScaler

    etimm.register()
    model = _model()
    opt = timm.optim.create_optimizer_v2(model, "samsgd", lr=0.05)
    loss = _ce(model, _batches(1)[0]).mean()
    with pytest.raises(RuntimeError, match="NativeScaler.*effsam.integrations.timm.train_st"):
        NativeScaler(device="cpu")(loss, opt)


def test_lookahead_around_sam_names_the_nesting():
    """timm's 'lookahead_samsgd' builds Lookahead(SAM(...)): the step error says that
    effsam's optimizer must be the outer wrapper."""
    etimm.register()
    model = _model()
    opt = timm.optim.create_optimizer_v2(model, "lookahead_samsgd", lr=0.05)
    before = _state(model)
    with pytest.raises(RuntimeError, match="must be the OUTER wrapper.*not Lookahead\\(SAM"):
        etimm.train_step(model, opt, _batches(1)[0], _ce)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
