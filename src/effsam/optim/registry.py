"""Name → optimizer spec table and one factory.

``create_optimizer(model_or_params, "esam", lr=0.05, momentum=0.9, weight_decay=1e-3,
rho=0.05, beta=0.6, gamma=0.5)`` builds the base optimizer and wraps it. ``"sgd"`` (and
any base name used as the optimizer name) returns the plain base optimizer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .ksam import KSAM
from .looksam import LookSAM
from .msam import MSAM
from .schedule import SCHEDULES, EveryStep
from .ssam import SSAM
from .variants import ASAM, ESAM, SAM

BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: a wrapper factory and fixed keyword arguments."""

    name: str
    description: str
    factory: Callable[..., Optimizer] | None  # None: the base optimizer alone
    fixed: dict[str, Any] = field(default_factory=dict)
    #: keyword defaults shown in help and used by the toolkit (paper settings)
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the schedule policy built from the schedule's own keyword arguments (None: every
    #: step is sharpness-aware, unless a ``schedule="name"`` argument asks otherwise)
    schedule: type[EveryStep] | None = None


REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry (names are lower-case, unique)."""
    if spec.name in REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def available_optimizers() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    key = name.lower()
    if key not in REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[key]


def _init_kwargs(factory: Any) -> set[str]:
    names: set[str] = set()
    for cls in inspect.getmro(factory) if inspect.isclass(factory) else [factory]:
        init = getattr(cls, "__init__", None) if cls is not object else None
        if init is None:
            continue
        names |= {
            p.name
            for p in inspect.signature(init).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
    # the instance, the wrapped optimizer and torch.optim.Optimizer's own arguments
    return names - {"self", "base", "params", "defaults"}


def schedule_class(name: str, kwargs: dict[str, Any] | None = None) -> type[EveryStep] | None:
    """The schedule optimizer ``name`` builds: its registry entry's, or the one a
    ``schedule="late"`` (etc.) argument names."""
    spec = get_spec(name)
    chosen = (kwargs or {}).get("schedule", spec.fixed.get("schedule"))
    if isinstance(chosen, str):
        if chosen not in SCHEDULES:
            raise ValueError(f"Unknown schedule {chosen!r}; choose from {', '.join(SCHEDULES)}")
        return SCHEDULES[chosen]
    return spec.schedule


def accepted_kwargs(name: str, kwargs: dict[str, Any] | None = None) -> set[str]:
    """The wrapper keyword arguments optimizer ``name`` takes (empty for the plain base).

    Collected from the ``__init__`` signatures along the factory's class hierarchy and its
    schedule's (the registry entry's, or the one ``kwargs["schedule"]`` names), minus the
    ones the registry entry fixes (e.g. ``gamma`` of ``esam-swp``).
    """
    spec = get_spec(name)
    if spec.factory is None:
        return set()
    names = _init_kwargs(spec.factory)
    sched = schedule_class(name, kwargs)
    if sched is not None:
        names |= _init_kwargs(sched)
    return (names | set(spec.defaults)) - set(spec.fixed)


def create_optimizer(
    params_or_model: nn.Module | Iterable[Any],
    name: str = "sam",
    *,
    base: str | type[Optimizer] = "sgd",
    lr: float = 0.1,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    nesterov: bool | None = None,
    base_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Optimizer:
    """Build ``base`` over the parameters and wrap it as the optimizer ``name``.

    Args:
        params_or_model: a module (its parameters) or an iterable of parameters / groups.
        name: a registered name (``available_optimizers()``).
        base: ``"sgd"``, ``"adamw"``, ``"adam"`` or an Optimizer class.
        lr, momentum, weight_decay, nesterov: the base optimizer's usual settings
            (momentum/nesterov only where the base takes them).
        base_kwargs: any further base-optimizer keyword arguments.
        **kwargs: the wrapper's arguments (``rho``, ``beta``, ``gamma``, ``sparsity``, …);
            unknown ones are an error naming them.
    """
    spec = get_spec(name)
    if isinstance(base, str):
        if base.lower() not in BASES:
            raise ValueError(f"Unknown base optimizer {base!r}; choose from {', '.join(BASES)}")
        base_cls = BASES[base.lower()]
    elif inspect.isclass(base) and issubclass(base, Optimizer):
        base_cls = base
    else:
        raise TypeError(f"base must be a name or an Optimizer class, got {base!r}")
    params = (
        params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model
    )
    bkw: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    accepted = inspect.signature(base_cls.__init__).parameters
    if momentum is not None and "momentum" in accepted:
        bkw["momentum"] = momentum
    if nesterov is not None and "nesterov" in accepted:
        bkw["nesterov"] = nesterov
    bkw.update(base_kwargs or {})
    if spec.factory is None:
        if kwargs:
            raise TypeError(
                f"{spec.name!r} takes no sharpness-aware arguments, got {sorted(kwargs)}"
            )
        return base_cls(params, **bkw)
    allowed = accepted_kwargs(spec.name, kwargs)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"{spec.name!r} got unknown arguments {unknown}; it takes {sorted(allowed)}"
        )
    merged = {**spec.defaults, **kwargs, **spec.fixed}
    sched = schedule_class(spec.name, merged)
    if sched is not None:
        # the schedule's own arguments go to it; shared ones (total_steps, seed) to both
        takes, factory_takes = _init_kwargs(sched), _init_kwargs(spec.factory)
        sched_args = {k: v for k, v in merged.items() if k in takes and k != "schedule"}
        for k in sched_args:
            if k not in factory_takes:
                del merged[k]
        merged["schedule"] = sched(**sched_args)
    return spec.factory(base_cls(params, **bkw), **merged)


register(OptimizerSpec("sgd", "the base optimizer alone (no sharpness-aware step)", None))
register(OptimizerSpec("sam", "SAM (Foret et al., 2021)", SAM, defaults={"rho": 0.05}))
register(
    OptimizerSpec("asam", "ASAM, adaptive SAM (Kwon et al., 2021)", ASAM, defaults={"rho": 0.5})
)
register(
    OptimizerSpec(
        "esam",
        "ESAM: SWP + SDS (Du et al., 2022)",
        ESAM,
        defaults={"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    )
)
register(
    OptimizerSpec(
        "esam-swp",
        "ESAM ablation: SWP alone (gamma = 1)",
        ESAM,
        fixed={"gamma": 1.0},
        defaults={"rho": 0.05, "beta": 0.6},
    )
)
register(
    OptimizerSpec(
        "esam-sds",
        "ESAM ablation: SDS alone (beta = 1)",
        ESAM,
        fixed={"beta": 1.0},
        defaults={"rho": 0.05, "gamma": 0.5},
    )
)
register(
    OptimizerSpec(
        "esam-loss",
        "ESAM with cheap selection by pass-1 loss (no extra forward)",
        ESAM,
        fixed={"selection": "loss"},
        defaults={"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    )
)

_SSAM_DEFAULTS = {"rho": 0.1, "sparsity": 0.5, "update_interval": 390}
register(
    OptimizerSpec(
        "ssam-f",
        "SSAM-F: sparse perturbation by Fisher mask (Mi et al., 2022)",
        SSAM,
        fixed={"mask": "fisher"},
        defaults={**_SSAM_DEFAULTS, "num_samples": 16},
    )
)
register(
    OptimizerSpec(
        "ssam-d",
        "SSAM-D: sparse perturbation by dynamic drop/grow mask (Mi et al., 2022); "
        "needs total_steps",
        SSAM,
        fixed={"mask": "dynamic"},
        defaults={**_SSAM_DEFAULTS, "drop_rate": 0.5},
    )
)
register(
    OptimizerSpec(
        "ssam-f-tensor",
        "SSAM-F extension: whole tensors chosen by Fisher mass, pass 1 skips the others",
        SSAM,
        fixed={"mask": "fisher", "granularity": "tensor"},
        defaults={**_SSAM_DEFAULTS, "num_samples": 16},
    )
)

register(
    OptimizerSpec(
        "sam-interval",
        "SAM every k-th step, plain steps between (composer's SAM interval)",
        SAM,
        defaults={"rho": 0.05, "every": 10},
        schedule=SCHEDULES["interval"],
    )
)
register(
    OptimizerSpec(
        "sam-late",
        "SGD, then SAM for the last part of training (Zhou et al., 2025); needs total_steps",
        SAM,
        defaults={"rho": 0.05, "start": 0.875},
        schedule=SCHEDULES["late"],
    )
)
register(
    OptimizerSpec(
        "esam-late",
        "SGD, then ESAM for the last part of training; needs total_steps",
        ESAM,
        defaults={"rho": 0.05, "beta": 0.6, "gamma": 0.5, "start": 0.875},
        schedule=SCHEDULES["late"],
    )
)
register(
    OptimizerSpec(
        "rst",
        "Randomized SAM: a Bernoulli trial per step, p rising linearly 0 -> 1 (Zhao et al., "
        "2022); needs total_steps",
        SAM,
        defaults={
            "rho": 0.05,
            "probability": 1.0,
            "min_probability": 0.0,
            "probability_schedule": "linear",
        },
        schedule=SCHEDULES["random"],
    )
)
register(
    OptimizerSpec(
        "ae-sam",
        "AE-SAM: SAM when the squared gradient norm is high (Jiang et al., 2023); needs "
        "total_steps",
        SAM,
        defaults={"rho": 0.05, "delta": 0.9, "lambda1": -1.0, "lambda2": 1.0},
        schedule=SCHEDULES["adaptive"],
    )
)
register(
    OptimizerSpec(
        "looksam",
        "LookSAM: SAM every k steps, its orthogonal direction reused between (Liu et al., 2022)",
        LookSAM,
        defaults={"rho": 0.05, "k": 5, "alpha": 0.7},
    )
)
register(
    OptimizerSpec(
        "msam",
        "MSAM: one pass at the point moved against the momentum (Becker et al., 2024)",
        MSAM,
        defaults={"rho": 3.0},
    )
)
register(
    OptimizerSpec(
        "ksam",
        "K-SAM: both passes on the top-k samples by loss (Ni et al., 2022)",
        KSAM,
        defaults={"rho": 0.05, "gamma": 0.5},
    )
)
register(
    OptimizerSpec(
        "esam-mix",
        "ESAM whose update blends the selected samples' perturbed gradient with pass 1's "
        "clean gradient of the whole batch (every sample stays in the update)",
        ESAM,
        fixed={"sds_update": "mix"},
        defaults={"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    )
)
register(
    OptimizerSpec(
        "esam-random",
        "ESAM control: SDS's subset drawn uniformly at random (same size, no extra forward)",
        ESAM,
        fixed={"selection": "random"},
        defaults={"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    )
)
