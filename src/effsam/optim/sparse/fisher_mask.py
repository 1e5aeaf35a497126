"""SSAM-F: :class:`FisherMask`, the mask of the largest diagonal empirical Fisher."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...batching import batch_size
from .._ranking import common_dtype, select_mask
from .._validate import check_choice, check_int
from ..fisher import FISHER_MODES, empirical_fisher
from .base import SparseMask, all_reduce_sum

GRANULARITIES = ("element", "tensor")


class FisherMask(SparseMask):
    r"""SSAM-F: perturb the elements with the largest diagonal empirical Fisher.

    At each refresh, with n = min(``num_samples``, batch size) samples of the batch::

        F_j = Σ_{i ≤ n} (∂ℓ_i/∂θ_j)²                  (see empirical_fisher for the mode)
        m   = top-k(F) over all perturbable elements,  k = round((1 − s) · N)

    Refreshes run before the first step (``ready`` is False until then; the skeleton
    refuses to step without a mask) and then whenever ``step % update_interval == 0``.
    A refresh whose Fisher is not finite keeps the previous mask and warns.

    ``granularity="tensor"`` (an extension, not the paper's method): whole tensors are
    ranked by Fisher mass per element, F̄_n = Σ_{j∈n} F_j / |n|, and taken greedily in that
    order; a tensor is taken when it brings the kept count closer to k (a larger one that
    would overshoot is passed over for smaller ones further down). The realised density is
    therefore close to, not exactly, 1 − s: read it from ``density``. Pass 1 computes
    weight gradients for the kept tensors only (as ESAM's SWP), so ε is normalised by
    their gradient: only ``normalisation="masked"`` is possible.

    Optimizer parameters that are not trainable parameters of the model cannot be scored:
    they are left out of N and never perturbed (a warning says how many).

    Args:
        sparsity: s ∈ [0, 1).
        num_samples: N_F ≥ 1 (authors: 16 on CIFAR, 128 on ImageNet).
        update_interval: steps between refreshes (authors: one epoch).
        granularity: ``"element"`` or ``"tensor"``.
        normalisation: ``"authors"`` or ``"masked"``; default ``"authors"`` for element
            masks, ``"masked"`` for tensor masks.
        chunk_size: samples per vectorised per-sample-gradient chunk (memory bound).
        fisher_mode: ``"eval"`` (default: BatchNorm with running statistics, which at the
            first refresh are those of initialisation) or ``"train"`` (the authors'
            procedure: each sample alone in train mode, on a copy of the model with
            BatchNorm using the sample's own statistics; see :func:`empirical_fisher`).
    """

    name = "fisher"
    needs_data = True

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        num_samples: int = 16,
        update_interval: int = 390,
        granularity: str = "element",
        normalisation: str | None = None,
        chunk_size: int | None = 16,
        fisher_mode: str = "eval",
    ) -> None:
        self.granularity = check_choice(granularity, "SSAM granularity", GRANULARITIES)
        self.fisher_mode = check_choice(fisher_mode, "SSAM fisher_mode", FISHER_MODES)
        if normalisation is None:
            normalisation = "masked" if granularity == "tensor" else "authors"
        if granularity == "tensor" and normalisation != "masked":
            raise ValueError(
                f"Invalid SSAM normalisation: {normalisation!r} with granularity='tensor' "
                "(pass 1 has no gradient for unkept tensors, so ‖g‖ cannot be formed: use "
                "'masked')"
            )
        super().__init__(sparsity, update_interval, normalisation)
        self.num_samples = check_int(num_samples, "SSAM num_samples", typed=True)
        self.chunk_size = (
            None if chunk_size is None else check_int(chunk_size, "SSAM chunk_size", typed=True)
        )
        #: samples the last refresh used (per worker)
        self.last_num_samples = 0
        self._warned_unscored = False

    @property
    def ready(self) -> bool:
        """Whether a mask exists (always True at sparsity 0)."""
        return self.trivial or self._masks is not None

    def refresh_due(self, step: int) -> bool:
        if self.trivial:
            return False
        if not self.ready:
            return True
        return step % self.update_interval == 0 and step != self.last_refresh_step

    @torch.no_grad()
    def refresh(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        batch: Any,
        loss_fn: Callable[..., Any],
        step: int,
    ) -> bool:
        """Recompute the mask from ``batch``; True when a new mask was installed."""
        if self.trivial:
            return False
        with torch.enable_grad():
            fisher = empirical_fisher(
                model,
                params,
                batch,
                loss_fn,
                self.num_samples,
                self.chunk_size,
                mode=self.fisher_mode,
            )
        pool = [f is not None for f in fisher]
        if not any(pool):
            raise RuntimeError(
                "SSAM-F: none of the optimizer's parameters is a trainable parameter of the "
                f"model given to refresh_mask ({type(model).__name__})"
            )
        unscored = sum(1 for p, f in zip(params, fisher) if f is None and p.requires_grad)
        if unscored and not self._warned_unscored:
            self._warned_unscored = True
            warnings.warn(
                f"effsam: {unscored} trainable optimizer parameter(s) are not parameters of "
                "the model given to refresh_mask: they get no Fisher score and are never "
                "perturbed",
                RuntimeWarning,
                stacklevel=2,
            )
        scored = [f for f in fisher if f is not None]
        device = scored[0].device
        dtype = common_dtype(scored)
        flat = torch.cat([f.reshape(-1).to(device=device, dtype=dtype) for f in scored])
        all_reduce_sum(flat)  # the same mask on every worker
        if not bool(torch.isfinite(flat.max())):  # non-negative: max is NaN or inf iff one is
            kept = "the previous mask is kept" if self._masks is not None else "no mask yet"
            warnings.warn(
                f"effsam: SSAM-F refresh at step {step} got a non-finite Fisher estimate; {kept}",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        self.last_num_samples = min(self.num_samples, batch_size(batch))
        k = self.num_kept(flat.numel())
        if self.granularity == "element":
            chosen = select_mask(flat, k, largest=True)
        else:
            chosen = self._choose_tensors(flat, [f.numel() for f in scored], k)
        self._install(self._split(chosen, params, pool), pool)
        self.last_refresh_step = step
        self.refreshes += 1
        self._bound = []
        return True

    @staticmethod
    def _choose_tensors(flat: Tensor, sizes: list[int], k: int) -> Tensor:
        """Whole tensors by Fisher mass per element, greedily towards k elements."""
        mass = torch.stack([seg.sum() for seg in flat.split(sizes)])
        per_element = mass / torch.tensor(sizes, dtype=mass.dtype, device=mass.device)
        order = torch.sort(per_element, descending=True, stable=True).indices.tolist()
        take = [False] * len(sizes)
        kept = 0
        for n in order:
            if kept + sizes[n] / 2 < k:  # closer to k with tensor n than without
                take[n] = True
                kept += sizes[n]
        return torch.cat(
            [torch.full((s,), t, dtype=torch.bool, device=flat.device) for s, t in zip(sizes, take)]
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_samples={self.num_samples}, "
            f"granularity={self.granularity!r}, fisher_mode={self.fisher_mode!r}"
        )
