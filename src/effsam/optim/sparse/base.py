"""The shared machinery of SSAM's mask policies: :class:`SparseMask` (a bool mask per
optimizer parameter of exact density, its layout checks, its state)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._dtensor import is_dtensor, like_param
from .._ranking import round_half_up
from .._validate import check_choice, check_fraction, check_int
from ..masks import PerturbationMask

NORMALISATIONS = ("authors", "masked")


def all_reduce_sum(flat: Tensor) -> None:
    """Sum ``flat`` over the workers in place (nothing outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)


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
    * ``_shards``: for DTensor parameters (FSDP2), each mask's local shard, keyed by the
      parameter's position and valid while its full mask is the one it was cut from.

    Args:
        sparsity: s ∈ [0, 1), the fraction of perturbable elements NOT perturbed. s = 0 is
            SAM: no mask is built and no refresh runs.
        update_interval: optimizer steps between refreshes (≥ 1).
        normalisation: ``"authors"`` (ε = m ⊙ ρ g/‖g‖, ‖ε‖ ≤ ρ; the default for element
            masks) or ``"masked"`` (ε = m ⊙ ρ g/‖m ⊙ g‖, ‖ε‖ = ρ).
    """

    granularity = "element"
    #: not with DTensor parameters (FSDP2) unless a subclass says so: SSAM-D does, SSAM-F
    #: (its Fisher information goes through torch.func on full-size tensors) does not
    masks_follow_param_layout = False

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
        #: FSDP2: per parameter index, (the full mask, this rank's shard of it); a cache,
        #: rebuilt whenever the mask is replaced, so neither saved nor snapshotted
        self._shards: dict[int, tuple[Tensor, Tensor]] = {}
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
        self._install_pending(params)
        self._bind(params)
        return self._pass1_flags()

    def _install_pending(self, params: Sequence[Tensor]) -> None:
        """Start of a step, before the layout check: install a mask built since the last
        step, or built lazily now (none in the base class)."""

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
            if is_dtensor(p):
                # FSDP2: this rank's shard of the (same on every rank) full mask, rebuilt
                # only when the mask changes
                hit = self._shards.get(i)
                if hit is None or hit[0] is not mask:
                    hit = self._shards[i] = (mask, like_param(mask.to(p.device), p))
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
