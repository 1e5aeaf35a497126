"""What every analysis shares: the loss convention, the parameters analysed, eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

#: ``loss_fn(model, batch)`` → per-sample losses ``[n]`` (or a tuple whose first element is
#: that), the convention of :func:`effsam.sharpness_aware_step`.
LossFn = Callable[[nn.Module, Any], Any]


def mean_loss(model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
    """The mean over the batch of the per-sample losses ``loss_fn`` returns (0-d tensor).

    Raises:
        TypeError: if ``loss_fn`` returns neither a tensor nor a tuple starting with one.
        ValueError: if the losses are not a scalar or a vector.
    """
    out = loss_fn(model, batch)
    if isinstance(out, tuple) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(
            f"loss_fn must return per-sample losses as a tensor, got {type(out).__name__}"
        )
    if out.dim() > 1:
        raise ValueError(f"loss_fn returned losses of shape {list(out.shape)}, expected [n]")
    return out.mean()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, in ``model.parameters()`` order.

    Raises:
        ValueError: if there are none.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to analyse")
    return params


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode and restores each one's own ``training`` flag on exit.

    Eval mode makes the loss a deterministic function of the weights: BatchNorm normalises
    with its running statistics (so no buffer is written and samples do not interact) and
    dropout is off. Flags are restored per module because a model may be deliberately mixed
    (e.g. frozen BatchNorm layers inside a training model).
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is one and at least ``minimum``; ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0; ValueError naming it."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def flat_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``⟨a, b⟩`` of two vectors stored as lists of tensors (0-d tensor, no sync)."""
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same draws on every device."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)
