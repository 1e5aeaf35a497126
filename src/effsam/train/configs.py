"""The configs shipped with the package, so ``--config configs/esam/...yaml`` works after
``pip install effsam`` as it does in a clone of the repository.

A path that exists is used as given. Otherwise a path of the form
``[configs/]<folder>/<name>[.yaml]`` is looked up among the shipped configs (installed as
``effsam/configs`` in a wheel; the repository's ``configs/`` in a source tree).
"""

from __future__ import annotations

from pathlib import Path

import effsam


def packaged_configs() -> Path | None:
    """The folder of the shipped configs, or None if there is none."""
    here = Path(effsam.__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):  # wheel, source tree
        if (candidate / "compare").is_dir():
            return candidate
    return None


def find_config(path: str | Path) -> Path:
    """``path`` if it exists, else the shipped config it names, else ``path`` unchanged
    (loading it then reports the file as not found)."""
    path = Path(path)
    if path.exists():
        return path
    root = packaged_configs()
    if root is None or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    candidate = root.joinpath(*parts) if parts else root
    if candidate.suffix != ".yaml":
        candidate = candidate.with_name(candidate.name + ".yaml")
    return candidate if candidate.is_file() else path
