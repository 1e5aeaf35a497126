"""The parts of the ``torch.optim.Optimizer`` contract the sharpness-aware wrapper keeps.

Frameworks (Lightning, the Hugging Face Trainer, accelerate, timm, LR schedulers,
profilers) rely on more than ``step(closure)``. :func:`install` adds, around the methods
of :class:`~effsam.SharpnessAware` (and of every subclass that overrides one of them):

* ``step(closure)``: the closure must leave gradients behind (a do-nothing closure after
  a hand-written backward would otherwise make the step a silent no-op);
* ``step()`` with no closure: finishes a step started with ``first_step`` (a framework
  that ran pass 2's backward itself), and is a clear error otherwise — except for
  torch.distributed.checkpoint's state initialisation (every lr 0, every gradient 0);
* ``state_dict()``: effsam's entry is also referenced from ``param_groups[0]``, which
  torch.distributed.checkpoint keeps (it drops other top-level keys);
* the step pre/post hooks (per optimizer and global) on the two-phase path too: they fire
  around :meth:`second_step`, i.e. around the base optimizer's update, when it is not
  called from ``step``;
* the state-dict hooks (``register_state_dict_pre_hook`` and the three others);
* pickling and ``copy.deepcopy`` (the base optimizer and the policies travel along);
* the base optimizer's ``defaults`` visible through the wrapper (``OneCycleLR`` and
  ``CyclicLR`` look for ``momentum`` / ``betas`` there), with effsam's ``rho`` on top; a
  base whose own defaults hold a ``rho`` (Adadelta) is refused, since its param groups'
  ``rho`` would be read as ρ;
* ``torch.compile`` of a whole training step: Dynamo drops attribute stores on Optimizer
  subclasses inside a compiled region (θ would never be restored), so every method that
  changes the wrapper's per-step state runs outside it, eagerly, which gives the eager
  result; the closure itself stays compiled;
* sharded parameters: FSDP2's DTensors take the per-tensor kernels (DTensor has no
  ``_foreach_copy_``; the norm of a sharded DTensor is a global reduction, so ε is the
  unsharded one); a mask policy whose masks are not laid out like the
  parameters (SSAM-F) is refused there; FSDP1's flat shards are refused (a per-shard
  norm gives ‖ε‖ = ρ·√world).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ._dtensor import is_dtensor

#: Methods that change per-step state: they run outside any compiled region.
EAGER_METHODS = (
    "first_step",
    "second_step",
    "restore",
    "abort_step",
    "begin_step",
    "decide_after_pass1",
    "grad_sq_norm",
    "_pre_pass1_perturb",
    "_draw",
    "_skip",
    "refresh_mask",
    "mask_refresh_due",
)

#: Instance attributes left out of pickles, as torch's ``Optimizer.__getstate__`` does
#: for the hooks (an LR scheduler's patched ``step`` holds a weak reference).
_UNPICKLED = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
    "step",
    "_effsam_depth",
)

_WRAPPED = "_effsam_contract"


def _depth(opt: Any) -> dict[str, int]:
    """Re-entry counters per wrapped call, so nested calls fire the hooks once."""
    d = opt.__dict__.get("_effsam_depth")
    if d is None:
        d = opt.__dict__["_effsam_depth"] = {}
    return d


class _Enter:
    """``with _Enter(opt, "step") as outer:`` — outer is True for the outermost call."""

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
    params = opt._params()
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


def _get_foreach(self: Any) -> bool:
    # DTensor has no sharding rule for _foreach_copy_: DTensor parameters (FSDP2) take the
    # per-tensor kernels, whose results are the same.
    if not self.__dict__.get("_foreach", True):
        return False
    return not any(is_dtensor(p) for group in self.param_groups for p in group["params"])


def _set_foreach(self: Any, value: bool) -> None:
    self.__dict__["_foreach"] = bool(value)


# ---------------------------------------------------------------------- method wrappers
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


class _SkipStep(Exception):
    """The closure returned None and left no gradient: skip the step."""


def _checked_closure(opt: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
    calls = [0]

    def checked() -> Any:
        calls[0] += 1
        out = closure()
        if not any(p.grad is not None for p in opt._params()):
            if calls[0] == 1 and out is None:
                # No loss and no gradient: the caller skipped this batch (a Lightning
                # training_step returning None). As for a plain optimizer: no step.
                raise _SkipStep
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


def _wrap_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        with _Enter(self, "step"):
            if closure is None:
                # --- "no step is pending" (framework glue: effsam/integrations) -------
                if self.perturbed or getattr(self, "_ascended", False):
                    # A framework ran pass 2's backward (or first_step() chose a plain
                    # step, whose pass 1 is the update) and now asks for the update.
                    self.second_step()
                    return None
                if _is_state_initialisation(self):
                    _initialise_state(self)
                    return None
                from ..integrations._frameworks import pending_step_hint

                raise RuntimeError(
                    f"{type(self).__name__}.step() was called without a closure and no "
                    "step is pending. Either pass a closure (zero grads, forward, backward, "
                    "return loss) that step() calls twice, or run pass 1 (under "
                    "opt.first_pass()), opt.first_step(zero_grad=True), pass 2, then "
                    "opt.step() or opt.second_step(); effsam.sharpness_aware_step(model, "
                    "opt, batch, loss_fn) does the whole step." + pending_step_hint(self)
                )
            if not _plain_closure(closure):
                from ..integrations._frameworks import check_closure

                check_closure(self, closure)  # Lightning without its callback, accelerate GA
                # --- end of the framework glue --------------------------------------
            try:
                return fn(self, _checked_closure(self, closure))
            except _SkipStep:
                return None  # step() rolled back the mask draw; nothing was changed

    # The orchestration runs eagerly; the closure's frames are still compiled.
    return torch.compiler.disable(step, recursive=False)


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
    for p in opt._params():
        if "theta" not in opt.state[p]:
            opt.state[p]["theta"] = torch.empty_like(p, memory_format=torch.preserve_format)


def _wrap_second_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def second_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _Enter(self, "step") as outer:
            if not outer:  # inside step(): torch's wrapper of step fires the hooks
                return fn(self, *args, **kwargs)
            return _fire_step_hooks(self, lambda: fn(self, *args, **kwargs))

    return second_step


def _wrap_checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_sharding(self)
        return fn(self, *args, **kwargs)

    return checked


#: The key of effsam's own state (counters, policies) in a state dict.
STATE_KEY = "effsam"


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


def _wrap_state_dict(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def state_dict(self: Any) -> Any:
        with _Enter(self, "state_dict") as outer:
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

    return torch._disable_dynamo(state_dict)


def _wrap_load_state_dict(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        with _Enter(self, "load_state_dict") as outer:
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

    return torch._disable_dynamo(load_state_dict)


def _wrap_init(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base = args[0] if args else kwargs.get("base")
        if (
            isinstance(base, Optimizer)
            and not isinstance(base, _ROOT[0])  # the root refuses that with its own message
            and "rho" in base.defaults
        ):
            raise ValueError(
                f"base optimizer {type(base).__name__} has its own 'rho' hyper-parameter "
                f"(rho={base.defaults['rho']!r}) in its param groups, where effsam keeps ρ: "
                "this base cannot be wrapped"
            )
        fn(self, *args, **kwargs)
        # The base's hyper-parameters (momentum, betas, …) under effsam's own.
        self.defaults = {**self.base.defaults, **self.defaults}

    return __init__


def _getstate(self: Any) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k not in _UNPICKLED}


def _setstate(self: Any, state: dict[str, Any]) -> None:
    Optimizer.__setstate__(self, state)


_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "__init__": _wrap_init,
    "step": _wrap_step,
    "first_step": _wrap_checked,
    "refresh_mask": _wrap_checked,
    "second_step": _wrap_second_step,
    "state_dict": _wrap_state_dict,
    "load_state_dict": _wrap_load_state_dict,
}


def _wrap(cls: type, name: str) -> None:
    fn = cls.__dict__.get(name)
    if fn is None or getattr(fn, _WRAPPED, False):
        return
    wrapped = fn
    if name in _WRAPPERS:
        wrapped = _WRAPPERS[name](wrapped)
    if name in EAGER_METHODS:
        wrapped = torch.compiler.disable(wrapped, recursive=True)
    setattr(wrapped, _WRAPPED, True)
    setattr(cls, name, wrapped)


def _init_subclass(cls: type, **kwargs: Any) -> None:
    super(_ROOT[0], cls).__init_subclass__(**kwargs)
    for name in (*_WRAPPERS, *EAGER_METHODS):
        if name != "__init__":  # the root's __init__ checks the base and merges defaults
            _wrap(cls, name)


_ROOT: list[type] = []


def install(root: type) -> None:
    """Apply the wrappers to ``root`` and, through ``__init_subclass__``, to its subclasses."""
    _ROOT.append(root)
    for name in (*_WRAPPERS, *EAGER_METHODS):
        _wrap(root, name)
    root.__init_subclass__ = classmethod(_init_subclass)  # type: ignore[assignment]
    root.__getstate__ = _getstate  # type: ignore[attr-defined]
    root.__setstate__ = _setstate  # type: ignore[attr-defined]
    root.foreach = property(_get_foreach, _set_foreach)  # type: ignore[attr-defined]
