"""The frameworks import torchvision (timm directly, Lightning through torchmetrics). A
torchvision wheel built for another torch variant than the installed one (e.g. a CUDA
torchvision beside the CPU torch) fails at import while registering the fake kernels of
its compiled operators, which these tests never use: that one registration module is then
replaced by an empty one, so the pure-Python parts import."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types


def _imports() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import torchvision"], capture_output=True, text=True
    )
    return probe.returncode == 0 or "torchvision::" not in probe.stderr


def make_importable() -> None:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    if not _imports():
        name = "torchvision._meta_registrations"
        sys.modules.setdefault(name, types.ModuleType(name))
