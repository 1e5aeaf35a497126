"""Batches as tensors, tuples/lists or dicts of tensors, all indexed on dim 0."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor


def _tensors(batch: Any) -> list[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        return [("batch", batch)]
    if isinstance(batch, Mapping):
        items = [(f"batch[{k!r}]", v) for k, v in batch.items()]
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        items = [(f"batch[{i}]", v) for i, v in enumerate(batch)]
    else:
        raise TypeError(
            f"a batch must be a tensor, a tuple/list or a dict of tensors, got {type(batch).__name__}"
        )
    return [(name, v) for name, v in items if isinstance(v, Tensor)]


def batch_size(batch: Any) -> int:
    """Size of dim 0, checked to agree across every tensor of the batch."""
    tensors = _tensors(batch)
    if not tensors:
        raise TypeError("the batch holds no tensor")
    sizes = {}
    for name, t in tensors:
        if t.dim() == 0:
            raise ValueError(f"{name} is a 0-d tensor; every tensor in a batch needs dim 0")
        sizes[name] = t.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the batch's tensors disagree on dim 0: {sizes}")
    return next(iter(sizes.values()))


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The same structure with every tensor replaced by ``fn(tensor)``, in order
    (non-tensor entries kept as they are)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: (fn(v) if isinstance(v, Tensor) else v) for k, v in batch.items()})
    items = [fn(v) if isinstance(v, Tensor) else v for v in batch]
    if hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*items)
    return tuple(items) if isinstance(batch, tuple) else items


def batch_tensors(batch: Any) -> list[Tensor]:
    """The batch's tensors, in the order :func:`map_tensors` visits them."""
    return [t for _, t in _tensors(batch)]


def index_batch(batch: Any, index: Tensor | slice) -> Any:
    """The same structure with every tensor indexed on dim 0."""
    return map_tensors(batch, lambda t: t[index])


def split_batch(batch: Any, chunks: int) -> list[Any]:
    """``chunks`` micro-batches of (nearly) equal size along dim 0."""
    b = batch_size(batch)
    if chunks < 1 or chunks > b:
        raise ValueError(f"cannot split a batch of {b} into {chunks} micro-batches")
    bounds = [round(i * b / chunks) for i in range(chunks + 1)]
    return [index_batch(batch, slice(bounds[i], bounds[i + 1])) for i in range(chunks)]
