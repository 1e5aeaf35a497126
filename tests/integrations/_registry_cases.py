"""Every optimizer of effsam's registry, built for a few-step framework run.

Each entry is built with ``create_optimizer(model, name, ...)`` with settings that make a
short run take both kinds of step (sharpness-aware and plain) where the method has them.
``outcome(opt)`` says what a framework that runs the step through its own loss closure
must do with it: run it (``"run"``; ``"run+loss_fn"`` when its mask is computed from
per-sample losses) or refuse it with an error matching the returned pattern.
"""

from __future__ import annotations

from effsam.optim.registry import REGISTRY, accepted_kwargs, create_optimizer

LR, MOMENTUM, RHO = 0.1, 0.9, 0.2

#: per-name settings for a run of 4 steps (every other step sharpness-aware, etc.)
OVERRIDES = {
    "sam-interval": {"every": 2},
    "sam-late": {"start": 0.5},
    "esam-late": {"start": 0.5},
    "late-slice": {"start": 0.5},
    "looksam": {"k": 2},
    "looksam-rel": {"k": 2},
    "sam-stale": {"refresh_every": 2},
    "rst-stale": {"refresh_every": 2},
    "ssam-d": {"update_interval": 2},
    "ssam-f": {"update_interval": 2},
    "ssam-f-tensor": {"update_interval": 2},
    "msam": {"rho": 1.0},
    "ae-sam": {"lambda1": 0.0, "lambda2": 0.0, "delta": 0.5},
    "msam-rel": {},
}


def names() -> list[str]:
    return [n for n, spec in REGISTRY.items() if spec.factory is not None]


def build(name: str, model, steps: int):
    kwargs = dict(REGISTRY[name].example)
    accepted = accepted_kwargs(name, kwargs)
    if "total_steps" in accepted:
        kwargs["total_steps"] = steps
    if "rho" in accepted:
        kwargs["rho"] = RHO
    kwargs.update(OVERRIDES.get(name, {}))
    return create_optimizer(model, name, lr=LR, momentum=MOMENTUM, **kwargs)


def outcome(opt) -> str:
    if opt.selection.needs_per_sample:
        return "sample selection"
    if opt.ascent_slice.slices:
        return "ascent_fraction"
    if opt.mask.needs_data:
        return "run+loss_fn"
    return "run"
