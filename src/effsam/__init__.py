"""effsam: efficient sharpness-aware minimization for PyTorch."""

from .bn import preserve_bn_stats
from .optim import (
    ASAM,
    ESAM,
    SAM,
    SSAM,
    AdaptiveAscent,
    AllSamples,
    DynamicMask,
    FisherMask,
    KeptFraction,
    L2Ascent,
    OptimizerSpec,
    PerturbationMask,
    RandomTensorSubset,
    SharpnessAware,
    TopLoss,
    TopSharpness,
    available_optimizers,
    create_optimizer,
    get_spec,
    register,
)
from .step import StepResult, sharpness_aware_step

__version__ = "0.2.0"

__all__ = [
    "ASAM",
    "ESAM",
    "SAM",
    "SSAM",
    "AdaptiveAscent",
    "AllSamples",
    "DynamicMask",
    "FisherMask",
    "KeptFraction",
    "L2Ascent",
    "OptimizerSpec",
    "PerturbationMask",
    "RandomTensorSubset",
    "SharpnessAware",
    "StepResult",
    "TopLoss",
    "TopSharpness",
    "available_optimizers",
    "create_optimizer",
    "get_spec",
    "preserve_bn_stats",
    "register",
    "sharpness_aware_step",
]
