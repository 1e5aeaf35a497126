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
  elements dead before the drop regrow (at random, or by largest |g|),
  r_t = r_0 (1 + cos(π t / T)) / 2; the new mask is used from the next step.

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

from ..batching import batch_size
from ._random import SeededPolicy
from ._ranking import common_dtype, largest_indices, round_half_up, select_mask
from ._validate import check_choice, check_fraction, check_int
from .fisher import FISHER_MODES, empirical_fisher
from .masks import PerturbationMask

__all__ = [
    "DynamicMask",
    "FisherMask",
    "SparseMask",
    "empirical_fisher",
    "largest_indices",
]

NORMALISATIONS = ("authors", "masked")
GRANULARITIES = ("element", "tensor")
GROW_MODES = ("random", "gradient")


# ---------------------------------------------------------------------- validation


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


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
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask, p.device_mesh, p.placements, src_data_rank=None)
    return mask


def _all_reduce_sum(flat: Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)


# ---------------------------------------------------------------------- shared machinery
class SparseMask(PerturbationMask):
    """Shared machinery of the SSAM mask policies: a bool mask per optimizer parameter,
    exact density over the perturbable elements, ``state_dict``. Not used directly: see
    :class:`FisherMask` and :class:`DynamicMask`.

    Fields and their invariants (all per optimizer parameter, in the optimizer's order):

    * ``_masks``: the current bool masks (``None`` before the first one is built). They
      are replaced, never modified in place, so holding a reference is a snapshot.
    * ``_pool``: whether the parameter can be perturbed at all (trainable and, for the
      Fisher mask, scored); unpooled parameters have all-False masks.
    * ``_has_any`` / ``_all_true`` / ``_counts``: per mask, any element kept, every
      element kept, the number kept — computed once when a mask is installed.
    * ``_bound`` / ``_index``: the parameters ``draw`` last saw and their positions; the
      mask is checked against their shapes (and moved to their devices) when they change.
    * ``_undo``: the snapshot taken by ``draw``, restored by ``rollback_draw``.

    Args:
        sparsity: s ∈ [0, 1), the fraction of perturbable elements NOT perturbed. s = 0 is
            SAM: no mask is built and no refresh runs.
        update_interval: optimizer steps between refreshes (≥ 1).
        normalisation: ``"authors"`` (ε = m ⊙ ρ g/‖g‖, ‖ε‖ ≤ ρ; the default for element
            masks) or ``"masked"`` (ε = m ⊙ ρ g/‖m ⊙ g‖, ‖ε‖ = ρ).
    """

    granularity = "element"

    def __init__(self, sparsity: float, update_interval: int, normalisation: str) -> None:
        self.sparsity = check_fraction(sparsity, "SSAM sparsity", "[0, 1)", typed=True)
        self.update_interval = check_int(update_interval, "SSAM update_interval", typed=True)
        self.normalisation = check_choice(normalisation, "SSAM normalisation", NORMALISATIONS)
        self.normalise_masked = normalisation == "masked"
        self._masks: list[Tensor] | None = None
        self._pool: list[bool] = []
        self._has_any: list[bool] = []
        self._all_true: list[bool] = []
        self._counts: list[int] = []
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
        # count_nonzero: a bool tensor's sum() would first make an int64 copy (8× its size)
        self._counts = [int(torch.count_nonzero(m)) for m in masks]
        self._has_any = [c > 0 for c in self._counts]
        self._all_true = [c == m.numel() for c, m in zip(self._counts, masks)]
        total = sum(m.numel() for m, p in zip(masks, pool) if p)
        kept = sum(c for c, p in zip(self._counts, pool) if p)
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
            return None if all(self._has_any) else list(self._has_any)
        return None  # "authors": ‖g‖ needs every gradient

    def rollback_draw(self) -> None:
        if self._undo is not None:
            self._restore(self._undo)
            self._undo = None

    def element_counts(self) -> list[int] | None:
        if self.trivial or self._masks is None:
            return None
        return list(self._counts)

    def element_masks(self, params: Sequence[Tensor]) -> list[Tensor | None] | None:
        if self.trivial or self._masks is None or self.granularity == "tensor":
            return None
        out: list[Tensor | None] = []
        for p in params:
            i = self._index[id(p)]
            if self._all_true[i]:
                out.append(None)
                continue
            # the bool mask itself: multiplying by it promotes, no float copy is kept
            mask = self._masks[i]
            if _is_dtensor(p):
                # FSDP2: this rank's shard of the (same on every rank) full mask, rebuilt
                # only when the mask changes
                cache = self.__dict__.setdefault("_shards", {})
                hit = cache.get(i)
                if hit is None or hit[0] is not mask:
                    hit = cache[i] = (mask, _like_param(mask.to(p.device), p))
                mask = hit[1]
            out.append(mask)
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
            self._masks, self._pool, self._has_any, self._all_true = None, [], [], []
            self._counts, self.density = [], 1.0
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

        F_j = Σ_{i ≤ n} (∂ℓ_i/∂θ_j)²                  (see empirical_fisher for the mode)
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
        fisher_mode: ``"eval"`` (default: BatchNorm with running statistics, which at the
            first refresh are those of initialisation) or ``"train"`` (the authors'
            procedure: each sample alone in train mode, on a copy of the model with
            BatchNorm using the sample's own statistics; see :func:`empirical_fisher`).
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
        fisher_mode: str = "eval",
    ) -> None:
        self.granularity = check_choice(granularity, "SSAM granularity", GRANULARITIES)
        self.fisher_mode = check_choice(fisher_mode, "SSAM fisher_mode", FISHER_MODES)
        if normalisation is None:
            normalisation = "masked" if granularity == "tensor" else "authors"
        if granularity == "tensor" and normalisation != "masked":
            raise ValueError(
                f"Invalid SSAM normalisation: {normalisation!r} with granularity='tensor' "
                "(pass 1 has no gradient for unkept tensors, so ‖g‖ cannot be formed: use "
                "'masked')"
            )
        super().__init__(sparsity, update_interval, normalisation)
        self.num_samples = check_int(num_samples, "SSAM num_samples", typed=True)
        self.chunk_size = (
            None if chunk_size is None else check_int(chunk_size, "SSAM chunk_size", typed=True)
        )
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
                model,
                params,
                batch,
                loss_fn,
                self.num_samples,
                self.chunk_size,
                mode=self.fisher_mode,
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
        dtype = common_dtype(scored)
        flat = torch.cat([f.reshape(-1).to(device=device, dtype=dtype) for f in scored])
        _all_reduce_sum(flat)  # the same mask on every worker
        if not bool(torch.isfinite(flat.max())):  # non-negative: max is NaN or inf iff one is
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
            chosen = select_mask(flat, k, largest=True)
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
            f"granularity={self.granularity!r}, fisher_mode={self.fisher_mode!r}"
        )


# ---------------------------------------------------------------------- SSAM-D
class DynamicMask(SparseMask, SeededPolicy):
    r"""SSAM-D: a random sparse mask updated by drop-and-grow (dynamic sparse training).

    The initial mask keeps k = round((1 − s) · N) perturbable elements drawn uniformly
    (created at the first step; needs no data). A refresh at step t, with
    r_t = r_0 (1 + cos(π min(t, T) / T)) / 2 and n_t = min(round(r_t · k), N − k)::

        drop: the n_t live elements with the smallest |g|
        grow: n_t elements among those that were dead BEFORE the drop (a just-dropped
              element cannot come straight back): uniformly at random
              (``grow="random"``), or those with the largest |g| (``grow="gradient"``)

    so the density stays exactly 1 − s (the cap N − k matters only when there are fewer
    dead elements than the drop count). As in the authors' code, refreshes run at every
    step t with ``t % update_interval == 0``, t = 0 included, from the pass-1 gradient g
    of step t itself (no extra forward or backward); step t still perturbs with the old
    mask, and the new one is used from step t + 1. Parameters without a gradient that step
    count as |g| = 0. A non-finite |g| keeps the previous mask (and warns).

    The refresh needs no data: the optimizer schedules it by itself in every API
    (``sharpness_aware_step``, ``step(closure)``, ``first_pass``/``first_step``).

    Args:
        sparsity: s ∈ [0, 1).
        total_steps: T of the cosine schedule (≥ 1): the training's total optimizer steps.
        update_interval: steps between refreshes.
        drop_rate: r_0 ∈ [0, 1] (authors: 0.5).
        grow: ``"random"`` (the paper) or ``"gradient"``.
        normalisation: ``"authors"`` (default) or ``"masked"``.
        seed: seed of the generator for the initial mask and random regrowth (its stream
            ``"ssam-d"`` is derived from it; its state is in ``state_dict``; equal seeds give
            equal masks on every worker).
    """

    name = "dynamic"
    stream = "ssam-d"
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
        self.total_steps = check_int(total_steps, "SSAM total_steps", typed=True)
        self.drop_rate = check_fraction(drop_rate, "SSAM drop_rate", "[0, 1]", typed=True)
        self.grow = check_choice(grow, "SSAM grow", GROW_MODES)
        self._seed_stream(seed, "SSAM")
        #: step whose pass-1 gradient the scheduled drop/grow will use (None: none due)
        self._pending: int | None = None
        #: the mask computed by the last drop/grow, installed at the next step's draw
        self._next: list[Tensor] | None = None
        #: elements dropped (and regrown) by the last refresh
        self.last_drop_count = 0

    def drop_rate_at(self, step: int) -> float:
        """r_t = r_0 (1 + cos(π min(t, T) / T)) / 2."""
        t = min(step, self.total_steps)
        return self.drop_rate * (1.0 + math.cos(math.pi * t / self.total_steps)) / 2.0

    def refresh_due(self, step: int) -> bool:
        return (
            not self.trivial
            and step % self.update_interval == 0
            and step != self.last_refresh_step
            and self._pending != step
        )

    def refresh(
        self,
        model: nn.Module | None,
        params: Sequence[Tensor],
        batch: Any,
        loss_fn: Callable[..., Any] | None,
        step: int,
    ) -> bool:
        """Schedule a drop/grow from this step's pass-1 gradient (model and batch unused).
        True when an update is scheduled."""
        if self.trivial:
            return False
        self._pending = step
        return True

    def _prepare(self, params: Sequence[Tensor]) -> None:
        if self.trivial:
            return
        if self._next is not None:
            self._install(self._next, self._pool)
            self._next = None
        elif self._masks is None:
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
        snap["next_masks"] = self._next
        snap["last_drop_count"] = self.last_drop_count
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        super()._restore(snap)
        self._load_generator(snap["generator"], "SSAM-D")
        self._pending = snap["pending"]
        self._next = snap.get("next_masks")
        self.last_drop_count = snap["last_drop_count"]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state["next_masks"] is not None:
            state["next_masks"] = [m.clone() for m in state["next_masks"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if state.get("next_masks") is not None:
            state["next_masks"] = [m.clone().bool() for m in state["next_masks"]]
        super().load_state_dict(state)

    def _init_random(self, params: Sequence[Tensor]) -> None:
        pool = [p.requires_grad for p in params]
        total = sum(p.numel() for p, pooled in zip(params, pool) if pooled)
        # k uniformly at random: the largest of uniform draws (no int64 permutation)
        u = torch.rand(total, generator=self.generator)
        chosen = select_mask(u, self.num_kept(total), largest=True)
        self._install(self._split(chosen, params, pool), pool)

    def prepare(self, params: Sequence[Tensor]) -> None:
        """Compute a scheduled drop/grow from the pass-1 gradients now present."""
        if self._pending is not None:
            self._drop_and_grow()

    def _drop_and_grow(self) -> None:
        step, self._pending = self._pending, None
        assert self._masks is not None and step is not None
        live = self._flat_mask()
        device = live.device
        grads = [_full_grad(p).reshape(-1) for p, pooled in zip(self._bound, self._pool) if pooled]
        dtype = common_dtype(grads)
        # one flat copy, made absolute in place (the refresh's memory is a few flat vectors)
        score = torch.cat([g.to(device=device, dtype=dtype) for g in grads]).abs_()
        _all_reduce_sum(score)  # the same mask on every worker
        if not bool(torch.isfinite(score.max())):  # non-negative: max is NaN or inf iff one is
            warnings.warn(
                f"effsam: SSAM-D refresh at step {step} got a non-finite gradient; the "
                "previous mask is kept",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        k = int(torch.count_nonzero(live))
        n_dead = live.numel() - k
        n_drop = min(round_half_up(self.drop_rate_at(step) * k), n_dead)
        # drop: the n_drop smallest |g| among the live
        new = live & ~select_mask(score, n_drop, live, largest=False)
        dead = ~live  # dead before the drop: the growth pool
        if self.grow == "random":
            del score
            # n_drop uniformly among the dead: the largest of uniform draws
            u = torch.rand(live.numel(), generator=self.generator).to(device)
            new |= select_mask(u, n_drop, dead, largest=True)
        else:
            new |= select_mask(score, n_drop, dead, largest=True)
        self._next = self._split(new, self._bound, self._pool)
        self.last_refresh_step = step
        self.last_drop_count = n_drop
        self.refreshes += 1

    @property
    def next_masks(self) -> list[Tensor] | None:
        """The mask the last drop/grow computed, used from the next step (read-only)."""
        return self._next

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, total_steps={self.total_steps}, "
            f"drop_rate={self.drop_rate}, grow={self.grow!r}, seed={self.seed}"
        )
