"""Selection policies: which samples pass 2 sees.

A policy is a pure function of loss tensors. :func:`~effsam.sharpness_aware_step`
slices the chosen samples out of the batch BEFORE pass 2's forward, so pass 2's cost
falls with γ.

* :class:`AllSamples` — every sample (SAM).
* :class:`TopSharpness` — ESAM's Sharpness-sensitive Data Selection (Du et al., ICLR 2022):
  s_i = ℓ_i(θ + ε) − ℓ_i(θ); keep the k = max(1, round(γ b)) samples with the largest s_i.
  Needs a no-grad forward at θ + ε (skipped at γ = 1). Exactly k samples, chosen by index;
  the authors' strict threshold picks one fewer — a documented deviation.
* :class:`TopLoss` — a cheaper mode with no extra forward: rank by the pass-1 loss ℓ_i(θ).
"""

from __future__ import annotations

from torch import Tensor

from ._ranking import largest_indices, ranking_dtype, round_half_up
from ._validate import check_fraction
from .policy import Policy


class Selection(Policy):
    """The base of the built-in selections: what pass 2 forwards, and the diagnostics."""

    #: True: the samples are chosen before pass 1 and both passes use them (K-SAM).
    before_pass1 = False
    #: True: pass 2 forwards the whole batch and back-propagates the selection (see
    #: :class:`effsam.optim.policy.SelectionPolicy`)
    pass2_whole_batch = False
    #: True: pass 2 is normalised with the whole batch's BN statistics (ESAM's BN repair)
    pass2_bn_whole_batch = False
    #: k / b of the last ``select`` call (None before the first; a diagnostic)
    last_fraction: float | None = None
    #: the indices the last ``select`` call chose (None: the whole batch)
    last_indices: Tensor | None = None


class AllSamples(Selection):
    """Pass 2 on the whole batch."""

    name = "all"
    gamma = 1.0
    needs_perturbed_loss = False
    needs_per_sample = False

    def num_selected(self, batch_size: int) -> int:
        return batch_size

    def select(self, loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        return None


class _TopK(Selection):
    """The k = max(1, round(γ b)) samples with the largest score; subclasses say which."""

    name = "top-k"

    def __init__(self, gamma: float) -> None:
        self.gamma = check_fraction(gamma, "SDS gamma")

    @property
    def needs_perturbed_loss(self) -> bool:
        return False

    @property
    def needs_per_sample(self) -> bool:
        return self.gamma < 1.0

    def num_selected(self, batch_size: int) -> int:
        return max(1, min(batch_size, round_half_up(self.gamma * batch_size)))

    def scores(self, loss_before: Tensor, loss_after: Tensor | None) -> Tensor:
        raise NotImplementedError

    def select(self, loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        if self.gamma >= 1.0 or loss_before is None:
            return None
        k = self.num_selected(loss_before.numel())
        self.last_fraction = k / loss_before.numel()
        self.last_indices = None
        if k >= loss_before.numel():
            return None
        scores = self.scores(loss_before.detach(), loss_after).reshape(-1)
        # Ranked in at least float32 (float64 scores stay float64), ties to the lower
        # index as in the SSAM masks; sorted, so the subset keeps the batch order.
        self.last_indices = largest_indices(scores.to(ranking_dtype(scores.dtype)), k)
        return self.last_indices

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


class TopSharpness(_TopK):
    """ESAM's SDS: the k samples with the largest ℓ_i(θ + ε) − ℓ_i(θ)."""

    name = "sharpness"

    @property
    def needs_perturbed_loss(self) -> bool:
        return self.gamma < 1.0

    def scores(self, loss_before: Tensor, loss_after: Tensor | None) -> Tensor:
        if loss_after is None:
            raise ValueError("SDS needs the per-sample losses at θ + ε (loss_after)")
        return loss_after - loss_before


class TopLoss(_TopK):
    """Cheap selection: the k samples with the largest pass-1 loss (no extra forward)."""

    name = "loss"

    def scores(self, loss_before: Tensor, loss_after: Tensor | None) -> Tensor:
        return loss_before


SELECTIONS = {"sharpness": TopSharpness, "loss": TopLoss}
