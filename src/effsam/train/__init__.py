"""The toolkit: config, training loop, checkpoints, comparisons and the ``effsam`` command.

Example:
    >>> from effsam.train import load_config, train, run_compare
    >>> cfg = load_config("configs/esam/cifar10_resnet18_esam.yaml", {"train.epochs": 1})
    >>> summary = train(cfg)
"""

from .compare import run_compare
from .config import Config, ConfigError, load_config
from .loop import train
from .validate import validate

__all__ = ["Config", "ConfigError", "load_config", "run_compare", "train", "validate"]
