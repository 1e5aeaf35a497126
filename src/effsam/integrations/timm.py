"""timm: effsam optimizers in timm's optimizer factory, and the training step for a
timm-style loop.

:func:`register` adds names to timm's default optimizer registry, so that
``timm.optim.create_optimizer_v2(model, "samsgd", lr=0.1, weight_decay=5e-4, rho=0.05)``
(and ``--opt samsgd`` in timm's ``train.py`` configs) builds ``effsam.SAM`` around timm's
own parameter groups (no weight decay on norms and biases). Names are
``<variant><base>`` with variant ``sam``, ``asam``, ``esam``, ``ssam`` and base ``sgd``
(Nesterov momentum, like timm's ``sgd``), ``momentum`` (heavy ball), ``adam``, ``adamw``:
``samsgd``, ``esamadamw``, … timm splits optimizer names on ``_`` (``lookahead_…``), so
the names have none. Keywords that timm does not know (``rho``, ``beta``, ``gamma``,
``sparsity``, …) pass through ``create_optimizer_v2(**kwargs)`` to effsam.

timm's ``train_one_epoch`` calls ``loss.backward(); optimizer.step()`` (or its
``NativeScaler``), which cannot evaluate pass 2. :func:`train_step` replaces that block:
it is :func:`effsam.sharpness_aware_step` with timm's names for AMP and clipping; mixup
and CutMix soft targets go through :func:`soft_target_loss`, a per-sample loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from ..optim.ssam import SSAM
from ..optim.variants import ASAM, ESAM, SAM
from ..step import StepResult, sharpness_aware_step
from ._frameworks import TIMM_BUILT

__all__ = ["BASES", "VARIANTS", "register", "soft_target_loss", "train_step"]

VARIANTS: dict[str, type] = {"sam": SAM, "asam": ASAM, "esam": ESAM, "ssam": SSAM}

#: base name → (optimizer class, fixed defaults, has_momentum, has_betas, has_eps)
BASES: dict[str, tuple[type, dict[str, Any], bool, bool, bool]] = {
    "sgd": (torch.optim.SGD, {"nesterov": True}, True, False, False),
    "momentum": (torch.optim.SGD, {"nesterov": False}, True, False, False),
    "adam": (torch.optim.Adam, {}, False, True, True),
    "adamw": (torch.optim.AdamW, {}, False, True, True),
}


_DESCRIPTION = "effsam:"


def _factory(variant: type, base: type, fixed: dict[str, Any]) -> Callable[..., Any]:
    @functools.wraps(variant)
    def build(params: Any, **kwargs: Any) -> Any:
        opt = variant(params, base=base, **{**fixed, **kwargs})
        TIMM_BUILT.add(opt)  # a stray optimizer.step() then names train_step
        return opt

    return build


def register(registry: Any = None) -> list[str]:
    """Add the effsam names to timm's optimizer registry (default: timm's default
    registry); returns the names. Calling it again changes nothing."""
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError as e:
        raise ImportError(
            "effsam.integrations.timm.register() needs timm (with its optimizer factory, "
            "timm >= 1.0): pip install 'effsam[timm]'"
        ) from e

    registry = default_registry if registry is None else registry
    names = []
    for vname, variant in VARIANTS.items():
        for bname, (base, fixed, momentum, betas, eps) in BASES.items():
            name = f"{vname}{bname}"
            names.append(name)
            if _registered(registry, name):
                continue
            registry.register(
                OptimInfo(
                    name=name,
                    opt_class=_factory(variant, base, fixed),
                    description=f"{_DESCRIPTION} {variant.__name__} around {base.__name__}",
                    has_eps=eps,
                    has_momentum=momentum,
                    has_betas=betas,
                )
            )
    return names


def _registered(registry: Any, name: str) -> bool:
    try:
        info = registry.get_optimizer_info(name)
    except (KeyError, ValueError):
        return False
    return str(getattr(info, "description", "")).startswith(_DESCRIPTION)


def soft_target_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Per-sample cross-entropy against soft targets ``(x, y_soft)`` (mixup, CutMix,
    label smoothing): −Σ_c y_c log softmax(model(x))_c, shape [b]."""
    x, target = batch
    logits = model(x)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: Callable[[torch.nn.Module, Any], Any] = soft_target_loss,
    *,
    amp_dtype: torch.dtype | str | None = None,
    loss_scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    accumulation_steps: int = 1,
) -> StepResult:
    """The optimizer block of timm's ``train_one_epoch`` for any optimizer, effsam or
    not: :func:`effsam.sharpness_aware_step` with ``autocast=amp_dtype``,
    ``scaler=loss_scaler`` (a ``torch.amp.GradScaler``, not timm's ``NativeScaler``) and
    ``clip_grad_norm=clip_grad``. Only norm clipping is offered (timm's
    ``clip_mode="agc"`` / ``"value"`` are not)."""
    return sharpness_aware_step(
        model,
        optimizer,
        batch,
        loss_fn,
        autocast=amp_dtype,
        scaler=loss_scaler,
        clip_grad_norm=clip_grad,
        accumulation_steps=accumulation_steps,
    )
