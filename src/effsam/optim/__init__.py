"""The library core: sharpness-aware optimizer wrappers. Depends on torch only."""

from .ascent import AdaptiveAscent, L2Ascent, asam_reference_params
from .cheap import FixedTensors, PartialSAM, StaleSAM, last_layer_params, norm_params
from .flatlora import FlatLoRA
from .ksam import KSAM
from .looksam import LookSAM
from .masks import PerturbationMask, RandomTensorSubset
from .msam import MSAM
from .registry import (
    REGISTRY,
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_spec,
    register,
)
from .schedule import SCHEDULES, AdaptiveSchedule, EveryStep, Interval, Late, Randomized
from .selection import AllSamples, TopLoss, TopSharpness
from .sharpness_aware import KeptFraction, SharpnessAware
from .slicing import AscentSlice
from .sparse import DynamicMask, FisherMask
from .ssam import SSAM
from .variants import ASAM, ESAM, SAM

__all__ = [
    "ASAM",
    "ESAM",
    "KSAM",
    "MSAM",
    "SCHEDULES",
    "REGISTRY",
    "SAM",
    "SSAM",
    "AdaptiveAscent",
    "AdaptiveSchedule",
    "AllSamples",
    "AscentSlice",
    "DynamicMask",
    "EveryStep",
    "FisherMask",
    "FixedTensors",
    "FlatLoRA",
    "Interval",
    "KeptFraction",
    "L2Ascent",
    "Late",
    "LookSAM",
    "OptimizerSpec",
    "PartialSAM",
    "PerturbationMask",
    "RandomTensorSubset",
    "Randomized",
    "SharpnessAware",
    "StaleSAM",
    "TopLoss",
    "TopSharpness",
    "asam_reference_params",
    "available_optimizers",
    "create_optimizer",
    "get_spec",
    "last_layer_params",
    "norm_params",
    "register",
]
