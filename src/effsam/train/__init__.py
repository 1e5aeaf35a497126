"""The toolkit: config, training loop, checkpoints, comparisons, the analysis of a trained
run and the ``effsam`` command.

It needs the ``toolkit`` extra (PyYAML, tqdm, scikit-learn, matplotlib).

Example:
    >>> from effsam.train import load_config, train, run_compare
    >>> cfg = load_config("configs/esam/cifar10_resnet18_esam.yaml", {"train.epochs": 1})
    >>> summary = train(cfg)
"""

from .analyze import analyze_run
from .compare import run_compare
from .config import Config, ConfigError, load_config
from .loop import RunDiverged, RunFailed, train
from .preflight import preflight
from .validate import validate

__all__ = [
    "Config",
    "ConfigError",
    "RunDiverged",
    "RunFailed",
    "analyze_run",
    "load_config",
    "preflight",
    "run_compare",
    "train",
    "validate",
]
