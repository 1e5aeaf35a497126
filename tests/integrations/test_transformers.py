"""SharpnessAwareTrainer in the real Hugging Face Trainer, against effsam driven by hand
with sharpness_aware_step on the same model, weights and batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from helpers import clone_state, tiny_bn_net, tiny_data

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("effsam.integrations.transformers")

RHO, LR, MOM, N = 0.2, 0.1, 0.9, 24


class Tiny(nn.Module):
    """A BatchNorm MLP with the Trainer's calling convention (kwargs in, dict out)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.net = tiny_bn_net().to(dtype)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _per_sample(model, batch):
    return F.cross_entropy(model.net(batch["x"]), batch["labels"], reduction="none")


def _dataset(dtype=torch.float64):
    x, y = tiny_data(seed=90, n=N)
    return [{"x": x[i].to(dtype), "labels": y[i]} for i in range(N)]


def _opt(kind, model):
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
    if kind == "sam":
        return effsam.SAM(base, rho=RHO)
    if kind == "esam_swp":
        return effsam.ESAM(base, rho=RHO, beta=0.5, gamma=1.0, seed=4)
    if kind == "esam_sds":
        return effsam.ESAM(base, rho=RHO, beta=0.5, gamma=0.5, seed=4)
    if kind == "ssam_d":
        return effsam.SSAM(base, rho=RHO, mask="dynamic", total_steps=4, update_interval=1)
    if kind == "ssam_f":
        return effsam.SSAM(base, rho=RHO, mask="fisher")
    raise ValueError(kind)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _train(tmp_path, kind="sam", dtype=torch.float64, form="instance", resume=None, **kw):
    model = Tiny(dtype)
    args = _args(tmp_path, **kw)
    if form == "instance":
        extra = {"optimizers": (_opt(kind, model.net), None)}
    else:
        assert kind == "sam"
        extra = {
            "optimizer_cls_and_kwargs": (
                effsam.SAM,
                {"base": torch.optim.SGD, "lr": LR, "momentum": MOM, "rho": RHO},
            )
        }
    trainer = hf.SharpnessAwareTrainer(
        model=model, args=args, train_dataset=_dataset(dtype), **extra
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def _reference(kind, steps, batch, dtype=torch.float64, **step_kwargs):
    model = Tiny(dtype)
    opt = _opt(kind, model.net)
    data = _dataset(dtype)
    for s in range(steps):
        rows = data[s * batch : (s + 1) * batch]
        b = {
            "x": torch.stack([r["x"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
        }
        effsam.sharpness_aware_step(model, opt, b, _per_sample, **step_kwargs)
    return clone_state(model), opt


def _assert_equal(state, ref, atol=0.0):
    for k in ref:
        if atol:
            torch.testing.assert_close(state[k], ref[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(state[k], ref[k]), k


@pytest.mark.parametrize("kind", ["sam", "esam_swp", "ssam_d"])
def test_trainer_equals_sharpness_aware_step(tmp_path, kind):
    trainer, model = _train(tmp_path, kind)
    ref, ref_opt = _reference(kind, 3, 4)
    _assert_equal(clone_state(model), ref)  # weights and BatchNorm buffers
    assert trainer.state.global_step == 3 == ref_opt.steps


def test_optimizer_cls_and_kwargs_builds_effsam_from_the_param_groups(tmp_path):
    trainer, model = _train(tmp_path, form="cls")
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, effsam.SAM) and len(opt.param_groups) == 2  # decay / no decay
    ref, _ = _reference("sam", 3, 4)
    # the groups list the tensors in another order: the norm sums in another order
    _assert_equal(clone_state(model), ref, atol=1e-12)


def test_gradient_accumulation_is_sharpness_aware_step_with_accumulation(tmp_path):
    _, model = _train(
        tmp_path, "esam_swp", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    ref, _ = _reference("esam_swp", 3, 8, accumulation_steps=2)
    _assert_equal(clone_state(model), ref, atol=1e-14)


def test_clipping_clips_the_pass_2_gradient(tmp_path):
    _, model = _train(tmp_path, "sam", max_grad_norm=0.05)
    ref, _ = _reference("sam", 3, 4, clip_grad_norm=0.05)
    _assert_equal(clone_state(model), ref)


def test_bf16_equals_a_bf16_reference(tmp_path):
    _, model = _train(tmp_path, "sam", dtype=torch.float32, bf16=True)
    ref, _ = _reference("sam", 3, 4, dtype=torch.float32, autocast="bf16")
    _assert_equal(clone_state(model), ref, atol=1e-6)


def test_resume_from_a_trainer_checkpoint_continues_exactly(tmp_path):
    _, full = _train(tmp_path / "full", "esam_swp", max_steps=4)
    _train(tmp_path / "cut", "esam_swp", max_steps=2, save_strategy="steps", save_steps=2)
    _, resumed = _train(
        tmp_path / "cut", "esam_swp", max_steps=4, resume=str(tmp_path / "cut" / "checkpoint-2")
    )
    _assert_equal(clone_state(resumed), clone_state(full))


@pytest.mark.parametrize(
    "kind, match", [("esam_sds", "sample selection"), ("ssam_f", "mask='dynamic'")]
)
def test_refusals(tmp_path, kind, match):
    with pytest.raises(ValueError, match=match):
        _train(tmp_path, kind)


def test_plain_trainer_cannot_finish_a_step_without_the_subclass(tmp_path):
    """What the subclass is for: the stock Trainer calls step() with no closure."""
    model = Tiny()
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        optimizers=(_opt("sam", model.net), None),
    )
    with pytest.raises(RuntimeError, match="no step is pending.*SharpnessAwareTrainer"):
        trainer.train()


def test_token_normalised_language_model_with_accumulation(tmp_path):
    """A tiny GPT-2 (built from a config) with padded labels: the Trainer divides the summed
    token losses of each micro-batch by the token count of the whole step
    (num_items_in_batch), so the step is SAM on that one normalised loss over all
    micro-batches of the step, whatever their token counts."""
    cfg = transformers.GPT2Config(
        vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(16):
        ids = torch.randint(0, 20, (8,), generator=g)
        labels = ids.clone()
        labels[8 - (i % 4) :] = -100  # 0 to 3 padded positions: token counts differ
        rows.append({"input_ids": ids, "labels": labels})

    def lm():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).double()

    model = lm()
    args = _args(
        tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    trainer = hf.SharpnessAwareTrainer(
        model=model, args=args, train_dataset=rows, optimizers=(opt, None)
    )
    assert trainer.model_accepts_loss_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    # The Trainer's normaliser: the labelled tokens of the whole step (over labels[:, 1:]
    # when it knows the loss shifts them).
    shifted = getattr(trainer, "_loss_shifts_labels", False)

    def token_sum_over_step_count(m, batch):
        logits = m(input_ids=batch["input_ids"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        counted = batch["labels"][:, 1:] if shifted else batch["labels"]
        total = F.cross_entropy(
            logits.reshape(-1, 20), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return total / counted.ne(-100).sum()

    ref = lm()
    ref_opt = effsam.SAM(torch.optim.SGD(ref.parameters(), lr=0.1), rho=0.1)
    for step in range(2):
        part = rows[8 * step : 8 * (step + 1)]
        batch = {k: torch.stack([r[k] for r in part]) for k in ("input_ids", "labels")}
        effsam.sharpness_aware_step(ref, ref_opt, batch, token_sum_over_step_count)
    # transformers' causal-LM loss casts the logits to float32 (ours stay float64)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------- the registry
from integrations import _registry_cases as cases  # noqa: E402


@pytest.mark.parametrize("name", cases.names())
def test_every_registry_method_runs_or_is_refused(tmp_path, name):
    """Every create_optimizer name (schedules, LookSAM, MSAM, the cheap ascents, …): equal
    to effsam's own loop with the same decisions (plain steps included: the Trainer's
    optimizer.step() finishes them), or refused before training with a message."""
    steps, batch = 4, 4
    model = Tiny()
    opt = cases.build(name, model.net, steps)
    expected = cases.outcome(opt)
    before = clone_state(model)
    trainer = hf.SharpnessAwareTrainer(
        model=model,
        args=_args(tmp_path, max_steps=steps, max_grad_norm=0.3),
        train_dataset=_dataset(),
        optimizers=(opt, None),
    )
    if expected != "run":
        match = "mask='dynamic'" if expected == "run+loss_fn" else expected
        with pytest.raises(ValueError, match=match):
            trainer.train()
        _assert_equal(clone_state(model), before)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    ref_model = Tiny()
    ref_opt = cases.build(name, ref_model.net, steps)
    data = _dataset()
    for s in range(steps):
        rows = data[s * batch : (s + 1) * batch]
        b = {
            "x": torch.stack([r["x"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
        }
        effsam.sharpness_aware_step(ref_model, ref_opt, b, _per_sample, clip_grad_norm=0.3)
    _assert_equal(clone_state(model), clone_state(ref_model))
    assert opt.steps == ref_opt.steps == steps
    assert opt.sharpness_aware_steps == ref_opt.sharpness_aware_steps
