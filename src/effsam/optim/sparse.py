"""SSAM's mask policies (Mi et al., NeurIPS 2022): perturb a sparse subset of the weights.

A binary mask m over parameter elements, of density 1 − s (s the sparsity), turns SAM's
ascent into

    ε = m ⊙ ρ g / (‖g‖₂ + δ)            normalisation="authors" (the authors' code): ‖ε‖ ≤ ρ
    ε = m ⊙ ρ g / (‖m ⊙ g‖₂ + δ)        normalisation="masked":                      ‖ε‖ = ρ

Pass 2 (the descent gradient) stays dense. Two ways to choose m:

* :class:`FisherMask` (SSAM-F): the k = round((1 − s) · N) elements with the largest
  diagonal empirical Fisher F_j = Σ_{i ≤ N_F} (∂ℓ_i/∂θ_j)², one global top-k over every
  perturbable element (not per layer), recomputed every ``update_interval`` steps.
  ``granularity="tensor"`` (an extension, not in the paper) keeps whole tensors instead,
  so pass 1 can skip the weight gradients of the others and sparsity saves real time.
* :class:`DynamicMask` (SSAM-D): a random mask of density 1 − s; every ``update_interval``
  steps the r_t fraction of live elements with the smallest |g| is dropped and as many
  dead elements regrow (at random, or by largest |g|), r_t = r_0 (1 + cos(π t / T)) / 2.

N counts the elements of the optimizer's parameters that can be perturbed: those with
``requires_grad`` (and, for the Fisher mask, that belong to the model). The mask is kept
as one bool tensor per optimizer parameter, in the optimizer's order; it is saved in the
optimizer's ``state_dict``. Ties in any ranking go to the lower flat index (optimizer
order, row-major), so masks are deterministic.

Under ``torch.distributed`` the scores (Fisher or |g|) are summed over workers before the
ranking and random draws use generators seeded alike, so every worker holds the same mask.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

# batching is a torch-only helper on batch structure (tensor, tuple/list, dict), shared
# with step.py; nothing else of the package is imported here.
from ..batching import batch_size, batch_tensors, index_batch, map_tensors
from .masks import PerturbationMask, cpu_generator_state, round_half_up

NORMALISATIONS = ("authors", "masked")
GRANULARITIES = ("element", "tensor")
GROW_MODES = ("random", "gradient")


# ---------------------------------------------------------------------- validation
def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"Invalid SSAM sparsity: {sparsity!r} (must be a number in [0, 1))")
    if not (0.0 <= sparsity < 1.0):  # also rejects NaN
        raise ValueError(f"Invalid SSAM sparsity: {sparsity!r} (must be in [0, 1))")
    return float(sparsity)


def _check_count(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid SSAM {what}: {value!r} (must be an int >= {minimum})")
    if value < minimum:
        raise ValueError(f"Invalid SSAM {what}: {value!r} (must be an int >= {minimum})")
    return value


def _check_choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid SSAM {what}: {value!r} (choose from {list(choices)})")
    return value


# ---------------------------------------------------------------------- ranking helpers
def largest_indices(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` largest entries of a 1-D tensor; ties go to the lower
    index. O(n) (one selection, no full sort), deterministic on every device."""
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    threshold = torch.kthvalue(scores, n - k + 1).values  # the k-th largest value
    above = (scores > threshold).nonzero().flatten()
    ties = (scores == threshold).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def _all_reduce_sum(flat: Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (FSDP2: an all-gather), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _full_grad(p: Tensor) -> Tensor:
    """``p``'s whole gradient (zeros if it has none), also for a DTensor parameter."""
    if p.grad is None:
        return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    return _full(p.grad)


def _like_param(mask: Tensor, p: Tensor) -> Tensor:
    """A full-size mask laid out like ``p``: for a DTensor parameter (FSDP2), this rank's
    shard of it (every rank holds the same full mask, so no communication)."""
    if hasattr(p, "device_mesh") and hasattr(p, "placements"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask, p.device_mesh, p.placements, src_data_rank=None)
    return mask


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------------- batches
class _LossOf(nn.Module):
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
) -> list[Tensor | None]:
    r"""Diagonal empirical Fisher F_j = Σ_{i ≤ n} (∂ℓ_i/∂θ_j)² over the first
    n = min(``num_samples``, batch size) samples of ``batch``, with their own labels.

    Per-sample gradients are computed in batches with ``torch.func`` (``vmap`` over
    ``grad`` of a ``functional_call``), ``chunk_size`` samples at a time (bounding memory
    at chunk_size gradient copies). The model runs in eval mode: per-sample gradients are
    only well defined when samples do not interact through batch statistics, and eval mode
    writes no BatchNorm buffer and disables dropout. Every module's training flag is
    restored afterwards; ``.grad`` is neither read nor written.

    Args:
        model: the module ``loss_fn`` evaluates (not DDP-wrapped).
        params: the parameters to score (e.g. an optimizer's, in its order).
        batch: a tensor, tuple/list or dict of tensors indexed on dim 0.
        loss_fn: ``loss_fn(model, batch)`` → per-sample losses (or ``(losses, aux)``).
        num_samples: N_F ≥ 1.
        chunk_size: samples per vectorised chunk (``None``: all at once).

    Returns:
        Per entry of ``params``: F in (at least) float32, or ``None`` for a tensor that is
        not a trainable parameter of ``model`` (it cannot be scored).
    """
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
    wrapper = _LossOf(model, loss_fn)
    primals = {key: params[i].detach() for key, i in wanted.items()}

    def sample_loss(theta: dict[str, Tensor], sample: tuple[Tensor, ...]) -> Tensor:
        it = iter(sample)
        one = map_tensors(first, lambda _: next(it).unsqueeze(0))
        return functional_call(wrapper, theta, (one,))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0))
    step = n if chunk_size is None else chunk_size
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    acc: dict[str, Tensor] = {}
    try:
        for start in range(0, n, step):
            chunk = tuple(t[start : start + step] for t in leaves)
            try:
                grads = per_sample_grads(primals, chunk)
            except RuntimeError as err:
                raise RuntimeError(
                    "SSAM-F computes per-sample gradients with torch.func (vmap over grad): "
                    "the model and loss_fn must be vmap-compatible (no .item(), no in-place "
                    f"updates of captured tensors, no data-dependent Python control flow): {err}"
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


# ---------------------------------------------------------------------- shared machinery
class SparseMask(PerturbationMask):
    """Shared machinery of the SSAM mask policies: a bool mask per optimizer parameter,
    exact density over the perturbable elements, float copies cached for the ascent,
    ``state_dict``. Not used directly: see :class:`FisherMask` and :class:`DynamicMask`.

    Args:
        sparsity: s ∈ [0, 1), the fraction of perturbable elements NOT perturbed. s = 0 is
            SAM: no mask is built and no refresh runs.
        update_interval: optimizer steps between refreshes (≥ 1).
        normalisation: ``"authors"`` (ε = m ⊙ ρ g/‖g‖, ‖ε‖ ≤ ρ; the default for element
            masks) or ``"masked"`` (ε = m ⊙ ρ g/‖m ⊙ g‖, ‖ε‖ = ρ).
    """

    granularity = "element"

    def __init__(self, sparsity: float, update_interval: int, normalisation: str) -> None:
        self.sparsity = _check_sparsity(sparsity)
        self.update_interval = _check_count(update_interval, "update_interval")
        self.normalisation = _check_choice(normalisation, "normalisation", NORMALISATIONS)
        self.normalise_masked = normalisation == "masked"
        self._masks: list[Tensor] | None = None
        self._pool: list[bool] = []
        self._keep: list[bool] = []
        self._all_true: list[bool] = []
        self._float: dict[int, Tensor] = {}
        self._index: dict[int, int] = {}
        self._bound: list[Tensor] = []
        self._undo: dict[str, Any] | None = None
        #: realised density: perturbed / perturbable elements (1.0 before any mask exists)
        self.density = 1.0
        #: optimizer step (``opt.steps``) of the last successful refresh
        self.last_refresh_step: int | None = None
        #: successful refreshes so far
        self.refreshes = 0

    @property
    def trivial(self) -> bool:
        """Sparsity 0: every element is perturbed, exactly SAM."""
        return self.sparsity == 0.0

    @property
    def masks(self) -> list[Tensor] | None:
        """The current mask: one bool tensor per optimizer parameter (read-only)."""
        return self._masks

    def num_kept(self, total: int) -> int:
        """k = round((1 − s) · N), rounded half up."""
        return round_half_up((1.0 - self.sparsity) * total)

    # ---------------------------------------------------------------- installing masks
    def _install(self, masks: list[Tensor], pool: list[bool]) -> None:
        self._masks = masks
        self._pool = pool
        self._keep = [bool(m.any()) for m in masks]
        self._all_true = [bool(m.all()) for m in masks]
        self._float = {}
        total = sum(m.numel() for m, p in zip(masks, pool) if p)
        kept = sum(int(m.sum()) for m, p in zip(masks, pool) if p)
        self.density = kept / total if total else 1.0

    def _bind(self, params: Sequence[Tensor]) -> None:
        """Map the optimizer's parameters to mask indices; check the mask still fits."""
        if len(params) == len(self._bound) and all(a is b for a, b in zip(params, self._bound)):
            return
        self._bound = list(params)
        self._index = {id(p): i for i, p in enumerate(params)}
        if self._masks is None:
            return
        if len(self._masks) != len(params) or any(
            m.shape != p.shape for m, p in zip(self._masks, params)
        ):
            raise RuntimeError(
                f"the {self.name!r} mask was built for {len(self._masks)} tensors of other "
                f"shapes than the optimizer's {len(params)} parameters: call "
                "opt.refresh_mask(model, batch, loss_fn) after changing the parameters"
            )
        if any(m.device != p.device for m, p in zip(self._masks, params)):
            self._masks = [m.to(p.device) for m, p in zip(self._masks, params)]
            self._float = {}

    def _split(self, flat: Tensor, params: Sequence[Tensor], pool: list[bool]) -> list[Tensor]:
        """A flat bool vector over the pool's elements back to one mask per parameter."""
        masks, offset = [], 0
        for p, pooled in zip(params, pool):
            if pooled:
                masks.append(flat[offset : offset + p.numel()].view(p.shape).to(p.device))
                offset += p.numel()
            else:
                masks.append(torch.zeros(p.shape, dtype=torch.bool, device=p.device))
        return masks

    def _flat_mask(self) -> Tensor:
        assert self._masks is not None
        pooled = [m.reshape(-1) for m, p in zip(self._masks, self._pool) if p]
        device = pooled[0].device
        return torch.cat([m.to(device) for m in pooled])

    # ---------------------------------------------------------------- the skeleton's hooks
    def draw(self, params: Sequence[Tensor]) -> list[bool] | None:
        self._undo = self._snapshot()
        self._prepare(params)
        self._bind(params)
        return self._pass1_flags()

    def _prepare(self, params: Sequence[Tensor]) -> None:
        """Start of a step, before the layout check (a lazily built mask goes here)."""

    def _pass1_flags(self) -> list[bool] | None:
        if self.trivial or self._masks is None:
            return None
        if self.granularity == "tensor" or self.normalise_masked:
            # ‖g‖ is only needed over perturbed tensors: the others skip weight gradients.
            return None if all(self._keep) else list(self._keep)
        return None  # "authors": ‖g‖ needs every gradient

    def rollback_draw(self) -> None:
        if self._undo is not None:
            self._restore(self._undo)
            self._undo = None

    def element_masks(self, params: Sequence[Tensor]) -> list[Tensor | None] | None:
        if self.trivial or self._masks is None or self.granularity == "tensor":
            return None
        out: list[Tensor | None] = []
        for p in params:
            i = self._index[id(p)]
            if self._all_true[i]:
                out.append(None)  # nothing to multiply
                continue
            cached = self._float.get(i)
            if cached is None or cached.dtype != p.dtype or cached.device != p.device:
                # One float copy per tensor, rebuilt only when the mask changes.
                cached = self._float[i] = _like_param(
                    self._masks[i].to(device=p.device, dtype=p.dtype), p
                )
            out.append(cached)
        return out

    # ---------------------------------------------------------------- state
    def _snapshot(self) -> dict[str, Any]:
        # Masks are replaced, never modified in place, so references are a snapshot.
        return {
            "masks": self._masks,
            "pool": self._pool,
            "last_refresh_step": self.last_refresh_step,
            "refreshes": self.refreshes,
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        if snap["masks"] is None:
            self._masks, self._pool, self._keep, self._all_true = None, [], [], []
            self._float, self.density = {}, 1.0
        elif snap["masks"] is not self._masks:
            self._install(snap["masks"], snap["pool"])
        self.last_refresh_step = snap["last_refresh_step"]
        self.refreshes = snap["refreshes"]

    def state_dict(self) -> dict[str, Any]:
        snap = self._snapshot()
        if snap["masks"] is not None:
            snap["masks"] = [m.clone() for m in snap["masks"]]
            snap["pool"] = list(snap["pool"])
        snap["sparsity"] = self.sparsity
        return snap

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sparsity", self.sparsity) != self.sparsity:
            warnings.warn(
                f"effsam: loading a {self.name!r} mask saved with sparsity "
                f"{state['sparsity']!r} into a policy with sparsity {self.sparsity!r}; the "
                "loaded mask is used until the next refresh",
                RuntimeWarning,
                stacklevel=2,
            )
        snap = dict(state)
        if snap["masks"] is not None:
            snap["masks"] = [m.clone().bool() for m in snap["masks"]]
            snap["pool"] = [bool(p) for p in snap["pool"]]
        self._masks = None  # force the install
        self._restore(snap)
        self._bound = []  # re-check the layout and devices at the next draw
        self._undo = None

    def extra_repr(self) -> str:
        return (
            f"sparsity={self.sparsity}, update_interval={self.update_interval}, "
            f"normalisation={self.normalisation!r}"
        )


# ---------------------------------------------------------------------- SSAM-F
class FisherMask(SparseMask):
    r"""SSAM-F: perturb the elements with the largest diagonal empirical Fisher.

    At each refresh, with n = min(``num_samples``, batch size) samples of the batch::

        F_j = Σ_{i ≤ n} (∂ℓ_i/∂θ_j)²                  (eval mode; see empirical_fisher)
        m   = top-k(F) over all perturbable elements,  k = round((1 − s) · N)

    Refreshes run before the first step (``ready`` is False until then; the skeleton
    refuses to step without a mask) and then whenever ``step % update_interval == 0``.
    A refresh whose Fisher is not finite keeps the previous mask and warns.

    ``granularity="tensor"`` (an extension, not the paper's method): whole tensors are
    ranked by Fisher mass per element, F̄_n = Σ_{j∈n} F_j / |n|, and taken greedily in that
    order; a tensor is taken when it brings the kept count closer to k (a larger one that
    would overshoot is passed over for smaller ones further down). The realised density is
    therefore close to, not exactly, 1 − s: read it from ``density``. Pass 1 computes
    weight gradients for the kept tensors only (as ESAM's SWP), so ε is normalised by
    their gradient: only ``normalisation="masked"`` is possible.

    Optimizer parameters that are not trainable parameters of the model cannot be scored:
    they are left out of N and never perturbed (a warning says how many).

    Args:
        sparsity: s ∈ [0, 1).
        num_samples: N_F ≥ 1 (authors: 16 on CIFAR, 128 on ImageNet).
        update_interval: steps between refreshes (authors: one epoch).
        granularity: ``"element"`` or ``"tensor"``.
        normalisation: ``"authors"`` or ``"masked"``; default ``"authors"`` for element
            masks, ``"masked"`` for tensor masks.
        chunk_size: samples per vectorised per-sample-gradient chunk (memory bound).
    """

    name = "fisher"
    needs_data = True

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        num_samples: int = 16,
        update_interval: int = 390,
        granularity: str = "element",
        normalisation: str | None = None,
        chunk_size: int | None = 16,
    ) -> None:
        self.granularity = _check_choice(granularity, "granularity", GRANULARITIES)
        if normalisation is None:
            normalisation = "masked" if granularity == "tensor" else "authors"
        if granularity == "tensor" and normalisation != "masked":
            raise ValueError(
                f"Invalid SSAM normalisation: {normalisation!r} with granularity='tensor' "
                "(pass 1 has no gradient for unkept tensors, so ‖g‖ cannot be formed: use "
                "'masked')"
            )
        super().__init__(sparsity, update_interval, normalisation)
        self.num_samples = _check_count(num_samples, "num_samples")
        self.chunk_size = None if chunk_size is None else _check_count(chunk_size, "chunk_size")
        #: samples the last refresh used (per worker)
        self.last_num_samples = 0
        self._warned_unscored = False

    @property
    def ready(self) -> bool:
        """Whether a mask exists (always True at sparsity 0)."""
        return self.trivial or self._masks is not None

    def refresh_due(self, step: int) -> bool:
        if self.trivial:
            return False
        if not self.ready:
            return True
        return step % self.update_interval == 0 and step != self.last_refresh_step

    @torch.no_grad()
    def refresh(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        batch: Any,
        loss_fn: Callable[..., Any],
        step: int,
    ) -> bool:
        """Recompute the mask from ``batch``; True when a new mask was installed."""
        if self.trivial:
            return False
        with torch.enable_grad():
            fisher = empirical_fisher(
                model, params, batch, loss_fn, self.num_samples, self.chunk_size
            )
        pool = [f is not None for f in fisher]
        if not any(pool):
            raise RuntimeError(
                "SSAM-F: none of the optimizer's parameters is a trainable parameter of the "
                f"model given to refresh_mask ({type(model).__name__})"
            )
        unscored = sum(1 for p, f in zip(params, fisher) if f is None and p.requires_grad)
        if unscored and not self._warned_unscored:
            self._warned_unscored = True
            warnings.warn(
                f"effsam: {unscored} trainable optimizer parameter(s) are not parameters of "
                "the model given to refresh_mask: they get no Fisher score and are never "
                "perturbed",
                RuntimeWarning,
                stacklevel=2,
            )
        scored = [f for f in fisher if f is not None]
        device = scored[0].device
        dtype = _common_dtype(scored)
        flat = torch.cat([f.reshape(-1).to(device=device, dtype=dtype) for f in scored])
        _all_reduce_sum(flat)  # the same mask on every worker
        if not bool(torch.isfinite(flat).all()):
            kept = "the previous mask is kept" if self._masks is not None else "no mask yet"
            warnings.warn(
                f"effsam: SSAM-F refresh at step {step} got a non-finite Fisher estimate; {kept}",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        self.last_num_samples = min(self.num_samples, batch_size(batch))
        k = self.num_kept(flat.numel())
        if self.granularity == "element":
            chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
            chosen[largest_indices(flat, k)] = True
        else:
            chosen = self._choose_tensors(flat, [f.numel() for f in scored], k)
        self._install(self._split(chosen, params, pool), pool)
        self.last_refresh_step = step
        self.refreshes += 1
        self._bound = []
        return True

    @staticmethod
    def _choose_tensors(flat: Tensor, sizes: list[int], k: int) -> Tensor:
        """Whole tensors by Fisher mass per element, greedily towards k elements."""
        mass = torch.stack([seg.sum() for seg in flat.split(sizes)])
        per_element = mass / torch.tensor(sizes, dtype=mass.dtype, device=mass.device)
        order = torch.sort(per_element, descending=True, stable=True).indices.tolist()
        take = [False] * len(sizes)
        kept = 0
        for n in order:
            if kept + sizes[n] / 2 < k:  # closer to k with tensor n than without
                take[n] = True
                kept += sizes[n]
        return torch.cat(
            [torch.full((s,), t, dtype=torch.bool, device=flat.device) for s, t in zip(sizes, take)]
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_samples={self.num_samples}, "
            f"granularity={self.granularity!r}"
        )


# ---------------------------------------------------------------------- SSAM-D
class DynamicMask(SparseMask):
    r"""SSAM-D: a random sparse mask updated by drop-and-grow (dynamic sparse training).

    The initial mask keeps k = round((1 − s) · N) perturbable elements drawn uniformly
    (created at the first step; needs no data). A refresh at step t, with
    r_t = r_0 (1 + cos(π min(t, T) / T)) / 2 and n_t = round(r_t · k)::

        drop: the n_t live elements with the smallest |g|
        grow: n_t elements among the dead ones (dead after the drop, so a just-dropped
              element can come back): uniformly at random (``grow="random"``), or those
              with the largest |g| (``grow="gradient"``)

    so the density stays exactly 1 − s. g is the pass-1 gradient of the refresh step
    itself: ``refresh`` only schedules the update, which is applied when the skeleton asks
    for the element masks in ``first_step`` — the gradient at the current weights, at no
    extra forward or backward. Parameters without a gradient that step count as |g| = 0.
    A non-finite |g| keeps the previous mask (and warns). Refreshes run at steps t > 0
    with ``t % update_interval == 0``.

    Args:
        sparsity: s ∈ [0, 1).
        total_steps: T of the cosine schedule (≥ 1): the training's total optimizer steps.
        update_interval: steps between refreshes.
        drop_rate: r_0 ∈ [0, 1] (authors: 0.5).
        grow: ``"random"`` (the paper) or ``"gradient"``.
        normalisation: ``"authors"`` (default) or ``"masked"``.
        seed: seed of the generator for the initial mask and random regrowth (its state is
            in ``state_dict``; equal seeds give equal masks on every worker).
    """

    name = "dynamic"
    #: needs no data: the random initial mask is made at the first step
    ready = True

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        total_steps: int,
        update_interval: int = 390,
        drop_rate: float = 0.5,
        grow: str = "random",
        normalisation: str = "authors",
        seed: int = 0,
    ) -> None:
        super().__init__(sparsity, update_interval, normalisation)
        self.total_steps = _check_count(total_steps, "total_steps")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
            raise TypeError(f"Invalid SSAM drop_rate: {drop_rate!r} (must be a number in [0, 1])")
        if not (0.0 <= drop_rate <= 1.0):
            raise ValueError(f"Invalid SSAM drop_rate: {drop_rate!r} (must be in [0, 1])")
        self.drop_rate = float(drop_rate)
        self.grow = _check_choice(grow, "grow", GROW_MODES)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Invalid SSAM seed: {seed!r} (must be an int)")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._pending: int | None = None
        #: elements dropped (and regrown) by the last refresh
        self.last_drop_count = 0

    def drop_rate_at(self, step: int) -> float:
        """r_t = r_0 (1 + cos(π min(t, T) / T)) / 2."""
        t = min(step, self.total_steps)
        return self.drop_rate * (1.0 + math.cos(math.pi * t / self.total_steps)) / 2.0

    def refresh_due(self, step: int) -> bool:
        return (
            not self.trivial
            and step > 0
            and step % self.update_interval == 0
            and step != self.last_refresh_step
        )

    def refresh(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        batch: Any,
        loss_fn: Callable[..., Any],
        step: int,
    ) -> bool:
        """Schedule a drop/grow for this step's pass-1 gradient (model and batch unused).
        True when an update is scheduled."""
        if self.trivial:
            return False
        self._pending = step
        return True

    def _prepare(self, params: Sequence[Tensor]) -> None:
        if not self.trivial and self._masks is None:
            self._bound = []
            self._init_random(params)

    def _pass1_flags(self) -> list[bool] | None:
        if self._pending is not None:
            return None  # the drop/grow update needs every |g|
        return super()._pass1_flags()

    def _snapshot(self) -> dict[str, Any]:
        snap = super()._snapshot()
        snap["generator"] = self.generator.get_state()
        snap["pending"] = self._pending
        snap["last_drop_count"] = self.last_drop_count
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        super()._restore(snap)
        self.generator.set_state(cpu_generator_state(snap["generator"], "SSAM-D"))
        self._pending = snap["pending"]
        self.last_drop_count = snap["last_drop_count"]

    def _init_random(self, params: Sequence[Tensor]) -> None:
        pool = [p.requires_grad for p in params]
        total = sum(p.numel() for p, pooled in zip(params, pool) if pooled)
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=self.generator)[: self.num_kept(total)]] = True
        self._install(self._split(chosen, params, pool), pool)

    def element_masks(self, params: Sequence[Tensor]) -> list[Tensor | None] | None:
        if self._pending is not None:
            self._apply_pending()
        return super().element_masks(params)

    def _apply_pending(self) -> None:
        step, self._pending = self._pending, None
        assert self._masks is not None and step is not None
        live = self._flat_mask()
        device = live.device
        grads = [_full_grad(p).reshape(-1) for p, pooled in zip(self._bound, self._pool) if pooled]
        dtype = _common_dtype(grads)
        score = torch.cat([g.to(device=device, dtype=dtype).abs() for g in grads])
        _all_reduce_sum(score)  # the same mask on every worker
        if not bool(torch.isfinite(score).all()):
            warnings.warn(
                f"effsam: SSAM-D refresh at step {step} got a non-finite gradient; the "
                "previous mask is kept",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        k = int(live.sum())
        n_drop = round_half_up(self.drop_rate_at(step) * k)
        live_idx = live.nonzero().flatten()
        new = live.clone()
        new[live_idx[largest_indices(-score[live_idx], n_drop)]] = False
        dead_idx = (~new).nonzero().flatten()
        if self.grow == "random":
            pick = torch.randperm(dead_idx.numel(), generator=self.generator)[:n_drop]
            grown = dead_idx[pick.to(device)]
        else:
            grown = dead_idx[largest_indices(score[dead_idx], n_drop)]
        new[grown] = True
        self._install(self._split(new, self._bound, self._pool), self._pool)
        self.last_refresh_step = step
        self.last_drop_count = n_drop
        self.refreshes += 1

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, total_steps={self.total_steps}, "
            f"drop_rate={self.drop_rate}, grow={self.grow!r}, seed={self.seed}"
        )
