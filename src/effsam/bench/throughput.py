"""Per-step wall time of every optimizer, measured side by side in one process.

Warm-up, then interleaved rounds (A B C … A B C …): each round runs a few steps of every
variant; a variant's time for a round is its median step time in that round, and the
ratios against SAM and SGD are taken within the round, so drift of the machine (thermal,
other load) cancels. Reported: the median over rounds of each time and ratio, forward /
backward sample-passes per step, the optimizer's own overhead (time in first_step and
second_step outside the base optimizer's step), the optimizer's memory and the peak memory
of a step, and the extra memory of the ascent (θ backup, masks and first_step's transient
peak) against the parameters' size.

A cost model explains the ratios: :func:`pass_costs` times each pass a step is made of
alone, on the same model and batch, and :func:`predicted_speeds` adds them up the way
each method does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models import create_model
from ..optim import SharpnessAware, create_optimizer
from ..optim.ascent import global_norm
from ..optim.cheap import last_layer_params, norm_params
from ..optim.masks import RandomTensorSubset, round_half_up
from ..optim.registry import REGISTRY
from ..step import sharpness_aware_step
from .memory import ascent_memory, peak_allocated_bytes

#: The variants and their settings (ESAM paper Table 1/3 for ResNet-18).
VARIANTS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
    "esam": {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    "esam-swp": {"rho": 0.05, "beta": 0.6},
    "esam-sds": {"rho": 0.05, "gamma": 0.5},
    "esam-loss": {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    "ssam-f": {"rho": 0.1, "sparsity": 0.5, "num_samples": 16, "update_interval": 390},
    "ssam-d": {"rho": 0.1, "sparsity": 0.5, "update_interval": 390, "total_steps": 78000},
    "ssam-f-tensor": {"rho": 0.1, "sparsity": 0.5, "num_samples": 16, "update_interval": 390},
    "sam-interval": {"rho": 0.05, "every": 10},
    "looksam": {"rho": 0.05, "k": 5, "alpha": 0.7},
    # late, RST and AE-SAM as their own plain step (these settings never fire); their time
    # is priced at the share of sharpness-aware steps in SHARES
    "sam-late": {"rho": 0.05, "start": 1.0, "total_steps": 10**9},
    "rst": {"rho": 0.05, "probability": 0.0, "probability_schedule": "constant"},
    "ae-sam": {"rho": 0.05, "total_steps": 10**9, "lambda1": 1e9, "lambda2": 1e9},
    "msam": {"rho": 3.0},
    "ksam": {"rho": 0.05, "gamma": 0.5},
    "esam-mix": {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    "esam-random": {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    "esam-wholebatch": {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    "esam-bn": {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    "msam-rel": {"rho": 0.041},
    "looksam-rel": {"rho": 0.05, "k": 5, "alpha": 1.0},
    # the cheap ascents (docs/algorithms.md, "Cheap ascents"): pass 1 cut, pass 2 dense
    "sam-slice": {"rho": 0.05, "ascent_fraction": 0.25},
    "sam-slice@0.5": {"rho": 0.05, "ascent_fraction": 0.5},
    "sam-on": {"rho": 0.05},
    "sam-layers": {"rho": 0.05, "layers": "last:0.5"},
    "sam-stale": {"rho": 0.05, "refresh_every": 3},
    # their compositions with RST and late SAM, as their own plain step (never firing),
    # priced at the share of sharpness-aware steps in SHARES with the cheap step's time
    "rst-slice": {"rho": 0.05, "probability": 0.0, "probability_schedule": "constant"},
    "rst-on": {"rho": 0.05, "probability": 0.0, "probability_schedule": "constant"},
    "rst-stale": {
        "rho": 0.05,
        "probability": 0.0,
        "probability_schedule": "constant",
        "refresh_every": 3,
    },
    "late-slice": {"rho": 0.05, "start": 1.0, "total_steps": 10**9},
}

#: Labels of a second setting of a registered method (label -> registered name; the
#: settings are the label's entry in VARIANTS).
VARIANT_OF: dict[str, str] = {"sam-slice@0.5": "sam-slice"}


def registry_name(variant: str) -> str:
    """The registered optimizer a benchmark variant builds (its label, or VARIANT_OF's)."""
    return VARIANT_OF.get(variant, variant)


#: Methods whose steps differ in a fixed cycle: each round runs whole cycles of this many
#: steps and takes their mean (the median would be the plain step).
PERIODS: dict[str, int] = {"sam-interval": 10, "looksam": 5, "looksam-rel": 5, "sam-stale": 3}

#: Methods whose share of sharpness-aware steps depends on the run (late: the last 1/8 of
#: training by default; RST with p rising 0 -> 1: one half on average; AE-SAM: about one
#: half in its paper): a round's time is share x SAM's + (1 - share) x their own plain step.
#: A composition's sharpness-aware steps are its cheap ascent's (SHARE_STEP), not SAM's.
SHARES: dict[str, float] = {
    "sam-late": 0.125,
    "rst": 0.5,
    "ae-sam": 0.5,
    "rst-slice": 0.5,
    "rst-on": 0.5,
    "rst-stale": 0.5,
    "late-slice": 0.125,
}

#: The method whose step a SHARES variant takes on its sharpness-aware steps (default SAM).
SHARE_STEP: dict[str, str] = {
    "rst-slice": "sam-slice",
    "rst-on": "sam-on",
    "rst-stale": "sam-stale",
    "late-slice": "sam-slice",
}

#: (variant, reference, minimum speed ratio = reference time / variant time, paper figure)
TARGETS: list[tuple[str, str, float, str]] = [
    ("esam", "sam", 1.40, "ESAM 140.3% of SAM (Table 1)"),
    ("esam-swp", "sam", 1.09, "SWP 110.5% of SAM (Table 3)"),
    ("esam-sds", "sam", 1.22, "SDS 122.6% of SAM (Table 3)"),
    ("ssam-f", "sam", 0.98, "SSAM costs no more than SAM"),
    ("ssam-d", "sam", 0.98, "SSAM costs no more than SAM"),
]


#: extra memory of the ascent (θ backup, masks, first_step's transient) / parameter bytes
ASCENT_MEMORY = 1.1
ASCENT_MEMORY_SSAM = 1.3  # a bool mask is 1/4 of float32 parameters
ASCENT_MEMORY_STALE = 2.1  # the θ backup and last step's gradient (one buffer each)


@dataclass
class VariantStats:
    name: str
    step_times: list[float] = field(default_factory=list)  # per round (median of its steps)
    overhead: list[float] = field(default_factory=list)  # per step: optimizer's own time
    refresh_time: float = 0.0  # one mask refresh (SSAM), amortised over its interval
    refresh_interval: int = 0
    forward_samples: float = 0.0  # sample-forwards per step / batch size
    backward_samples: float = 0.0
    optimizer_mb: float = 0.0
    #: memory allocated during one step, at its highest: the larger of the first step's
    #: (which allocates the θ backups and the base optimizer's state) and a later one's
    peak_mb: float | None = None
    #: extra memory of the ascent / parameter bytes: persistent (θ backup, masks) and the
    #: transient peak of first_step (None for plain optimizers), after the warm-up
    ascent_persistent: float | None = None
    ascent_transient: float | None = None
    #: the same total on the optimizer's very first first_step (its θ backups allocated
    #: inside it), measured before the warm-up
    ascent_first: float | None = None

    @property
    def ascent_ratio(self) -> float | None:
        """The extra memory of the ascent at its highest: on the first call or later."""
        if self.ascent_persistent is None or self.ascent_transient is None:
            return self.ascent_first
        later = self.ascent_persistent + self.ascent_transient
        return later if self.ascent_first is None else max(later, self.ascent_first)

    @property
    def amortised(self) -> list[float]:
        extra = self.refresh_time / self.refresh_interval if self.refresh_interval else 0.0
        return [t + extra for t in self.step_times]


class _PassCounter:
    """Counts samples forwarded with and without grad through the model's root module."""

    def __init__(self, model: nn.Module) -> None:
        self.grad = 0
        self.nograd = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        n = args[0].shape[0]
        if torch.is_grad_enabled():
            self.grad += n
        else:
            self.nograd += n


def _timed(fn: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    return wrapper


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Bench:
    """One variant under test: its model, optimizer, batch and instrumentation."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    batch: tuple[torch.Tensor, torch.Tensor]
    counter: _PassCounter
    own: list[float]
    base_step: list[float]

    def step(self) -> float:
        device = self.batch[0].device
        _sync(device)
        start = time.perf_counter()
        sharpness_aware_step(self.model, self.opt, self.batch, _loss)
        _sync(device)
        return time.perf_counter() - start


@dataclass(frozen=True)
class Workload:
    """What is measured: the model, its batch and the device, the same for every variant."""

    model_name: str = "resnet18"
    width: float = 1.0  # channel width multiplier
    batch_size: int = 128
    num_classes: int = 10
    image_shape: tuple[int, ...] = (3, 32, 32)
    device: str = "cpu"

    def build(self, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
        """A seeded model in training mode and a random batch on the device."""
        device = torch.device(self.device)
        torch.manual_seed(seed)
        model = create_model(
            self.model_name,
            num_classes=self.num_classes,
            in_channels=self.image_shape[0],
            width=self.width,
        ).to(device)
        model.train()
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        x = torch.randn(self.batch_size, *self.image_shape, generator=g).to(device)
        y = torch.randint(0, self.num_classes, (self.batch_size,), generator=g).to(device)
        return model, (x, y)


def build_bench(name: str, workload: Workload, compile_model: bool = False, seed: int = 0) -> Bench:
    model, (x, y) = workload.build(seed)
    counter = _PassCounter(model)
    if compile_model:
        model = torch.compile(model)
    kwargs = dict(VARIANTS.get(name, {}))
    opt = create_optimizer(
        model, registry_name(name), lr=0.05, momentum=0.9, weight_decay=5e-4, **kwargs
    )
    own: list[float] = []
    base_step: list[float] = []
    if isinstance(opt, SharpnessAware):
        opt.first_step = _timed(opt.first_step, own)  # type: ignore[method-assign]
        opt.second_step = _timed(opt.second_step, own)  # type: ignore[method-assign]
        opt.base.step = _timed(opt.base.step, base_step)  # type: ignore[method-assign]
    return Bench(name, model, opt, (x, y), counter, own, base_step)


def optimizer_megabytes(opt: torch.optim.Optimizer) -> float:
    """Bytes held by the optimizer: base state, ε backups, masks."""
    seen: set[int] = set()
    total = 0

    def add(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                add(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                add(v)

    if isinstance(opt, SharpnessAware):
        add(list(opt.state.values()))
        add(list(opt.base.state.values()))
        add(opt.mask.state_dict())
    else:
        add(list(opt.state.values()))
    return total / 2**20


def run(
    variants: Sequence[str],
    workload: Workload = Workload(),
    *,
    rounds: int = 5,
    steps_per_round: int = 3,
    warmup: int = 2,
    compile_model: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, VariantStats]:
    """Measure every variant; returns per-variant statistics."""
    unknown = [v for v in variants if registry_name(v) not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; registered: {list(REGISTRY)}")
    unpriced = [
        f"{v} (needs {SHARE_STEP.get(v, 'sam')})"
        for v in variants
        if v in SHARES and SHARE_STEP.get(v, "sam") not in variants
    ]
    if unpriced:
        raise ValueError(
            "a scheduled variant is priced from the step it takes on its sharpness-aware "
            f"steps, measured in the same run: add it: {', '.join(unpriced)}"
        )
    dev = torch.device(workload.device)
    benches = [build_bench(v, workload, compile_model) for v in variants]
    stats = {b.name: VariantStats(b.name) for b in benches}
    first_peak: dict[str, float | None] = {}
    for b in benches:
        opt = b.opt
        if isinstance(opt, SharpnessAware) and opt.mask.needs_data:
            # SSAM refreshes every update_interval steps: time one refresh to amortise it.
            start = time.perf_counter()
            opt.refresh_mask(b.model, b.batch, _loss)
            _sync(dev)
            stats[b.name].refresh_time = time.perf_counter() - start
            stats[b.name].refresh_interval = int(VARIANTS[b.name].get("update_interval", 0))
        elif isinstance(opt, SharpnessAware) and VARIANTS.get(b.name, {}).get("update_interval"):
            opt.refresh_mask(b.model, b.batch, _loss)  # SSAM-D: time its drop/grow as well
            start = time.perf_counter()
            opt.refresh_mask(b.model, b.batch, _loss)
            stats[b.name].refresh_time = time.perf_counter() - start
            stats[b.name].refresh_interval = int(VARIANTS[b.name]["update_interval"])
        if isinstance(opt, SharpnessAware):
            # the first call, before any step: the θ backups are allocated inside it
            mem = ascent_memory(opt, b.model, b.batch, _ascent_loss(opt))
            if mem is not None and mem.parameters:
                stats[b.name].ascent_first = mem.ratio
        for i in range(warmup):
            if i == 0:  # the first step's peak (profiled; warm-up steps are not timed)
                peak = peak_allocated_bytes(b.step, b.batch[0].device)
                first_peak[b.name] = None if peak is None else peak / 2**20
            else:
                b.step()
        b.own.clear()
        b.base_step.clear()
        b.counter.grad = b.counter.nograd = 0
    for r in range(rounds):
        for b in benches:
            times = []
            for _ in range(PERIODS.get(b.name, steps_per_round)):
                times.append(b.step())
            per_round = statistics.fmean if b.name in PERIODS else statistics.median
            stats[b.name].step_times.append(per_round(times))
        if progress:
            progress(
                f"round {r + 1}/{rounds}: "
                + ", ".join(
                    f"{b.name} {stats[b.name].step_times[-1] * 1e3:.0f} ms" for b in benches
                )
            )
    for b in benches:
        s = stats[b.name]
        n_steps = rounds * PERIODS.get(b.name, steps_per_round)
        s.forward_samples = (b.counter.grad + b.counter.nograd) / n_steps / workload.batch_size
        s.backward_samples = b.counter.grad / n_steps / workload.batch_size
        if b.own:
            own = sum(b.own) - sum(b.base_step)
            s.overhead = [own / n_steps]
        s.optimizer_mb = optimizer_megabytes(b.opt)
    for b in benches:  # last: the profiled step must not count in the times or passes
        later = step_peak_megabytes(b)
        first = first_peak.get(b.name)
        stats[b.name].peak_mb = later if first is None else max(first, later or 0.0)
        if isinstance(b.opt, SharpnessAware):
            mem = ascent_memory(b.opt, b.model, b.batch, _ascent_loss(b.opt))
            if mem is not None and mem.parameters:
                stats[b.name].ascent_persistent = mem.persistent / mem.parameters
                stats[b.name].ascent_transient = mem.transient / mem.parameters
    _price_shares(stats)
    return stats


def _ascent_loss(opt: SharpnessAware) -> Callable[..., Tensor]:
    """The loss the ascent-memory probe runs pass 1 with: through ``ascent_batch``, so a
    reduced-batch ascent ascends on its slice, as in a step (the whole batch otherwise)."""

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return _loss(model, opt.ascent_batch(batch))

    return loss


def _price_shares(stats: dict[str, VariantStats]) -> None:
    """SHARES variants: each round's time and the pass counts at their share of
    sharpness-aware steps, those steps being SAM's or the composition's (SHARE_STEP)."""
    for name, share in SHARES.items():
        s = stats.get(name)
        ref = stats.get(SHARE_STEP.get(name, "sam"))
        if s is None or ref is None:
            continue
        s.step_times = [share * a + (1 - share) * p for a, p in zip(ref.amortised, s.step_times)]
        s.forward_samples = share * ref.forward_samples + (1 - share) * s.forward_samples
        s.backward_samples = share * ref.backward_samples + (1 - share) * s.backward_samples


def step_peak_megabytes(bench: Bench) -> float | None:
    """The most memory one step holds at once beyond what was allocated before it
    (activations, gradients, SDS's losses, …): CUDA's allocator statistics on a GPU, the
    profiler's allocation events on a CPU (None where neither is available)."""
    peak = peak_allocated_bytes(bench.step, bench.batch[0].device)
    return None if peak is None else peak / 2**20


def ratios(stats: dict[str, VariantStats], name: str, ref: str) -> float:
    """Median over rounds of (reference step time / variant step time): a speed ratio."""
    a, r = stats[name].amortised, stats[ref].amortised
    return statistics.median(rr / aa for aa, rr in zip(a, r))


def evaluate_targets(stats: dict[str, VariantStats]) -> list[dict[str, Any]]:
    """Each target with its measured value and PASS/FAIL (missing variants are skipped)."""
    rows = []
    for name, ref, minimum, paper in TARGETS:
        if name in stats and ref in stats:
            value = ratios(stats, name, ref)
            rows.append(
                {
                    "target": f"{name} speed vs {ref} >= {minimum:.2f}x",
                    "value": value,
                    "pass": value >= minimum,
                    "paper": paper,
                }
            )
    if "sam" in stats and "sgd" in stats:
        value = 1.0 / ratios(stats, "sam", "sgd")
        rows.append(
            {
                "target": "SAM step <= 2.05x SGD step",
                "value": value,
                "pass": value <= 2.05,
                "paper": "SAM = 2 x SGD passes",
            }
        )
    for name, st in stats.items():
        if st.ascent_ratio is not None:
            stale = registry_name(name) in ("sam-stale", "rst-stale")
            limit = ASCENT_MEMORY_SSAM if name.startswith("ssam") else ASCENT_MEMORY
            floor = "floor: the theta backup (1x)"
            if stale:
                limit, floor = ASCENT_MEMORY_STALE, "floor: theta backup + last gradient (2x)"
            rows.append(
                {
                    "target": f"{name} ascent memory <= {limit:.1f}x params",
                    "value": st.ascent_ratio,
                    "pass": st.ascent_ratio <= limit,
                    "paper": floor,
                }
            )
    if "sam" in stats and stats["sam"].overhead:
        value = stats["sam"].overhead[0] / statistics.median(stats["sam"].step_times)
        rows.append(
            {
                "target": "optimizer overhead <= 3% of a SAM step",
                "value": value,
                "pass": value <= 0.03,
                "paper": "-",
            }
        )
    return rows


#: What each pass costs, for the cost model below (all at the benchmark's batch size b).
PASSES = {
    "forward": "forward with autograd, batch b",
    "backward": "backward, batch b",
    "backward_swp": "backward, batch b, weight grads of a Bernoulli(beta) subset of tensors only",
    "forward_no_grad": "forward under no_grad, batch b (SDS's sharpness forward)",
    "forward_subset": "forward with autograd, the gamma*b selected samples",
    "backward_subset": "backward, the gamma*b selected samples",
    "forward_slice": "forward with autograd, the f*b ascent slice (f = ascent_fraction)",
    "backward_slice": "backward, the f*b ascent slice",
    "forward_slice_half": "forward with autograd, an ascent slice of b/2",
    "backward_slice_half": "backward, an ascent slice of b/2",
    "forward_norm": "forward, batch b, weight grads for the norm layers only (SAM-ON's pass 1)",
    "backward_norm": "backward, batch b, weight grads for the norm layers only",
    "forward_layers": "forward, batch b, weight grads for the last layers only (sam-layers)",
    "backward_layers": "backward, batch b, weight grads for the last layers only (stops early)",
    "perturb_restore": "a stale step's copy/restore: norm of s, θ backup, θ += ρ s/‖s‖, restore",
}

#: The second slice the cost model times (beside ``ascent_fraction``): pass 1 on b/2.
SLICE_HALF = 0.5


def pass_costs(
    workload: Workload = Workload(),
    *,
    beta: float = 0.6,
    gamma: float = 0.5,
    ascent_fraction: float = 0.25,
    layers: int | float = 0.5,
    rounds: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of each pass in :data:`PASSES`, measured in interleaved rounds.

    The passes the steps are made of, timed one by one on the same model and batch (each
    round runs every pass once): ESAM's, and the cheap ascents' pass 1 — on a slice of
    ⌊f·b + ½⌋ samples (f = ``ascent_fraction``, and b/2), with weight gradients for the
    normalisation layers' affine parameters only (SAM-ON), for the last ``layers`` of the
    layers only (``requires_grad`` off for the others during the forward and the backward,
    as those methods do) — and a stale step's copy/restore. With them,
    :func:`predicted_speeds` says what each variant's speed against SAM must be on this
    hardware, so a missed target can be told apart from overhead of ours. A model without
    normalisation layers has no ``forward_norm`` / ``backward_norm``.
    """
    dev = torch.device(workload.device)
    model, (x, y) = workload.build(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    swp = RandomTensorSubset(beta, seed=seed)
    b = workload.batch_size
    k = max(1, round_half_up(gamma * b))
    k_slice = min(b, max(1, round_half_up(ascent_fraction * b)))
    k_half = min(b, max(1, round_half_up(SLICE_HALF * b)))
    norm_ids = {id(p) for p in norm_params(model)}
    keep_norm = [id(p) in norm_ids for p in params] if norm_ids else None
    last_ids = {id(p) for p in last_layer_params(model, layers)}
    keep_last = [id(p) in last_ids for p in params]
    names = [n for n in PASSES if keep_norm is not None or not n.endswith("_norm")]
    times: dict[str, list[float]] = {name: [] for name in names}
    stale = [torch.randn_like(p) for p in params]  # stands in for last step's gradient
    backups = [torch.empty_like(p) for p in params]

    def clock() -> float:
        _sync(dev)
        return time.perf_counter()

    def forward_backward(xb: Tensor, yb: Tensor, fwd: str, bwd: str, keep=None) -> None:
        if keep is not None:
            for p, kept in zip(params, keep):
                p.requires_grad_(kept)
        try:
            t0 = clock()
            loss = F.cross_entropy(model(xb), yb)
            t1 = clock()
            loss.backward()
            t2 = clock()
        finally:
            for p in params:
                p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        if fwd:
            times[fwd].append(t1 - t0)
        times[bwd].append(t2 - t1)

    @torch.no_grad()
    def perturb_restore(rho: float = 0.05) -> None:
        t0 = clock()
        scale = rho / (float(global_norm(stale, True)) + 1e-12)
        for p, s, backup in zip(params, stale, backups):
            backup.copy_(p)
            p.add_(s, alpha=scale)
        for p, backup in zip(params, backups):
            p.copy_(backup)
        times["perturb_restore"].append(clock() - t0)

    for r in range(warmup + rounds):
        if r == warmup:
            times = {name: [] for name in names}
        forward_backward(x, y, "forward", "backward")
        keep = swp.draw(params)
        forward_backward(x, y, "", "backward_swp", keep=keep)
        t0 = clock()
        with torch.no_grad():
            model(x)
        times["forward_no_grad"].append(clock() - t0)
        forward_backward(x[:k], y[:k], "forward_subset", "backward_subset")
        forward_backward(x[:k_slice], y[:k_slice], "forward_slice", "backward_slice")
        forward_backward(x[:k_half], y[:k_half], "forward_slice_half", "backward_slice_half")
        if keep_norm is not None:
            forward_backward(x, y, "forward_norm", "backward_norm", keep=keep_norm)
        forward_backward(x, y, "forward_layers", "backward_layers", keep=keep_last)
        perturb_restore()
    return {name: statistics.median(ts) for name, ts in times.items()}


def predicted_speeds(
    costs: dict[str, float], *, refresh_every: int | None = None
) -> dict[str, float]:
    """Speed against SAM (SAM step time / variant step time) from the pass costs alone.

    SGD = F + B; SAM = 2 (F + B); SWP alone = F + B_swp + F + B; SDS alone = F + B + F_ng +
    F_k + B_k; ESAM = F + B_swp + F_ng + F_k + B_k; esam-loss = F + B_swp + F_k + B_k.
    The step-skipping methods at share q of sharpness-aware steps: (1 + q)(F + B) — q = 1/k
    for interval and LookSAM, SHARES for late, RST and AE-SAM; MSAM = F + B; K-SAM = F_ng +
    2 (F_k + B_k); ESAM-mix = ESAM; the random-subset control = esam-loss; the whole-batch
    control = SWP alone; ESAM with the BN repair = ESAM (its hooks run no pass); the
    relative MSAM and LookSAM = MSAM and LookSAM.

    The cheap ascents (pass 1 cut, pass 2 = F + B on the whole batch):
    sam-slice = F_fb + B_fb + F + B (the f·b slice; sam-slice@0.5 with the b/2 slice);
    sam-on = F_norm + B_norm + F + B; sam-layers = F_last + B_last + F + B;
    sam-stale = SAM / k + (k − 1)/k · (F + B + C), C the copy/restore, k = refresh_every
    (PERIODS' cycle by default). A composition with a schedule at share q (SHARES) =
    q · (its cheap step) + (1 − q)(F + B). A method whose passes are missing from
    ``costs`` is left out.
    """
    f, b = costs["forward"], costs["backward"]
    sub = costs["forward_subset"] + costs["backward_subset"]
    sam = 2 * (f + b)
    steps = {
        "sgd": f + b,
        "sam": sam,
        "esam-swp": f + costs["backward_swp"] + f + b,
        "esam-sds": f + b + costs["forward_no_grad"] + sub,
        "esam": f + costs["backward_swp"] + costs["forward_no_grad"] + sub,
        "esam-loss": f + costs["backward_swp"] + sub,
        "msam": f + b,
        "ksam": costs["forward_no_grad"] + 2 * sub,
    }
    steps["esam-mix"] = steps["esam"]
    steps["esam-random"] = steps["esam-loss"]
    steps["esam-wholebatch"] = steps["esam-swp"]  # pass 2 forwards and back-propagates all b
    steps["esam-bn"] = steps["esam"]
    steps["msam-rel"] = steps["msam"]
    for name, period in PERIODS.items():
        steps[name] = (1 + 1 / period) * (f + b)
    # the cheap ascents: their own pass 1, then pass 2 on the whole batch
    pass1 = {
        "sam-slice": ("forward_slice", "backward_slice"),
        "sam-slice@0.5": ("forward_slice_half", "backward_slice_half"),
        "sam-on": ("forward_norm", "backward_norm"),
        "sam-layers": ("forward_layers", "backward_layers"),
    }
    for name, (fwd, bwd) in pass1.items():
        if fwd in costs and bwd in costs:
            steps[name] = costs[fwd] + costs[bwd] + f + b
    k = refresh_every if refresh_every is not None else PERIODS["sam-stale"]
    steps["sam-stale"] = sam / k + (k - 1) / k * (f + b + costs.get("perturb_restore", 0.0))
    for name, share in SHARES.items():
        ref = SHARE_STEP.get(name, "sam")
        if ref in steps:
            steps[name] = share * steps[ref] + (1 - share) * (f + b)
    return {name: sam / t for name, t in steps.items()}
