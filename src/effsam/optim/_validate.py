"""Argument checks shared by the optimizers and their policies.

Each check returns the value (as a float or int) or raises with a message naming the
argument: ``Invalid <name>: <value> (<what it must be>)``. ``name`` is the argument as the
user knows it ("rho", "SDS gamma", "SSAM sparsity").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_choice",
    "check_fraction",
    "check_int",
    "check_non_negative",
    "check_seed",
    "is_number",
]

#: the intervals :func:`check_fraction` checks, by how they are written in messages
_INTERVALS = {
    "(0, 1]": lambda x: 0.0 < x <= 1.0,
    "[0, 1]": lambda x: 0.0 <= x <= 1.0,
    "[0, 1)": lambda x: 0.0 <= x < 1.0,
}


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_non_negative(value: Any, name: str, *, typed: bool = True) -> float:
    """A finite number ≥ 0 (ρ, η, the ascent noise): a non-number is a TypeError (a
    ValueError unless ``typed``), a negative or non-finite one a ValueError."""
    if not is_number(value):
        raise (TypeError if typed else ValueError)(f"Invalid {name}: {value!r} (must be a number)")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and >= 0)")
    return float(value)


def check_fraction(
    value: Any, name: str, interval: str = "(0, 1]", *, typed: bool = False
) -> float:
    """A number in ``interval`` (one of ``"(0, 1]"``, ``"[0, 1]"``, ``"[0, 1)"``); NaN is
    outside every interval. ``typed``: a non-number is a TypeError (else a ValueError)."""
    inside = _INTERVALS[interval]
    if typed and not is_number(value):
        raise TypeError(f"Invalid {name}: {value!r} (must be a number in {interval})")
    if not is_number(value) or not inside(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be in {interval})")
    return float(value)


def check_int(value: Any, name: str, low: int = 1, *, typed: bool = False) -> int:
    """An int ≥ ``low`` (not a bool). ``typed``: a non-int is a TypeError (else a
    ValueError); too small is a ValueError."""
    message = f"Invalid {name}: {value!r} (must be an int >= {low})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise (TypeError if typed else ValueError)(message)
    if value < low:
        raise ValueError(message)
    return value


def check_bool(value: Any, name: str) -> bool:
    """True or False, nothing else (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True/False)")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose from {list(choices)})")
    return value


def check_seed(seed: Any, who: str) -> int:
    """An int seed (not a bool); otherwise a TypeError naming ``who``'s seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Invalid {who} seed: {seed!r} (must be an int)")
    return seed
