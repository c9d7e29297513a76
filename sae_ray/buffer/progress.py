"""Production progress: a recent tokens/s rate, an ETA, and the one-line display. No Ray here.

The coordinator feeds `RateMeter` with its committed-row count after every commit and puts
`RateMeter.rate()` / `eta_seconds()` in its status; the driver turns that status into a line
with `format_progress`.
"""

from __future__ import annotations

import time
from collections import deque


class RateMeter:
    """Rows per second over the last `window_s` seconds of (time, total rows) samples."""

    def __init__(self, window_s: float = 30.0, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, total_rows: int) -> None:
        """Record the running total of rows at the current time."""
        now = self.clock()
        self.samples.append((now, total_rows))
        # keep one sample older than the window so the rate spans the whole window
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()

    def rate(self) -> float:
        """Rows per second between the oldest kept sample and now; 0.0 until two samples exist."""
        if len(self.samples) < 2:
            return 0.0
        (t0, r0), (t1, r1) = self.samples[0], self.samples[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0


def eta_seconds(rows: int, target_rows: int, rate: float) -> float | None:
    """Seconds until `target_rows` at `rate` rows/s; None when the rate is not known yet."""
    if rows >= target_rows:
        return 0.0
    if rate <= 0:
        return None
    return (target_rows - rows) / rate


def format_duration(seconds: float | None) -> str:
    """'42s', '3m05s', '2h07m'; '?' when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_progress(status: dict, width: int = 24) -> str:
    """One line from a coordinator status: bar, rows/target, shards, recent tokens/s, ETA.

    Keys used: rows_committed, target_rows, shards_committed, tokens_per_s, eta_s, and when
    present producers_finished/n_producers, waiting_for_readers, complete.
    """
    rows, target = int(status["rows_committed"]), max(int(status["target_rows"]), 1)
    frac = 1.0 if status.get("complete") else min(rows / target, 1.0)
    filled = int(frac * width)
    bar = "#" * filled + "-" * (width - filled)
    parts = [
        f"[{bar}] {frac:6.1%}",
        f"{rows:,}/{target:,} rows",
        f"{status['shards_committed']} shards",
        f"{status.get('tokens_per_s', 0.0):,.0f} tok/s",
        "done" if status.get("complete") else f"ETA {format_duration(status.get('eta_s'))}",
    ]
    if "n_producers" in status:
        parts.append(f"producers {status.get('producers_finished', 0)}/{status['n_producers']} done")
    if status.get("waiting_for_readers"):
        parts.append("window full: waiting for readers")
    return "  ".join(parts)
