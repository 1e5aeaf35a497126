"""Bodies of the 2-process DDP tests. Each writes what it saw to ``out/rank{r}.pt``; the
test process checks it against expectations computed without DDP."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import effsam
from scale._common import LR, MOMENTUM, RHO, bn_mlp, ce, data, mlp, weights_of

BATCH = 6  # per rank


def local_batch(step: int, rank: int, n: int = BATCH) -> dict:
    """Rank r's batch at a step; sample ids are unique over ranks and steps."""
    return data(seed=1000 * step + rank, n=n, first_id=100 * step + 10 * rank)


def _save(out: str, rank: int, obj: Any) -> None:
    torch.save(obj, Path(out) / f"rank{rank}.pt")


#: The default-run scenarios: one spawn runs them all (starting two interpreters costs
#: more than the scenarios themselves), each writing to its own sub-directory.
SUITE_STEPS = {"sam_modes": 3, "esam_swp_sds": 5, "own_loop": 3, "schedules": 4}


def suite(rank: int, world: int, out: str) -> None:
    for name, fn, args in (
        ("sam_modes", sam_modes, (SUITE_STEPS["sam_modes"],)),
        ("esam_swp_sds", esam_swp_sds, (SUITE_STEPS["esam_swp_sds"],)),
        ("amp_overflow_one_rank", amp_overflow_one_rank, ()),
        ("own_loop", own_loop, (SUITE_STEPS["own_loop"],)),
        ("schedules", schedules, (SUITE_STEPS["schedules"],)),
        ("sync_ascent_missing_grad", sync_ascent_missing_grad, ()),
        # Last: it ends in an (expected) error on every rank.
        ("mismatched_settings", mismatched_settings, ()),
    ):
        sub = Path(out) / name
        sub.mkdir(exist_ok=True)
        fn(rank, world, str(sub), *args)


def sam_modes(rank: int, world: int, out: str, steps: int) -> None:
    """SAM under DDP: m-sharpness (default), sync_ascent, sync_ascent with accumulation.
    Records ε = θ_perturbed − θ seen by pass 2 and the weights after every step."""
    results = {}
    modes = (
        ("local", False, 1),
        ("sync", True, 1),
        ("sync_accum", True, 2),
        ("slice", False, 1),  # reduced-batch ascent: each rank slices its own batch
    )
    for mode, sync, accum in modes:
        model = mlp(0)
        ddp = DDP(model)
        fraction = 0.5 if mode == "slice" else 1.0
        opt = effsam.SAM(
            torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
            rho=RHO,
            ascent_fraction=fraction,
            ascent_seed=11,
        )
        before: dict[str, torch.Tensor] = {}
        eps: list[dict[str, torch.Tensor]] = []
        weights = []

        def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
            # Pass 2 runs at θ + ε: its first call shows this rank's ε.
            if opt.perturbed and torch.is_grad_enabled() and len(eps) == len(weights):
                eps.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
            return ce(m, batch)

        for step in range(steps):
            before.clear()
            before.update(weights_of(model))
            effsam.sharpness_aware_step(
                ddp,
                opt,
                local_batch(step, rank),
                loss_fn,
                sync_ascent=sync,
                accumulation_steps=accum,
            )
            weights.append(weights_of(model))
        results[mode] = {"eps": eps, "weights": weights}
    _save(out, rank, results)


def esam_swp_sds(rank: int, world: int, out: str, steps: int) -> None:
    """ESAM (β = 0.5, γ = 0.5) under DDP with find_unused_parameters=False.
    Records the pass-1 requires_grad pattern (the SWP mask actually applied), the
    per-sample losses SDS compared, the samples pass 2 used and the weights."""
    model = mlp(0)
    ddp = DDP(model, find_unused_parameters=False)
    opt = effsam.ESAM(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        rho=RHO,
        beta=0.5,
        gamma=0.5,
        seed=7,
    )
    log: list[dict[str, Any]] = []

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        losses = ce(m, batch)
        entry = log[-1]
        if not torch.is_grad_enabled():  # SDS's no-grad forward at θ + ε
            entry["after"] = losses.detach().clone()
        elif opt.perturbed:  # pass 2
            entry["pass2_idx"] = batch["idx"].clone()
        else:  # pass 1
            entry["mask"] = [p.requires_grad for p in model.parameters()]
            entry["before"] = losses.detach().clone()
        return losses

    for step in range(steps):
        log.append({"w0": weights_of(model)})
        result = effsam.sharpness_aware_step(ddp, opt, local_batch(step, rank), loss_fn)
        log[-1]["selected"] = result.selected
        log[-1]["weights"] = weights_of(model)
    generator = opt.state_dict()["effsam"]["mask"]["generator"]
    _save(out, rank, {"log": log, "generator": generator})


def schedules(rank: int, world: int, out: str, steps: int) -> None:
    """sam-interval (every 2nd step) and AE-SAM under DDP: the decisions and the weights
    after every step (a plain step's pass 1 must be all-reduced; AE-SAM must decide alike
    on every rank although each rank's pass 1 is local)."""
    results = {}
    for name, kwargs in (
        ("sam-interval", {"every": 2}),
        ("ae-sam", {"total_steps": steps, "lambda1": 3.0, "lambda2": 3.0}),
    ):
        model = mlp(0)
        ddp = DDP(model)
        opt = effsam.create_optimizer(model, name, lr=LR, momentum=MOMENTUM, rho=RHO, **kwargs)
        decisions, weights = [], []
        for step in range(steps):
            res = effsam.sharpness_aware_step(ddp, opt, local_batch(step, rank), ce)
            decisions.append(res.sharpness_aware)
            weights.append(weights_of(model))
        results[name] = {"decisions": decisions, "weights": weights}
    _save(out, rank, results)


def own_loop(rank: int, world: int, out: str, steps: int) -> None:
    """The hand-written DDP loop of docs/scaling.md, and the common wrong one that puts
    only pass 1's backward under no_sync. Records ε and the weights."""
    results = {}
    for recipe in ("docs", "backward_only"):
        net = mlp(0)
        model = DDP(net)
        opt = effsam.SAM(torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO)
        eps, weights = [], []
        for step in range(steps):
            batch = local_batch(step, rank)
            x, y = batch["x"], batch["y"]
            before = weights_of(net)
            if recipe == "docs":
                with model.no_sync(), opt.first_pass():  # forward AND backward inside
                    F.cross_entropy(model(x), y).backward()
            else:
                with opt.first_pass():
                    loss = F.cross_entropy(model(x), y)  # DDP decides here: synced
                    with model.no_sync():
                        loss.backward()
            ok = opt.first_step(zero_grad=True)
            eps.append({n: p.detach() - before[n] for n, p in net.named_parameters()})
            with effsam.preserve_bn_stats(net):
                loss = F.cross_entropy(model(x), y)
                (loss if ok else loss * float("nan")).backward()
            opt.second_step(zero_grad=True)
            weights.append(weights_of(net))
        results[recipe] = {"eps": eps, "weights": weights}
    _save(out, rank, results)


def sync_ascent_missing_grad(rank: int, world: int, out: str) -> None:
    """sync_ascent when one rank's pass 1 gives a tensor no gradient (as a data-dependent
    branch can): the hand-made all-reduce must still line up, that tensor counting as 0."""
    model = mlp(0)
    ddp = DDP(model)
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO)
    before = weights_of(model)
    eps: dict[str, torch.Tensor] = {}

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        if opt.perturbed:
            if not eps:
                eps.update({n: p.detach() - before[n] for n, p in model.named_parameters()})
            return ce(m, batch)
        if rank == 1:  # pass 1 on rank 1: the last bias is left out of the graph
            last = model[-1]
            h = model[:-1](batch["x"])
            return F.cross_entropy(
                F.linear(h, last.weight, last.bias.detach()), batch["y"], reduction="none"
            )
        return ce(m, batch)

    effsam.sharpness_aware_step(ddp, opt, local_batch(0, rank), loss_fn, sync_ascent=True)
    _save(out, rank, {"eps": eps, "weights": weights_of(model)})


def mismatched_settings(rank: int, world: int, out: str) -> None:
    """Rank 1 builds ESAM with another γ, then with another seed, then with the same seed
    but a mask generator that has drawn once (a rank resumed from another checkpoint):
    every rank must raise."""
    messages: dict[str, str | None] = {}
    for case, other in (("gamma", 0.7), ("seed", 1), ("generator", None)):
        model = mlp(0)
        ddp = DDP(model)
        kwargs: dict[str, Any] = {"beta": 0.5, "gamma": 0.5, "seed": 0}
        if rank == 1 and other is not None:
            kwargs[case] = other
        opt = effsam.ESAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, **kwargs)
        if rank == 1 and case == "generator":
            torch.rand(1, generator=opt.mask.generator)
        w0 = weights_of(model)
        try:
            effsam.sharpness_aware_step(ddp, opt, local_batch(0, rank), ce)
            messages[case] = None
        except RuntimeError as e:
            messages[case] = str(e)
        changed = any(not torch.equal(p, w0[n]) for n, p in weights_of(model).items())
        messages[case + "_weights_changed"] = str(changed)
    _save(out, rank, messages)


def amp_overflow_one_rank(rank: int, world: int, out: str) -> None:
    """m-sharpness with a GradScaler (float64, no autocast: scaling is exact). Step 1:
    only rank 0 overflows, in pass 1. Step 2: only rank 1 overflows, in pass 2. Steps 0
    and 3 are normal. No rank may hang; every rank must skip steps 1 and 2."""
    model = mlp(0)
    ddp = DDP(model)
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), rho=RHO)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    inject = {"step": -1}

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        losses = ce(m, batch)
        bad_pass1 = inject["step"] == 1 and rank == 0 and not opt.perturbed
        bad_pass2 = inject["step"] == 2 and rank == 1 and opt.perturbed
        return losses * float("inf") if bad_pass1 or bad_pass2 else losses

    log = []
    for step in range(4):
        inject["step"] = step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = effsam.sharpness_aware_step(
                ddp, opt, local_batch(step, rank), loss_fn, scaler=scaler
            )
        log.append(
            {"skipped": result.skipped, "scale": scaler.get_scale(), "weights": weights_of(model)}
        )
    _save(out, rank, {"log": log, "steps": opt.steps, "skipped_steps": opt.skipped_steps})


def everything_with_bn(rank: int, world: int, out: str, steps: int) -> None:
    """ESAM + BatchNorm + accumulation + clipping + a GradScaler under DDP, both ascent
    modes and several DDP options. Records the weights (BN buffers are left out: DDP
    broadcasts rank 0's at each forward, so between steps they legitimately differ)."""
    results: dict[Any, Any] = {}
    options: dict[str, dict[str, bool]] = {
        "default": {},
        "bucket_view": {"gradient_as_bucket_view": True},
        "find_unused": {"find_unused_parameters": True},
    }
    for name, kwargs in options.items():
        for sync in (False, True):
            model = bn_mlp(0)
            ddp = DDP(model, **kwargs)
            opt = effsam.ESAM(
                torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                rho=RHO,
                beta=0.6,
                gamma=0.5,
                seed=3,
            )
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
            selected = []
            for step in range(steps):
                result = effsam.sharpness_aware_step(
                    ddp,
                    opt,
                    local_batch(step, rank, n=12),
                    ce,
                    scaler=scaler,
                    accumulation_steps=2,
                    clip_grad_norm=0.5,
                    sync_ascent=sync,
                )
                selected.append(result.selected)
            results[(name, sync)] = {"weights": weights_of(model), "selected": selected}
    # static_graph cannot work with a no_sync pass 1: a clear error, before any collective.
    model = mlp(0)
    opt = effsam.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    try:
        effsam.sharpness_aware_step(DDP(model, static_graph=True), opt, local_batch(0, rank), ce)
        results["static_graph"] = None
    except ValueError as e:
        results["static_graph"] = str(e)
    _save(out, rank, results)
