"""The frontier: does a cheaper sharpness-aware method keep SAM's accuracy, and is it worth
the time? SGD, SAM and the efficient methods trained side by side on one protocol (a
compare config: the user's model and data), their speeds measured side by side, and the
verdicts by a stated rule.

* :mod:`effsam.frontier.rule` — the verdicts and targets (pure functions of the runs);
* :mod:`effsam.frontier.runs` — the runs on disk: stamps, stale checks, processes;
* :mod:`effsam.frontier.driver` — a :class:`~effsam.frontier.driver.Protocol`, the runs it
  still needs in the order that decides soonest, the equal wall-clock runs, the reports;
* :mod:`effsam.frontier.report` — tables, verdict lines, the plot;
* ``effsam frontier`` (:mod:`effsam.frontier.command`) — the command for any config.
"""

from .driver import Protocol, run_frontier
from .rule import BASE_SEEDS, FULL_SEEDS, SHARE, STRETCH_SPEED, TARGET_SPEED

__all__ = [
    "BASE_SEEDS",
    "FULL_SEEDS",
    "SHARE",
    "STRETCH_SPEED",
    "TARGET_SPEED",
    "Protocol",
    "run_frontier",
]
