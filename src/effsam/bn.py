"""BatchNorm statistics: keep the ones pass 1 produced, or recompute them at θ.

The original SAM keeps BatchNorm running statistics from the unperturbed pass only.
Setting the momentum to 0 during pass 2 (a common trick) still increments
``num_batches_tracked`` and, for layers built with ``momentum=None`` (cumulative
average), still changes the statistics. Here the buffers are copied before and copied
back after, which is exact for every flavour of BatchNorm (and InstanceNorm with
``track_running_stats``) and costs a few kilobytes of copies.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase


def norm_buffers(model: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every normalisation layer in ``model``."""
    buffers: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(module, name, None)
                if isinstance(buf, Tensor):
                    buffers.append(buf)
    return buffers


#: (buffer, copy) pairs: every running-statistics buffer of a model and its saved value
BNSnapshot = list[tuple[Tensor, Tensor]]


def snapshot_bn(model: nn.Module) -> BNSnapshot:
    """(buffer, copy) pairs for :func:`restore_bn`."""
    with torch.no_grad():
        return [(b, b.detach().clone()) for b in norm_buffers(model)]


def restore_bn(snapshot: BNSnapshot) -> None:
    with torch.no_grad():
        for buf, saved in snapshot:
            buf.copy_(saved)


def bn_finite(snapshot: BNSnapshot) -> bool:
    """Whether every buffer of the snapshot (its current value, not the saved copy) is
    finite: one device sync. A finite but huge batch can make ``running_var`` inf."""
    flags = [torch.isfinite(buf).all() for buf, _ in snapshot if buf.is_floating_point()]
    if not flags:
        return True
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())


# A sharpness-aware step's pass 1 in progress (SharpnessAware.first_pass sets it): a
# callback that takes the model whose BN buffers the step should keep a snapshot of, so
# that a skipped or failed step can put them back.
_WATCH: contextvars.ContextVar[Callable[[nn.Module], None] | None] = contextvars.ContextVar(
    "effsam_bn_watch", default=None
)


@contextlib.contextmanager
def watching_bn(callback: Callable[[nn.Module], None]) -> Iterator[None]:
    """Inside the block, :func:`preserve_bn_stats` hands its model to ``callback``."""
    token = _WATCH.set(callback)
    try:
        yield
    finally:
        _WATCH.reset(token)


@contextlib.contextmanager
def preserve_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Leave every BatchNorm buffer exactly as it was on entry.

    Use it around pass 2 when driving the optimizer by hand::

        with effsam.preserve_bn_stats(model):
            loss_fn(model, batch).mean().backward()
        opt.second_step(zero_grad=True)

    Entered during a sharpness-aware optimizer's pass 1 (inside ``opt.first_pass()``, as
    the closure recipe does with ``enabled=opt.perturbed``, i.e. False there), it also
    hands the buffers as they are to the optimizer, which puts them back if the step is
    skipped (non-finite gradients or statistics) or fails.
    """
    watch = _WATCH.get()
    if watch is not None:
        watch(model)
    snapshot = snapshot_bn(model) if enabled else []
    try:
        yield
    finally:
        restore_bn(snapshot)


def _batch_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


@contextlib.contextmanager
def capture_bn_stats(
    model: nn.Module, into: dict[nn.Module, tuple[Tensor, Tensor]]
) -> Iterator[None]:
    """Record, for every BatchNorm layer in training mode, the batch statistics its input
    had in the forward run inside the block: ``into[layer] = (mean, biased var)`` per
    channel, detached, in float32 (float64 for float64 inputs)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(x, _batch_dims(x), correction=0)
        into[module] = (mean, var)

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.training
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def use_bn_stats(model: nn.Module, stats: dict[nn.Module, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Inside the block, each BatchNorm layer in ``stats`` (in training mode) outputs its
    input normalised with the recorded (mean, var) of another batch — ESAM's BN repair: the
    selected subset normalised as the whole batch was.

    The correction is Batch Renormalization's (Ioffe, 2017): with the subset's own μ_S, σ_S
    (σ² + eps) and the recorded μ_B, σ_B,

        x̂ = (x − μ_S)/σ_S · r + d,    r = sg(σ_S/σ_B),  d = sg((μ_S − μ_B)/σ_B)

    (sg: no gradient). Its value is exactly (x − μ_B)/σ_B; its gradient flows through the
    subset's statistics, as a BN layer's does (normalising by constants instead removes
    BatchNorm's projection of the gradient, and training then diverges)."""

    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        mean_b, var_b = stats[module]
        x = args[0]
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        # one fused kernel: the subset normalised by its own statistics, and those statistics
        x_hat, mu_s, invstd_s = torch.native_batch_norm(
            xs, None, None, None, None, True, 0.0, module.eps
        )
        sd_b = torch.sqrt(var_b.to(xs.dtype) + module.eps)
        r = (1.0 / (invstd_s * sd_b)).detach()  # σ_S / σ_B
        d = ((mu_s - mean_b.to(xs.dtype)) / sd_b).detach()
        # (x̂ r + d) w + b, folded per channel: one multiply and one add per element
        scale = r if module.weight is None else r * module.weight
        shift = d if module.weight is None else d * module.weight
        if module.bias is not None:
            shift = shift + module.bias
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x_hat, scale.view(shape)).to(out.dtype)

    handles = [m.register_forward_hook(hook) for m in stats if m.training]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _norm_layers(model: nn.Module) -> list[_NormBase]:
    """The normalisation layers of ``model`` that keep running mean and variance."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _NormBase)
        and m.track_running_stats
        and isinstance(m.running_mean, Tensor)
        and isinstance(m.running_var, Tensor)
    ]


def _model_input(batch: Any) -> Any:
    """What the model is called with: a tensor batch itself, else the first element of a
    tuple/list batch (``(inputs, targets)``)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(
        f"cannot tell the model's input in a batch of type {type(batch).__name__}: pass "
        "forward=lambda model, batch: model(...)"
    )


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Recompute every BatchNorm layer's running statistics at the current weights.

    Each layer's running mean and variance are reset and re-estimated as the cumulative
    average (``momentum=None``) of the batch statistics over the batches forwarded: with
    μ_j and s²_j the mean and unbiased variance of the layer's input over batch j,
    ``running_mean = (1/N) Σ_j μ_j`` and ``running_var = (1/N) Σ_j s²_j``. Every batch counts
    alike, and nothing of the previous statistics is kept (an exponential average with the
    layer's own momentum would still carry a share of them after a bounded pass).

    The pass runs without gradients with the whole model in train mode (as in training:
    each layer normalises with its batch's statistics), then restores each module's own
    ``training`` flag, each layer's ``momentum`` and ``num_batches_tracked`` (which keeps
    counting training batches only). Weights are not touched, and the random number
    generators (CPU and the model's CUDA devices) are left as they were, so a training run
    goes on exactly as without the pass. A model without such layers costs nothing: no
    batch is forwarded. If the pass fails, every buffer is left as it was.

    Args:
        model: the module (not a DDP wrapper: under data parallel each worker recomputes
            on its own batches).
        batches: an iterable of batches, e.g. the training loader.
        max_batches: use at most this many batches (None: all of them).
        forward: ``forward(model, batch)`` runs the model on a batch (default:
            ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list).

    Returns:
        The number of batches used (0: no BatchNorm layer, or no batch; then nothing
        changed).
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or an integer >= 1, got {max_batches!r}")
    layers = _norm_layers(model)
    if not layers:
        return 0
    snapshot = snapshot_bn(model)
    momenta = [m.momentum for m in layers]
    counts = [
        m.num_batches_tracked.clone() if isinstance(m.num_batches_tracked, Tensor) else None
        for m in layers
    ]
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted(
        {t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda}
    )
    used = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        chosen = batches if max_batches is None else itertools.islice(batches, max_batches)
        with torch.random.fork_rng(devices=devices):
            for batch in chosen:
                if forward is None:
                    model(_model_input(batch))
                else:
                    forward(model, batch)
                used += 1
    except BaseException:
        restore_bn(snapshot)
        raise
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for module, training in flags:
            module.training = training
    if used == 0:
        restore_bn(snapshot)
        return 0
    for m, count in zip(layers, counts):
        if count is not None:
            m.num_batches_tracked.copy_(count)
    return used
