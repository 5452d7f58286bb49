"""Progress for long jobs: a steady time estimate, and one display per stage for the command line.

`Eta` estimates the time left from the average wall-clock time per unit since the first unit finished. The
first unit is left out (it pays for warm-up: allocations, caches, first-touch of the weights), and the average
runs over everything since, checkpoints and validation included: one slow step then moves the estimate by its
share of the run, not by its share of a short window (a 20-step window made the demo's ETA swing 5x).

`Stages` shows a job made of stages ("stage 3/6: LoRA student"): a tqdm bar per stage on a terminal, or, where
the output is a log (CI, a file, a caller's `log` function), a plain line at every 10% of a stage and at least
once a minute. Messages go through `tqdm.write`, so they never break a bar.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable


def format_seconds(seconds: float | None) -> str:
    """1h05m, 3m07s, 42s; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Eta:
    """Time left in a loop of `total` units, `done` of them finished before this process started (resume)."""

    def __init__(self, total: int, done: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.total, self.clock = total, clock
        self.start = (clock(), done)  # (time, units done) when the loop began
        self.first: tuple[float, int] | None = None  # after the first unit(s): the measured average starts here
        self.last: tuple[float, int] | None = None

    def update(self, done: int, total: int | None = None) -> float | None:
        """Record that `done` units are finished now; returns the seconds left."""
        if total is not None:
            self.total = total
        point = (self.clock(), done)
        if self.first is None:
            if done > self.start[1]:
                self.first = point
        self.last = point
        return self.remaining()

    @property
    def seconds_per_unit(self) -> float | None:
        """Average since the first unit; before a second one, the first unit's own time (all there is)."""
        if self.last is None:
            return None
        since = self.first if self.first is not None and self.last[1] > self.first[1] else self.start
        units = self.last[1] - since[1]
        return (self.last[0] - since[0]) / units if units > 0 else None

    def remaining(self) -> float | None:
        rate = self.seconds_per_unit
        if rate is None or self.last is None:
            return None
        return rate * max(0, self.total - self.last[1])


def _terminal(file) -> bool:
    """A terminal a bar can be drawn on (a pseudo-terminal of width 0 would show tqdm's bar as nothing)."""
    try:
        return file.isatty() and os.get_terminal_size(file.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Stages:
    """The progress of a job in named stages (see the module docstring).

    `names`: the stages in order (None: a single unnamed stage, e.g. one `train` command). `log` receives plain
    lines and messages; `bars=True` shows tqdm bars on `file` when it is a terminal (plain lines otherwise).
    """

    MARKS = 10  # plain lines at every tenth of a stage...
    EVERY_SECONDS = 60.0  # ...and at least once a minute

    def __init__(self, names: list[str] | None = None, *, log: Callable[[str], None] = print, bars: bool = False,
                 file=None, clock: Callable[[], float] = time.perf_counter):
        self.names = list(names) if names else None
        self.log, self.file, self.clock = log, file if file is not None else sys.stderr, clock
        self.bars = bool(bars) and _terminal(self.file)
        self.index = 0
        self.label = ""
        self._reset()

    def _reset(self) -> None:
        self.bar = None
        self.eta: Eta | None = None
        self.next_mark, self.last_line = 1, self.clock()  # the next tenth to report

    # -- stages
    def start(self, name: str) -> None:
        """Begin the next stage, announced as "stage k/n: name" (without `names`: just named, for its bar)."""
        self.close()
        self.index += 1
        self.label = f"stage {self.index}/{len(self.names)}: {name}" if self.names else name
        if self.names:
            self.message(self.label)

    def update(self, done: int, total: int, unit: str = "step", **postfix) -> None:
        """`done` of `total` units of the current stage are finished; `postfix` (e.g. loss="0.123") is shown."""
        if self.eta is None:
            self.eta = Eta(total, done=done, clock=self.clock)
            self.next_mark = done * self.MARKS // total + 1 if total else 1
            if self.bars:
                from tqdm import tqdm

                # smoothing=0: tqdm's rate is the average since this first update (as `Eta`: no warm-up, no swing)
                self.bar = tqdm(total=total, initial=done, desc=self.label or None, unit=unit, smoothing=0,
                                file=self.file, dynamic_ncols=True, mininterval=0.5)
            return
        left = self.eta.update(done, total)
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.total = total
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = self.clock()
        fraction = done / total if total else 1.0
        passed = done * self.MARKS >= self.next_mark * total  # (integers: 3 * 0.1 is not 0.3)
        if done < total and not passed and now - self.last_line < self.EVERY_SECONDS:
            return
        self.next_mark = done * self.MARKS // total + 1 if total else 1
        self.last_line = now
        parts = [f"{unit} {done}/{total} ({fraction:.0%})"] + [f"{k} {v}" for k, v in postfix.items()]
        if done < total:
            parts.append(f"eta {format_seconds(left)}")
        self.log(f"[{self.label}] " + " · ".join(parts) if self.label else " · ".join(parts))

    def message(self, text: str) -> None:
        """A line of text, above the bar when one is shown."""
        if self.bars:
            from tqdm import tqdm

            tqdm.write(text, file=self.file)
        else:
            self.log(text)

    __call__ = message  # a Stages is also a `log` function

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._reset()
