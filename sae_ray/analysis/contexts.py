"""Contexts of buffer rows: the tokens around a row, rebuilt from the corpus. No Ray.

A buffer row stores its token, document and position in its context, but a long document spans
several contexts, so those do not say which context a row came from. The producers' own
determinism does: producer rank r of `world` packs documents r, r + world, ... (`pack_documents`)
into one stream of rows, cuts it into shards of `shard_rows` in order, and shuffles shard i of its
stream with the seed (train.seed + r, i) (`sae_ray.activations.produce`). So a buffer row maps to
one place in one rank's stream (`StreamMap`), and replaying that rank's packing finds its context
and position exactly, and the stream places of the window's other tokens, which map back to
buffer rows. The rebuilt token at the centre is checked against the stored one: a mismatch means
the corpus, tokenizer, context size, producer count or train.seed differ from the buffer's, and
is an error.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from sae_ray.activations.text import pack_documents
from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.ledger import dropped_ranks, shard_rank


class StreamMap:
    """Global buffer rows (shard_id * shard_rows + row in shard) <-> (rank, row of its stream)."""

    def __init__(self, buffer: ActivationBuffer, world: int, seed: int):
        self.shard_rows, self.world, self.seed = buffer.shard_rows, world, seed
        live = buffer.committed()
        ranks = dropped_ranks(buffer)
        self.rows_in = dict(live)
        by_rank: dict[int, list[int]] = {}
        for shard_id in sorted([*live, *buffer.dropped()]):
            rank = ranks[shard_id] if shard_id in ranks else shard_rank(buffer, shard_id, world)
            by_rank.setdefault(rank, []).append(shard_id)
        self.place = {s: (r, i) for r, ids in by_rank.items() for i, s in enumerate(ids)}  # shard -> (rank, i-th of its stream)
        self.shard_at = {(r, i): s for s, (r, i) in self.place.items()}
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _order(self, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, inverse): row j of the shard is row order[j] of its stream slice."""
        if shard_id not in self._orders:
            rank, i = self.place[shard_id]
            order = np.random.default_rng((self.seed + rank, i)).permutation(self.rows_in[shard_id])
            self._orders[shard_id] = (order, np.argsort(order))
        return self._orders[shard_id]

    def to_stream(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows [n] -> (rank [n], stream row [n])."""
        rank, stream = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
        for j, row in enumerate(rows.tolist()):
            shard_id, local = divmod(row, self.shard_rows)
            r, i = self.place[shard_id]
            rank[j], stream[j] = r, i * self.shard_rows + self._order(shard_id)[0][local]
        return rank, stream

    def to_rows(self, rank: int, stream: np.ndarray) -> np.ndarray:
        """Stream rows [n] of `rank` (-1: none) -> global rows [n] (-1 where the shard is not live)."""
        out = np.full(len(stream), -1, np.int64)
        for j, n in enumerate(stream.tolist()):
            if n < 0:
                continue
            i, offset = divmod(n, self.shard_rows)
            shard_id = self.shard_at.get((rank, i))
            if shard_id is not None and shard_id in self.rows_in and offset < self.rows_in[shard_id]:
                out[j] = shard_id * self.shard_rows + self._order(shard_id)[1][offset]
        return out


@dataclass
class RebuiltContexts:
    """Windows of W = 2w+1 positions around each asked-for row (index i of the request)."""

    tokens: np.ndarray
    """[n, W] int32 token ids (-1 outside the context or at padding)."""
    rows: np.ndarray
    """[n, W] int64 global buffer row of each token (-1: no row, e.g. a special token)."""


def rebuild_contexts(tokenizer, documents: Callable[[], Iterable[str]], streams: StreamMap, context_size: int,
                     rows: np.ndarray, token: np.ndarray, window: int, batch_size: int = 64) -> RebuiltContexts:
    """The windows around global buffer rows `rows` [n] whose stored tokens are `token` [n], by
    replaying each producer rank's packing of `documents()` (called once per rank needed).
    ValueError naming the first row whose rebuilt token is not its stored one."""
    n, width = len(rows), 2 * window + 1
    out = RebuiltContexts(np.full((n, width), -1, np.int32), np.full((n, width), -1, np.int64))
    rank, stream = streams.to_stream(rows)
    offsets = np.arange(-window, window + 1)
    found = np.zeros(n, bool)
    for r in sorted(set(rank.tolist())):
        mine = np.flatnonzero(rank == r)
        by_stream = np.argsort(stream[mine], kind="stable")
        wanted, at = mine[by_stream], stream[mine][by_stream]  # requests of this rank in stream order
        base, k = 0, 0
        docs = itertools.islice(documents(), r, None, streams.world)
        for batch in pack_documents(tokenizer, docs, context_size, batch_size):
            flat = batch.keep.reshape(-1)
            kept = int(flat.sum())
            if k < len(at) and at[k] < base + kept:
                where = np.flatnonzero(flat)  # flat index of each kept row of this batch
                place = np.full(flat.shape, -1, np.int64)
                place[where] = base + np.arange(kept)  # stream row of each kept position
                place = place.reshape(batch.keep.shape)
                while k < len(at) and at[k] < base + kept:
                    i = wanted[k]
                    b, p = divmod(int(where[at[k] - base]), context_size)
                    q = p + offsets
                    inside = (q >= 0) & (q < context_size)
                    qc = np.clip(q, 0, context_size - 1)
                    real = inside & (batch.attention_mask[b, qc] == 1)
                    out.tokens[i] = np.where(real, batch.input_ids[b, qc], -1)
                    out.rows[i] = streams.to_rows(r, np.where(real, place[b, qc], -1))
                    found[i] = out.tokens[i, window] == token[i]
                    k += 1
            base += kept
            if k >= len(at):
                break
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise ValueError(
            f"buffer row {int(rows[i])} (token {int(token[i])}) is not where the config's data puts it (rebuilt token "
            f"{int(out.tokens[i, window])}): the dataset, tokenizer, data.context_size, producers.count or train.seed "
            "differ from the ones that produced the buffer")
    return out
