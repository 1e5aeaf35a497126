"""What a run shows while it works: one progress bar for the whole run on a terminal, an
occasional plain line in a log, nothing with ``quiet``.

On a terminal (stderr is a TTY) a tqdm bar counts every training step of the run, so its
ETA is the run's, and its average rate includes the time spent evaluating (the ETA covers
the evaluations still to come); evaluation shows a second bar under it. Elsewhere (a log
file, ``nohup``, a CI job) a bar would fill the log with carriage returns, so a plain line
is printed at most every ``log_interval`` seconds instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 60.0


def format_duration(seconds: float) -> str:
    """``3725`` → ``'1 h 02 min'``; ``95`` → ``'1 min 35 s'``; ``4.2`` → ``'4.2 s'``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400 * 2:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s / 86400:.1f} days"


class RunProgress:
    """Progress of one run: ``total_steps`` training steps over ``epochs`` epochs."""

    def __init__(
        self,
        total_steps: int,
        *,
        quiet: bool = False,
        label: str = "",
        stream: TextIO | None = None,
        log_interval: float = LOG_INTERVAL_S,
    ) -> None:
        self.quiet = quiet
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.total = max(1, total_steps)
        self.done = 0
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self._last_line = self.start
        self._desc = ""
        self._postfix = ""
        self.bar: Any = None
        self.tty = not quiet and _isatty(self.stream)
        self._closed = False

    # ---- lines
    def write(self, line: str) -> None:
        """A line of output (stdout), above the bar; nothing when quiet."""
        if self.quiet:
            return
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    # ---- training steps
    def epoch(self, epoch: int, epochs: int) -> None:
        """Epoch ``epoch`` (1-based) of ``epochs`` begins."""
        self._desc = f"{self.label + ' ' if self.label else ''}epoch {epoch}/{epochs}"
        if self.tty and self.bar is None and not self._closed:
            from tqdm import tqdm

            self.start = time.perf_counter()
            self.bar = tqdm(
                total=self.total,
                desc=self._desc,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                smoothing=0.0,  # the run's average rate: evaluations are part of the ETA
                unit="step",
            )
        elif self.bar is not None:
            self.bar.set_description_str(self._desc, refresh=False)

    def step(self, postfix: Any = None) -> None:
        """One training step is done; ``postfix()`` gives the bar's running metrics."""
        self.done += 1
        if self.quiet:
            return
        if self.bar is not None:
            if postfix is not None and (self.done % 5 == 0 or self.done == self.total):
                self.bar.set_postfix_str(postfix(), refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.log_interval:
            self._last_line = now
            self._postfix = postfix() if postfix is not None else ""
            self._log_line(now)

    def eta_s(self) -> float | None:
        """Seconds left for the run at its average rate so far (None before the first step)."""
        if self.done == 0:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed / self.done * (self.total - self.done)

    def _log_line(self, now: float) -> None:
        eta = self.eta_s()
        text = (
            f"{self._desc}: step {self.done}/{self.total} of the run "
            f"({100 * self.done / self.total:.0f}%), {format_duration(now - self.start)} elapsed"
            + (f", ETA {format_duration(eta)}" if eta is not None else "")
            + (f"  {self._postfix}" if self._postfix else "")
        )
        print(text, file=self.stream, flush=True)

    # ---- evaluation
    def evaluating(self, batches: Iterable[Any], total: int) -> Iterator[Any]:
        """``batches`` with an evaluation bar (terminal) or an occasional line (logs)."""
        if self.quiet:
            yield from batches
            return
        if self.bar is not None:
            from tqdm import tqdm

            with tqdm(
                total=total,
                desc="evaluating",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                position=1,
                unit="batch",
            ) as bar:
                for item in batches:
                    yield item
                    bar.update(1)
            return
        start = time.perf_counter()
        last = start
        for i, item in enumerate(batches):
            yield item
            now = time.perf_counter()
            if now - last >= self.log_interval:
                last = now
                print(
                    f"{self._desc}: evaluating, batch {i + 1}/{total}, "
                    f"{format_duration(now - start)}",
                    file=self.stream,
                    flush=True,
                )

    def close(self) -> None:
        self._closed = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
