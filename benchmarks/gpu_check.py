"""GPU check: every CUDA path the library claims, against a CPU float64 reference, and the
paper-parity throughput, in one process.

    python benchmarks/gpu_check.py --device cuda            # one data-centre GPU, < 8 minutes
    python benchmarks/gpu_check.py --device cpu --smoke     # the same code on a CPU, tiny sizes

Checks (each a PASS / FAIL / SKIP line with the measured difference and its tolerance):

* fp32   every registered optimizer on the device (TF32 off) against the same model, data
         and seed in float64 on the CPU;
* fp16   SAM and ESAM under fp16 autocast with torch.amp.GradScaler, and an overflow in
         pass 1 or pass 2 that must skip the step with weights and optimizer state unchanged;
* bf16   SAM and ESAM under bf16 autocast;
* compile  SAM and ESAM with a torch.compile'd model (inductor on CUDA, aot_eager in smoke);
* ddp    a one-process NCCL group (gloo on a CPU), a DDP-wrapped model, m-sharpness
         (the default) and sync_ascent;
* memory the peak memory of the first steps of SGD, SAM and ESAM (CUDA's allocator peak),
         as ratios to SGD's;
* throughput  CIFAR ResNet-18, batch 128, side by side (interleaved rounds, ratios within a
         round) with the paper's speed figures beside the measured ones.

The comparison: both runs start from the same float32 weights and see the same batches;
the difference is ||w_device - w_reference|| / ||w_reference - w_start|| over all parameters
(and, the same way, over the BatchNorm running statistics): the error relative to the
update the steps made. Where a method selects samples (SDS, K-SAM, ...), the reference
replays the device's selection, so that a near-tie that rounding breaks the other way does
not count as an error; how often its own choice differed is reported.

Results go to benchmarks/results/gpu-check-<device>-torch<version>.md/.json (--out to change
the folder). Exit status: 0 all checks passed, 1 a check failed, 2 bad usage (or --device
cuda without a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from effsam import sharpness_aware_step
from effsam.bench.memory import peak_allocated_bytes
from effsam.bench.throughput import (
    VARIANTS,
    Workload,
    pass_costs,
    predicted_speeds,
    ratios,
    run,
)
from effsam.environment import cpu_name, environment
from effsam.models import SmallCNN
from effsam.optim import SharpnessAware
from effsam.optim.registry import (
    REGISTRY,
    accepted_kwargs,
    available_optimizers,
    create_optimizer,
    get_spec,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: Relative update error allowed (see the module docstring for the measure). float32
#: against float64 measures ~2e-6 on a CPU; 1e-3 leaves room for cuDNN's convolution
#: algorithms (Winograd, FFT: ~1e-5 per operation in float32), whose errors the gradient's
#: cancellations amplify. Half precision: one step's gradient of the first layers already
#: differs by ~1% (fp16, 10-bit mantissa) and ~5% (bf16, 7-bit) from float64, plain SGD
#: included (measured on a CPU: up to 3e-2 and 7e-2 after the steps), so 0.1 and 0.2. These
#: catch a gross error (an unscaled gradient, a step at θ + ε, a wrong skip), not a subtle
#: one in the ascent: the detail of each line says how far plain SGD would be, which is
#: what a missing ascent would cost; the float32 checks resolve the ascent.
TOLERANCES: dict[str, float] = {
    "fp32": 1e-3,
    "compile": 1e-3,
    "ddp": 1e-3,
    "fp16": 0.1,
    "bf16": 0.2,
}

#: The peak memory of SAM's first steps may exceed SGD's by its θ backup (1x the parameter
#: bytes) and first_step's transient (the ascent-memory target of the throughput benchmark,
#: 1.1x in all), plus this share of SGD's peak for the allocator's rounding and the
#: convolutions' workspaces; ESAM's may exceed SAM's by that share only (its pass 2 runs on
#: half the batch after pass 1 is freed).
ASCENT_X_PARAMS = 1.1
MEMORY_SLACK = 0.05

#: Speed against SAM in Du et al. (ICLR 2022), Tables 1 and 3: ResNet-18, CIFAR-10, GPUs.
PAPER_VS_SAM = {"esam": 1.40, "esam-swp": 1.105, "esam-sds": 1.226}

#: The throughput variants: always these, then the cheap ascents that are registered.
THROUGHPUT_CORE = ["sgd", "sam", "esam", "esam-swp", "esam-sds", "rst"]
THROUGHPUT_CHEAP = ["sam-slice", "sam-on", "sam-layers", "sam-stale", "esam-bn"]

SAM_KWARGS: dict[str, Any] = {"rho": 0.05}
ESAM_KWARGS: dict[str, Any] = {"rho": 0.05, "beta": 0.6, "gamma": 0.5}
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4

GROUPS = ("fp32", "fp16", "bf16", "compile", "ddp", "memory", "throughput")


@dataclass(frozen=True)
class Sizes:
    """What the checks run on: the full GPU setting or the CPU smoke setting."""

    check_width: float  # SmallCNN width of the comparison model (3 conv-BN-ReLU, a head)
    check_batch: int
    image_size: int
    steps: int  # steps compared against the reference
    compile_backend: str
    throughput_width: float  # ResNet-18 width
    throughput_batch: int
    rounds: int
    steps_per_round: int
    warmup: int


FULL = Sizes(1.0, 32, 8, 4, "inductor", 1.0, 128, 8, 5, 3)
SMOKE = Sizes(0.5, 16, 8, 3, "aot_eager", 1 / 16, 16, 1, 1, 1)


# ---------------------------------------------------------------------------- reporting
@dataclass
class Check:
    group: str
    name: str
    status: str  # PASS, FAIL or SKIP
    diff: float | None = None
    tol: float | None = None
    detail: str = ""

    def line(self) -> str:
        head = f"{self.status}  {self.group}/{self.name}:"
        if self.status == "SKIP" or (self.diff is None and self.tol is None):
            return f"{head} {self.detail}"
        measured = "-" if self.diff is None else f"{self.diff:.2e}"
        tol = "-" if self.tol is None else f"{self.tol:.0e}" if self.tol else "0"
        text = f"{head} diff {measured} (tol {tol})"
        return f"{text}; {self.detail}" if self.detail else text


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    throughput_info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quiet: bool = False

    def add(self, check: Check) -> None:
        self.checks.append(check)
        try:
            print(check.line(), flush=True)
        except BrokenPipeError:  # the reader has gone (`| head`): keep checking, quietly
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    def compare(self, group: str, name: str, diff: float, tol: float, detail: str = "") -> None:
        ok = math.isfinite(diff) and diff <= tol
        self.add(Check(group, name, "PASS" if ok else "FAIL", diff, tol, detail))

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def guard(self, group: str, name: str) -> Iterator[None]:
        """An exception inside is this check's FAIL (its traceback on stderr), not the end."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check
            traceback.print_exc(file=sys.stderr)
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.add(Check(group, name, "FAIL", detail=f"raised {type(e).__name__}: {message}"))


# ---------------------------------------------------------------------------- the runs
def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def start_model(sizes: Sizes, seed: int = 0) -> nn.Module:
    """The comparison model in float32 on the CPU: both runs start from these weights."""
    torch.manual_seed(seed)
    return SmallCNN(num_classes=10, in_channels=3, width=sizes.check_width).train()


def batches(sizes: Sizes, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """CIFAR-like classes a few steps can learn: a fixed random image per class plus noise
    of half its scale (random labels would make the batch gradient a sum of cancelling
    per-sample terms, and every rounding error look large against it)."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, sizes.image_size, sizes.image_size)
    means = torch.randn((10, *shape), generator=g)
    out = []
    for _ in range(sizes.steps + 2):  # two spare batches for the overflow checks
        y = torch.randint(0, 10, (sizes.check_batch,), generator=g)
        out.append((means[y] + 0.5 * torch.randn((sizes.check_batch, *shape), generator=g), y))
    return out


def on(device: torch.device, batch: tuple[Tensor, Tensor], dtype: torch.dtype | None = None):
    x, y = batch
    return x.to(device=device, dtype=dtype or x.dtype), y.to(device)


def build_optimizer(name: str, model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    return create_optimizer(
        model, name, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **kwargs
    )


def registry_kwargs(name: str, steps: int) -> dict[str, Any]:
    """A registered optimizer's arguments for an N-step check: its spec's ``example`` (the
    arguments a minimal instance needs), with ``total_steps`` = N, a late schedule switching
    half-way and an interval of 2, so that the check sees both kinds of step."""
    kwargs = dict(get_spec(name).example)
    if "total_steps" in kwargs:
        kwargs["total_steps"] = steps
    takes = accepted_kwargs(name, kwargs)
    if "start" in takes:
        kwargs["start"] = 0.5
    if "every" in takes:
        kwargs["every"] = 2
    return kwargs


@dataclass
class Outcome:
    """What N steps left: the weights and BN statistics (float64, CPU) and what each step
    did."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    aware: list[bool]
    skipped: list[bool]
    selected: list[int]
    selections: list[Tensor | None]
    replay_differs: int = 0
    replayed: int = 0


def _state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = {n: p.detach().to("cpu", torch.float64) for n, p in model.named_parameters()}
    buffers = {
        n: b.detach().to("cpu", torch.float64)
        for n, b in model.named_buffers()
        if b.is_floating_point()
    }
    return params, buffers


def _record_selection(opt: Any, log: list[Tensor | None]) -> None:
    if not isinstance(opt, SharpnessAware):
        return
    own = opt.select

    def select(loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        idx = own(loss_before, loss_after)
        log.append(None if idx is None else idx.detach().cpu())
        return idx

    opt.select = select  # type: ignore[method-assign]


def _replay_selection(opt: Any, log: list[Tensor | None], counts: dict[str, int]) -> None:
    """The reference takes the device's choice of samples (its own is computed and
    compared: ``counts["differs"]`` of ``counts["calls"]`` differed)."""
    if not isinstance(opt, SharpnessAware):
        return
    own = opt.select
    queue = list(log)

    def select(loss_before: Tensor | None, loss_after: Tensor | None) -> Tensor | None:
        mine = own(loss_before, loss_after)
        if not queue:
            return mine
        theirs = queue.pop(0)
        counts["calls"] += 1
        same = (mine is None and theirs is None) or (
            mine is not None and theirs is not None and torch.equal(mine.cpu(), theirs)
        )
        if not same:
            counts["differs"] += 1
        if theirs is None:
            return None
        device = loss_before.device if loss_before is not None else torch.device("cpu")
        return theirs.to(device)

    opt.select = select  # type: ignore[method-assign]


def run_steps(
    net: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[tuple[Tensor, Tensor]],
    *,
    replay: list[Tensor | None] | None = None,
    **step_kwargs: Any,
) -> Outcome:
    """``len(data)`` steps of ``opt`` on ``net`` (``model`` is the module that holds the
    weights: ``net`` may be its compiled or DDP wrapper)."""
    log: list[Tensor | None] = []
    counts = {"calls": 0, "differs": 0}
    if replay is None:
        _record_selection(opt, log)
    else:
        _replay_selection(opt, replay, counts)
    aware, skipped, selected = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SWP with a compiled model, recompile limits
        for batch in data:
            r = sharpness_aware_step(net, opt, batch, loss_fn, **step_kwargs)
            aware.append(bool(r.sharpness_aware))
            skipped.append(bool(r.skipped))
            selected.append(int(r.selected))
    params, buffers = _state(model)
    return Outcome(
        params, buffers, aware, skipped, selected, log, counts["differs"], counts["calls"]
    )


#: Set by --perturb-reference: each reference's first weight is moved by this share of its
#: update norm after the run (a self-test: every comparison must then fail).
PERTURB = {"fraction": 0.0}


def reference(
    name: str,
    kwargs: dict[str, Any],
    start: nn.Module,
    data: list[tuple[Tensor, Tensor]],
    device_run: Outcome,
) -> Outcome:
    """The same optimizer, model, data and seed in float64 on the CPU, replaying the
    device run's sample selections."""
    model = copy.deepcopy(start).to("cpu", torch.float64)
    opt = build_optimizer(name, model, kwargs)
    cpu_data = [on(torch.device("cpu"), b, torch.float64) for b in data]
    out = run_steps(model, model, opt, cpu_data, replay=device_run.selections)
    if PERTURB["fraction"]:
        init, _ = _state(start)
        first = next(iter(out.params))
        size = _norm({n: out.params[n] - init[n] for n in out.params})
        out.params[first] = out.params[first].clone()
        out.params[first].view(-1)[0] += PERTURB["fraction"] * max(size, 1e-12)
    return out


def _norm(ts: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in ts.values()))


def relative_error(
    got: dict[str, Tensor], want: dict[str, Tensor], start: dict[str, Tensor]
) -> float:
    """||got - want|| / ||want - start||: the error relative to the update made."""
    if not want:
        return 0.0
    err = _norm({n: got[n] - want[n] for n in want})
    size = _norm({n: want[n] - start[n] for n in want})
    if size == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / size


_SGD_RUNS: dict[Sizes, Outcome] = {}


def sgd_reference(sizes: Sizes, start: nn.Module, data: list[tuple[Tensor, Tensor]]) -> Outcome:
    """Plain SGD on the same start and data in float64 (what a run without the ascent
    would give): the yardstick each check's error is reported against."""
    if sizes not in _SGD_RUNS:
        model = copy.deepcopy(start).to("cpu", torch.float64)
        opt = build_optimizer("sgd", model, {})
        cpu = [on(torch.device("cpu"), b, torch.float64) for b in data]
        _SGD_RUNS[sizes] = run_steps(model, model, opt, cpu)
    return _SGD_RUNS[sizes]


def compare_runs(start: nn.Module, dev: Outcome, ref: Outcome) -> tuple[float, str]:
    """(relative error, a description); the error is inf when the runs took different
    branches (sharpness-aware or plain, skipped, number of samples)."""
    for what in ("aware", "skipped", "selected"):
        a, b = getattr(dev, what), getattr(ref, what)
        if a != b:
            return math.inf, f"the runs differ in {what} per step: device {a}, reference {b}"
    p0, b0 = _state(start)
    err_p = relative_error(dev.params, ref.params, p0)
    err_b = relative_error(dev.buffers, ref.buffers, b0)
    n = len(dev.aware)
    parts = [f"weights {err_p:.1e}, BN statistics {err_b:.1e}", f"{sum(dev.aware)}/{n} SAM steps"]
    if ref.replayed:
        parts.append(
            f"selection replayed, the reference's own differed {ref.replay_differs}/{ref.replayed}"
        )
    return max(err_p, err_b), "; ".join(parts)


@contextlib.contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """TF32 off for matmuls and convolutions on CUDA (a comparison in float32 must run in
    float32); restored afterwards."""
    if device.type != "cuda":
        yield
        return
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
        torch.backends.cudnn, "conv"
    )
    if new_api:
        saved = (
            torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision,
        )
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            torch.backends.cuda.matmul.fp32_precision = saved[0]
            torch.backends.cudnn.conv.fp32_precision = saved[1]
        else:
            torch.backends.cuda.matmul.allow_tf32 = saved[0]
            torch.backends.cudnn.allow_tf32 = saved[1]


def device_check(
    report: Report,
    group: str,
    label: str,
    name: str,
    kwargs: dict[str, Any],
    sizes: Sizes,
    device: torch.device,
    *,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    extra: str = "",
    note: Callable[[], str] = lambda: "",
    **step_kwargs: Any,
) -> None:
    """One comparison: N steps of ``name`` on the device (the model wrapped by ``wrap``)
    against the float64 CPU reference (``note()``, called after the device run, adds to
    the line's detail)."""
    with report.guard(group, label):
        start = start_model(sizes)
        data = batches(sizes)[: sizes.steps]
        model = copy.deepcopy(start).to(device)
        opt = build_optimizer(name, model, kwargs)
        dev = run_steps(wrap(model), model, opt, [on(device, b) for b in data], **step_kwargs)
        ref = reference(name, kwargs, start, data, dev)
        diff, detail = compare_runs(start, dev, ref)
        if get_spec(name).factory is not None and any(ref.aware):
            sgd = sgd_reference(sizes, start, data)
            away = relative_error(sgd.params, ref.params, _state(start)[0])
            detail += f"; plain SGD would be {away:.1e} away"
        report.compare(group, label, diff, TOLERANCES[group], detail + extra + note())


# ---------------------------------------------------------------------------- the checks
def check_fp32(report: Report, sizes: Sizes, device: torch.device) -> None:
    """Every registered optimizer in float32 on the device against float64 on the CPU."""
    plain_seen: str | None = None
    for name in available_optimizers():
        if get_spec(name).factory is None:  # the plain base optimizer: one check serves all
            if plain_seen is not None:
                report.add(
                    Check("fp32", name, "SKIP", detail=f"the plain base optimizer, as {plain_seen}")
                )
                continue
            plain_seen = name
        if name == "flat-lora" and device.type != "cpu":
            # its noise is drawn by the weight's device's generator (no copy from the CPU per
            # chunk): another device draws other numbers than the CPU reference, by design
            report.add(Check("fp32", name, "SKIP", detail=f"noise drawn by the {device.type} "
                             "generator, not comparable with the CPU draw; tested on CPU"))  # fmt: skip
            continue
        kwargs = registry_kwargs(name, sizes.steps)
        extra = f"; {kwargs}" if kwargs else ""
        device_check(report, "fp32", name, name, kwargs, sizes, device, extra=extra)


def _fp16_available(device: torch.device) -> str | None:
    """None if fp16 autocast with a GradScaler works on ``device``, else why not."""
    try:
        torch.amp.GradScaler(device.type)
        with torch.autocast(device.type, dtype=torch.float16):
            out = nn.Conv2d(3, 4, 3).to(device)(torch.randn(1, 3, 8, 8, device=device))
        if out.dtype != torch.float16:
            return f"autocast on {device.type} does not run convolutions in float16"
    except Exception as e:  # noqa: BLE001 - the reason goes into the SKIP line
        return f"fp16 autocast or GradScaler unavailable on {device.type}: {e}"
    return None


def _bf16_available(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = nn.Conv2d(3, 4, 3).to(device)(torch.randn(1, 3, 8, 8, device=device))
        if out.dtype != torch.bfloat16:
            return f"autocast on {device.type} does not run convolutions in bfloat16"
    except Exception as e:  # noqa: BLE001
        return f"bf16 autocast unavailable on {device.type}: {e}"
    return None


def check_fp16(report: Report, sizes: Sizes, device: torch.device) -> None:
    reason = _fp16_available(device)
    for name, kwargs in (("sgd", {}), ("sam", SAM_KWARGS), ("esam", ESAM_KWARGS)):
        if reason:
            report.add(Check("fp16", name, "SKIP", detail=reason))
            continue
        scaler = torch.amp.GradScaler(device.type)
        device_check(
            report, "fp16", name, name, kwargs, sizes, device,
            extra=f"; GradScaler scale {scaler.get_scale():g} at the start",
            scaler=scaler, autocast="fp16",
        )  # fmt: skip
    for name, kwargs in (("sam", SAM_KWARGS), ("esam", ESAM_KWARGS)):
        for where in ("pass1", "pass2"):
            label = f"{name}-overflow-{where}"
            if reason:
                report.add(Check("fp16", label, "SKIP", detail=reason))
                continue
            with report.guard("fp16", label):
                overflow_check(report, label, name, kwargs, where, sizes, device)


def _snapshot(model: nn.Module, opt: Any) -> dict[str, Tensor]:
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    base = opt.base if isinstance(opt, SharpnessAware) else opt
    for i, state in base.state_dict()["state"].items():
        for k, v in state.items():
            if isinstance(v, Tensor):
                out[f"state:{i}:{k}"] = v.detach().clone()
    return out


def overflow_check(
    report: Report,
    label: str,
    name: str,
    kwargs: dict[str, Any],
    where: str,
    sizes: Sizes,
    device: torch.device,
) -> None:
    """One clean step, then a step whose losses are inf in ``where``: it must be skipped
    with the weights and the base optimizer's state bit-identical, the scale halved, and
    the next step must run."""
    data = [on(device, b) for b in batches(sizes)]
    model = copy.deepcopy(start_model(sizes)).to(device)
    opt = build_optimizer(name, model, kwargs)
    scaler = torch.amp.GradScaler(device.type)
    active = {"on": False}

    def poisoned(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        losses = loss_fn(m, batch)
        hit = opt.perturbed if where == "pass2" else not opt.perturbed
        if active["on"] and hit and torch.is_grad_enabled():
            return losses * float("inf")
        return losses

    def step(batch: tuple[Tensor, Tensor]) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a skipped step warns by design
            return sharpness_aware_step(model, opt, batch, poisoned, scaler=scaler, autocast="fp16")

    first = step(data[0])
    if first.skipped:
        report.add(Check("fp16", label, "FAIL", detail="the clean first step was skipped"))
        return
    before, scale, skipped = _snapshot(model, opt), scaler.get_scale(), opt.skipped_steps
    active["on"] = True
    result = step(data[1])
    active["on"] = False
    after = _snapshot(model, opt)
    diff = max(float((after[k] - before[k]).abs().max()) for k in before)
    if after.keys() != before.keys():
        diff = math.inf
    problems = []
    if not result.skipped:
        problems.append("the step was not skipped")
    if opt.skipped_steps != skipped + 1:
        problems.append(f"skipped_steps {skipped} -> {opt.skipped_steps}")
    if scaler.get_scale() != scale * 0.5:
        problems.append(f"scale {scale:g} -> {scaler.get_scale():g} (expected halved)")
    nxt = step(data[2])
    if nxt.skipped:
        problems.append("the step after it was skipped too")
    detail = (
        f"skipped, weights and momentum unchanged, scale {scale:g} -> {scaler.get_scale():g}, "
        "next step ran"
    )
    if problems:
        report.add(Check("fp16", label, "FAIL", diff, 0.0, "; ".join(problems)))
    else:
        report.compare("fp16", label, diff, 0.0, detail)


def check_bf16(report: Report, sizes: Sizes, device: torch.device) -> None:
    reason = _bf16_available(device)
    for name, kwargs in (("sgd", {}), ("sam", SAM_KWARGS), ("esam", ESAM_KWARGS)):
        if reason:
            report.add(Check("bf16", name, "SKIP", detail=reason))
            continue
        device_check(report, "bf16", name, name, kwargs, sizes, device, autocast="bf16")


def check_compile(report: Report, sizes: Sizes, device: torch.device) -> None:
    """A torch.compile'd model (the whole forward and backward of each pass compiled; the
    optimizer runs eagerly), SAM and ESAM. SWP recompiles per new mask pattern
    (docs/scaling.md); the number of graphs is reported."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    backend = sizes.compile_backend
    for name, kwargs in (("sam", SAM_KWARGS), ("esam", ESAM_KWARGS)):
        torch._dynamo.reset()
        counters.clear()
        t0 = time.perf_counter()
        device_check(
            report, "compile", name, name, kwargs, sizes, device,
            wrap=lambda m: torch.compile(m, backend=backend),
            extra=f"; backend {backend}",
            note=lambda t0=t0: f", {counters['stats']['unique_graphs']} graphs compiled, "
            f"{time.perf_counter() - t0:.0f} s",
        )  # fmt: skip
    torch._dynamo.reset()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_process_group(backend: str, device: torch.device) -> Iterator[None]:
    """A world-size-1 process group on a free localhost port (env:// initialisation)."""
    import torch.distributed as dist

    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.get(k) for k in keys}
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    try:
        for attempt in range(3):
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()),
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
            )
            try:
                dist.init_process_group(
                    backend, init_method="env://", timeout=datetime.timedelta(seconds=60),
                    **kwargs,
                )  # fmt: skip
                break
            except Exception as e:
                if "address already in use" not in str(e).lower() or attempt == 2:
                    raise
        try:
            yield
        finally:
            gc.collect()  # DDP reducers in reference cycles go before the group does
            dist.destroy_process_group()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_ddp(report: Report, sizes: Sizes, device: torch.device) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    backend = "nccl" if device.type == "cuda" else "gloo"
    cases = [
        ("sam", "sam", SAM_KWARGS, False),
        ("esam", "esam", ESAM_KWARGS, False),
        ("sam-sync-ascent", "sam", SAM_KWARGS, True),
    ]
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        for label, *_ in cases:
            report.add(Check("ddp", label, "SKIP", detail=f"torch.distributed {backend} missing"))
        return
    ids = [device.index] if device.type == "cuda" else None
    with one_process_group(backend, device):
        for label, name, kwargs, sync in cases:
            device_check(
                report, "ddp", label, name, kwargs, sizes, device,
                wrap=lambda m: DDP(m, device_ids=ids),
                extra=f"; {backend}, world size 1, " + ("sync_ascent" if sync else "m-sharpness"),
                sync_ascent=sync,
            )  # fmt: skip


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, int | None]:
    """(peak, kept): the most bytes ``fn()`` held at once beyond what was allocated before
    it, and what it left allocated. CUDA: the caching allocator's statistics; CPU: the
    profiler's allocation events (kept is then not measured: None)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return peak, torch.cuda.memory_allocated(device) - before
    peak = peak_allocated_bytes(fn, device)
    if peak is None:
        raise RuntimeError("the profiler recorded no allocation events on this CPU")
    return peak, None


def check_memory(report: Report, sizes: Sizes, device: torch.device) -> None:
    """Peak memory of the first two steps (the optimizer's state allocated on the first)
    of SGD, SAM and ESAM on the throughput workload, each from a fresh model."""
    workload = throughput_workload(sizes, device)
    rows: dict[str, dict[str, Any]] = {}
    with report.guard("memory", "measure"):
        for name in ("sgd", "sam", "esam"):
            model, batch = workload.build(seed=0)
            opt = build_optimizer(name, model, dict(VARIANTS.get(name, {})))

            def two_steps(model=model, opt=opt, batch=batch) -> None:
                for _ in range(2):
                    sharpness_aware_step(model, opt, batch, loss_fn)

            peak, kept = peak_bytes(two_steps, device)
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            rows[name] = {
                "optimizer": name,
                "peak_mb": peak / 2**20,
                "kept_mb": None if kept is None else kept / 2**20,
                "params_mb": params / 2**20,
            }
            del model, opt, batch
        sgd = rows["sgd"]["peak_mb"]
        for r in rows.values():
            r["vs_sgd"] = r["peak_mb"] / sgd
            r["extra_x_params"] = (r["peak_mb"] - sgd) / r["params_mb"]
        report.memory = list(rows.values())
        for r in report.memory:
            report.say(
                f"  memory/{r['optimizer']}: peak {r['peak_mb']:.1f} MB, {r['vs_sgd']:.3f}x SGD"
            )
    if len(rows) < 3:
        return
    sgd, sam, esam, params = (
        rows["sgd"]["peak_mb"],
        rows["sam"]["peak_mb"],
        rows["esam"]["peak_mb"],
        rows["sam"]["params_mb"],
    )
    slack = MEMORY_SLACK * sgd
    excess = sam - sgd - ASCENT_X_PARAMS * params
    report.compare(
        "memory", "sam", max(0.0, excess / sgd), MEMORY_SLACK,
        f"peak {sam:.1f} MB = {sam / sgd:.3f}x SGD's {sgd:.1f} MB, +{(sam - sgd) / params:.2f}x "
        f"the parameters ({params:.1f} MB; allowed {ASCENT_X_PARAMS}x + {slack:.1f} MB)",
    )  # fmt: skip
    report.compare(
        "memory", "esam", max(0.0, (esam - sam) / sgd), MEMORY_SLACK,
        f"peak {esam:.1f} MB = {esam / sgd:.3f}x SGD's, {esam / sam:.3f}x SAM's "
        f"(allowed: SAM's + {slack:.1f} MB)",
    )  # fmt: skip


def throughput_workload(sizes: Sizes, device: torch.device) -> Workload:
    return Workload(
        model_name="resnet18",
        width=sizes.throughput_width,
        batch_size=sizes.throughput_batch,
        device=str(device),
    )


def _conv_precision(device: torch.device) -> str:
    """How float32 convolutions run on the device (the throughput keeps torch's default)."""
    if device.type != "cuda":
        return "float32"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return f"cuDNN fp32_precision={conv.fp32_precision}"
    return "TF32 allowed" if torch.backends.cudnn.allow_tf32 else "TF32 off"


def check_throughput(report: Report, sizes: Sizes, device: torch.device) -> None:
    missing = [n for n in THROUGHPUT_CORE + THROUGHPUT_CHEAP if n not in REGISTRY]
    variants = [n for n in THROUGHPUT_CORE + THROUGHPUT_CHEAP if n in REGISTRY]
    if missing:
        report.notes.append(f"not registered, left out of the throughput: {', '.join(missing)}")
        report.say(f"  {report.notes[-1]}")
    workload = throughput_workload(sizes, device)
    with report.guard("throughput", "resnet18"):
        stats = run(
            variants,
            workload,
            rounds=sizes.rounds,
            steps_per_round=sizes.steps_per_round,
            warmup=sizes.warmup,
            progress=lambda s: report.say(f"  {s}"),
        )
        costs = pass_costs(
            workload,
            beta=ESAM_KWARGS["beta"],
            gamma=ESAM_KWARGS["gamma"],
            rounds=max(3, sizes.rounds),
            warmup=sizes.warmup,
        )
        predicted = predicted_speeds(costs)
        rows = []
        for name, s in stats.items():
            step = statistics.median(s.amortised)
            rows.append(
                {
                    "variant": name,
                    "step_ms": step * 1e3,
                    "images_per_s": workload.batch_size / step,
                    "vs_sam": ratios(stats, name, "sam"),
                    "predicted_vs_sam": predicted.get(name),
                    "paper_vs_sam": PAPER_VS_SAM.get(name),
                    "forward_passes": s.forward_samples,
                    "backward_passes": s.backward_samples,
                    "step_peak_mb": s.peak_mb,
                }
            )
        report.throughput = rows
        report.throughput_info = {
            "model": "resnet18 (CIFAR)",
            "width": workload.width,
            "batch": workload.batch_size,
            "rounds": sizes.rounds,
            "steps_per_round": sizes.steps_per_round,
            "warmup": sizes.warmup,
            "pass_costs_s": costs,
            "sam_vs_sgd_step": 1 / ratios(stats, "sam", "sgd"),
            "float32_convolutions": _conv_precision(device),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }
        for r in rows:
            paper = "" if r["paper_vs_sam"] is None else f" (paper {r['paper_vs_sam']:.3f})"
            report.say(f"  {r['variant']}: {r['vs_sam']:.3f}x SAM{paper}")
        report.add(
            Check(
                "throughput",
                "resnet18",
                "PASS",
                detail=f"{len(rows)} methods side by side in {sizes.rounds} interleaved "
                f"round{'s' if sizes.rounds > 1 else ''} (speeds are reported, not judged)",
            )
        )


CHECKS: dict[str, Callable[[Report, Sizes, torch.device], None]] = {
    "fp32": check_fp32,
    "fp16": check_fp16,
    "bf16": check_bf16,
    "compile": check_compile,
    "ddp": check_ddp,
    "memory": check_memory,
    "throughput": check_throughput,
}


# ---------------------------------------------------------------------------- results
def git_commit() -> tuple[str, bool]:
    """(commit, uncommitted changes to tracked files) of the source tree, or ('unknown',
    False) outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: Report, meta: dict[str, Any]) -> str:
    commit = meta["commit"] + (" (with uncommitted changes)" if meta["dirty"] else "")
    env = meta["environment"]
    md = [
        f"# GPU check: {meta['device_name']}" + (" (smoke)" if meta["smoke"] else ""),
        "",
        f"Device: {meta['device_name']} (`{meta['device']}`)  ",
        f"Command: `{meta['command']}`  ",
        f"Commit: {commit}  ",
        f"Date: {env['date']}  ",
        f"Environment: torch {env['torch']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + f", Python {env['python']}, {env['cpu']}, {env['torch_threads']} threads  ",
        f"Duration: {meta['seconds']:.0f} s; result: "
        + ("all checks passed" if meta["passed"] else "FAILED"),
        "",
        "## Checks against the CPU float64 reference",
        "",
        f"The same model (3 conv-BN-ReLU layers and a head, width {meta['sizes']['check_width']}"
        f", {meta['sizes']['image_size']}x{meta['sizes']['image_size']} inputs, batch "
        f"{meta['sizes']['check_batch']}), the same float32 starting weights and batches, "
        f"{meta['sizes']['steps']} steps of SGD (lr {LR}, momentum {MOMENTUM}, weight decay "
        f"{WEIGHT_DECAY}) under each method. diff = ||w - w_ref|| / ||w_ref - w_0||, over the "
        "weights and, separately, the BatchNorm statistics (the larger is shown). TF32 is off "
        "for the float32 checks. SAM: rho 0.05; ESAM: rho 0.05, beta 0.6, gamma 0.5; every "
        "other method at its registered defaults (a late switch at half the steps, "
        "total_steps = the steps). Where a method selects samples, the reference replays the "
        "device's selection. Overflow: a step whose loss is inf in the given pass must be "
        "skipped with weights and base optimizer state bit-identical (tolerance 0).",
        "",
        "| precision | tolerance |",
        "|---|---:|",
        *(f"| {k} | {v:g} |" for k, v in TOLERANCES.items()),
        "",
        "| result | check | diff | tolerance | detail |",
        "|---|---|---:|---:|---|",
    ]
    for c in report.checks:
        detail = c.detail.replace("|", "/")
        md.append(
            f"| {c.status} | {c.group}/{c.name} | {_fmt(c.diff, '.2e')} | "
            f"{_fmt(c.tol, 'g')} | {detail} |"
        )
    if report.memory:
        md += [
            "",
            "## Peak memory of the first two steps",
            "",
            f"ResNet-18 (CIFAR) at width {meta['sizes']['throughput_width']:g}, batch "
            f"{meta['sizes']['throughput_batch']}, a fresh model and optimizer each; the peak "
            "beyond what was allocated before the first step ("
            + (
                "torch.cuda.reset_peak_memory_stats / max_memory_allocated"
                if meta["device"].startswith("cuda")
                else "the profiler's allocation events on the CPU"
            )
            + ").",
            "",
            "| optimizer | peak MB | vs SGD | extra ×params | kept after MB |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in report.memory:
            md.append(
                f"| {r['optimizer']} | {r['peak_mb']:.1f} | {r['vs_sgd']:.3f} | "
                f"{r['extra_x_params']:.2f} | {_fmt(r['kept_mb'], '.1f')} |"
            )
    if report.throughput:
        info = report.throughput_info
        md += [
            "",
            "## Throughput, side by side",
            "",
            f"CIFAR ResNet-18 at width {info['width']:g}, batch {info['batch']}, random "
            f"CIFAR-shaped inputs, every method on the same model and batch in one process: "
            f"{info['warmup']} warm-up steps, {info['rounds']} interleaved rounds of "
            f"{info['steps_per_round']} steps (methods with a cycle: whole cycles), the median "
            "per round, ratios within a round, the median over rounds. RST is priced at half "
            "its steps sharpness-aware. Predicted: from each pass timed alone (the throughput "
            "benchmark's cost model). Paper: Du et al. (ICLR 2022) Tables 1 and 3, ResNet-18 "
            f"on CIFAR-10 on GPUs. A SAM step costs {info['sam_vs_sgd_step']:.2f} SGD steps. "
            f"float32 convolutions: {info['float32_convolutions']}, cudnn.benchmark "
            f"{info['cudnn_benchmark']} (torch's defaults).",
            "",
            "| method | ms/step | images/s | speed vs SAM | predicted | paper | fwd passes | "
            "bwd passes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report.throughput:
            md.append(
                f"| {r['variant']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
                f"{r['vs_sam']:.3f} | {_fmt(r['predicted_vs_sam'], '.3f')} | "
                f"{_fmt(r['paper_vs_sam'], '.3f')} | {r['forward_passes']:.2f} | "
                f"{r['backward_passes']:.2f} |"
            )
    if report.notes:
        md += ["", "## Notes", "", *(f"* {n}" for n in report.notes)]
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round (under a minute)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json")
    p.add_argument(
        "--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="run these groups only"
    )
    p.add_argument(
        "--perturb-reference",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="self-test: move one weight of every reference by FRACTION of its update's norm;\n"
        "the comparisons must then FAIL",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"gpu_check: invalid --device {args.device!r} (cuda, cuda:N or cpu)", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu_check: invalid --device {args.device!r} (cuda, cuda:N or cpu)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(
                f"gpu_check: --device {args.device} but CUDA is not available (torch "
                f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible); use a GPU "
                "machine, or --device cpu --smoke",
                file=sys.stderr,
            )
            return 2
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            print(
                f"gpu_check: --device {args.device}: only {torch.cuda.device_count()} GPUs",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    sizes = SMOKE if args.smoke else FULL
    PERTURB["fraction"] = args.perturb_reference
    report = Report(quiet=args.quiet)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/gpu_check.py", *map(shlex.quote, given)])
    report.say(f"gpu check on {device_name(device)} ({device}), torch {torch.__version__}")
    t_start = time.perf_counter()
    for group in GROUPS:
        if group not in args.only:
            continue
        report.say(f"== {group}")
        t0 = time.perf_counter()
        # the throughput runs as a user's would: with torch's default float32 precision
        precision = full_fp32(device) if group != "throughput" else contextlib.nullcontext()
        with report.guard(group, "setup"), precision:
            CHECKS[group](report, sizes, device)
        report.timings[group] = time.perf_counter() - t0
        report.say(f"   {group}: {report.timings[group]:.1f} s")
    seconds = time.perf_counter() - t_start
    failed = [c for c in report.checks if c.status == "FAIL"]
    commit, dirty = git_commit()
    env = environment(device)
    meta = {
        "device": str(device),
        "device_name": device_name(device),
        "command": command,
        "commit": commit,
        "dirty": dirty,
        "date": env["date"],
        "environment": env,
        "smoke": args.smoke,
        "sizes": asdict(sizes),
        "seconds": seconds,
        "passed": not failed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-check-{slug(meta['device_name'])}-torch{torch.__version__.split('+')[0]}"
    if args.smoke:
        stem += "-smoke"
    (args.out / f"{stem}.md").write_text(markdown(report, meta))
    payload = {
        **meta,
        "tolerances": TOLERANCES,
        "perturb_reference": args.perturb_reference,
        "checks": [asdict(c) for c in report.checks],
        "memory": report.memory,
        "throughput": report.throughput,
        "throughput_settings": report.throughput_info,
        "notes": report.notes,
        "group_seconds": report.timings,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    counts = {s: sum(c.status == s for c in report.checks) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
        f"{seconds:.0f} s; results: {args.out / stem}.md/.json",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
