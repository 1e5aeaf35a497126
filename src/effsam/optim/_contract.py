"""The parts of the ``torch.optim.Optimizer`` contract the sharpness-aware wrapper keeps.

Frameworks (Lightning, the Hugging Face Trainer, accelerate, timm, LR schedulers,
profilers) rely on more than ``step(closure)``. :class:`~effsam.SharpnessAware` keeps the
contract with the decorators and helpers below, applied and called where it defines its
methods (nothing here changes a class):

* :func:`eager` — ``torch.compile`` of a whole training step: Dynamo drops attribute
  stores on Optimizer subclasses inside a compiled region (θ would never be restored), so
  every method that changes the wrapper's per-step state runs outside it, eagerly, which
  gives the eager result. :func:`eager_frame` for ``step``: its own frame runs eagerly, the
  closure's frames stay compiled;
* ``step(closure)``: :func:`checked_closure` — the closure must leave gradients behind (a
  do-nothing closure after a hand-written backward would otherwise make the step a silent
  no-op); :func:`step_without_closure` — ``step()`` with no closure finishes a step
  started with ``first_step`` (a framework that ran pass 2's backward itself), and is a
  clear error otherwise, except for torch.distributed.checkpoint's state initialisation
  (every lr 0, every gradient 0);
* :func:`fires_step_hooks` — the step pre/post hooks (per optimizer and global) on the
  two-phase path too: they fire around ``second_step``, i.e. around the base optimizer's
  update, when it is not called from ``step``;
* :func:`runs_state_dict_hooks`, :func:`runs_load_state_dict_hooks` — the state-dict hooks
  (``register_state_dict_pre_hook`` and the three others); effsam's entry is also
  referenced from ``param_groups[0]``, which torch.distributed.checkpoint keeps (it drops
  other top-level keys);
* :func:`checks_sharding` — sharded parameters: a mask policy whose per-element masks
  are not laid out like the parameters (SSAM-F) is refused on FSDP2's DTensors, and
  FSDP1's flat shards are refused (a per-shard norm gives ‖ε‖ = ρ·√world). DTensors take
  the per-tensor kernels (the class's ``foreach`` property: DTensor has no
  ``_foreach_copy_``; the norm of a sharded DTensor is a global reduction, so ε is the
  unsharded one);
* :data:`UNPICKLED` — pickling and ``copy.deepcopy`` (the base optimizer and the policies
  travel along, the hooks do not).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from itertools import chain
from typing import Any, TypeVar

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ._dtensor import is_dtensor

F = TypeVar("F", bound=Callable[..., Any])

#: Instance attributes left out of pickles, as torch's ``Optimizer.__getstate__`` does
#: for the hooks (an LR scheduler's patched ``step`` holds a weak reference).
UNPICKLED = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
    "step",
    "_effsam_depth",
)

#: The key of effsam's own state (counters, policies) in a state dict.
STATE_KEY = "effsam"


# ---------------------------------------------------------------------- torch.compile
def eager(fn: F) -> F:
    """Run ``fn``, and everything it calls, outside any compiled region (it changes the
    optimizer's per-step state, whose attribute stores Dynamo would drop)."""
    return torch.compiler.disable(fn, recursive=True)  # type: ignore[return-value]


def eager_frame(fn: F) -> F:
    """Run ``fn``'s own frame eagerly; the functions it calls (a training closure) are
    still compiled. The methods it calls that change per-step state are :func:`eager`."""
    return torch.compiler.disable(fn, recursive=False)  # type: ignore[return-value]


# ---------------------------------------------------------------------- nesting
def _depth(opt: Any) -> dict[str, int]:
    """Re-entry counters per kind of call, so nested calls fire the hooks once."""
    d = opt.__dict__.get("_effsam_depth")
    if d is None:
        d = opt.__dict__["_effsam_depth"] = {}
    return d


class entered:  # noqa: N801 - used as a function: ``with entered(opt, "step") as outer``
    """``with entered(opt, "step") as outer:`` — outer is True for the outermost call."""

    def __init__(self, opt: Any, key: str) -> None:
        self.d, self.key = _depth(opt), key

    def __enter__(self) -> bool:
        n = self.d.get(self.key, 0)
        self.d[self.key] = n + 1
        return n == 0

    def __exit__(self, *exc: Any) -> None:
        self.d[self.key] -= 1


# ---------------------------------------------------------------------- sharded params
def _is_fsdp1(p: Any) -> bool:
    return type(p).__name__ == "FlatParameter" or bool(getattr(p, "_fsdp_flattened", False))


def check_sharding(opt: Any) -> None:
    """Refuse FSDP1 (FullyShardedDataParallel) parameters: each rank holds a flat shard,
    and the ascent's norm over it would be a per-rank norm. On DTensor parameters
    (FSDP2), refuse a mask policy whose per-element masks are not laid out like the
    parameters (``masks_follow_param_layout`` False: SSAM-F); SSAM-D's are."""
    params = opt.params
    if any(is_dtensor(p) for p in params) and not opt.mask.masks_follow_param_layout:
        raise NotImplementedError(
            f"effsam: the {opt.mask.name!r} mask keeps full-size per-element masks (SSAM-F "
            "also computes its Fisher information through torch.func), which do not work "
            "with FSDP2 (fully_shard) DTensor parameters: SSAM-F under FSDP2 is not "
            "supported; SAM, ASAM, ESAM and SSAM-D (mask='dynamic') are"
        )
    for p in params:
        if _is_fsdp1(p):
            raise RuntimeError(
                "effsam: the parameters are FSDP1 (FullyShardedDataParallel) flat shards; the "
                "ascent would normalise each rank's shard by its own norm (‖ε‖ = ρ·√world, "
                "silently wrong). Shard the model with torch.distributed.fsdp.fully_shard "
                "(FSDP2) instead, or use DistributedDataParallel"
            )


def checks_sharding(fn: F) -> F:
    """Call :func:`check_sharding` before ``fn`` (the methods that perturb or mask)."""

    @functools.wraps(fn)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_sharding(self)
        return fn(self, *args, **kwargs)

    return checked  # type: ignore[return-value]


# ---------------------------------------------------------------------- step hooks
def _fire_step_hooks(opt: Any, fn: Callable[[], Any]) -> Any:
    args: tuple = (opt,)
    kwargs: dict = {}
    name = f"Optimizer.step#{type(opt).__name__}.step"
    with torch.autograd.profiler.record_function(name):
        for pre in chain(
            _global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()
        ):
            result = pre(opt, args, kwargs)
            if result is not None and not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"a step pre-hook must return None or (new_args, new_kwargs), got {result!r}"
                )
        out = fn()
        opt._optimizer_step_code()
        for post in chain(
            opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
        ):
            post(opt, args, kwargs)
    return out


def fires_step_hooks(fn: F) -> F:
    """Fire the step pre/post hooks around ``fn`` (``second_step``, the base optimizer's
    update) when it is called by itself; inside ``step`` torch's own wrapper of ``step``
    fires them."""

    @functools.wraps(fn)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with entered(self, "step") as outer:
            if not outer:
                return fn(self, *args, **kwargs)
            return _fire_step_hooks(self, lambda: fn(self, *args, **kwargs))

    return hooked  # type: ignore[return-value]


# ---------------------------------------------------------------------- step(closure)
class SkipStep(Exception):
    """The closure returned None and left no gradient: skip the step."""


def checked_closure(opt: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
    """``closure`` checked on each call: it must leave a gradient on some parameter.

    A closure a framework wrapped is first checked for the loops that cannot work
    (Lightning without its callback, accelerate's gradient accumulation). A first call
    that returns None and leaves no gradient (a Lightning ``training_step`` returning
    None: the batch is skipped) raises :class:`SkipStep`."""
    if not _plain_closure(closure):
        from ..integrations._frameworks import check_closure

        check_closure(opt, closure)
    calls = [0]

    def checked() -> Any:
        calls[0] += 1
        out = closure()
        if not any(p.grad is not None for p in opt.params):
            if calls[0] == 1 and out is None:
                # No loss and no gradient: the caller skipped this batch (a Lightning
                # training_step returning None). As for a plain optimizer: no step.
                raise SkipStep
            raise RuntimeError(
                f"effsam: call {calls[0]} of the closure left no gradient on any parameter. "
                "The closure must zero the gradients, run the forward AND the backward, and "
                "return the loss (a framework's do-nothing closure after a hand-written "
                "backward, e.g. Lightning's `manual_backward(loss); opt.step()`, cannot "
                "work: give step() a closure that runs forward+backward, or drive "
                "first_step()/second_step() yourself)"
            )
        return out

    return checked


def _plain_closure(closure: Any) -> bool:
    """A closure no framework wrapped (a plain function or lambda): nothing to check."""
    return isinstance(closure, types.FunctionType) and "accelerate" not in sys.modules


def step_without_closure(opt: Any) -> None:
    """``step()`` with no closure: finish the pending step (a framework ran pass 2's
    backward, or ``first_step`` chose a plain step whose pass 1 is the update),
    initialise the state for torch.distributed.checkpoint, or raise naming what to do."""
    if opt.perturbed or opt._ascended:
        opt.second_step()
        return
    if _is_state_initialisation(opt):
        _initialise_state(opt)
        return
    from ..integrations._frameworks import pending_step_hint

    raise RuntimeError(
        f"{type(opt).__name__}.step() was called without a closure and no step is pending. "
        "Either pass a closure (zero grads, forward, backward, return loss) that step() "
        "calls twice, or run pass 1 (under opt.first_pass()), opt.first_step(zero_grad="
        "True), pass 2, then opt.step() or opt.second_step(); effsam.sharpness_aware_step("
        "model, opt, batch, loss_fn) does the whole step." + pending_step_hint(opt)
    )


def _is_state_initialisation(opt: Any) -> bool:
    """torch.distributed.checkpoint initialises an optimizer's state (before saving, and
    on a fresh optimizer before loading) by ``step()`` with every learning rate 0 and
    every gradient 0: such a step cannot change any weight."""
    groups = opt.param_groups
    if not groups or any(float(g.get("lr", 1.0)) != 0.0 for g in groups):
        return False
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    return bool(grads) and all(not bool(torch.count_nonzero(g)) for g in grads)


def _initialise_state(opt: Any) -> None:
    """The base optimizer's state (one step at lr 0) and the wrapper's θ buffers."""
    opt.base.step()
    for p in opt.params:
        if "theta" not in opt.state[p]:
            opt.state[p]["theta"] = torch.empty_like(p, memory_format=torch.preserve_format)


# ---------------------------------------------------------------------- state dicts
def _group_layout(sd: Any) -> Any:
    """Also reference the ``"effsam"`` entry from ``param_groups[0]``.

    torch.distributed.checkpoint (``get_optimizer_state_dict``) keeps only ``state`` and
    ``param_groups`` and drops other top-level keys; param-group keys it keeps. The same
    object sits in both places, so ``torch.save`` stores it once."""
    if isinstance(sd, dict) and STATE_KEY in sd and sd.get("param_groups"):
        groups = list(sd["param_groups"])
        groups[0] = {**groups[0], STATE_KEY: sd[STATE_KEY]}
        sd = {**sd, "param_groups": groups}
    return sd


def _top_layout(sd: dict[str, Any]) -> dict[str, Any]:
    """Move the ``"effsam"`` entry out of the param groups (where a state dict that went
    through torch.distributed.checkpoint has it) to the top level."""
    groups = sd.get("param_groups")
    if not groups or not any(isinstance(g, dict) and STATE_KEY in g for g in groups):
        return sd
    clean = []
    found = None
    for g in groups:
        if isinstance(g, dict) and STATE_KEY in g:
            g = dict(g)
            entry = g.pop(STATE_KEY)
            found = entry if found is None else found
        clean.append(g)
    sd = {**sd, "param_groups": clean}
    sd.setdefault(STATE_KEY, found)
    return sd


def runs_state_dict_hooks(fn: F) -> F:
    """``state_dict`` as torch's: outside compiled regions, the state-dict pre/post hooks
    around ``fn``, and the ``"effsam"`` entry also referenced from ``param_groups[0]``."""

    @functools.wraps(fn)
    @torch._disable_dynamo  # (one wrapper: wraps() names it after fn)
    def state_dict(self: Any) -> Any:
        with entered(self, "state_dict") as outer:
            if not outer:
                return fn(self)
            for pre in self._optimizer_state_dict_pre_hooks.values():
                pre(self)
            sd = _group_layout(fn(self))
            for post in self._optimizer_state_dict_post_hooks.values():
                result = post(self, sd)
                if result is not None:
                    sd = result
            return sd

    return state_dict  # type: ignore[return-value]


def runs_load_state_dict_hooks(fn: F) -> F:
    """``load_state_dict`` as torch's: outside compiled regions, the load-state-dict
    pre/post hooks around ``fn``, which gets the ``"effsam"`` entry at the top level
    wherever it was saved (torch.distributed.checkpoint keeps it in the param groups)."""

    @functools.wraps(fn)
    @torch._disable_dynamo  # (one wrapper: wraps() names it after fn)
    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        with entered(self, "load_state_dict") as outer:
            if not outer:
                return fn(self, state_dict)
            state_dict = dict(state_dict)
            for pre in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre(self, state_dict)
                if result is not None:
                    state_dict = result
            fn(self, _top_layout(state_dict))
            for post in self._optimizer_load_state_dict_post_hooks.values():
                post(self)
            return None

    return load_state_dict  # type: ignore[return-value]
