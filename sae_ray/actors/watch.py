"""The driver's view of production: ask the coordinator for its status and print it.

`watch` blocks until every producer is done (one updating line on a terminal, else a line
every `every` seconds) and raises a producer's error as soon as it happens;
`watch_in_background` prints a line every `every` seconds from a daemon thread, for a driver
that is busy with something else (the sweep). The formatting is `sae_ray.buffer.progress`.
"""

from __future__ import annotations

import sys
import threading

import ray

from sae_ray.buffer.progress import format_progress


def watch(coordinator, refs: list, every: float | None = None, prefix: str = "[sae-ray] buffer ") -> list:
    """Wait for the producers' `run` refs, printing progress; returns their results.
    every: seconds between lines (default 1 s on a terminal, where the line updates in place; else 10 s)."""
    tty = sys.stdout.isatty()
    every = every or (1.0 if tty else 10.0)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=every)
        ray.get(ready)  # a producer's error, as soon as it fails
        try:
            line = prefix + format_progress(ray.get(coordinator.status.remote(), timeout=30))
        except ray.exceptions.GetTimeoutError:
            continue
        print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", flush=True)
    if tty:
        print(flush=True)
    return ray.get(list(refs))


def watch_in_background(coordinator, refs: list, every: float | None = 10.0, on_done=None,
                        prefix: str = "[sae-ray] buffer ") -> threading.Thread:
    """A daemon thread that waits for the producers' refs, printing a progress line every `every`
    seconds (None: silent), then calls `on_done()` (also when Ray shuts down or a producer fails)."""

    def loop() -> None:
        pending = list(refs)
        try:
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=every or 10.0)
                if every:
                    print(prefix + format_progress(ray.get(coordinator.status.remote(), timeout=30)), flush=True)
        except Exception:  # noqa: BLE001 - Ray shut down, or a producer failed: the driver reports that
            pass
        if on_done is not None:
            on_done()

    thread = threading.Thread(target=loop, name="sae-ray-progress", daemon=True)
    thread.start()
    return thread
