"""PEFT (LoRA) models: the parameters to build an optimizer over, and the checks.

Every sharpness-aware optimizer of effsam works on a ``peft`` model when it is built over
the trainable parameters only (the adapters, and any ``modules_to_save``): the ascent then
perturbs the adapters alone, its restore copies only them, and the frozen base weights
are never copied, never perturbed and never changed::

    from peft import LoraConfig, get_peft_model
    from effsam.integrations.peft import trainable_parameters

    model = get_peft_model(base_model, LoraConfig(r=8, lora_alpha=16, target_modules=[...]))
    opt = effsam.SAM(trainable_parameters(model), base=torch.optim.AdamW, lr=2e-4, rho=0.05)

Flat-LoRA (:class:`effsam.optim.flatlora.FlatLoRA`) perturbs the merged weight of each
LoRA layer instead and needs the model: ``FlatLoRA(trainable_parameters(model),
base=torch.optim.AdamW, lr=2e-4, model=model, total_steps=T)``. See docs/lora.md.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["trainable_parameters", "frozen_parameters", "check_trainable_only"]


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters with ``requires_grad`` (a LoRA model's adapters), each once, in
    ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def frozen_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters without ``requires_grad`` (a LoRA model's base weights)."""
    return [p for p in model.parameters() if not p.requires_grad]


def check_trainable_only(optimizer: object) -> None:
    """Raise if ``optimizer``'s param groups hold a frozen parameter (an optimizer built
    over ``model.parameters()`` instead of the trainable ones). Frozen parameters never get
    a gradient, so nothing would be perturbed or stepped wrongly; this check is for a
    training script that wants to be sure the base weights stay outside the optimizer."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise TypeError(f"not an optimizer: {optimizer!r:.80}")
    frozen = [p for g in groups for p in g["params"] if not p.requires_grad]
    if frozen:
        n = sum(p.numel() for p in frozen)
        raise ValueError(
            f"the optimizer holds {len(frozen)} frozen parameters ({n} elements): build it "
            "over effsam.integrations.peft.trainable_parameters(model)"
        )
