"""ShardWriter: claim, write and commit shards on a background thread, without Ray.

The producer's forward passes hand each full shard to `put` and carry on; one writer thread
takes the shards in order, claims an id for each, writes it and commits it. `put` blocks only
while `max_queue` shards are already waiting. Because one thread writes one shard at a time,
in order, a rank's committed shards are always a prefix of its row stream (what makes resume
exact) and a rank holds at most one claimed-but-uncommitted id.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from .ledger import WAIT

_DONE = object()


class ShardWriterError(RuntimeError):
    """Writing or committing one shard failed; the message names the shard (``shard_id``)."""

    def __init__(self, message: str, shard_id: int | None = None):
        super().__init__(message)
        self.shard_id = shard_id

    def __reduce__(self):
        return type(self), (self.args[0], self.shard_id)


class ShardWriter:
    """write(shard_id, shard): write it whole. claim() -> id | None (no more shards wanted) | "wait"
    (try again in `poll_s`). commit(shard_id, n_rows): make it visible.
    """

    def __init__(self, write: Callable[[int, Any], None], claim: Callable[[], Any], commit: Callable[[int, int], None],
                 max_queue: int = 2, poll_s: float = 0.5, where: str = ""):
        self.write, self.claim, self.commit = write, claim, commit
        self.poll_s, self.where = poll_s, where
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.stopped = threading.Event()  # no more shards wanted, or an error
        self.rows = self.shards = 0
        self.thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True)
        self.thread.start()

    def put(self, shard) -> bool:
        """Queue a full shard (len(shard) rows); blocks while the queue is full. Returns False once
        no more shards are wanted (stop producing). Raises the writer thread's error."""
        while True:
            self._raise()
            if self.stopped.is_set():
                return False
            try:
                self.queue.put(shard, timeout=self.poll_s)
                return True
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until every queued shard is written and committed; raise the writer thread's error."""
        while self.thread.is_alive():
            try:
                self.queue.put(_DONE, timeout=self.poll_s)
                break
            except queue.Full:
                continue
        self.thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop after the shard being written; queued shards are dropped (never claimed)."""
        self.stopped.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                shard = self.queue.get(timeout=self.poll_s)
            except queue.Empty:
                continue
            if shard is _DONE:
                return
            try:
                shard_id = self.claim()
                while shard_id == WAIT:
                    if self.stopped.is_set():
                        return
                    time.sleep(self.poll_s)
                    shard_id = self.claim()
                if shard_id is None:
                    self.stopped.set()
                    return
                n = len(shard)
                try:
                    self.write(shard_id, shard)
                except Exception as e:
                    raise ShardWriterError(f"{self.where}writing shard {shard_id} ({n} rows) failed, "
                                           f"nothing of it was committed: {type(e).__name__}: {e}", shard_id) from e
                try:
                    self.commit(shard_id, n)
                except Exception as e:
                    raise ShardWriterError(f"{self.where}committing shard {shard_id} ({n} rows) failed: "
                                           f"{type(e).__name__}: {e}", shard_id) from e
                self.rows += n
                self.shards += 1
            except BaseException as e:  # noqa: BLE001 - handed to the producer's thread by put/close
                self.error = e
                self.stopped.set()
                return
