"""Fixtures of the toolkit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.tiny_runs import tiny_config


@pytest.fixture
def tiny(tmp_path: Path):
    """``tiny(**overrides)`` → a Config for a tiny run under a fresh directory."""
    return lambda **kw: tiny_config(tmp_path, **kw)
