"""Packaging is described in pyproject.toml; this file only lists the packages: those under
src/, and effsam.configs with one sub-package per folder, which is the repository's configs/
(mapped by package-dir), so the YAML files ship inside the wheel."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
configs = sorted(f"effsam.configs.{d.name}" for d in (here / "configs").iterdir() if d.is_dir())
setup(packages=[*find_packages("src"), "effsam.configs", *configs])
