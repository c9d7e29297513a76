"""BufferCoordinator: the one process that changes the buffer's metadata.

It hands out shard ids, grows the arrays before a shard is written, records commits in
the group's attributes and marks the buffer complete when every producer has finished.
Activations never pass through it, only ids and counts. Its state lives on disk, so a
restarted coordinator rebuilds it from the group's attributes.
"""

from __future__ import annotations

import math

import ray

from sae_ray.buffer import ActivationBuffer


@ray.remote(num_cpus=0, max_restarts=-1)
class BufferCoordinator:
    def __init__(self, path: str, n_tokens: int, n_producers: int):
        self.buffer = ActivationBuffer.open(path)
        self.max_shards = math.ceil(n_tokens / self.buffer.shard_rows)
        self.n_producers = n_producers
        self.finished: set[int] = set()
        committed = self.buffer.committed()
        self.next_id = max(committed, default=-1) + 1
        self.claimed: set[int] = set()

    def claim_shard(self) -> int | None:
        """A fresh shard id for a producer that holds a full shard in memory; None once enough shards exist."""
        if len(self.buffer.committed()) + len(self.claimed) >= self.max_shards:
            return None
        shard_id = self.next_id
        self.next_id += 1
        self.buffer.ensure_capacity(shard_id + 1)
        self.claimed.add(shard_id)
        return shard_id

    def commit_shard(self, shard_id: int, n_rows: int) -> None:
        """The producer has written the shard whole; from now on readers may see it."""
        self.buffer.commit_shard(shard_id, n_rows)
        self.claimed.discard(shard_id)

    def producer_finished(self, rank: int) -> None:
        self.finished.add(rank)
        if len(self.finished) >= self.n_producers:
            self.buffer.mark_complete()

    def status(self) -> dict:
        committed = self.buffer.committed()
        return {
            "shards_committed": len(committed),
            "rows_committed": sum(committed.values()),
            "shards_in_flight": len(self.claimed),
            "producers_finished": len(self.finished),
            "complete": self.buffer.is_complete(),
        }
