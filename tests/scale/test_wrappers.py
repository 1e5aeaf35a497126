"""The DDP/compile wrapper chain walked once (effsam.parallel.wrapper_chain), and what the
step remembers per optimizer without writing on it (the compile warning, the DDP check)."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import effsam
import effsam.parallel as parallel
from effsam.parallel import (
    ObjectMemory,
    check_ddp_settings,
    find_ddp,
    is_compiled,
    unwrap_model,
    wrapper_chain,
)
from scale._common import LR, RHO, ce, data, mlp


def _fake_ddp(module: nn.Module) -> DistributedDataParallel:
    """A DDP instance around ``module`` as the walker sees it (no process group needed)."""
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = module
    return ddp


# ------------------------------------------------------------------ the walker
def test_the_walker_goes_through_compile_and_ddp_outermost_first() -> None:
    model = mlp(0)
    assert list(wrapper_chain(model)) == [model]
    assert unwrap_model(model) is model and find_ddp(model) is None and not is_compiled(model)

    ddp = _fake_ddp(model)
    compiled = torch.compile(ddp, backend="eager")  # a wrapper: nothing compiles until called
    chain = list(wrapper_chain(compiled))
    assert chain == [compiled, ddp, model]
    assert unwrap_model(compiled) is model and find_ddp(compiled) is ddp
    assert is_compiled(compiled) and not is_compiled(ddp)

    inner = torch.compile(model, backend="eager")
    assert list(wrapper_chain(_fake_ddp(inner)))[1:] == [inner, model]
    assert is_compiled(_fake_ddp(inner))


def test_the_walker_sees_an_in_place_compile() -> None:
    model = mlp(0)
    model.compile(backend="eager")  # model.compile(): no wrapper, the module itself
    assert list(wrapper_chain(model)) == [model] and is_compiled(model)
    assert is_compiled(_fake_ddp(model)) and unwrap_model(_fake_ddp(model)) is model


# ------------------------------------------------------------------ memory per optimizer
def test_object_memory_holds_objects_weakly_and_writes_nothing_on_them() -> None:
    memory = ObjectMemory()
    opt = torch.optim.SGD(mlp(0).parameters(), lr=LR)
    before = dict(vars(opt))
    assert opt not in memory
    memory.add(opt)
    assert opt in memory and vars(opt).keys() == before.keys()
    other = torch.optim.SGD(mlp(1).parameters(), lr=LR)
    assert other not in memory
    del opt
    gc.collect()
    assert len(memory._objects) == 0  # a collected optimizer is forgotten
    for odd in (object(), [1, 2]):  # no weak reference; unhashable
        memory.add(odd)
        assert odd not in memory  # never remembered, no error


def test_the_ddp_check_runs_once_per_optimizer_and_writes_nothing(monkeypatch) -> None:
    gathers: list[dict[str, str]] = []

    def all_gather_object(out: list[Any], obj: dict[str, str]) -> None:
        gathers.append(obj)
        out[:] = [obj, dict(obj)]

    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(parallel.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(parallel, "_DDP_CHECKED", ObjectMemory())
    plain = torch.optim.SGD(mlp(0).parameters(), lr=LR)
    sam = effsam.SAM(torch.optim.SGD(mlp(1).parameters(), lr=LR), rho=RHO)
    names = {opt: set(vars(opt)) for opt in (plain, sam, sam.base)}
    for _ in range(3):
        check_ddp_settings(plain, {"rho": "0.1"})
        check_ddp_settings(sam, {"rho": "0.2"})
    assert gathers == [{"rho": "0.1"}, {"rho": "0.2"}]  # once each
    assert {opt: set(vars(opt)) for opt in names} == names  # no attribute added

    def disagreeing(out: list[Any], obj: dict[str, str]) -> None:
        gathers.append(obj)
        out[:] = [obj, {"rho": "9"}]

    monkeypatch.setattr(parallel.dist, "all_gather_object", disagreeing)
    third = torch.optim.SGD(mlp(2).parameters(), lr=LR)
    for _ in range(2):  # a failed check is not remembered: it fails again
        with pytest.raises(RuntimeError, match="disagree on rho"):
            check_ddp_settings(third, {"rho": "0.1"})
    assert len(gathers) == 4


def test_the_compile_warning_fires_once_per_optimizer_and_writes_nothing() -> None:
    torch._dynamo.reset()
    try:
        model = mlp(0)
        net = torch.compile(model, backend="eager")
        opts = [
            effsam.ESAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, beta=0.5, seed=s)
            for s in (4, 5)
        ]
        counts = []
        for opt in opts:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(3):
                    effsam.sharpness_aware_step(net, opt, data(seed=step, n=8), ce)
            ours = [w for w in caught if "effsam: SWP" in str(w.message)]
            counts.append(len(ours))
        assert counts == [1, 1]  # once for each optimizer
        for opt in opts:  # remembered without writing on the optimizer or its base
            assert "_effsam_compile_warned" not in vars(opt)
            assert not [name for name in vars(opt.base) if name.startswith("_effsam")]
    finally:
        torch._dynamo.reset()
