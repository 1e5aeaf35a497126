"""Recognise the framework that called an effsam optimizer's ``step()``, for the two
places where the optimizer alone cannot tell a right call from a wrong one:

* :func:`check_closure` — ``step(closure)`` from a framework loop that would train
  silently wrong: Lightning without ``SharpnessAwareCallback`` (pass 2 would update the
  BatchNorm statistics a second time, and ``accumulate_grad_batches`` would be wrong),
  accelerate's gradient accumulation (the micro-batches where accelerate does not step
  never reach the closure). It raises before anything is computed.
* :func:`pending_step_hint` — what to use instead, appended to the error of a
  ``step()`` without a closure and with no step pending (the HF Trainer, timm's loop and
  its ``NativeScaler``, an optimizer wrapper such as timm's ``Lookahead`` around effsam's).

Nothing here imports a framework: callers are recognised by the module their code lives
in, and only the frames above the ``step()`` call are read.
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any

import torch

#: optimizers built by effsam.integrations.timm.register()'s factories
TIMM_BUILT: weakref.WeakSet = weakref.WeakSet()

_LIGHTNING = ("lightning.", "pytorch_lightning.", "lightning_fabric.")
_MAX_FRAMES = 40


def _module(obj: Any) -> str:
    return str(getattr(type(obj), "__module__", "") or "")


def _frames(depth: int = 2) -> list[Any]:
    out = []
    try:
        frame = sys._getframe(depth)
    except ValueError:  # pragma: no cover - a shallow stack
        return out
    while frame is not None and len(out) < _MAX_FRAMES:
        out.append(frame)
        frame = frame.f_back
    return out


def _has_sharpness_aware_callback(trainer: Any) -> bool:
    for cb in getattr(trainer, "callbacks", None) or []:
        for klass in type(cb).__mro__:
            if (
                klass.__name__ == "SharpnessAwareCallback"
                and klass.__module__ == "effsam.integrations.lightning"
            ):
                return True
    return False


def _lightning_module(closure: Any) -> Any:
    """The LightningModule of a Lightning precision plugin's wrapped closure
    (``partial(plugin._wrap_closure, model, optimizer, closure)``), else None."""
    if not isinstance(closure, functools.partial):
        return None
    owner = getattr(closure.func, "__self__", None)
    if owner is None or not _module(owner).startswith(_LIGHTNING):
        return None
    return closure.args[0] if closure.args else None


def check_closure(opt: Any, closure: Any) -> None:
    """Refuse ``opt.step(closure)`` from a framework loop that would train wrong."""
    module = _lightning_module(closure)
    if module is not None:
        trainer = getattr(module, "_trainer", None) or getattr(module, "trainer", None)
        inner = closure.args[2] if len(closure.args) > 2 else None
        if getattr(inner, "__name__", "") == "do_nothing_closure":
            # LightningOptimizer.step() with no closure: one pass already ran
            raise RuntimeError(
                f"effsam: {type(opt).__name__}.step() was called through Lightning without "
                "a closure, after a single backward: a sharpness-aware step needs two "
                "passes. Under manual optimisation use "
                "effsam.integrations.lightning.manual_step(self, batch, loss_fn) in "
                "training_step (or opt.step(closure=...) with a closure that runs the "
                "forward and self.manual_backward, and SharpnessAwareCallback among the "
                "Trainer's callbacks). Nothing was changed"
            )
        if trainer is not None and not _has_sharpness_aware_callback(trainer):
            raise RuntimeError(
                f"effsam: Lightning called {type(opt).__name__}.step(closure) without "
                "effsam.integrations.lightning.SharpnessAwareCallback among the Trainer's "
                "callbacks. Without it pass 2 updates the BatchNorm running statistics a "
                "second time, and accumulate_grad_batches and gradient clipping act on the "
                "wrong gradient. Use L.Trainer(callbacks=[SharpnessAwareCallback()], ...). "
                "Nothing was changed"
            )
        return
    if "accelerate" not in sys.modules:
        return
    for frame in _frames(2):
        owner = frame.f_locals.get("self")
        if (
            owner is not None
            and type(owner).__name__ == "AcceleratedOptimizer"
            and getattr(owner, "optimizer", None) is opt
        ):
            steps = int(getattr(getattr(owner, "gradient_state", None), "num_steps", 1) or 1)
            if steps > 1:
                raise RuntimeError(
                    f"effsam: opt.step(closure) with accelerate's gradient accumulation "
                    f"(num_steps={steps}): inside accelerator.accumulate accelerate does "
                    "not step on the first micro-batches, so the closure never sees them "
                    "(and accelerator.backward divides the loss by the number of steps). "
                    "Use Accelerator(gradient_accumulation_steps=1) and "
                    "effsam.integrations.accelerate.sharpness_aware_step(accelerator, "
                    "model, opt, batch, loss_fn, accumulation_steps=n). Nothing was changed"
                )
            return


def pending_step_hint(opt: Any) -> str:
    """What to use instead, from the code that called ``step()`` without a closure."""
    modules: list[str] = []
    for frame in _frames(2):
        name = str(frame.f_globals.get("__name__", ""))
        owner = frame.f_locals.get("self")
        if (
            isinstance(owner, torch.optim.Optimizer)
            and owner is not opt
            and not _module(owner).startswith(("effsam.", "torch.", "accelerate."))
        ):
            lookahead = "timm" in _module(owner) or "Lookahead" in type(owner).__name__
            return (
                f" Here {type(owner).__name__} wraps the effsam optimizer and calls its "
                "step() after a single backward: effsam's optimizer must be the OUTER "
                "wrapper, e.g. effsam.SAM(" + type(owner).__name__ + "(torch.optim.SGD("
                "params, ...)), rho=0.05)"
                + (
                    " — not Lookahead(SAM(...)), which timm's 'lookahead_sam…' names build"
                    if lookahead
                    else ""
                )
                + "."
            )
        modules.append(name)

    def called_from(*prefixes: str) -> bool:
        return any(m.startswith(prefixes) for m in modules)

    if called_from("transformers."):
        return (
            " Here the Hugging Face Trainer calls optimizer.step() after its own single "
            "backward: use effsam.integrations.transformers.SharpnessAwareTrainer, a "
            "drop-in Trainer subclass that runs both passes."
        )
    if called_from(*_LIGHTNING):
        return (
            " Here Lightning steps the optimizer itself: add "
            "effsam.integrations.lightning.SharpnessAwareCallback() to the Trainer's "
            "callbacks (fp16 with a GradScaler: also plugins=[SharpnessAwarePrecision("
            "'16-mixed', device)]); under manual optimisation call opt.step(closure) or "
            "effsam.integrations.lightning.manual_step."
        )
    if called_from("timm.") or opt in TIMM_BUILT:
        return (
            " Here timm's training block (loss.backward(); optimizer.step(), or its "
            "NativeScaler) runs one backward: replace it with "
            "effsam.integrations.timm.train_step(model, optimizer, batch, loss_fn, "
            "loss_scaler=torch.amp.GradScaler(...), clip_grad=...)."
        )
    if called_from("accelerate."):
        return (
            " Here accelerate's optimizer.step() follows a single accelerator.backward: "
            "use effsam.integrations.accelerate.sharpness_aware_step(accelerator, model, "
            "opt, batch, loss_fn), or opt.step(closure) with accelerator.backward inside "
            "the closure."
        )
    return ""
