"""Command-line progress: volumes and the slices of the current volume, with a rate that means something.

The engine reports progress through plain callbacks, so the same job shows
tqdm bars here and a Qt progress bar in Slicer.  Two things the bars do
themselves here rather than leave to tqdm:

* **The rate** is measured over the last half minute of work, from the first
  report on, and shown only once two seconds of work have been timed.  The
  first report is only a starting point: the constant slices (air, padding)
  that are served from a cache count as done in no time, and the first batch
  includes the model's warm-up, so a rate from the start would read
  "2501865 slice/s" and then crawl.
* **Not a terminal** (a cluster job's log, a pipe): no bars, no carriage
  returns or cursor codes, one plain line at most every
  ``$RAPTOR_PROGRESS_INTERVAL`` seconds (default 10).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Callable

DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "RAPTOR_PROGRESS_INTERVAL"


def plain_interval() -> float:
    """Seconds between plain progress lines when the output is not a terminal."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class RateMeter:
    """Units per second over the last ``window`` seconds, once ``min_seconds`` of work have been timed."""

    def __init__(self, window: float = 30.0, min_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.min_seconds, self.clock = window, min_seconds, clock
        self.samples: collections.deque[tuple[float, float]] = collections.deque()

    def update(self, done: float) -> None:
        now = self.clock()
        self.samples.append((now, float(done)))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    @property
    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        if t1 - t0 < self.min_seconds or d1 <= d0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self, remaining: float) -> float | None:
        rate = self.rate
        return remaining / rate if rate else None

    def describe(self, unit: str, remaining: float | None = None) -> str:
        """``12.3 slices/s, ETA 42s``, or ``measuring the rate`` before there is one."""
        rate = self.rate
        if rate is None:
            return "measuring the rate"
        text = f"{rate:.1f} {unit}/s" if rate >= 1 else f"{rate:.2f} {unit}/s"
        if remaining is not None:
            text += f", ETA {duration(remaining / rate)}"
        return text


class SliceCounter:
    """Slices done over every volume seen so far, from per-volume reports (volumes may interleave)."""

    def __init__(self) -> None:
        self.finished = 0  # slices of volumes no longer reported
        self.current: dict[str, int] = {}

    def report(self, volume_id: str, done: int, total: int) -> int:
        self.current[volume_id] = done
        if done >= total:
            self.finished += self.current.pop(volume_id)
        return self.total()

    def total(self) -> int:
        return self.finished + sum(self.current.values())


class Progress:
    """``raptor embed``'s progress: tqdm bars (volumes, slices) on a terminal, plain lines otherwise; a no-op when disabled."""

    def __init__(self, total_volumes: int, enabled: bool = True, *, stream=None, clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.enabled = enabled and total_volumes > 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = plain_interval() if interval is None else interval
        self.total_volumes = total_volumes
        self.volumes_done = 0
        self.meter = RateMeter(clock=clock)
        self.counter = SliceCounter()
        self._volumes = self._slices = None
        self._current = None
        self._last_line = None
        if self.enabled and self.tty:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._volumes = tqdm(total=total_volumes, desc="volumes", unit="vol", position=0, file=self.stream,
                                 dynamic_ncols=True)

    def slices(self, volume_id: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        self.meter.update(self.counter.report(volume_id, done, total))
        remaining = total - done
        if not self.tty:
            now = self.clock()
            if self._last_line is None or now - self._last_line >= self.interval:
                self._last_line = now
                self._plain(f"raptor: volume {min(self.volumes_done + 1, self.total_volumes)}/{self.total_volumes} "
                            f"{volume_id}: {done}/{total} slices, {self.meter.describe('slices', remaining)}")
            return
        if self._current != volume_id:
            if self._slices is not None:
                self._slices.close()
            self._slices = self._tqdm(total=total, desc=f"{volume_id[:24]:24s}", unit="slice", position=1, leave=False,
                                      file=self.stream, dynamic_ncols=True,
                                      bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} slices{postfix}")
            self._current = volume_id
        self._slices.n = done
        self._slices.set_postfix_str(self.meter.describe("slices", remaining), refresh=False)
        self._slices.refresh()

    def volume_done(self) -> None:
        self.volumes_done += 1
        if self._volumes is not None:
            self._volumes.update(1)

    def write(self, message: str) -> None:
        if self.enabled and self.tty:
            self._tqdm.write(message, file=self.stream)
        else:
            self._plain(message)

    def _plain(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in (self._slices, self._volumes):
            if bar is not None:
                bar.close()
        self._slices = self._volumes = None
