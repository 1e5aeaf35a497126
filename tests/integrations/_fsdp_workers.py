"""Worker functions for the FSDP tests (spawned processes import them by module name).

Every rank trains the same float64 model sharded with FSDP2 ``fully_shard`` (or wrapped
in FSDP1) on its own batch; rank 0 saves the full weights after each step. The
reference (one process, unsharded, the concatenation of both ranks' batches) is computed
by the test.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import effsam

D, H, C, B, STEPS = 6, 8, 3, 6, 3
LR, MOM = 0.1, 0.9


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C)
    ).double()


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randint(
        0, C, (B,), generator=g
    )


def make_opt(kind: str, params) -> effsam.SharpnessAware:
    base = torch.optim.SGD(params, lr=LR, momentum=MOM)
    if kind == "sam":
        return effsam.SAM(base, rho=0.1)
    if kind == "asam":
        return effsam.ASAM(base, rho=0.5)
    if kind == "esam_swp":
        return effsam.ESAM(base, rho=0.1, beta=0.5, gamma=1.0, seed=7)
    if kind == "ssam_d":
        return effsam.SSAM(base, rho=0.1, mask="dynamic", total_steps=4, update_interval=2)
    if kind == "ssam_f":
        return effsam.SSAM(base, rho=0.1, mask="fisher", num_samples=4, update_interval=2)
    raise ValueError(kind)


def per_sample(model: nn.Module, b) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sharded(seed: int = 0) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = net()
    if seed:
        torch.manual_seed(seed)
        for p in model.parameters():
            p.data.normal_()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _dcp_round_trip(rank: int) -> dict[str, object] | str:
    """ESAM-SWP trained 2 steps, its model and optimizer state taken and loaded into a
    fresh sharded model and optimizer through torch.distributed.checkpoint's state-dict
    API; then one more step on both."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    try:
        model = _sharded()
        opt = effsam.ESAM(
            torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM), rho=0.1, beta=0.5,
            gamma=1.0, seed=7,
        )  # fmt: skip
        for step in range(2):
            effsam.sharpness_aware_step(model, opt, batch(step, rank), per_sample)
        # copies: the state dicts hold the live tensors (momentum buffers)
        msd = copy.deepcopy(get_model_state_dict(model))
        osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
        has_entry = "effsam" in osd["param_groups"][0]
        model2 = _sharded(seed=3)
        opt2 = effsam.ESAM(
            torch.optim.SGD(model2.parameters(), lr=LR, momentum=MOM), rho=0.1, beta=0.5,
            gamma=1.0, seed=99,
        )  # fmt: skip
        set_model_state_dict(model2, msd)
        set_optimizer_state_dict(model2, opt2, osd)
        for m, o in ((model, opt), (model2, opt2)):
            effsam.sharpness_aware_step(m, o, batch(2, rank), per_sample)
        return {
            "has_entry": has_entry,
            "steps": (opt.steps, opt2.steps),
            "weights": [
                [_full(p.detach()).clone() for p in m.parameters()] for m in (model, model2)
            ],
        }
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}\n{traceback.format_exc()}"


def _run(kind: str, drive: str, rank: int) -> list[list[torch.Tensor]] | str:
    model = _sharded()
    opt = make_opt(kind, model.parameters())
    log = []
    try:
        for step in range(STEPS):
            b = batch(step, rank)
            if drive == "closure":

                def closure():
                    opt.zero_grad()
                    loss = per_sample(model, b).mean()
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                effsam.sharpness_aware_step(model, opt, b, per_sample)
            log.append([_full(p.detach()).clone() for p in model.parameters()])
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return log


def suite(rank: int, world: int, out: str, cases: list[tuple[str, str]]) -> None:
    """FSDP2 runs of every case, then the FSDP1 refusals; one spawn for all."""
    results = {}
    for kind, drive in cases:
        results[f"{kind}/{drive}"] = _run(kind, drive, rank)
    results["dcp"] = _dcp_round_trip(rank)
    results["fsdp1"] = _fsdp1(rank)
    if rank == 0:
        torch.save(results, Path(out) / "fsdp.pt")


def _fsdp1(rank: int) -> dict[bool, str]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    results = {}
    for orig in (False, True):
        model = FSDP(net(), device_id=torch.device("cpu"), use_orig_params=orig)
        opt = make_opt("sam", model.parameters())
        b = batch(0, rank)
        try:
            effsam.sharpness_aware_step(model, opt, b, per_sample)
            results[orig] = "ran"
        except Exception as e:  # noqa: BLE001
            results[orig] = f"{type(e).__name__}: {e}"
            if "FSDP1" not in str(e):
                results[orig] += "\n" + traceback.format_exc()
    return results
