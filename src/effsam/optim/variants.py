"""SAM, ASAM and ESAM: thin compositions of the :class:`SharpnessAware` skeleton."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .ascent import AdaptiveAscent, L2Ascent
from .masks import RandomTensorSubset
from .sds_variants import MixWithPass1, RandomSubset
from .selection import SELECTIONS, AllSamples
from .sharpness_aware import SharpnessAware, refuse_nonfinite, resolve_base

#: ESAM's selection modes: the paper's, the cheap one, and the random control
ESAM_SELECTIONS = {**SELECTIONS, "random": RandomSubset}
#: ESAM's defaults, the paper's (Du et al., 2022; ResNet-18 on CIFAR): the class's and
#: the registry's
ESAM_DEFAULTS = {"rho": 0.05, "beta": 0.6, "gamma": 0.5}
SDS_UPDATES = ("paper", "mix")
SDS_PASS2 = ("subset", "batch")
SDS_BN = ("subset", "batch")


class SAM(SharpnessAware):
    """SAM (Foret et al., ICLR 2021); ``adaptive=True`` gives ASAM (Kwon et al., ICML 2021).

    ε = ρ g / (‖g‖₂ + δ), or for ASAM ε = ρ T² g / (‖T g‖₂ + δ) with T = |θ| + η.
    ASAM wants a ρ about 10× SAM's (e.g. 0.5 instead of 0.05).

    ``adaptive_only``: the tensors T applies to (the others get T = 1). The ASAM authors'
    code makes only parameters named ``*weight*`` adaptive, with η = 0.01:
    ``ASAM(base, eta=0.01, adaptive_only=effsam.asam_reference_params(model))``.

    Two ways to build it: around an optimizer instance, ``SAM(torch.optim.SGD(params,
    lr=0.1), rho=0.05)``, or from the parameters, ``SAM(params, base=torch.optim.SGD,
    lr=0.1, rho=0.05)`` — then every keyword the wrapper does not take (and everything in
    ``base_kwargs={...}``) goes to the base class. The second form is for frameworks that
    build the optimizer as ``cls(params, **kwargs)`` (the Hugging Face Trainer's
    ``optimizer_cls_and_kwargs``, timm's factory, LightningCLI).
    """

    def __init__(
        self,
        params: Any = None,
        rho: float = 0.05,
        *,
        base: Any = None,
        adaptive: bool = False,
        eta: float = 0.0,
        adaptive_only: Iterable[Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        refuse_nonfinite("ASAM", eta=eta)
        if adaptive_only is not None and not adaptive:
            raise ValueError("adaptive_only needs adaptive=True (it selects ASAM's tensors)")
        only = None if adaptive_only is None else list(adaptive_only)
        ascent = AdaptiveAscent(eta, only=only) if adaptive else L2Ascent()
        super().__init__(base, rho, ascent=ascent, **kwargs)


class ASAM(SAM):
    """ASAM: SAM with the adaptive ascent; default ρ = 0.5. Built like :class:`SAM`."""

    def __init__(
        self,
        params: Any = None,
        rho: float = 0.5,
        *,
        base: Any = None,
        eta: float = 0.0,
        adaptive_only: Iterable[Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, rho, base=base, adaptive=True, eta=eta, adaptive_only=adaptive_only, **kwargs
        )


class ESAM(SharpnessAware):
    """ESAM (Du et al., ICLR 2022) = SAM + Stochastic Weight Perturbation (β) +
    Sharpness-sensitive Data Selection (γ).

    * SWP: each parameter tensor is perturbed with probability β; pass 1 computes weight
      gradients only for those tensors. ε is normalised by the kept gradients and scaled
      by 1/β (authors' code: ‖ε‖ = ρ/β); ``swp_scaling="unit"`` gives ‖ε‖ = ρ.
    * SDS: pass 2 sees only the k = max(1, round(γ b)) samples whose loss rose most under
      the perturbation (``selection="sharpness"``, one extra no-grad forward), or with the
      largest pass-1 loss (``selection="loss"``, no extra forward). Needs
      :func:`effsam.sharpness_aware_step` and a per-sample ``loss_fn`` when γ < 1.

    β = 1 gives SDS alone, γ = 1 gives SWP alone, both 1 is SAM.

    Args:
        params: the optimizer instance to wrap, or the parameters (then ``base`` is the
            optimizer class and the other keywords go to it, as for :class:`SAM`).
        rho: ρ (paper: 0.05 ResNet-18, 0.1 WRN-28-10, 0.2 PyramidNet-110).
        beta: SWP keep probability in (0, 1].
        gamma: SDS selection ratio in (0, 1].
        seed: seed of the SWP mask generator and of the random-subset control (each derives
            its own stream from it; equal on every data-parallel worker).
        selection: ``"sharpness"`` (paper), ``"loss"`` (cheap mode) or ``"random"`` (the
            control: a uniformly random subset of the same size).
        sds_update: ``"paper"`` (the update is the selected samples' perturbed gradient) or
            ``"mix"`` (blended with pass 1's clean gradient of the whole batch, so every
            sample stays in the update; see :mod:`effsam.optim.sds_variants`).
        sds_pass2: ``"subset"`` (paper: pass 2 forwards only the selected samples) or
            ``"batch"`` (the control: pass 2 forwards the whole batch at θ + ε, ranks the
            samples from that forward and back-propagates only the selected samples'
            mean loss, so BN's batch statistics come from every sample, at SAM's cost).
        sds_bn: ``"subset"`` (paper: BatchNorm normalises pass 2 by the selected samples'
            own batch statistics) or ``"batch"`` (the BN repair: pass 2's BatchNorm layers
            normalise the selected samples with the WHOLE batch's statistics, recorded as
            constants from the selection forward at θ + ε — or, for selections without
            that forward ("loss", "random"), from pass 1 at θ; no extra pass).
        swp_scaling: ``"authors"`` (‖ε‖ = ρ/β) or ``"unit"`` (‖ε‖ = ρ).
        adaptive: use ASAM's adaptive ascent.
    """

    def __init__(
        self,
        params: Any = None,
        rho: float = ESAM_DEFAULTS["rho"],
        *,
        base: Any = None,
        beta: float = ESAM_DEFAULTS["beta"],
        gamma: float = ESAM_DEFAULTS["gamma"],
        seed: int = 0,
        selection: str = "sharpness",
        swp_scaling: str = "authors",
        sds_update: str = "paper",
        sds_pass2: str = "subset",
        sds_bn: str = "subset",
        adaptive: bool = False,
        eta: float = 0.0,
        **kwargs,
    ) -> None:
        base, kwargs = resolve_base(params, base, kwargs, type(self).__name__)
        refuse_nonfinite("ESAM", eta=eta)
        if selection not in ESAM_SELECTIONS:
            raise ValueError(
                f"Invalid ESAM selection: {selection!r} (choose from {sorted(ESAM_SELECTIONS)})"
            )
        if sds_update not in SDS_UPDATES:
            raise ValueError(
                f"Invalid ESAM sds_update: {sds_update!r} (choose from {', '.join(SDS_UPDATES)})"
            )
        if sds_pass2 not in SDS_PASS2:
            raise ValueError(
                f"Invalid ESAM sds_pass2: {sds_pass2!r} (choose from {', '.join(SDS_PASS2)})"
            )
        if sds_bn not in SDS_BN:
            raise ValueError(f"Invalid ESAM sds_bn: {sds_bn!r} (choose from {', '.join(SDS_BN)})")
        if sds_bn == "batch" and sds_pass2 == "batch":
            raise ValueError(
                "ESAM sds_bn='batch' with sds_pass2='batch': pass 2 already forwards the "
                "whole batch (its statistics are the whole batch's); choose one"
            )
        mask = RandomTensorSubset(beta, seed=seed, scaling=swp_scaling)
        cls = ESAM_SELECTIONS[selection]
        policy = cls(gamma, seed=seed) if cls is RandomSubset else cls(gamma)
        sel = policy if policy.gamma < 1.0 else AllSamples()
        # which samples pass 2 forwards, and whose BN statistics normalise it: the
        # selection's (the controls' settings are the selection's own)
        sel.pass2_whole_batch = sds_pass2 == "batch"
        sel.pass2_bn_whole_batch = sds_bn == "batch"
        if sds_update == "mix":
            if kwargs.get("update") is not None:
                raise ValueError("ESAM sds_update='mix' is its update policy: pass no other")
            kwargs["update"] = MixWithPass1(sel.needs_per_sample)
        ascent = AdaptiveAscent(eta) if adaptive else L2Ascent()
        super().__init__(base, rho, ascent=ascent, mask=mask, selection=sel, **kwargs)
        self.beta = mask.beta
        self.gamma = policy.gamma
        self.sds_update = sds_update
