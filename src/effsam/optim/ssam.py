"""SSAM (Mi et al., NeurIPS 2022): SAM with a sparse perturbation, a thin composition of the
:class:`SharpnessAware` skeleton with :class:`FisherMask` or :class:`DynamicMask`."""

from __future__ import annotations

from typing import Any

from .sharpness_aware import SharpnessAware, refuse_nonfinite, resolve_base
from .sparse import DynamicMask, FisherMask, SparseMask

MASKS = ("fisher", "dynamic")


class SSAM(SharpnessAware):
    r"""Sparse SAM: perturb only a fraction 1 − s of the weights, chosen by a binary mask.

    With m the mask (density 1 − s over the perturbable elements) and g the pass-1
    gradient::

        ε = m ⊙ ρ g / (‖g‖₂ + δ)          normalisation="authors" (default): ‖ε‖ ≤ ρ
        ε = m ⊙ ρ g / (‖m ⊙ g‖₂ + δ)      normalisation="masked":            ‖ε‖ = ρ
        θ ← θ_copy after pass 2 at θ + ε; base step with the dense pass-2 gradient

    * ``mask="fisher"`` (SSAM-F): m keeps the top-k elements of the diagonal empirical
      Fisher over ``num_samples`` training samples, k = round((1 − s) N), recomputed
      every ``update_interval`` steps and before the first step.
    * ``mask="dynamic"`` (SSAM-D): a random initial mask; every ``update_interval`` steps
      (from step 0) the r_t = r_0 (1 + cos(π t / T)) / 2 fraction of live elements with
      the smallest |g| is dropped and as many elements dead before the drop regrow
      (``grow="random"`` or ``"gradient"``); the new mask is used from the next step.
    * ``granularity="tensor"`` (an extension, Fisher only): whole tensors are kept by
      Fisher mass per element, so pass 1 skips the weight gradients of the others and
      sparsity saves compute; the density is then close to 1 − s (see :attr:`density`).

    s = 0 is SAM exactly (no mask, no refresh). The optimizer's ``step()`` never sees
    data: the training loop calls ``opt.refresh_mask(model, batch, loss_fn)`` when
    ``opt.mask_refresh_due()`` (:func:`effsam.sharpness_aware_step` does this).

    Example::

        opt = effsam.SSAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                          rho=0.1, sparsity=0.5, mask="fisher", update_interval=390)
        for batch in loader:
            effsam.sharpness_aware_step(model, opt, batch, loss_fn)

    Args:
        params: the optimizer instance to wrap, or the parameters (then ``base`` is the
            optimizer class and the other keywords go to it, as for :class:`~effsam.SAM`).
        rho: ρ (authors: 0.1 for ResNet-18 on CIFAR-10).
        sparsity: s ∈ [0, 1), the fraction of elements NOT perturbed (authors: 0.5).
        mask: ``"fisher"`` (SSAM-F) or ``"dynamic"`` (SSAM-D).
        update_interval: optimizer steps between mask refreshes (authors: one epoch; 390
            is one CIFAR epoch at batch 128).
        num_samples: SSAM-F's N_F (authors: 16 CIFAR, 128 ImageNet).
        drop_rate: SSAM-D's r_0 ∈ [0, 1].
        total_steps: SSAM-D's T, the training's total optimizer steps (required for it).
        grow: SSAM-D's regrowth, ``"random"`` or ``"gradient"``.
        granularity: ``"element"`` or ``"tensor"`` (SSAM-F only).
        normalisation: ``"authors"`` or ``"masked"``; default ``"authors"`` for element
            masks and ``"masked"`` for tensor masks (the only one possible there).
        seed: SSAM-D's generator seed (initial mask and random regrowth).
        fisher_chunk_size: samples per vectorised per-sample-gradient chunk (SSAM-F).
        fisher_mode: SSAM-F's ``"eval"`` (default) or ``"train"`` (the authors' procedure:
            single samples in train mode; see :func:`effsam.optim.fisher.empirical_fisher`).
        **kwargs: passed to :class:`SharpnessAware` (``ascent``, ``selection``, ``foreach``,
            ``check_finite``, ``eps_denominator``).
    """

    def __init__(
        self,
        params: Any = None,
        rho: float = 0.1,
        *,
        base: Any = None,
        sparsity: float = 0.5,
        mask: str = "fisher",
        update_interval: int = 390,
        num_samples: int = 16,
        drop_rate: float = 0.5,
        total_steps: int | None = None,
        grow: str = "random",
        granularity: str = "element",
        normalisation: str | None = None,
        seed: int = 0,
        fisher_chunk_size: int | None = 16,
        fisher_mode: str = "eval",
        **kwargs: Any,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        refuse_nonfinite("SSAM", drop_rate=drop_rate)
        if not isinstance(mask, str):
            raise TypeError(
                f"Invalid SSAM mask: {mask!r} (a name, 'fisher' or 'dynamic'; to plug in a "
                "mask policy object use SharpnessAware(base, mask=...))"
            )
        if mask not in MASKS:
            raise ValueError(f"Invalid SSAM mask: {mask!r} (choose from {list(MASKS)})")
        policy: SparseMask
        if mask == "fisher":
            policy = FisherMask(
                sparsity,
                num_samples=num_samples,
                update_interval=update_interval,
                granularity=granularity,
                normalisation=normalisation,
                chunk_size=fisher_chunk_size,
                fisher_mode=fisher_mode,
            )
        else:
            if granularity != "element":
                raise ValueError(
                    f"Invalid SSAM granularity: {granularity!r} with mask='dynamic' (tensor "
                    "masks are chosen by Fisher mass: use mask='fisher')"
                )
            if fisher_mode != "eval":
                raise ValueError(
                    f"Invalid SSAM fisher_mode: {fisher_mode!r} with mask='dynamic' (the "
                    "dynamic mask computes no Fisher: use mask='fisher')"
                )
            if total_steps is None:
                raise ValueError(
                    "SSAM mask='dynamic' needs total_steps (the T of its cosine drop-rate "
                    "schedule): got total_steps=None"
                )
            policy = DynamicMask(
                sparsity,
                total_steps=total_steps,
                update_interval=update_interval,
                drop_rate=drop_rate,
                grow=grow,
                normalisation="authors" if normalisation is None else normalisation,
                seed=seed,
            )
        super().__init__(base, rho, mask=policy, **kwargs)
        self.sparsity = policy.sparsity

    @property
    def density(self) -> float:
        """Realised density of the current mask: perturbed / perturbable elements."""
        return self.mask.density
