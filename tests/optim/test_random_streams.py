"""The random streams of an optimizer's policies are independent.

Every registered method is built with every combination of random policies the registry
allows (a ``schedule=``, ESAM's ``selection``, PartialSAM's ``layers="random:F"``, a
reduced-batch ascent), at the default seeds and with one seed given to every seed argument.
No two generators of one optimizer may share an initial seed or a first draw, and a run
resumed from ``state_dict`` continues every stream bit-identically.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import effsam
from effsam.optim.registry import accepted_kwargs, get_spec
from effsam.optim.schedule import SCHEDULES

WRAPPERS = [n for n in effsam.available_optimizers() if get_spec(n).factory is not None]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(i: int, n: int = 12):
    g = torch.Generator().manual_seed(300 + i)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def build(name: str, kwargs: dict):
    model = net()
    return model, effsam.create_optimizer(model, name, lr=0.1, momentum=0.9, **kwargs)


def variants(name: str) -> list[dict]:
    """Every combination of random policies ``name`` accepts, each with the arguments a
    minimal instance needs."""
    spec = get_spec(name)
    accepted = accepted_kwargs(name)
    axes: list[list[dict]] = []
    if "schedule" in accepted:
        axes.append([{}] + [{"schedule": s} for s in SCHEDULES])
    if "selection" in accepted:
        axes.append([{"selection": s} for s in ("sharpness", "loss", "random")])
    if "layers" in accepted:
        axes.append([{}, {"layers": "random:0.5"}])
    if "ascent_fraction" in accepted:
        axes.append([{}, {"ascent_fraction": 0.5, "ascent_noise": 0.1}])
    seeds = [{}]
    one_seed = {k: 3 for k in ("seed", "ascent_seed") if k in accepted}
    if one_seed:
        seeds.append(one_seed)
    axes.append(seeds)
    out = []
    for combo in itertools.product(*axes):
        kwargs = dict(spec.example)
        for part in combo:
            kwargs.update(part)
        if "total_steps" in accepted_kwargs(name, kwargs):
            kwargs.setdefault("total_steps", 20)
        if "update_interval" in accepted:
            kwargs["update_interval"] = 2
        kwargs = {k: v for k, v in kwargs.items() if k in accepted_kwargs(name, kwargs)}
        out.append(kwargs)
    return out


def _builds(name: str, kwargs: dict) -> bool:
    """Whether the combination is one the optimizer accepts (some are refused by design:
    a reduced-batch ascent with AE-SAM's schedule, ...)."""
    try:
        build(name, kwargs)
    except ValueError as err:
        assert "cannot be combined" in str(err) or "not with" in str(err), err
        return False
    return True


CASES = [(name, kwargs) for name in WRAPPERS for kwargs in variants(name) if _builds(name, kwargs)]


def generators(obj) -> list[tuple[str, torch.Generator]]:
    """Every torch.Generator held by the optimizer or by one of its policies (objects of
    effsam's classes, followed through attributes, lists, tuples and dicts)."""
    found: list[tuple[str, torch.Generator]] = []
    seen: set[int] = set()

    def walk(x, path: str) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Generator):
            found.append((path, x))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif type(x).__module__.startswith("effsam") and hasattr(x, "__dict__"):
            for k, v in vars(x).items():
                walk(v, f"{path}.{k}")

    walk(obj, "opt")
    return found


def first_draw(g: torch.Generator) -> float:
    twin = torch.Generator()
    twin.set_state(g.get_state())
    return float(torch.rand((), generator=twin, dtype=torch.float64))


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=lambda v: str(v))
def test_no_two_generators_share_a_stream(name, kwargs):
    _, opt = build(name, kwargs)
    gens = generators(opt)
    seeds = [g.initial_seed() for _, g in gens]
    draws = [first_draw(g) for _, g in gens]
    paths = [p for p, _ in gens]
    assert len(set(seeds)) == len(seeds), dict(zip(paths, seeds))
    assert len(set(draws)) == len(draws), dict(zip(paths, draws))


def test_the_walk_finds_every_policy_generator():
    """Every optimizer owns the ascent slice's generator; ESAM with the random-subset
    control and an RST schedule holds four: SWP, the control, RST and the slice."""
    _, opt = build("esam", {"selection": "random", "schedule": "random", "total_steps": 20})
    assert len(generators(opt)) == 4
    _, opt = build("sam-layers", {"layers": "random:0.5", "ascent_fraction": 0.5})
    assert len(generators(opt)) == 2
    _, opt = build("ssam-d", {"total_steps": 20, "schedule": "random"})
    assert len(generators(opt)) == 3


#: one case per method with at least two generators, or one generator of a policy
RESUME_CASES = [
    (name, kwargs)
    for name, kwargs in CASES
    if kwargs.get("seed", 0) == 3 or kwargs.get("ascent_seed", 0) == 3
    if len(generators(build(name, kwargs)[1])) >= 2
]


def _states(opt) -> list[torch.Tensor]:
    return [g.get_state() for _, g in generators(opt)]


@pytest.mark.parametrize(("name", "kwargs"), RESUME_CASES, ids=lambda v: str(v))
def test_a_resumed_run_continues_every_stream(name, kwargs):
    steps = 6
    model, opt = build(name, kwargs)
    for i in range(steps):
        effsam.sharpness_aware_step(model, opt, batch(i), ce)
    ref = (copy.deepcopy(model.state_dict()), _states(opt))

    model, opt = build(name, kwargs)
    for i in range(3):
        effsam.sharpness_aware_step(model, opt, batch(i), ce)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = build(name, kwargs)
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    for i in range(3, steps):
        effsam.sharpness_aware_step(model, opt, batch(i), ce)
    states = _states(opt)
    assert len(states) == len(ref[1])
    for a, b in zip(states, ref[1]):
        assert torch.equal(a, b)
    for k, v in ref[0].items():
        assert torch.equal(model.state_dict()[k], v), k


def test_resume_cases_cover_the_random_policies():
    names = {name for name, _ in RESUME_CASES}
    assert {"esam", "esam-random", "ssam-d", "sam-layers", "rst-slice"} <= names
