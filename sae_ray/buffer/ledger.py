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
  still count its rows for the rank that made them); with a window also ``readers`` (the
  reader ids registered up front) and ``pinned`` (shards kept for the held-out rows).

The bounded window drops a live shard once every reader has passed it: every registered
reader (a sweep registers one per stack before any trial starts, so a trial that has not
started yet holds every shard) and every other reader that wrote progress, a reader that
recorded itself done excepted. It never drops the pinned shards: the lowest live shard ids
whose held-out rows make up ``eval_rows``, exactly the shards ``split.held_out_rows`` reads,
so every trial's final evaluation reads the same rows and never meets a dropped shard.
When the window is full, nothing can be dropped, no shard is being written, and every
registered reader has started and is either done or waiting for a new shard after reading
every live one (what is left is held back by the readers' carried rows and the pinned
shards), nothing would ever move again: then one shard is handed out over the window
(counted in ``status()["window_overflows"]``).

Claims are per rank and a producer writes its shards one at a time, in order: a new claim
(or ``producer_started``) by a rank frees the rank's old claim. An id freed that way is never
handed out again (a dead attempt may have written part of it); it stays an unused hole.
"""

from __future__ import annotations

import math
import time

from .errors import CorruptShardError
from .progress import RateMeter, eta_seconds
from .split import eval_fraction, split_mask
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
    dropped once every reader has passed it (see the module docstring). readers: the reader
    ids that must pass every shard, registered before they start; min_readers: nothing is
    dropped until at least this many readers have written progress (at least len(readers)).
    eval_rows: the held-out rows each trial evaluates on (`train.eval_rows`); the shards that
    hold them are pinned (None: nothing pinned).
    """

    def __init__(self, buffer: ActivationBuffer, n_tokens: int, n_producers: int,
                 max_gb: float | None = None, min_readers: int = 1, readers: tuple[str, ...] | list[str] = (),
                 eval_rows: int | None = None, clock=time.monotonic):
        self.buffer = buffer
        self.target_rows = n_tokens
        self.max_shards = math.ceil(n_tokens / buffer.shard_rows)
        self.n_producers = n_producers
        self.max_bytes = None if max_gb is None else max_gb * 1e9
        self.production = buffer.production()
        self.readers = tuple(readers) or tuple(self.production.get("readers", []))
        self.min_readers = max(1, min_readers, len(self.readers))
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
        self.window_overflows = 0
        self.eval_rows = eval_rows if max_gb is not None else None
        if self.eval_rows is not None:
            try:
                eval_fraction(buffer)
            except ValueError:  # no held-out split: nothing to keep for evaluation
                self.eval_rows = None
        self.pinned: set[int] = {int(s) for s in self.production.get("pinned", [])} & set(self.committed)
        self._held_out: dict[int, int] = {}  # shard id -> its held-out rows, read once
        self.stopped = False
        self._rank_of: dict[int, int] | None = None  # shard id -> rank, read lazily (one small read per shard)
        self.meter = RateMeter(clock=clock)
        self.meter.add(self.rows_committed())
        if self.max_bytes is not None:
            self.update_pins()
            self._save()

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
            states = self.buffer.reader_states()
            self.drop_passed(states)
            full = self.live_bytes() >= self.max_bytes
            if full and self.window_stuck(states):
                self.window_overflows += 1
                full = False
            self.waiting_for_readers = full
            if full:
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
        pinned = len(self.pinned)
        self.update_pins()  # before any drop: the new shard may be one held_out_rows reads
        claimed = self.claims.get(rank) == shard_id
        if claimed:
            del self.claims[rank]
        if claimed or len(self.pinned) != pinned:
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
        """Hand out no more ids: producers finish after the shard they are writing. With a window,
        the shards every reader has passed are dropped now: no claim will come to drop them."""
        self.stopped = True
        if self.max_bytes is not None:
            self.drop_passed()

    # ------------------------------------------------------------------ bounded window

    def live_bytes(self) -> float:
        """Bytes the live committed shards take in the store."""
        return float(self.buffer.live_nbytes())

    def drop_passed(self, states: dict[str, dict] | None = None) -> list[int]:
        """Drop every live shard that all readers have passed (a reader that is done passes
        everything), pinned ones excepted; returns the ids dropped. Nothing is dropped until
        every registered reader, and at least `min_readers` readers, have written progress.
        states: `buffer.reader_states()`, if already read."""
        states = self.buffer.reader_states() if states is None else states
        if len(states) < self.min_readers or any(r not in states for r in self.readers):
            return []
        passed = [s for s in self.committed if s not in self.pinned
                  and all(st["done"] or s in st["passed"] for st in states.values())]
        for shard_id in passed:
            self.dropped_ranks[shard_id] = self.rank_of(shard_id)  # first: its doc_index goes with the data
            self._save()
            self.buffer.drop_shard(shard_id)
            self.dropped[shard_id] = self.committed.pop(shard_id)
        return passed

    def window_stuck(self, states: dict[str, dict]) -> bool:
        """Whether the full window could never move again: no shard is being written, every
        registered reader has started, and every reader not done waits for a new shard after
        reading every live one, so none will pass another shard until one more is committed.
        states: `buffer.reader_states()`, read after `drop_passed`."""
        if self.claims or len(states) < self.min_readers or any(r not in states for r in self.readers):
            return False
        live = set(self.committed)
        readers = [st for st in states.values() if not st["done"]]
        return bool(readers) and all(st["waiting"] and st["seen"] is not None and live <= st["seen"] for st in readers)

    def update_pins(self) -> None:
        """Pin the lowest live shard ids until their held-out rows make up `eval_rows`: the shards
        `split.held_out_rows(buffer, hook, eval_rows)` reads. Pins are only ever added, so a shard
        that reader may have started on is never dropped under it."""
        if self.eval_rows is None:
            return
        have = 0
        for shard_id in sorted(self.committed):
            if have >= self.eval_rows:
                break
            self.pinned.add(shard_id)
            if shard_id not in self._held_out:
                try:
                    self._held_out[shard_id] = int(split_mask(self.buffer, shard_id, "eval").sum())
                except CorruptShardError:  # its readers say so; here it just holds no usable held-out rows
                    self._held_out[shard_id] = 0
            have += self._held_out[shard_id]

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
            "window_overflows": self.window_overflows,
            "pinned_shards": len(self.pinned),
            "readers": list(self.readers),
            "complete": self.buffer.is_complete(),
        }

    def _save(self) -> None:
        self.production = {
            **self.production,
            "claims": {str(r): s for r, s in sorted(self.claims.items())},
            "finished": sorted(self.finished),
            "dropped_ranks": {str(s): r for s, r in sorted(self.dropped_ranks.items())},
        }
        if self.max_bytes is not None:
            self.production.update(readers=list(self.readers), pinned=sorted(self.pinned))
        self.buffer.set_production(self.production)
