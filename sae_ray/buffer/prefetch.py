"""Read ahead in a daemon thread: ``Prefetcher(source, depth, stop)`` runs a generator there
and hands its items over through a bounded queue (what ``BufferReader`` uses for its mixes)."""

from __future__ import annotations

import queue
import threading
from typing import Iterator


class Prefetcher:
    """Runs a generator of mixes in a daemon thread, at most ``depth`` items ahead.
    Iterating it yields the items; an exception in the thread is raised here."""

    def __init__(self, source: Iterator, depth: int, stop: threading.Event):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = stop
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="BufferReader-prefetch")
        self.thread.start()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(("error", e))
        finally:
            source.close()

    def __iter__(self) -> Iterator:
        while True:
            kind, item = self.queue.get()
            if kind == "item":
                yield item
            elif kind == "end":
                return
            else:
                raise item

    def close(self, timeout: float = 10.0) -> None:
        self.stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)
