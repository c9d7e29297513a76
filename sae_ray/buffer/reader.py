"""Shuffled float32 batches from an activation buffer, for trainers.

Rows inside a shard are already shuffled by the producer. The reader takes committed
shards in a seeded random order, reads ``shards_in_mix`` of them at a time (whole
shards, so reads are chunk-aligned), shuffles the rows across them and yields full
batches, carrying the remainder into the next mix. It streams: it may start while
producers are still committing, and picks up new shards as they are committed.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from .store import TORCH_DTYPE, ActivationBuffer


class BufferReader:
    """Endless iterator of ``[batch_size, d_in]`` float32 CPU tensors from one hook.

    Epoch ``e`` visits every shard committed during it exactly once, in an order drawn
    from ``np.random.default_rng((seed, e))``. When every committed shard has been read:
    if the buffer is complete, the next epoch starts; otherwise the reader polls every
    ``poll_seconds`` for new commits and raises TimeoutError after ``timeout_seconds``
    without any. ``rows_read`` counts rows yielded so far; ``epoch`` is the current epoch.
    """

    def __init__(
        self,
        buffer: ActivationBuffer,
        hook: str,
        batch_size: int,
        seed: int = 0,
        shards_in_mix: int = 4,
        poll_seconds: float = 0.5,
        timeout_seconds: float = 600.0,
    ):
        if hook not in buffer.hooks:
            raise KeyError(f"buffer at {buffer.path!r} has no hook {hook!r}; hooks: {sorted(buffer.hooks)}")
        for field, v in (("batch_size", batch_size), ("shards_in_mix", shards_in_mix)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BufferReader {field} must be an int >= 1, got {v!r}")
        for field, v in (("poll_seconds", poll_seconds), ("timeout_seconds", timeout_seconds)):
            if not v > 0:
                raise ValueError(f"BufferReader {field} must be > 0, got {v!r}")
        self.buffer = buffer
        self.hook = hook
        self.d_in = buffer.hooks[hook]
        self.batch_size = batch_size
        self.seed = seed
        self.shards_in_mix = shards_in_mix
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        self.rows_read = 0
        self.epoch = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yields [batch_size, d_in] float32 tensors, forever. Restarts from epoch 0."""
        self.rows_read, self.epoch = 0, 0
        rng = np.random.default_rng((self.seed, self.epoch))
        pool: list[int] = []  # committed, not yet read this epoch, in random order
        seen: set[int] = set()  # read (or in the pool) this epoch
        carry = torch.empty(0, self.d_in, dtype=TORCH_DTYPE[self.buffer.dtype])
        waiting_since: float | None = None

        while True:
            if len(pool) < self.shards_in_mix:  # top up with shards committed since we last looked
                complete = self.buffer.is_complete()  # read before committed(): no commit follows complete
                committed = self.buffer.committed()
                new = [s for s in committed if s not in seen]
                if new:
                    seen.update(new)
                    pool.extend(new)
                    rng.shuffle(pool)
                if not pool:
                    if complete:
                        if not committed:
                            raise ValueError(f"buffer at {self.buffer.path!r} is complete but has no committed rows")
                        self.epoch += 1
                        rng = np.random.default_rng((self.seed, self.epoch))
                        seen = set()
                        continue
                    waiting_since = waiting_since or time.monotonic()
                    if time.monotonic() - waiting_since > self.timeout_seconds:
                        raise TimeoutError(
                            f"no new shard committed to buffer at {self.buffer.path!r} in {self.timeout_seconds} s "
                            f"({len(committed)} committed shards, all read; buffer not marked complete). "
                            "Are the producers running?"
                        )
                    time.sleep(self.poll_seconds)
                    continue
            waiting_since = None

            mix, pool = pool[: self.shards_in_mix], pool[self.shards_in_mix :]
            rows = torch.cat([carry] + [self.buffer.read_tensor(self.hook, s) for s in mix])
            perm = torch.from_numpy(rng.permutation(len(rows)))
            n_full = len(rows) // self.batch_size * self.batch_size
            for i in range(0, n_full, self.batch_size):
                batch = rows[perm[i : i + self.batch_size]].to(torch.float32)
                self.rows_read += self.batch_size
                yield batch
            carry = rows[perm[n_full:]]
