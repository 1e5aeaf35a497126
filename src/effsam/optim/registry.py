"""Name → optimizer spec table and one factory.

``create_optimizer(model_or_params, "esam", lr=0.05, momentum=0.9, weight_decay=1e-3,
rho=0.05, beta=0.6, gamma=0.5)`` builds the base optimizer and wraps it. ``"sgd"`` (and
any base name used as the optimizer name) returns the plain base optimizer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .cheap import PartialSAM, StaleSAM
from .ksam import KSAM
from .looksam import LookSAM
from .msam import MSAM
from .schedule import SCHEDULES, EveryStep
from .ssam import SSAM
from .variants import ASAM, ESAM, ESAM_DEFAULTS, SAM

BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}


#: Arguments of the :class:`SharpnessAware` skeleton every wrapper passes through.
COMMON_ARGS = frozenset({"foreach", "check_finite", "eps_denominator"})
#: the reduced-batch ascent's arguments (SharpnessAware takes them), declared by the entries
#: whose pass 1 is an ascent alone (no sample selection, no decision from pass 1's gradient)
SLICE_ARGS = frozenset({"ascent_fraction", "ascent_noise", "ascent_seed"})


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: a wrapper factory, the keyword arguments it takes, and
    fixed keyword arguments.

    ``args`` declares the wrapper arguments a user may pass (besides :data:`COMMON_ARGS`,
    which every wrapper takes); anything else is rejected by :func:`create_optimizer`
    before an optimizer is built, with an error naming it.
    """

    name: str
    description: str
    factory: Callable[..., Optimizer] | None  # None: the base optimizer alone
    fixed: dict[str, Any] = field(default_factory=dict)
    #: keyword defaults shown in help and used by the toolkit (paper settings)
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the wrapper arguments this entry takes (plus COMMON_ARGS)
    args: frozenset[str] = frozenset()
    #: arguments a minimal working instance needs beyond the defaults (e.g. SSAM-D's
    #: total_steps): for documentation, and the contract test builds every entry with them
    example: dict[str, Any] = field(default_factory=dict)
    #: the schedule policy this entry builds from the schedule's own arguments (None:
    #: every step is sharpness-aware, unless a ``schedule="name"`` argument asks otherwise)
    schedule: type[EveryStep] | None = None
    #: whether a ``schedule="name"`` argument (a name of SCHEDULES, whose own arguments are
    #: then accepted too) may put a schedule on this entry — e.g.
    #: ``create_optimizer(model, "ssam-f", schedule="interval", every=5)``. Not for an entry
    #: with its own schedule, nor for LookSAM (its refresh interval is its schedule).
    schedulable: bool = True
    #: the factory needs the model (``model=``), e.g. to find its normalisation layers:
    #: :func:`create_optimizer` passes it, and refuses a bare parameter list
    needs_model: bool = False


REGISTRY: dict[str, OptimizerSpec] = {}


def _signature_names(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword names ``factory`` takes; None when it has ``**kwargs`` (anything goes)."""
    names: set[str] = set()
    for p in inspect.signature(factory).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.add(p.name)
    return names


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry (names are lower-case, unique).

    Its declared ``args``, ``defaults`` and ``fixed`` must not overlap wrongly: a default
    must be a declared argument, and a fixed one must not be."""
    if spec.name in REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    if spec.factory is not None:
        declared = set(spec.args) | schedule_args(spec.schedule)
        bad_defaults = sorted((set(spec.defaults) | set(spec.example)) - declared)
        if bad_defaults:
            raise ValueError(
                f"{spec.name!r}: defaults/example {bad_defaults} are not declared in args"
            )
        clash = sorted(set(spec.fixed) & (set(spec.args) | COMMON_ARGS))
        if clash:
            raise ValueError(f"{spec.name!r}: {clash} are both fixed and declared in args")
        takes = _signature_names(spec.factory)
        if takes is not None:
            missing = sorted((set(spec.args) | set(spec.fixed)) - takes)
            if missing:
                raise ValueError(f"{spec.name!r}: the factory does not take {missing}")
    elif spec.args or spec.fixed or spec.defaults:
        raise ValueError(f"{spec.name!r}: a plain base optimizer takes no wrapper arguments")
    REGISTRY[spec.name] = spec
    return spec


def available_optimizers() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    if not isinstance(name, str):
        raise TypeError(
            f"the optimizer name must be a string, got {type(name).__name__} {name!r:.60}; "
            f"choose from {', '.join(REGISTRY)}"
        )
    key = name.lower()
    if key not in REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[key]


def schedule_args(schedule: type[EveryStep] | None) -> set[str]:
    """The keyword arguments a schedule class takes."""
    if schedule is None:
        return set()
    return (_signature_names(schedule.__init__) or set()) - {"self"}


def schedule_class(name: str, kwargs: dict[str, Any] | None = None) -> type[EveryStep] | None:
    """The schedule optimizer ``name`` builds: the one a ``schedule="late"`` (etc.)
    argument names, else its registry entry's (None: every step)."""
    spec = get_spec(name)
    chosen = (kwargs or {}).get("schedule")
    if isinstance(chosen, str) and _takes_schedule(spec):
        if chosen not in SCHEDULES:
            raise ValueError(f"Unknown schedule {chosen!r}; choose from {', '.join(SCHEDULES)}")
        return SCHEDULES[chosen]
    return spec.schedule


def accepted_kwargs(name: str, kwargs: dict[str, Any] | None = None) -> set[str]:
    """The wrapper keyword arguments optimizer ``name`` takes (empty for the plain base):
    its declared ``args``, :data:`COMMON_ARGS` and its schedule's arguments (the entry's,
    or those of the schedule ``kwargs["schedule"]`` names)."""
    spec = get_spec(name)
    if spec.factory is None:
        return set()
    names = set(spec.args) | set(COMMON_ARGS) | schedule_args(schedule_class(name, kwargs))
    return names | ({"schedule"} if _takes_schedule(spec) else set())


def _takes_schedule(spec: OptimizerSpec) -> bool:
    return spec.factory is not None and spec.schedulable and spec.schedule is None


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
    for key, value in {**bkw, **kwargs}.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Invalid {key}: {value!r} for {spec.name!r} (must be finite)")
    params = _trainable_checked(params, spec.name)
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
    if spec.needs_model:
        if not isinstance(params_or_model, nn.Module):
            raise TypeError(
                f"{spec.name!r} needs the model (it chooses the tensors to perturb from its "
                "layers): pass the model to create_optimizer, not its parameters"
            )
        merged["model"] = params_or_model
    sched = schedule_class(spec.name, merged)
    if sched is not None:
        # the schedule's own arguments go to it; shared ones (total_steps, seed) to both
        takes = schedule_args(sched)
        sched_args = {k: v for k, v in merged.items() if k in takes}
        for k in sched_args:
            if k not in spec.args:
                del merged[k]
        merged["schedule"] = sched(**sched_args)
    return spec.factory(base_cls(params, **bkw), **merged)


def _trainable_checked(params: Iterable[Any], name: str) -> list[Any]:
    """The parameters (or param groups) as a list; none of them trainable is an error."""
    params = list(params)
    tensors = [
        p
        for item in params
        for p in (item["params"] if isinstance(item, dict) else [item])
        if isinstance(p, torch.Tensor)
    ]
    if tensors and not any(p.requires_grad for p in tensors):
        raise ValueError(
            f"{name!r}: none of the {len(tensors)} parameters is trainable (every one has "
            "requires_grad=False): there is nothing to train"
        )
    return params


_SAM_ARGS = frozenset({"rho", "adaptive", "eta"}) | SLICE_ARGS
_ESAM_ARGS = frozenset(
    {"rho", "beta", "gamma", "seed", "selection", "swp_scaling", "adaptive", "eta", "sds_bn"}
)
_SSAM_ARGS = frozenset({"rho", "sparsity", "update_interval", "normalisation"})
# (SSAM-F draws nothing at random: no seed)
_SSAM_F_ARGS = _SSAM_ARGS | {"num_samples", "fisher_chunk_size", "fisher_mode", "granularity"}
# seed: SSAM-D's generator (initial mask, random regrowth)
_SSAM_D_ARGS = _SSAM_ARGS | {"total_steps", "drop_rate", "grow", "seed"}

register(OptimizerSpec("sgd", "the base optimizer alone (no sharpness-aware step)", None))
register(
    OptimizerSpec("sam", "SAM (Foret et al., 2021)", SAM, defaults={"rho": 0.05}, args=_SAM_ARGS)
)
register(
    OptimizerSpec(
        "asam",
        "ASAM, adaptive SAM (Kwon et al., 2021)",
        ASAM,
        defaults={"rho": 0.5},
        args=frozenset({"rho", "eta"}) | SLICE_ARGS,
    )
)
register(
    OptimizerSpec(
        "esam",
        "ESAM: SWP + SDS (Du et al., 2022)",
        ESAM,
        defaults=dict(ESAM_DEFAULTS),
        args=_ESAM_ARGS,
    )
)
register(
    OptimizerSpec(
        "esam-swp",
        "ESAM ablation: SWP alone (gamma = 1)",
        ESAM,
        fixed={"gamma": 1.0},
        defaults={"rho": ESAM_DEFAULTS["rho"], "beta": ESAM_DEFAULTS["beta"]},
        args=(_ESAM_ARGS | SLICE_ARGS) - {"gamma", "selection"},
    )
)
register(
    OptimizerSpec(
        "esam-sds",
        "ESAM ablation: SDS alone (beta = 1)",
        ESAM,
        fixed={"beta": 1.0},
        defaults={"rho": ESAM_DEFAULTS["rho"], "gamma": ESAM_DEFAULTS["gamma"]},
        args=_ESAM_ARGS - {"beta", "seed", "swp_scaling"},
    )
)
register(
    OptimizerSpec(
        "esam-loss",
        "ESAM with cheap selection by pass-1 loss (no extra forward)",
        ESAM,
        fixed={"selection": "loss"},
        defaults=dict(ESAM_DEFAULTS),
        args=_ESAM_ARGS - {"selection"},
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
        args=_SSAM_F_ARGS,
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
        args=_SSAM_D_ARGS,
        example={"total_steps": 10},
    )
)
register(
    OptimizerSpec(
        "ssam-f-tensor",
        "SSAM-F extension: whole tensors chosen by Fisher mass, pass 1 skips the others",
        SSAM,
        fixed={"mask": "fisher", "granularity": "tensor"},
        defaults={**_SSAM_DEFAULTS, "num_samples": 16},
        args=_SSAM_F_ARGS - {"granularity"},
    )
)

_LATE = {"start": 0.875}
register(
    OptimizerSpec(
        "sam-interval",
        "SAM every k-th step, plain steps between (composer's SAM interval)",
        SAM,
        defaults={"rho": 0.05, "every": 10},
        args=_SAM_ARGS,
        schedule=SCHEDULES["interval"],
    )
)
register(
    OptimizerSpec(
        "sam-late",
        "SGD, then SAM for the last part of training (Zhou et al., 2025); needs total_steps",
        SAM,
        defaults={"rho": 0.05, **_LATE},
        args=_SAM_ARGS,
        example={"total_steps": 10},
        schedule=SCHEDULES["late"],
    )
)
register(
    OptimizerSpec(
        "esam-late",
        "SGD, then ESAM for the last part of training; needs total_steps",
        ESAM,
        defaults={**ESAM_DEFAULTS, **_LATE},
        args=_ESAM_ARGS,
        example={"total_steps": 10},
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
        args=_SAM_ARGS,
        example={"total_steps": 10},
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
        args=_SAM_ARGS - SLICE_ARGS,  # decides from pass 1: a plain step needs the batch
        example={"total_steps": 10},
        schedule=SCHEDULES["adaptive"],
    )
)
_LOOKSAM_ARGS = (_SAM_ARGS - SLICE_ARGS) | {"k", "alpha", "alpha_mode", "ratio_ema"}
register(
    OptimizerSpec(
        "looksam",
        "LookSAM: SAM every k steps, its orthogonal direction reused between (Liu et al., 2022)",
        LookSAM,
        defaults={"rho": 0.05, "k": 5, "alpha": 0.7},
        args=_LOOKSAM_ARGS,
        schedulable=False,
    )
)
# alpha 1 in the relative mode: the reused push is exactly the share of ‖g‖ that SAM's own
# orthogonal correction had at the last refresh (the paper's intent, at the model's scale)
register(
    OptimizerSpec(
        "looksam-rel",
        "LookSAM whose reused push is alpha times SAM's own correction ‖g_v‖/‖g‖ measured "
        "at the last refresh (alpha 1: SAM's)",
        LookSAM,
        defaults={"rho": 0.05, "k": 5, "alpha": 1.0, "alpha_mode": "relative"},
        args=_LOOKSAM_ARGS,
        schedulable=False,
    )
)
# bn_recompute: the MSAM authors recompute BN statistics at θ after training, every model
_MSAM_ARGS = frozenset({"rho", "rho_mode", "bn_recompute", "bn_recompute_batches"})
register(
    OptimizerSpec(
        "msam",
        "MSAM: one pass at the point moved against the momentum (Becker et al., 2024)",
        MSAM,
        defaults={"rho": 3.0, "bn_recompute": True},
        args=_MSAM_ARGS,
    )
)
# rho 0.041: the authors' rho = 3 over the norm of their CIFAR-100 WRN-16-4 at
# initialisation (73.24), the share of ‖θ‖ their runs perturbed by
register(
    OptimizerSpec(
        "msam-rel",
        "MSAM with a relative radius: the point moved by rho·‖θ‖ against the momentum "
        "(rho 0.041, the authors' share)",
        MSAM,
        defaults={"rho": 0.041, "rho_mode": "relative", "bn_recompute": True},
        args=_MSAM_ARGS,
    )
)
register(
    OptimizerSpec(
        "ksam",
        "K-SAM: both passes on the top-k samples by loss (Ni et al., 2022)",
        KSAM,
        defaults={"rho": 0.05, "gamma": 0.5},
        args=(_SAM_ARGS - SLICE_ARGS) | {"gamma"},
    )
)
register(
    OptimizerSpec(
        "esam-mix",
        "ESAM whose update blends the selected samples' perturbed gradient with pass 1's "
        "clean gradient of the whole batch (every sample stays in the update)",
        ESAM,
        fixed={"sds_update": "mix"},
        defaults=dict(ESAM_DEFAULTS),
        args=_ESAM_ARGS - {"selection"},
    )
)
register(
    OptimizerSpec(
        "esam-wholebatch",
        "ESAM control at SAM's cost: pass 2 forwards the whole batch at θ + ε and "
        "back-propagates only SDS's top-sharpness samples (BN statistics of every sample)",
        ESAM,
        fixed={"sds_pass2": "batch"},
        defaults=dict(ESAM_DEFAULTS),
        args=_ESAM_ARGS - {"sds_bn"},  # its pass 2 already has the whole batch's statistics
    )
)
register(
    OptimizerSpec(
        "esam-random",
        "ESAM control: SDS's subset drawn uniformly at random (same size, no extra forward)",
        ESAM,
        fixed={"selection": "random"},
        defaults=dict(ESAM_DEFAULTS),
        args=_ESAM_ARGS - {"selection"},
    )
)
register(
    OptimizerSpec(
        "esam-bn",
        "ESAM with its BatchNorm repair: pass 2 on SDS's subset, normalised with the whole "
        "batch's statistics from the selection forward (no extra pass)",
        ESAM,
        fixed={"sds_bn": "batch"},
        defaults=dict(ESAM_DEFAULTS),
        args=_ESAM_ARGS - {"sds_bn"},
    )
)

# The cheap ascents (effsam.optim.cheap, effsam.optim.slicing). Their defaults follow one
# rule, from the pass costs (a pass = forward + backward, the backward ≈ 2 forwards): the
# cheapest ascent the method allows that still leaves SAM's two-pass structure at
# ≥ 1.5x SAM's speed by the cost model — a slice of f = 1/4 (1.6x), a true ascent every
# k = 3 steps (1.5x) — never chosen by an accuracy. ρ stays the protocol's: each keeps
# ‖ε‖ = ρ, normalised over what it perturbs.
_SLICE = {"ascent_fraction": 0.25}
register(
    OptimizerSpec(
        "sam-slice",
        "SAM whose ascent (pass 1) runs on a random slice of the batch (default 1/4), the "
        "descent on the whole batch; optional ascent noise (Wei et al., 2025)",
        SAM,
        defaults={"rho": 0.05, **_SLICE},
        args=_SAM_ARGS,
    )
)
_PARTIAL_ARGS = _SAM_ARGS | {"layers", "seed"}
register(
    OptimizerSpec(
        "sam-on",
        "SAM-ON: the ascent perturbs only the normalisation layers' affine parameters, "
        "pass 1 computes only their weight gradients (Mueller et al., 2023)",
        PartialSAM,
        fixed={"layers": "norm"},
        defaults={"rho": 0.05},
        args=_PARTIAL_ARGS - {"layers"},
        needs_model=True,
    )
)
register(
    OptimizerSpec(
        "sam-layers",
        "SAM whose ascent perturbs only some layers (default: the last half), pass 1's "
        "backward stopping at the earliest of them",
        PartialSAM,
        defaults={"rho": 0.05, "layers": "last:0.5"},
        args=_PARTIAL_ARGS,
        needs_model=True,
    )
)
register(
    OptimizerSpec(
        "sam-stale",
        "Stale ascent: ε from the previous step's update gradient (one pass), a true SAM "
        "step every k-th step (default 3): 1 + 1/k passes",
        StaleSAM,
        defaults={"rho": 0.05, "refresh_every": 3},
        args=frozenset({"rho", "refresh_every"}) | SLICE_ARGS,
    )
)
_RST = {"probability": 1.0, "min_probability": 0.0, "probability_schedule": "linear"}
register(
    OptimizerSpec(
        "rst-slice",
        "RST with the reduced-batch ascent on its sharpness-aware steps; needs total_steps",
        SAM,
        defaults={"rho": 0.05, **_RST, **_SLICE},
        args=_SAM_ARGS,
        example={"total_steps": 10},
        schedule=SCHEDULES["random"],
    )
)
register(
    OptimizerSpec(
        "rst-on",
        "RST with SAM-ON's normalisation-only ascent on its sharpness-aware steps; needs "
        "total_steps",
        PartialSAM,
        fixed={"layers": "norm"},
        defaults={"rho": 0.05, **_RST},
        args=_PARTIAL_ARGS - {"layers"},
        example={"total_steps": 10},
        schedule=SCHEDULES["random"],
        needs_model=True,
    )
)
register(
    OptimizerSpec(
        "rst-stale",
        "RST with the stale ascent on its sharpness-aware steps; needs total_steps",
        StaleSAM,
        defaults={"rho": 0.05, "refresh_every": 3, **_RST},
        args=frozenset({"rho", "refresh_every"}) | SLICE_ARGS,
        example={"total_steps": 10},
        schedule=SCHEDULES["random"],
    )
)
register(
    OptimizerSpec(
        "late-slice",
        "SGD, then SAM with the reduced-batch ascent for the last part of training; needs "
        "total_steps",
        SAM,
        defaults={"rho": 0.05, **_LATE, **_SLICE},
        args=_SAM_ARGS,
        example={"total_steps": 10},
        schedule=SCHEDULES["late"],
    )
)

# ---------------------------------------------------------------- Flat-LoRA (LoRA models)
# σ 0.05: the authors' setting; σ rises from 0 on a cosine over total_steps, as in the paper.
# It needs the model (its LoRA layers); on a model without LoRA layers it perturbs every
# trainable nn.Linear / Conv1D weight. Its σ schedule is its own (not schedulable).
from .flatlora import FlatLoRA  # noqa: E402

register(
    OptimizerSpec(
        "flat-lora",
        "Flat-LoRA: a seeded Gaussian perturbation of each LoRA layer's merged weight "
        "W + s·BA, scaled per row by its norm, one pass (Li et al., 2025); needs total_steps",
        FlatLoRA,
        defaults={"rho": 0.05},
        args=frozenset({"rho", "total_steps", "seed"}),
        example={"total_steps": 10},
        schedulable=False,
        needs_model=True,
    )
)
