"""Model zoo: CIFAR ResNet-18, WideResNet, PyramidNet, ImageNet ResNets and small CPU models.

Example:
    >>> from effsam.models import create_model
    >>> model = create_model("resnet18", num_classes=10, width=0.125)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from effsam.models.pyramidnet import PyramidNet
from effsam.models.resnet_cifar import ResNetCifar, resnet18_cifar
from effsam.models.resnet_imagenet import ResNetImageNet
from effsam.models.small import CifarCNN, SmallCNN, scaled_channels
from effsam.models.wrn import WideResNet


def _resnet50(num_classes: int, in_channels: int, width: float, **kw: Any) -> nn.Module:
    return ResNetImageNet((3, 4, 6, 3), num_classes, in_channels, width, **kw)


def _resnet101(num_classes: int, in_channels: int, width: float, **kw: Any) -> nn.Module:
    return ResNetImageNet((3, 4, 23, 3), num_classes, in_channels, width, **kw)


def _wrn(num_classes: int, in_channels: int, width: float, **kw: Any) -> nn.Module:
    return WideResNet(num_classes=num_classes, in_channels=in_channels, width=width, **kw)


def _pyramidnet(num_classes: int, in_channels: int, width: float, **kw: Any) -> nn.Module:
    return PyramidNet(num_classes=num_classes, in_channels=in_channels, width=width, **kw)


def _plain(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, width: float) -> nn.Module:
        return cls(num_classes=num_classes, in_channels=in_channels, width=width)

    return build


# name -> (builder, keyword options it accepts)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "resnet18": (_plain(ResNetCifar), ()),
    "wrn": (_wrn, ("depth", "widen", "dropout")),
    "wrn28_10": (_wrn, ("dropout",)),
    "pyramidnet": (_pyramidnet, ("depth", "alpha", "bottleneck")),
    "pyramidnet110": (_pyramidnet, ("alpha", "bottleneck")),
    "resnet50": (_resnet50, ("zero_init_residual",)),
    "resnet101": (_resnet101, ("zero_init_residual",)),
    "small_cnn": (_plain(SmallCNN), ()),
    "cifar_cnn": (_plain(CifarCNN), ()),
}

#: Names accepted by :func:`create_model`.
MODELS = tuple(_REGISTRY)

__all__ = [
    "MODELS",
    "CifarCNN",
    "PyramidNet",
    "ResNetCifar",
    "ResNetImageNet",
    "SmallCNN",
    "WideResNet",
    "create_model",
    "resnet18_cifar",
    "scaled_channels",
]


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, **kwargs: Any
) -> nn.Module:
    """Builds a model by name.

    Args:
        name: One of :data:`MODELS`. ``"wrn28_10"`` is ``"wrn"`` fixed at depth 28, widen 10;
            ``"pyramidnet110"`` is ``"pyramidnet"`` fixed at depth 110.
        num_classes: Outputs of the classifier.
        in_channels: Channels of the input images.
        width: Multiplier of all channel widths (e.g. 0.125 for quick CPU runs).
        **kwargs: Architecture options: ``depth``, ``widen``, ``dropout`` (wrn); ``depth``,
            ``alpha``, ``bottleneck`` (pyramidnet); ``zero_init_residual`` (resnet50/101).

    Returns:
        The model, freshly initialised, on the default device.

    Raises:
        ValueError: For an unknown name or invalid sizes.
        TypeError: For options the model does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    builder, options = _REGISTRY[name]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        allowed = ", ".join(options) or "none"
        raise TypeError(f"model {name!r} got unexpected options {unknown}; it takes: {allowed}")
    return builder(num_classes, in_channels, float(width), **kwargs)
