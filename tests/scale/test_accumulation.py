"""Gradient accumulation: n micro-batches of b/n per pass behave as one batch of b;
SDS selects within each micro-batch."""

from __future__ import annotations

import pytest
import torch

import effsam
from effsam.batching import split_batch
from effsam.optim.masks import round_half_up
from scale._common import (
    LR,
    MOMENTUM,
    RHO,
    SGDMomentum,
    add,
    ascent,
    assert_close,
    ce,
    data,
    grad,
    mean,
    mlp,
    per_sample_loss,
    sub,
    weights_of,
)


def _make(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    if kind == "sgd":
        return base
    if kind == "asam":
        return effsam.ASAM(base, rho=1.0)
    return effsam.SAM(base, rho=RHO)


@pytest.mark.parametrize("kind", ["sam", "asam", "sgd"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_micro_batches_match_one_batch(kind: str, n: int) -> None:
    """b = 12: n = 5 gives uneven micro-batches (2, 3, 2, 3, 2), weighted by size."""
    one, many = mlp(0), mlp(0)
    opt_one, opt_many = _make(kind, one), _make(kind, many)
    for step in range(3):
        batch = data(seed=200 + step, n=12)
        r1 = effsam.sharpness_aware_step(one, opt_one, batch, ce)
        rn = effsam.sharpness_aware_step(many, opt_many, batch, ce, accumulation_steps=n)
        torch.testing.assert_close(rn.loss, r1.loss, atol=1e-14, rtol=0)
        assert rn.selected == r1.selected == 12
        assert_close(weights_of(many), weights_of(one))


def test_sam_accumulation_against_the_formulas() -> None:
    """The ascent uses the gradient accumulated over all micro-batches (not the last one)."""
    model = mlp(0)
    opt = _make("sam", model)
    w, ref = weights_of(model), SGDMomentum()
    for step in range(2):
        batch = data(seed=300 + step, n=12)
        eps = ascent(grad(model, w, batch), RHO)
        w = ref.step(w, grad(model, add(w, eps), batch))
        effsam.sharpness_aware_step(model, opt, batch, ce, accumulation_steps=3)
        assert_close(weights_of(model), w)


def test_esam_selects_within_each_micro_batch() -> None:
    """b = 10 in 3 micro-batches (3, 4, 3), γ = 0.5: k = 2 + 2 + 2 = 6 (one batch: 5).
    The chosen samples and the update are recomputed here from the formulas."""
    model = mlp(0)
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO, beta=1, gamma=0.5
    )
    seen: list[torch.Tensor] = []

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        if opt.perturbed and torch.is_grad_enabled():
            seen.append(batch["idx"].clone())
        return ce(m, batch)

    w, ref = weights_of(model), SGDMomentum()
    for step in range(3):
        batch = data(seed=400 + step, n=10)
        micro = split_batch(batch, 3)
        assert [len(mb["idx"]) for mb in micro] == [3, 4, 3]
        eps = ascent(grad(model, w, batch), RHO)  # accumulated = full-batch gradient
        chosen, g2s = [], []
        for mb in micro:
            k = round_half_up(0.5 * len(mb["idx"]))
            sharp = per_sample_loss(model, add(w, eps), mb) - per_sample_loss(model, w, mb)
            idx = torch.topk(sharp, k).indices.sort().values
            chosen.append(mb["idx"][idx])
            g2s.append(grad(model, add(w, eps), sub(mb, idx)))
        w = ref.step(w, mean(g2s, [len(mb["idx"]) / 10 for mb in micro]))

        seen.clear()
        result = effsam.sharpness_aware_step(model, opt, batch, loss_fn, accumulation_steps=3)
        assert result.selected == 6
        assert len(seen) == 3
        for got, want in zip(seen, chosen):
            assert torch.equal(got, want)
        assert_close(weights_of(model), w)


def test_esam_with_swp_counts_per_micro_batch_selection() -> None:
    model = mlp(0)
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, beta=0.6, gamma=0.3, seed=2
    )
    for step in range(4):
        batch = data(seed=500 + step, n=16)
        # 4 micro-batches of 4: k = max(1, round(1.2)) = 1 each; one batch would give 5.
        result = effsam.sharpness_aware_step(model, opt, batch, ce, accumulation_steps=4)
        assert result.selected == 4
        assert result.batch_size == 16


def test_accumulation_steps_validation() -> None:
    model = mlp(0)
    opt = _make("sam", model)
    batch = data(seed=0, n=4)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="accumulation_steps"):
            effsam.sharpness_aware_step(model, opt, batch, ce, accumulation_steps=bad)
    with pytest.raises(ValueError, match="micro-batches"):
        effsam.sharpness_aware_step(model, opt, batch, ce, accumulation_steps=5)
