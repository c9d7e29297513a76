"""ShardLedger: the coordinator's bookkeeping, without Ray (the actor in sae_ray/actors/coordinator.py wraps it).

Everything it must remember lives in the buffer's group attributes, so a ledger built on
the same buffer after a crash carries on where the old one stopped:

- ``committed``: the buffer's own record of written shards (``commit_shard``);
- array capacity: every id ever handed out lies below it (``ensure_capacity`` runs before
  an id is returned), so a rebuilt ledger never hands out an id a live producer still holds;
- ``dropped``: shards the bounded window removed (``drop_shard``), with their rows;
- ``production`` (``set_production``): ``producers`` (count), ``claims`` {rank: shard id
  claimed but not yet committed}, ``finished`` [ranks], ``dropped_ranks`` {shard id: rank}
  (written before a shard is dropped: its doc_index is gone afterwards, and a resume must
  still count its rows for the rank that made them).

Claims are per rank and a producer writes its shards one at a time, in order: a new claim
(or ``producer_started``) by a rank frees the rank's old claim. An id freed that way is never
handed out again (a dead attempt may have written part of it); it stays an unused hole.
"""

from __future__ import annotations

import math
import time

from .progress import RateMeter, eta_seconds
from .store import ActivationBuffer

WAIT = "wait"
"""`claim` result: the bounded window is full; sleep and ask again."""


def dropped_ranks(buffer: ActivationBuffer) -> dict[int, int]:
    """{shard id: rank} recorded for shards the bounded window dropped (or is about to drop)."""
    return {int(s): int(r) for s, r in buffer.production().get("dropped_ranks", {}).items()}


def shard_rank(buffer: ActivationBuffer, shard_id: int, n_producers: int) -> int:
    """Which producer rank wrote a committed shard: all its rows share doc_index % n_producers."""
    return int(buffer.read_column("doc_index", shard_id, 0, 1)[0]) % n_producers


def committed_rows_by_rank(buffer: ActivationBuffer, n_producers: int) -> list[int]:
    """Rows each producer rank has committed, dropped shards included.

    A rank commits its shards in the order it produced them, so these rows are a prefix
    of the rank's row stream: resuming after them (``iter_shards(skip_rows=...)``) is exact.
    """
    ranks = dropped_ranks(buffer)
    done = [0] * n_producers
    for shard_id, n_rows in [*buffer.committed().items(), *buffer.dropped().items()]:
        rank = ranks[shard_id] if shard_id in ranks else shard_rank(buffer, shard_id, n_producers)
        done[rank] += n_rows
    return done


class ShardLedger:
    """Hands out shard ids, records commits and finished producers, runs the bounded window.

    buffer: the buffer (opened by this process). n_tokens: rows wanted; at most
    ceil(n_tokens / shard_rows) shards are committed. max_gb: the bounded window (None: off):
    ids are handed out only while the live committed shards take < max_gb, and a shard is
    dropped once every registered reader (at least `min_readers` of them) has passed it.
    """

    def __init__(self, buffer: ActivationBuffer, n_tokens: int, n_producers: int,
                 max_gb: float | None = None, min_readers: int = 1, clock=time.monotonic):
        self.buffer = buffer
        self.target_rows = n_tokens
        self.max_shards = math.ceil(n_tokens / buffer.shard_rows)
        self.n_producers = n_producers
        self.max_bytes = None if max_gb is None else max_gb * 1e9
        self.min_readers = max(1, min_readers)
        self.production = buffer.production()
        self.finished: set[int] = {int(r) for r in self.production.get("finished", [])}
        self.dropped_ranks = dropped_ranks(buffer)
        self.committed = buffer.committed()  # live shards
        self.dropped = buffer.dropped()
        # a crash between `commit_shard` and clearing the claim leaves a claim on a committed shard: drop it
        self.claims: dict[int, int] = {int(r): int(s) for r, s in self.production.get("claims", {}).items()
                                       if int(s) not in self.committed and int(s) not in self.dropped}
        self.next_id = max([buffer.capacity_rows() // buffer.shard_rows, *(s + 1 for s in self.committed),
                            *(s + 1 for s in self.dropped), *(s + 1 for s in self.claims.values())])
        self.pids: dict[int, int] = {}
        self.waiting_for_readers = False
        self.stopped = False
        self._rank_of: dict[int, int] | None = None  # shard id -> rank, read lazily (one small read per shard)
        self.meter = RateMeter(clock=clock)
        self.meter.add(self.rows_committed())

    # ------------------------------------------------------------------ protocol

    def producer_started(self, rank: int, pid: int | None = None) -> int:
        """A producer (re)starts: free what its dead attempt claimed; returns the rows it already committed."""
        self.pids[rank] = pid
        self.finished.discard(rank)
        self.claims.pop(rank, None)
        self._save()
        return self.rows_by_rank()[rank]

    def claim(self, rank: int) -> int | str | None:
        """A fresh shard id for `rank`, which holds a full shard; None once enough shards exist
        (or after `stop`); WAIT while the bounded window is full. Frees the rank's previous claim."""
        if self.claims.pop(rank, None) is not None:
            self._save()
        if self.stopped or self.n_shards() + len(self.claims) >= self.max_shards:
            return None
        if self.max_bytes is not None:
            self.drop_passed()
            self.waiting_for_readers = self.live_bytes() >= self.max_bytes
            if self.waiting_for_readers:
                return WAIT
        shard_id = self.next_id
        self.next_id += 1
        self.buffer.ensure_capacity(shard_id + 1)  # the capacity on disk now covers the id
        self.claims[rank] = shard_id
        self._save()
        return shard_id

    def commit(self, rank: int, shard_id: int, n_rows: int, objects: dict | None = None) -> None:
        """`rank` has written shard `shard_id` whole; from now on readers may see it. Idempotent.
        objects: what `write_shard` returned (sizes and hashes of the shard's objects); None: the
        buffer reads the objects back to hash them."""
        self.buffer.commit_shard(shard_id, n_rows, objects)
        self.committed[shard_id] = n_rows
        if self._rank_of is not None:
            self._rank_of[shard_id] = rank
        if self.claims.get(rank) == shard_id:
            del self.claims[rank]
            self._save()
        self.meter.add(self.rows_committed())

    def producer_finished(self, rank: int) -> None:
        """`rank` has committed all its shards; the last one to finish marks the buffer complete."""
        self.finished.add(rank)
        self.claims.pop(rank, None)
        self._save()
        if len(self.finished) >= self.n_producers:
            self.buffer.mark_complete()

    def stop(self) -> None:
        """Hand out no more ids: producers finish after the shard they are writing."""
        self.stopped = True

    # ------------------------------------------------------------------ bounded window

    def live_bytes(self) -> float:
        """Bytes the live committed shards take in the store."""
        return float(self.buffer.live_nbytes())

    def drop_passed(self) -> list[int]:
        """Drop every live shard that all registered readers have passed; returns the ids dropped.
        Nothing is dropped until at least `min_readers` readers have registered."""
        progress = self.buffer.reader_progress()
        if len(progress) < self.min_readers:
            return []
        passed = [s for s in self.committed if all(s in seen for seen in progress.values())]
        for shard_id in passed:
            self.dropped_ranks[shard_id] = self.rank_of(shard_id)  # first: its doc_index goes with the data
            self._save()
            self.buffer.drop_shard(shard_id)
            self.dropped[shard_id] = self.committed.pop(shard_id)
        return passed

    # ------------------------------------------------------------------ counts

    def rank_of(self, shard_id: int) -> int:
        if shard_id in self.dropped_ranks:
            return self.dropped_ranks[shard_id]
        if self._rank_of is None:
            self._rank_of = {}
        if shard_id not in self._rank_of:
            self._rank_of[shard_id] = shard_rank(self.buffer, shard_id, self.n_producers)
        return self._rank_of[shard_id]

    def rows_by_rank(self) -> list[int]:
        """Rows each rank has committed, dropped shards included."""
        done = [0] * self.n_producers
        for shard_id, n_rows in [*self.committed.items(), *self.dropped.items()]:
            done[self.rank_of(shard_id)] += n_rows
        return done

    def n_shards(self) -> int:
        """Shards committed so far, dropped ones included."""
        return len(self.committed) + len(self.dropped)

    def rows_committed(self) -> int:
        return sum(self.committed.values()) + sum(self.dropped.values())

    def status(self) -> dict:
        rows = self.rows_committed()
        self.meter.add(rows)  # a stall shows as a falling rate
        rate = self.meter.rate()
        return {
            "rows_committed": rows,
            "shards_committed": self.n_shards(),
            "target_rows": self.target_rows,
            "tokens_per_s": rate,
            "eta_s": eta_seconds(rows, self.target_rows, rate),
            "rows_by_rank": self.rows_by_rank(),
            "claims": dict(self.claims),
            "n_producers": self.n_producers,
            "producers_finished": len(self.finished),
            "producer_pids": dict(self.pids),
            "live_shards": len(self.committed),
            "shards_dropped": len(self.dropped),
            "waiting_for_readers": self.waiting_for_readers,
            "complete": self.buffer.is_complete(),
        }

    def _save(self) -> None:
        self.production = {
            **self.production,
            "claims": {str(r): s for r, s in sorted(self.claims.items())},
            "finished": sorted(self.finished),
            "dropped_ranks": {str(s): r for s, r in sorted(self.dropped_ranks.items())},
        }
        self.buffer.set_production(self.production)
