"""The CPU thread policy of ``effsam train`` and ``effsam compare`` (one rule for both).

``train.threads`` (``--threads N``) wins when given. Otherwise a run takes one thread per
CPU core that is free when it starts: the cores this process may use minus the 1-minute
load average, rounded, at least 1 and at most torch's default. On an idle machine that is
torch's default (every core); on a shared, busy one it is fewer threads, because torch's
worker threads wait for each other at every operation and a thread that shares its core
with another program stalls all of them (on a loaded 2-core machine two threads trained
the digits demo over ten times slower than one). A comparison decides once, before its
first run, so every optimizer in it runs on the same number of threads.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def resolve_threads(requested: int | None) -> tuple[int, str]:
    """The thread count to use and why (for env.json and the start line)."""
    if requested is not None:
        return requested, "train.threads"
    default = torch.get_num_threads()
    cores = available_cores()
    load = load_average()
    if load is None:
        return default, "torch's default"
    free = max(1, min(default, int(cores - load + 0.5)))
    return free, f"free cores: {cores} cores, load average {load:.1f}"
