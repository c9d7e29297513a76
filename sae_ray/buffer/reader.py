"""Shuffled float32 batches from an activation buffer, for trainers.

Rows inside a shard are already shuffled by the producer. The reader takes committed
shards in a seeded random order, reads ``shards_in_mix`` of them at a time (whole
shards, so reads are chunk-aligned), shuffles the rows across them and yields full
batches, carrying the remainder into the next mix. It streams: it may start while
producers are still committing, and picks up new shards as they are committed.

A background thread reads and mixes up to ``prefetch`` mixes ahead of the consumer
(``prefetch=0``: no thread). ``state_dict()`` describes what the consumer has received
(not what the thread has read ahead), so a reader built with ``state=`` yields exactly
the batches an uninterrupted reader would have yielded next.

Pairs (a transcoder's input and output): ``hook`` a tuple of hook names. Each shard's arrays are
read once each and set side by side in one row, so everything above (mixing, carry, resume,
split) moves both together, and each batch is a tuple of one tensor per hook, the same rows.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from sae_ray.dtypes import TORCH_DTYPES

from .errors import CorruptShardError, ShardDroppedError
from .layout import check_reader_id
from .prefetch import Prefetcher
from .split import SPLITS, eval_fraction, split_mask
from .store import ActivationBuffer

STATE_VERSION = 1
SHARDS_IN_MIX = 4
"""Shards a reader mixes at a time by default (what a trial uses)."""
ON_CORRUPT = ("fail", "skip")
# state keys that must match the reader's own settings: another value gives another stream
_SETTINGS = ("hook", "batch_size", "seed", "shards_in_mix", "split")
# position keys a state saved before they existed may lack (they start at 0)
_OPTIONAL = ("shards_skipped",)


@dataclass
class _Mix:
    """One mix as the background thread hands it over.

    ``batches``: [k, d_in] tensors in the stored dtype (views of one permuted tensor);
    ``before``: the position at the start of this mix (``batches_done`` counts batches
    already consumed before a resume); ``after``: the position once all are consumed;
    ``passed``: shards fully consumed this epoch once all are consumed."""

    before: dict
    batches: list[torch.Tensor]
    after: dict
    passed: list[int]
    rows_skipped: int
    shards_skipped: int


class _Demand:
    """What the consumer side tells the mixing side: whether it is blocked asking for the next
    mix (``asking``), and how far it has received (``received``: the ``mix`` of its last
    mix's ``after``). A reader waits for a shard with nothing left to give only when both say so."""

    def __init__(self, received: int):
        self.asking = threading.Event()
        self.received = received


@dataclass
class _End:
    """A windowed buffer is complete and every live shard has been read."""

    after: dict
    passed: list[int]


class BufferReader:
    """Iterator of ``[batch_size, d_in]`` float32 CPU tensors from one hook; with ``hook`` a tuple
    of hook names, of tuples of ``[batch_size, d_h]`` tensors, one per hook, of the same rows.

    Epoch ``e`` visits every shard committed during it exactly once, in an order drawn
    from ``seed`` and ``e``. When every committed shard has been read: if the buffer is
    complete, the next epoch starts (endless); otherwise the reader polls every
    ``poll_seconds`` for new commits and raises TimeoutError after ``timeout_seconds``
    without any. A windowed buffer (``buffer.is_windowed()``: a window is set or shards
    were dropped) is single-epoch: each shard is read once, and once the buffer is
    complete and every live shard has been read the iterator ends (StopIteration; the
    last < batch_size rows are not yielded). Dropped shards are never read.

    ``split``: None returns every row; "train" only rows of documents outside the buffer's
    held-out split, "eval" only those inside it (`split.held_out`); a buffer without a split
    is refused for either.

    ``on_corrupt``: "fail" raises ``CorruptShardError``; "skip" skips the shard, adds its
    rows to ``rows_skipped``, counts it in ``shards_skipped`` and warns (a shard skipped in
    several epochs counts each time; an epoch in which every shard was skipped raises
    ValueError). ``prefetch``: mixes read ahead by a background thread (0: none).
    ``pin_memory``: batches in page-locked memory (needs CUDA), so that copying them to the GPU
    with ``non_blocking=True`` is asynchronous.
    ``reader_id``: if set, after each mix the shards fully consumed in the current epoch
    are written to ``<buffer>/readers/<reader_id>.json`` (what the coordinator of a
    bounded window waits for; shards whose rows are still carried into the next mix are not
    passed yet); so is waiting for a new shard with everything read consumed ("waiting"),
    and ``close()`` records the reader done (the window stops waiting for it). ``state``: a
    ``state_dict()`` to resume from. ``rows_read`` counts rows yielded, ``rows_skipped``
    rows lost to damaged or dropped shards, ``shards_skipped`` the shards they were in,
    ``epoch`` is the epoch of the last batch yielded.

    Memory: about ``(prefetch + 2) * shards_in_mix * shard_rows * d_in`` stored values.
    """

    def __init__(
        self,
        buffer: ActivationBuffer,
        hook: str | tuple[str, ...],
        batch_size: int,
        seed: int = 0,
        shards_in_mix: int = SHARDS_IN_MIX,
        poll_seconds: float = 0.5,
        timeout_seconds: float = 600.0,
        on_corrupt: str = "fail",
        prefetch: int = 2,
        reader_id: str | None = None,
        state: dict | None = None,
        split: str | None = None,
        pin_memory: bool = False,
    ):
        names = (hook,) if isinstance(hook, str) else tuple(hook)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"BufferReader hook {hook!r}: give a hook name, or a tuple of distinct hook names")
        for name in names:
            if name not in buffer.hooks:
                raise KeyError(f"buffer at {buffer.path!r} has no hook {name!r}; hooks: {sorted(buffer.hooks)}")
        for field, v in (("batch_size", batch_size), ("shards_in_mix", shards_in_mix)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BufferReader {field} must be an int >= 1, got {v!r}")
        for field, v in (("poll_seconds", poll_seconds), ("timeout_seconds", timeout_seconds)):
            if not v > 0:
                raise ValueError(f"BufferReader {field} must be > 0, got {v!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"BufferReader seed must be an int >= 0, got {seed!r}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"BufferReader on_corrupt {on_corrupt!r} is not supported; accepted: {', '.join(ON_CORRUPT)}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"BufferReader split {split!r} is not supported; accepted: None (every row), {', '.join(SPLITS)}")
        if split is not None:
            eval_fraction(buffer)  # a buffer without a held-out split: refused now, not after the first mix
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("BufferReader pin_memory=True needs CUDA (page-locked memory is for copies to a GPU); "
                             "this machine has none")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"BufferReader prefetch must be an int >= 0 (mixes read ahead; 0 = no thread), got {prefetch!r}")
        self.buffer = buffer
        self.hook = hook if isinstance(hook, str) else names
        self.hooks = names
        self.widths = [buffer.hooks[h] for h in names]
        self.d_in = sum(self.widths)  # of a row as mixed: the hooks side by side
        self.batch_size = batch_size
        self.seed = seed
        self.shards_in_mix = shards_in_mix
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        self.on_corrupt = on_corrupt
        self.prefetch = prefetch
        self.reader_id = reader_id
        self.split = split
        self.pin_memory = pin_memory
        if reader_id is not None:  # now rather than after the first mix
            check_reader_id(reader_id, buffer.path)
        self._start = _fresh_position()
        self._start_rows_read = 0
        self._pos = self._start
        self.rows_read = 0
        self.rows_skipped = 0
        self.shards_skipped = 0
        self.epoch = 0
        self._current: weakref.ref | None = None
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Where the consumer is: JSON-serialisable. Pass it as ``state=`` (or to
        ``load_state_dict``) to continue with exactly the batches that come next."""
        state = {"version": STATE_VERSION, "hook": self._json("hook"), "batch_size": self.batch_size, "seed": self.seed,
                 "shards_in_mix": self.shards_in_mix, "split": self.split, **self._pos, "rows_read": self.rows_read}
        return json.loads(json.dumps(state))

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a ``state_dict()``) at the next ``iter()``; stops a running iterator."""
        where = f"BufferReader on buffer {self.buffer.path!r}, hook {self.hook!r}"
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{where}: state must be a dict from state_dict() with version {STATE_VERSION}, got {got!r}")
        for key in _SETTINGS:
            if state.get(key) != self._json(key):
                raise ValueError(f"{where}: state was saved with {key}={state.get(key)!r} but this reader has "
                                 f"{key}={getattr(self, key)!r}; resume with the same {', '.join(_SETTINGS)}")
        missing = [k for k in _fresh_position() if k not in state and k not in _OPTIONAL]
        if missing:
            raise ValueError(f"{where}: state lacks {missing}; pass a dict from state_dict()")
        self._stop()
        self._start = {**_fresh_position(), **{k: state[k] for k in _fresh_position() if k in state}}
        self._pos = self._start
        self._start_rows_read = self.rows_read = int(state.get("rows_read", 0))
        self.rows_skipped = int(state["rows_skipped"])
        self.shards_skipped = int(self._start["shards_skipped"])
        self.epoch = int(state["epoch"])

    def _json(self, key: str):
        """Setting `key` as state_dict() holds it (a tuple of hooks is a list)."""
        return json.loads(json.dumps(getattr(self, key)))

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yields [batch_size, d_in] float32 tensors from the start (or the loaded state).
        One iterator at a time: a new one stops the previous one."""
        self._stop()
        start = self._start
        self._pos = start
        self.rows_read = self._start_rows_read
        self.rows_skipped = int(start["rows_skipped"])
        self.shards_skipped = int(start["shards_skipped"])
        self.epoch = int(start["epoch"])
        it = self._batches(start)
        self._current = weakref.ref(it)
        return it

    def close(self) -> None:
        """Stop the current iterator and its background thread (also done when it is garbage
        collected), and with a ``reader_id`` record that this reader reads no more: a bounded
        window no longer waits for it (a later ``iter()`` registers it again, but shards dropped
        meanwhile are gone)."""
        self._stop()
        self._record_progress(_passed(self._pos), int(self._pos["epoch"]), done=True)

    def _stop(self) -> None:
        """Stop the current iterator and its background thread."""
        it = self._current() if self._current is not None else None
        self._current = None
        if it is not None:
            it.close()

    def _batches(self, start: dict) -> Iterator[torch.Tensor]:
        """Consumer side: unpacks mixes, keeps the position in step with what it yields."""
        # registers (again) before reading: a done left by an earlier run of this reader no longer holds
        self._record_progress(_passed(start), int(start["epoch"]))
        stop = threading.Event()
        demand = _Demand(int(start["mix"]))
        source = self._mixes(start, stop, demand)
        prefetcher = None
        if self.prefetch:
            prefetcher = Prefetcher(source, self.prefetch, stop)
            items: Iterator = iter(prefetcher)
        else:
            items = source
        try:
            while True:
                demand.asking.set()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    demand.asking.clear()
                if isinstance(item, _End):
                    self._pos = item.after
                    self._record_progress(item.passed, item.after["epoch"])
                    return
                demand.received = int(item.after["mix"])
                self.rows_skipped, self.shards_skipped = item.rows_skipped, item.shards_skipped
                n = len(item.batches)
                for j, batch in enumerate(item.batches):
                    self.epoch = int(item.before["epoch"])
                    self.rows_read += self.batch_size
                    if j == n - 1:
                        self._pos = item.after
                        self._record_progress(item.passed, item.before["epoch"])
                    else:
                        self._pos = {**item.before, "batches_done": item.before["batches_done"] + j + 1}
                    yield self._out(batch)
                if n == 0:
                    self._pos = item.after
                    self._record_progress(item.passed, item.before["epoch"])
        finally:
            stop.set()
            if prefetcher is not None:
                prefetcher.close()
            else:
                source.close()

    def _record_progress(self, passed: list[int], epoch: int, done: bool = False, waiting: bool = False,
                         seen: set[int] | None = None) -> None:
        if self.reader_id is None:
            return
        try:
            self.buffer.write_reader_progress(self.reader_id, passed, epoch, done=done, waiting=waiting, seen=seen)
        except OSError as e:  # the next mix writes it again
            warnings.warn(f"buffer at {self.buffer.path!r}: could not write progress of reader {self.reader_id!r} "
                          f"({type(e).__name__}: {e}); will retry after the next mix", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ producer side (may run in a thread)

    def _out(self, batch: torch.Tensor):
        """A mixed batch [B, d_in] (stored dtype) as yielded: float32, one tensor per hook for pairs."""
        if isinstance(self.hook, str):
            return batch.to(torch.float32, copy=True)
        return tuple(part.to(torch.float32, copy=True) for part in batch.split(self.widths, dim=1))

    def _rows(self, shard_id: int) -> torch.Tensor:
        """The shard's rows [n, d_in] (stored dtype): each hook's array read once, side by side."""
        parts = [self.buffer.read_tensor(h, shard_id) for h in self.hooks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _read_shard(self, shard_id: int, skips: "_Skips") -> tuple[torch.Tensor, np.ndarray] | None:
        """The shard's rows of this reader's split [n, d_in] (stored dtype) and their row numbers
        in the shard [n]; or None if skipped (counted in ``skips``)."""
        try:
            rows = self._rows(shard_id)
            if self.split is None:
                return rows, np.arange(len(rows))
            keep = split_mask(self.buffer, shard_id, self.split)
            return rows[torch.from_numpy(keep)], np.flatnonzero(keep)
        except (CorruptShardError, ShardDroppedError) as e:
            if isinstance(e, CorruptShardError) and self.on_corrupt == "fail":
                raise
            state = self.buffer.commit_state()
            n = state.committed.get(shard_id, state.dropped.get(shard_id, 0))
            skips.add(n)
            warnings.warn(f"BufferReader on buffer {self.buffer.path!r}: skipped shard {shard_id} ({n} rows; "
                          f"{skips.rows} rows skipped so far): {e}", RuntimeWarning, stacklevel=2)
            return None

    def _read_ids(self, ids: np.ndarray, skips: "_Skips") -> tuple[torch.Tensor, np.ndarray]:
        """Rows named by ``ids`` [n, 2] of (shard, row), read again in that order (a resumed
        carry): ([n', d_in] stored dtype, their ids [n', 2]); lost rows are counted in ``skips``."""
        out = torch.empty(len(ids), self.d_in, dtype=TORCH_DTYPES[self.buffer.dtype])
        keep = np.ones(len(ids), dtype=bool)
        for s in np.unique(ids[:, 0]).tolist():
            mask = ids[:, 0] == s
            try:
                rows = self._rows(s)
            except (CorruptShardError, ShardDroppedError) as e:
                if isinstance(e, CorruptShardError) and self.on_corrupt == "fail":
                    raise
                keep &= ~mask
                skips.add(int(mask.sum()))
                warnings.warn(f"BufferReader on buffer {self.buffer.path!r}: {int(mask.sum())} carried rows of shard {s} "
                              f"are lost ({skips.rows} rows skipped so far): {e}", RuntimeWarning, stacklevel=2)
                continue
            out[torch.from_numpy(mask)] = rows[torch.from_numpy(ids[mask, 1])]
        return out[torch.from_numpy(keep)], ids[keep]

    def _mixes(self, start: dict, stop: threading.Event, demand: _Demand) -> Iterator[_Mix | _End]:
        """Producer side: from position ``start``, every mix in turn (see ``_Mix``)."""
        if start.get("finished"):
            yield _End(after=start, passed=[int(s) for s in start["seen"]])
            return
        epoch, m = int(start["epoch"]), int(start["mix"])
        pool, seen = [int(s) for s in start["pool"]], {int(s) for s in start["seen"]}
        skips = _Skips(int(start["rows_skipped"]), int(start["shards_skipped"]))
        carry_ids = np.asarray(start["carry"], dtype=np.int64).reshape(-1, 2)
        carry, carry_ids = self._read_ids(carry_ids, skips)
        mix = [int(s) for s in start["mix_shards"]]
        done = int(start["batches_done"])
        waiting_since: float | None = None
        announced = False  # this wait is recorded in the progress file
        # whether this epoch, read from its start, has given any row (an epoch of only skipped shards raises)
        epoch_rows: int | None = 0 if (m == 0 and not carry_ids.size and not mix) else None

        while True:
            if not mix:  # between mixes: top up the pool, or change epoch, or wait, or end
                done = 0
                if len(pool) < self.shards_in_mix:
                    state = self.buffer.commit_state()  # one read: complete, committed and windowed agree
                    pool = [s for s in pool if s in state.committed]  # dropped meanwhile
                    new = [s for s in state.committed if s not in seen]
                    if new:
                        seen.update(new)
                        pool.extend(new)
                        np.random.default_rng((self.seed, epoch, 1, len(seen))).shuffle(pool)
                    if not pool:
                        if state.complete:
                            if state.windowed:
                                after = {**_fresh_position(), "epoch": epoch, "mix": m, "seen": sorted(seen),
                                         "rows_skipped": skips.rows, "shards_skipped": skips.shards, "finished": True}
                                yield _End(after=after, passed=sorted(seen))
                                return
                            if not state.committed:
                                raise ValueError(f"buffer at {self.buffer.path!r} is complete but has no committed rows")
                            if epoch_rows == 0:
                                raise ValueError(
                                    f"BufferReader on buffer {self.buffer.path!r}: every shard of epoch {epoch} was skipped "
                                    f"as damaged ({skips.shards} shards, {skips.rows} rows skipped so far): nothing is left "
                                    "to read. See `sae-ray buffer info PATH --verify`, and re-produce the buffer")
                            epoch, m, seen, epoch_rows = epoch + 1, 0, set(), 0
                            continue
                        waiting_since = waiting_since or time.monotonic()
                        if not announced and demand.asking.is_set() and demand.received == m:
                            # everything read is consumed: only a new shard helps (a full window's coordinator looks for this)
                            carried = set(carry_ids[:, 0].tolist())
                            self._record_progress(sorted(seen - carried), epoch, waiting=True, seen=seen)
                            announced = self.reader_id is not None
                        if time.monotonic() - waiting_since > self.timeout_seconds:
                            raise TimeoutError(
                                f"no new shard committed to buffer at {self.buffer.path!r} in {self.timeout_seconds} s "
                                f"({len(state.committed)} committed shards, all read; buffer not marked complete). "
                                + (self._window_note(state) or "Are the producers running?")
                            )
                        if stop.wait(self.poll_seconds):
                            return
                        continue
                waiting_since, announced = None, False
                mix, pool = pool[: self.shards_in_mix], pool[self.shards_in_mix :]

            before = {"epoch": epoch, "mix": m, "pool": list(pool), "seen": sorted(seen), "mix_shards": list(mix),
                      "carry": carry_ids.tolist(), "batches_done": done, "rows_skipped": skips.rows,
                      "shards_skipped": skips.shards, "finished": False}
            parts, ids = [carry], [carry_ids]
            for s in mix:
                read = self._read_shard(s, skips)
                if read is not None:
                    rows, numbers = read
                    parts.append(rows)
                    ids.append(np.stack([np.full(len(rows), s), numbers], axis=1).astype(np.int64))
                    if epoch_rows is not None:
                        epoch_rows += len(rows)
            rows, row_ids = torch.cat(parts), np.concatenate(ids)
            perm = np.random.default_rng((self.seed, epoch, 0, m)).permutation(len(rows))
            n_full = len(rows) // self.batch_size * self.batch_size
            take = torch.from_numpy(perm[:n_full])
            # pinned batches let the training loop's .to(cuda, non_blocking=True) overlap the step
            mixed = torch.empty((n_full, rows.shape[1]), dtype=rows.dtype, pin_memory=self.pin_memory)
            torch.index_select(rows, 0, take, out=mixed)
            carry, carry_ids = rows[torch.from_numpy(perm[n_full:])], row_ids[perm[n_full:]]
            del rows
            batches = [mixed[i : i + self.batch_size] for i in range(done * self.batch_size, n_full, self.batch_size)]
            after = {"epoch": epoch, "mix": m + 1, "pool": list(pool), "seen": sorted(seen), "mix_shards": [],
                     "carry": carry_ids.tolist(), "batches_done": 0, "rows_skipped": skips.rows,
                     "shards_skipped": skips.shards, "finished": False}
            passed = sorted(seen - set(pool) - set(carry_ids[:, 0].tolist()))
            yield _Mix(before=before, batches=batches, after=after, passed=passed, rows_skipped=skips.rows,
                       shards_skipped=skips.shards)
            mix, m = [], m + 1

    def _window_note(self, state) -> str:
        """Why a full bounded window gets no new shard: the readers it waits for ("" when it is not full)."""
        if state.window_bytes is None:
            return ""
        live = self.buffer.live_nbytes()
        if live < state.window_bytes:
            return ""
        states = self.buffer.reader_states()
        not_started = [r for r in self.buffer.production().get("readers", []) if r not in states]
        behind = [r for r, st in states.items()
                  if r != self.reader_id and not st["done"] and not set(state.committed) <= st["passed"]]
        return (f"The bounded window is full ({live:,} of {state.window_bytes:,} bytes, buffer.max_gb) and a shard is "
                f"dropped only once every reader has passed it; readers not started: {not_started or 'none'}; readers "
                f"that have not passed every live shard: {behind or 'none'}. A trial that has not started holds every "
                "shard, so with more stacks than can run at once each trial must finish within the window: raise "
                "buffer.max_gb, lower train.total_tokens, or let every stack run at once (resources.max_concurrent_trials, "
                "CPUs per trial)")


@dataclass
class _Skips:
    """Rows and shards a reader has skipped (damaged or dropped) so far."""

    rows: int = 0
    shards: int = 0

    def add(self, rows: int) -> None:
        self.rows += rows
        self.shards += 1


def _passed(pos: dict) -> list[int]:
    """The shards a reader at position ``pos`` has passed in its epoch: seen, and neither in its
    pool, nor in the mix it is in, nor carried."""
    held = {*pos["pool"], *pos["mix_shards"], *(s for s, _ in pos["carry"])}
    return [int(s) for s in pos["seen"] if pos.get("finished") or s not in held]


def _fresh_position() -> dict[str, Any]:
    """The position before anything is read."""
    return {"epoch": 0, "mix": 0, "pool": [], "seen": [], "mix_shards": [], "carry": [], "batches_done": 0,
            "rows_skipped": 0, "shards_skipped": 0, "finished": False}
