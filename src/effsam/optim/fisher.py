"""SSAM-F's score: the diagonal empirical Fisher of a batch's first samples, from per-sample
gradients computed in batches with ``torch.func``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

# batching is a torch-only helper on batch structure (tensor, tuple/list, dict), shared
# with step.py; nothing else of the package is imported here.
from ..batching import batch_size, batch_tensors, index_batch, map_tensors

FISHER_MODES = ("eval", "train")


class _SampleLoss(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's
    parameters whatever way ``loss_fn`` calls the model."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        out = self.loss_fn(self.model, batch)
        if isinstance(out, tuple):  # (losses, aux)
            out = out[0]
        return out.sum()


def empirical_fisher(
    model: nn.Module,
    params: Sequence[Tensor],
    batch: Any,
    loss_fn: Callable[..., Any],
    num_samples: int,
    chunk_size: int | None = None,
    mode: str = "eval",
) -> list[Tensor | None]:
    r"""Diagonal empirical Fisher F_j = Σ_{i ≤ n} (∂ℓ_i/∂θ_j)² over the first
    n = min(``num_samples``, batch size) samples of ``batch``, with their own labels.

    Per-sample gradients are computed in batches with ``torch.func`` (``vmap`` over
    ``grad`` of a ``functional_call``), ``chunk_size`` samples at a time (bounding memory
    at chunk_size gradient copies).

    ``mode="eval"`` (default): the model runs in eval mode — BatchNorm normalises with its
    running statistics, dropout is off; no buffer is written. Early in training the running
    statistics are still those of initialisation, so this network is not the one being
    trained. ``mode="train"``: the SSAM authors' procedure, each sample alone through the
    model in train mode — BatchNorm normalises with the sample's own statistics (over its
    spatial positions; a BatchNorm1d on [b, C] inputs cannot do that and raises) and
    dropout is active. It runs on a copy of the model whose norm layers track no running
    statistics (``torch.func.replace_all_batch_norm_modules_``), so the model's buffers are
    untouched. Either way every module's training flag is restored afterwards and
    ``.grad`` is neither read nor written.

    Args:
        model: the module ``loss_fn`` evaluates (not DDP-wrapped).
        params: the parameters to score (e.g. an optimizer's, in its order).
        batch: a tensor, tuple/list or dict of tensors indexed on dim 0.
        loss_fn: ``loss_fn(model, batch)`` → per-sample losses (or ``(losses, aux)``).
        num_samples: N_F ≥ 1.
        chunk_size: samples per vectorised chunk (``None``: all at once).
        mode: ``"eval"`` or ``"train"``.

    Returns:
        Per entry of ``params``: F in (at least) float32, or ``None`` for a tensor that is
        not a trainable parameter of ``model`` (it cannot be scored).
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"Invalid Fisher mode: {mode!r} (choose from {list(FISHER_MODES)})")
    names = {id(p): name for name, p in model.named_parameters()}
    wanted: dict[str, int] = {}
    for i, p in enumerate(params):
        name = names.get(id(p))
        if name is not None and p.requires_grad:
            wanted[f"model.{name}"] = i
    out: list[Tensor | None] = [None] * len(params)
    if not wanted:
        return out
    n = min(num_samples, batch_size(batch))
    first = index_batch(batch, slice(0, n))
    leaves = batch_tensors(first)
    primals = {key: params[i].detach() for key, i in wanted.items()}
    if mode == "train":
        net = copy.deepcopy(model)
        replace_all_batch_norm_modules_(net)
        net.train()
        randomness = "different"  # dropout draws its own mask per sample
    else:
        net = model
        randomness = "error"
    wrapper = _SampleLoss(net, loss_fn)

    def sample_loss(theta: dict[str, Tensor], sample: tuple[Tensor, ...]) -> Tensor:
        it = iter(sample)
        one = map_tensors(first, lambda _: next(it).unsqueeze(0))
        return functional_call(wrapper, theta, (one,))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0), randomness=randomness)
    step = n if chunk_size is None else chunk_size
    flags = [(m, m.training) for m in model.modules()]
    if mode == "eval":
        model.eval()
    acc: dict[str, Tensor] = {}
    try:
        for start in range(0, n, step):
            chunk = tuple(t[start : start + step] for t in leaves)
            try:
                grads = per_sample_grads(primals, chunk)
            except (RuntimeError, ValueError) as err:
                if type(err) not in (RuntimeError, ValueError):
                    raise  # the loss_fn's own exception types pass through unchanged
                raise RuntimeError(
                    "SSAM-F computes per-sample gradients with torch.func (vmap over grad): "
                    "the model and loss_fn must be vmap-compatible (no .item(), no in-place "
                    "updates of captured tensors, no data-dependent Python control flow"
                    + (
                        "; in fisher_mode='train' every norm layer must see more than one "
                        "value per channel in a single sample"
                        if mode == "train"
                        else ""
                    )
                    + f"): {err}"
                ) from err
            for key, g in grads.items():
                sq = g.to(torch.promote_types(g.dtype, torch.float32)).square().sum(0)
                acc[key] = sq if key not in acc else acc[key] + sq
    finally:
        for module, flag in flags:
            module.training = flag  # per module: mixed train/eval flags survive
    for key, i in wanted.items():
        out[i] = acc[key]
    return out
