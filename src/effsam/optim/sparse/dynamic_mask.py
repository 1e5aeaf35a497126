"""SSAM-D: :class:`DynamicMask`, a random sparse mask updated by drop-and-grow."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._dtensor import full_grad
from .._random import SeededPolicy
from .._ranking import common_dtype, round_half_up, select_mask
from .._validate import check_choice, check_fraction, check_int
from .base import SparseMask, all_reduce_sum

GROW_MODES = ("random", "gradient")


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
    #: its masks are cut into each DTensor parameter's local shard (FSDP2)
    masks_follow_param_layout = True

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

    def _install_pending(self, params: Sequence[Tensor]) -> None:
        """Install the mask the last drop/grow computed, or draw the initial random one."""
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
        grads = [full_grad(p).reshape(-1) for p, pooled in zip(self._bound, self._pool) if pooled]
        dtype = common_dtype(grads)
        # one flat copy, made absolute in place (the refresh's memory is a few flat vectors)
        score = torch.cat([g.to(device=device, dtype=dtype) for g in grads]).abs_()
        all_reduce_sum(score)  # the same mask on every worker
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
