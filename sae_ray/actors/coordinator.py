"""BufferCoordinator: the one process that changes the buffer's metadata.

A thin actor over `ShardLedger` (sae_ray.buffer.ledger): it hands out shard ids, grows the
arrays before a shard is written, records commits in the group's attributes, runs the bounded
window and marks the buffer complete when every producer has finished. Activations never pass
through it, only ids and counts. Its state lives on disk, so when its process dies Ray restarts
it (max_restarts=-1), the ledger is rebuilt from the group's attributes, and the calls that were
in flight are retried (max_task_retries=-1; every method is safe to run twice).

It is a named actor (`coordinator_name(path)`), so the driver, a test or a trial can ask it
for `status()`.
"""

from __future__ import annotations

import hashlib
import os
import time

import ray

from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.ledger import ShardLedger


def coordinator_name(buffer_path: str) -> str:
    """The coordinator's actor name for a buffer path."""
    return "sae-ray-coordinator-" + hashlib.sha1(str(buffer_path).encode()).hexdigest()[:12]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class BufferCoordinator:
    def __init__(self, path: str, n_tokens: int, n_producers: int, max_gb: float | None = None, min_readers: int = 1,
                 readers: tuple[str, ...] = (), eval_rows: int | None = None):
        self.ledger = ShardLedger(ActivationBuffer.open(path), n_tokens, n_producers, max_gb, min_readers,
                                  readers=readers, eval_rows=eval_rows)

    def producer_started(self, rank: int, pid: int | None = None) -> int:
        """A producer (re)starts: its dead attempt's claim is freed; returns the rows it already committed."""
        return self.ledger.producer_started(rank, pid)

    def claim_shard(self, rank: int) -> int | str | None:
        """A fresh shard id for a producer that holds a full shard; None once enough shards exist; "wait" while the window is full."""
        return self.ledger.claim(rank)

    def commit_shard(self, rank: int, shard_id: int, n_rows: int, objects: dict | None = None) -> None:
        """The producer has written the shard whole; from now on readers may see it. objects: the
        sizes and sha256 of its objects, as `write_shard` returned them (the data never comes here)."""
        self.ledger.commit(rank, shard_id, n_rows, objects)

    def producer_finished(self, rank: int) -> None:
        self.ledger.producer_finished(rank)

    def stop(self) -> None:
        """No more shards: producers finish after the one they are writing; with a window, what
        every reader has passed is dropped now."""
        self.ledger.stop()

    def status(self) -> dict:
        """Rows and shards committed, recent tokens/s, ETA to buffer.n_tokens, claims, producer pids, own pid;
        with a window: live, dropped and pinned shards, registered readers, shards handed out over the window."""
        return {**self.ledger.status(), "pid": os.getpid()}


def start_coordinator(path: str, n_tokens: int, n_producers: int, max_gb: float | None = None, min_readers: int = 1,
                      readers: tuple[str, ...] = (), eval_rows: int | None = None):
    """Start the buffer's named coordinator. An earlier one of the same buffer in this Ray job
    (a finished or failed run) is killed first: one buffer, one coordinator. readers: the reader
    ids a bounded window waits for (one per trial, registered before any starts); eval_rows: the
    held-out rows each trial evaluates on (their shards are kept); see `ShardLedger`."""
    name = coordinator_name(path)
    deadline = time.monotonic() + 30
    while True:
        try:
            return BufferCoordinator.options(name=name).remote(path, n_tokens, n_producers, max_gb, min_readers,
                                                               tuple(readers), eval_rows)
        except ValueError:  # the name is taken
            if time.monotonic() > deadline:
                raise
        try:
            ray.kill(ray.get_actor(name), no_restart=True)
        except ValueError:
            pass
        time.sleep(0.2)


def stop_production(path: str, timeout: float = 30) -> None:
    """Tell the buffer's coordinator to hand out no more shard ids: its producers finish after the
    shard they hold. For a sweep with a bounded window whose trials are done (nobody will pass
    the shards still in the window; those they all passed are dropped, the held-out ones kept).
    No coordinator running: nothing to do."""
    try:
        coordinator = ray.get_actor(coordinator_name(path))
    except ValueError:
        return
    ray.get(coordinator.stop.remote(), timeout=timeout)
