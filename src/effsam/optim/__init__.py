"""The library core: sharpness-aware optimizer wrappers. Depends on torch only."""

from .ascent import AdaptiveAscent, L2Ascent, asam_reference_params
from .masks import PerturbationMask, RandomTensorSubset
from .registry import (
    REGISTRY,
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_spec,
    register,
)
from .selection import AllSamples, TopLoss, TopSharpness
from .sharpness_aware import KeptFraction, SharpnessAware
from .sparse import DynamicMask, FisherMask
from .ssam import SSAM
from .variants import ASAM, ESAM, SAM

__all__ = [
    "ASAM",
    "ESAM",
    "REGISTRY",
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
    "TopLoss",
    "TopSharpness",
    "asam_reference_params",
    "available_optimizers",
    "create_optimizer",
    "get_spec",
    "register",
]
