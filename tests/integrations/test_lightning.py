"""effsam inside the real Lightning Trainer, against effsam driven by hand with
sharpness_aware_step on the same model, weights and batches."""

from __future__ import annotations

import warnings

import pytest
import torch

import effsam
from helpers import clone_state, per_sample_ce, tiny_bn_net, tiny_data

L = pytest.importorskip("lightning.pytorch")
lit = pytest.importorskip("effsam.integrations.lightning")

STEPS, RHO, LR = 3, 0.2, 0.1


def _batches(n=STEPS, dtype=torch.float64):
    out = []
    for i in range(n):
        x, y = tiny_data(seed=70 + i, n=8)
        out.append((x.to(dtype), y))
    return out


def _opt(kind, model):
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if kind == "sam":
        return effsam.SAM(base, rho=RHO)
    if kind == "asam":
        return effsam.ASAM(base, rho=1.0)
    if kind == "esam_swp":
        return effsam.ESAM(base, rho=RHO, beta=0.5, gamma=1.0, seed=3)
    if kind == "esam_sds":
        return effsam.ESAM(base, rho=RHO, beta=0.5, gamma=0.5, seed=3)
    if kind == "ssam_d":
        return effsam.SSAM(
            base, rho=RHO, sparsity=0.5, mask="dynamic", total_steps=4, update_interval=2
        )
    if kind == "ssam_f":
        return effsam.SSAM(base, rho=RHO, sparsity=0.5, mask="fisher", update_interval=2)
    raise ValueError(kind)


def _model(dtype=torch.float64):
    return tiny_bn_net().to(dtype)


class Net(L.LightningModule):
    def __init__(self, kind, mode="auto", dtype=torch.float64, step_kwargs=None):
        super().__init__()
        self.net = _model(dtype)
        self.kind = kind
        self.mode = mode
        self.step_kwargs = step_kwargs or {}
        self.automatic_optimization = mode == "auto"

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return _opt(self.kind, self.net)

    def training_step(self, batch, batch_idx):
        if self.mode == "auto":
            return per_sample_ce(self.net, batch).mean()
        opt = self.optimizers()
        if self.mode == "closure":

            def closure():
                opt.zero_grad()
                loss = per_sample_ce(self.net, batch).mean()
                self.manual_backward(loss)
                return loss

            opt.step(closure=closure)
        elif self.mode == "no_closure":
            opt.zero_grad()
            self.manual_backward(per_sample_ce(self.net, batch).mean())
            opt.step()
        else:  # manual_step
            lit.manual_step(self, batch, lambda m, b: per_sample_ce(m.net, b), **self.step_kwargs)
        return None


def _fit(module, batches, callbacks=None, enable_checkpointing=False, **trainer_kwargs):
    trainer = L.Trainer(
        max_steps=len(batches),
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks if callbacks is not None else [lit.SharpnessAwareCallback()],
        **trainer_kwargs,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return trainer


def _reference(kind, batches, dtype=torch.float64, **step_kwargs):
    model = _model(dtype)
    opt = _opt(kind, model)
    for batch in batches:
        effsam.sharpness_aware_step(model, opt, batch, per_sample_ce, **step_kwargs)
    return clone_state(model), opt


def _assert_equal(state, ref, atol=0.0):
    assert state.keys() == ref.keys()
    for k in ref:
        if atol:
            torch.testing.assert_close(state[k], ref[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(state[k], ref[k]), k


# ---------------------------------------------------------------------- automatic
@pytest.mark.parametrize("kind", ["sam", "asam", "esam_swp", "ssam_d"])
def test_automatic_optimisation_equals_sharpness_aware_step(kind):
    batches = _batches()
    module = Net(kind)
    trainer = _fit(module, batches)
    ref, ref_opt = _reference(kind, batches)
    _assert_equal(clone_state(module.net), ref)  # weights AND BatchNorm buffers
    assert trainer.global_step == STEPS == ref_opt.steps


def test_automatic_fisher_mask_is_refreshed_from_the_callbacks_loss_fn():
    batches = _batches()
    module = Net("ssam_f")
    cb = lit.SharpnessAwareCallback(loss_fn=lambda m, b: per_sample_ce(m.net, b))
    _fit(module, batches, callbacks=[cb])
    ref, ref_opt = _reference("ssam_f", batches)
    _assert_equal(clone_state(module.net), ref)
    assert module.optimizers().optimizer.mask.refreshes == ref_opt.mask.refreshes == 2


@pytest.mark.parametrize(
    "mode, trainer_kwargs",
    [("auto", {}), ("closure", {}), ("auto", {"accumulate_grad_batches": 2})],
)
def test_without_the_callback_the_step_is_refused(mode, trainer_kwargs):
    """Without the callback pass 2 would update the BatchNorm statistics a second time
    (and accumulate_grad_batches would act on the last micro-batch): refused at the first
    step, before any weight changes (and before any forward of that step: with
    accumulation Lightning has already run the first micro-batch, without a step)."""
    module = Net("sam", mode=mode)
    before = clone_state(module.net)
    with pytest.raises(RuntimeError, match="without effsam.integrations.lightning.SharpnessAw"):
        _fit(module, _batches(), callbacks=[], **trainer_kwargs)
    after = clone_state(module.net)
    if trainer_kwargs:
        after = {k: v for k, v in after.items() if "running" not in k and "num_batches" not in k}
        before = {k: before[k] for k in after}
    _assert_equal(after, before)


def test_gradient_clipping_clips_the_pass_2_gradient():
    batches = _batches()
    module = Net("sam")
    _fit(module, batches, gradient_clip_val=0.05)
    ref, _ = _reference("sam", batches, clip_grad_norm=0.05)
    # Lightning also clips pass 1, which the normalisation undoes up to δ = 1e-12
    _assert_equal(clone_state(module.net), ref, atol=1e-12)


def test_bf16_mixed_equals_a_bf16_reference():
    batches = _batches(dtype=torch.float32)
    module = Net("sam", dtype=torch.float32)
    _fit(module, batches, precision="bf16-mixed")
    ref, _ = _reference("sam", batches, dtype=torch.float32, autocast="bf16")
    _assert_equal(clone_state(module.net), ref, atol=1e-6)


def test_fp16_through_the_effsam_precision_plugin_equals_the_scaler_reference():
    batches = _batches(dtype=torch.float32)
    module = Net("sam", dtype=torch.float32)
    plugin = lit.SharpnessAwarePrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    _fit(module, batches, plugins=[plugin])
    ref, _ = _reference(
        "sam", batches, dtype=torch.float32, autocast="fp16", scaler=torch.amp.GradScaler("cpu")
    )
    _assert_equal(clone_state(module.net), ref, atol=1e-6)
    assert plugin.scaler.get_scale() == 65536.0  # no overflow, no back-off


@pytest.mark.parametrize(
    "kind, trainer_kwargs, callback_kwargs, match",
    [
        ("sam", {"accumulate_grad_batches": 2}, {}, "accumulate_grad_batches=2"),
        ("esam_sds", {}, {}, "sample selection"),
        ("ssam_f", {}, {}, "give SharpnessAwareCallback\\(loss_fn"),
    ],
)
def test_automatic_refusals(kind, trainer_kwargs, callback_kwargs, match):
    module = Net(kind)
    with pytest.raises(ValueError, match=match):
        _fit(
            module,
            _batches(),
            callbacks=[lit.SharpnessAwareCallback(**callback_kwargs)],
            **trainer_kwargs,
        )


def test_lightnings_own_fp16_plugin_is_refused():
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = Net("sam", dtype=torch.float32)
    with pytest.raises(ValueError, match="SharpnessAwarePrecision"):
        _fit(module, _batches(dtype=torch.float32), plugins=[plugin])


# ---------------------------------------------------------------------- manual
def test_manual_closure_equals_sharpness_aware_step():
    batches = _batches()
    module = Net("esam_swp", mode="closure")
    trainer = _fit(module, batches)
    ref, _ = _reference("esam_swp", batches)
    _assert_equal(clone_state(module.net), ref)
    assert trainer.global_step == STEPS


def test_manual_backward_then_step_without_closure_raises():
    module = Net("sam", mode="no_closure")
    before = clone_state(module.net)
    with pytest.raises(
        RuntimeError, match="without a closure, after a single backward.*manual_step"
    ):
        _fit(module, _batches())
    assert torch.equal(module.net[0].weight, before["0.weight"])


@pytest.mark.parametrize(
    "kind, step_kwargs",
    [("esam_sds", {}), ("sam", {"accumulation_steps": 2}), ("ssam_f", {})],
)
def test_manual_step_equals_sharpness_aware_step_and_counts_steps(kind, step_kwargs):
    batches = _batches()
    module = Net(kind, mode="manual_step", step_kwargs=step_kwargs)
    trainer = _fit(module, batches, callbacks=[])
    ref, ref_opt = _reference(kind, batches, **step_kwargs)
    _assert_equal(clone_state(module.net), ref)
    assert trainer.global_step == STEPS == ref_opt.steps


def test_manual_step_under_automatic_optimisation_is_refused():
    class Bad(Net):
        def training_step(self, batch, batch_idx):
            return lit.manual_step(self, batch, per_sample_ce)

    with pytest.raises(RuntimeError, match="manual optimisation"):
        _fit(Bad("sam"), _batches())


def test_resume_from_a_model_checkpoint_continues_exactly(tmp_path):
    """2 epochs of 2 steps straight, against epoch 1 resumed from the checkpoint written at
    the end of epoch 0 (ESAM-SWP: the mask generator must be restored)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    batches = _batches(2)

    def fit(module, callbacks, ckpt_path=None):
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = torch.utils.data.DataLoader(batches, batch_size=None)
            trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainer

    full = Net("esam_swp")
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
    )
    fit(full, [ckpt, lit.SharpnessAwareCallback()])
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("epoch=0")]
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    assert saved["effsam"]["steps"] == 2
    resumed = Net("esam_swp")
    trainer = fit(resumed, [lit.SharpnessAwareCallback()], ckpt_path=path)
    assert trainer.global_step == 4 and resumed.optimizers().optimizer.steps == 4
    _assert_equal(clone_state(resumed.net), clone_state(full.net))


# ---------------------------------------------------------------------- clipping
def _sam_by_hand(batches, clip_value=None, clip_norm=None):
    """SAM + SGD(momentum) written out: ε = ρ·g/(‖g‖ + 1e-12) from the unclipped pass-1
    gradient, BatchNorm statistics from pass 1 only, θ restored by a copy, then the
    final (pass-2) gradient clipped and stepped."""
    import torch.nn.functional as F

    model = _model()
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=LR, momentum=0.9)
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        theta = [p.detach().clone() for p in params]
        stats = [b.clone() for b in model.buffers()]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(gi * (RHO / (norm + 1e-12)))
        g2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
            for b, s in zip(model.buffers(), stats):
                b.copy_(s)
        for p, gi in zip(params, g2):
            p.grad = gi.clone()
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        sgd.step()
    return clone_state(model)


@pytest.mark.parametrize(
    "trainer_kwargs, ref_kwargs",
    [
        ({"gradient_clip_val": 0.02, "gradient_clip_algorithm": "value"}, {"clip_value": 0.02}),
        ({"gradient_clip_val": 0.05}, {"clip_norm": 0.05}),
    ],
)
def test_gradient_clipping_clips_the_final_gradient_only(trainer_kwargs, ref_kwargs):
    """Lightning clips after every closure call; the callback runs the passes itself so
    that the clip (value or norm) applies once, to the final gradient: ε comes from the
    unclipped pass-1 gradient (a value clip would turn it)."""
    batches = _batches()
    module = Net("sam")
    _fit(module, batches, **trainer_kwargs)
    ref = _sam_by_hand(batches, **ref_kwargs)
    unclipped = _sam_by_hand(batches)
    _assert_equal(clone_state(module.net), ref, atol=1e-13)
    assert max((ref[k] - unclipped[k]).abs().max() for k in ref) > 1e-3  # the clip matters


# ---------------------------------------------------------------------- the registry
from integrations import _registry_cases as cases  # noqa: E402

REG_STEPS = 4


class RegistryNet(Net):
    def __init__(self, name, mode="auto"):
        super().__init__("sam", mode=mode)
        self.name = name

    def configure_optimizers(self):
        return cases.build(self.name, self.net, REG_STEPS)


class _Decisions(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append(bool(trainer.optimizers[0].last_step_sharpness_aware))


def _loss_fn(m, b):
    return per_sample_ce(getattr(m, "net", m), b)


def _two_phase(name, batches, clip=None, algorithm="norm"):
    """effsam's plain-loop semantics, by hand with the two-phase API: pass 1, first_step
    (the schedule's decision, the method's own transform), pass 2 if sharpness-aware
    (BatchNorm as pass 1 left it), the final gradient clipped, second_step."""
    model = _model()
    opt = cases.build(name, model, len(batches))
    decisions = []
    for batch in batches:
        if opt.mask_refresh_due():
            opt.refresh_mask(model, batch, _loss_fn)
        opt.zero_grad()
        with opt.first_pass():
            per_sample_ce(model, batch).mean().backward()
        if opt.first_step(zero_grad=True):
            with effsam.preserve_bn_stats(model):
                per_sample_ce(model, batch).mean().backward()
        if clip is not None and algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(opt.params, clip)
        elif clip is not None:
            torch.nn.utils.clip_grad_value_(opt.params, clip)
        opt.second_step()
        decisions.append(bool(opt.last_step_sharpness_aware))
    return clone_state(model), decisions


def _run_registry(name, **trainer_kwargs):
    batches = _batches(REG_STEPS)
    module = RegistryNet(name)
    expected = cases.outcome(module.configure_optimizers())
    loss_fn = _loss_fn if expected == "run+loss_fn" else None
    seen = _Decisions()
    before = clone_state(module.net)
    if not expected.startswith("run"):
        with pytest.raises(ValueError, match=expected):
            _fit(module, batches, callbacks=[lit.SharpnessAwareCallback(), seen])
        _assert_equal(clone_state(module.net), before)
        return None
    trainer = _fit(
        module, batches, callbacks=[lit.SharpnessAwareCallback(loss_fn=loss_fn), seen],
        **trainer_kwargs,
    )  # fmt: skip
    assert trainer.global_step == REG_STEPS
    return batches, module, seen.seen


@pytest.mark.parametrize("name", cases.names())
def test_every_registry_method_runs_or_is_refused_under_automatic_optimisation(name):
    """Every create_optimizer name: equal to effsam's own loop (the same decisions), or
    refused when training starts with a message naming manual_step."""
    out = _run_registry(name)
    if out is None:
        return
    batches, module, seen = out
    ref_model = _model()
    ref_opt = cases.build(name, ref_model, REG_STEPS)
    ref_seen = []
    for b in batches:
        effsam.sharpness_aware_step(ref_model, ref_opt, b, per_sample_ce)
        ref_seen.append(bool(ref_opt.last_step_sharpness_aware))
    _assert_equal(clone_state(module.net), clone_state(ref_model))
    assert seen == ref_seen


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("name", ["ae-sam", "looksam", "sam-interval", "msam", "sam-stale"])
def test_clipping_with_schedules_and_gradient_reuse_matches_the_plain_loop(name, algorithm):
    """AE-SAM decides on the unclipped pass-1 gradient; LookSAM (and MSAM, the stale
    ascent) clip the gradient the base steps with, after their own transform."""
    clip = 0.3 if algorithm == "norm" else 0.02
    out = _run_registry(name, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    batches, module, seen = out
    ref, ref_seen = _two_phase(name, batches, clip, algorithm)
    _assert_equal(clone_state(module.net), ref)
    assert seen == ref_seen
