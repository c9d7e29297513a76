"""Turn documents into shards of activation rows. Knows nothing of Ray or Zarr.

A producer runs the model over packed contexts, keeps the rows at non-special
positions, and collects them until it holds a whole shard; the shard's rows are then
shuffled (across the many sequences it holds) and handed to the caller to write.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sae_ray.activations.hooks import ResolvedHook, capture_activations
from sae_ray.activations.text import pack_documents
from sae_ray.dtypes import STORAGE_DTYPES, as_storage


@dataclass
class Shard:
    """Rows ready to be written as one shard. All arrays have n rows."""

    acts: dict[str, np.ndarray]
    """hook name -> [n, d_in]; bfloat16 as uint16 bits."""
    tokens: np.ndarray
    """[n] int32 token ids."""
    doc_index: np.ndarray
    """[n] int64 index of the source document."""
    position: np.ndarray
    """[n] int32 position in the context."""

    def __len__(self) -> int:
        return len(self.tokens)


class _HostCopy:
    """Rows of one batch on their way to host memory.

    On CPU the copy is done at once. On CUDA the rows are gathered and cast on the compute
    stream, then copied into pinned host tensors on a side stream with non_blocking=True, so
    the copy runs while the next batch's forward pass computes; `wait()` synchronises on the
    copy's event before the numpy views are handed out.
    """

    def __init__(self, acts: dict[str, torch.Tensor], keep: np.ndarray, dtype: str, copy_stream=None):
        flat_keep = np.flatnonzero(keep.reshape(-1))
        self.np_dtype = STORAGE_DTYPES[dtype]
        self.event = None
        if copy_stream is None:  # CPU: nothing to overlap
            index = torch.from_numpy(flat_keep)
            self.host = {name: as_storage(a.reshape(-1, a.shape[-1]).index_select(0, index.to(a.device)), dtype).cpu()
                         for name, a in acts.items()}
            return
        device = next(iter(acts.values())).device
        # an index (not a boolean mask) gathers without a device->host sync
        index = torch.from_numpy(flat_keep).pin_memory().to(device, non_blocking=True)
        rows = {name: as_storage(a.reshape(-1, a.shape[-1]).index_select(0, index), dtype) for name, a in acts.items()}
        copy_stream.wait_stream(torch.cuda.current_stream(device))
        self.host = {}
        with torch.cuda.stream(copy_stream):
            for name, r in rows.items():
                host = torch.empty(r.shape, dtype=r.dtype, pin_memory=True)
                host.copy_(r, non_blocking=True)
                r.record_stream(copy_stream)  # keep r's memory from being reused before the copy is done
                self.host[name] = host
        self.event = torch.cuda.Event()
        self.event.record(copy_stream)

    def wait(self) -> dict[str, np.ndarray]:
        """{hook: [n, d] numpy in the storage dtype}, once the copy has landed."""
        if self.event is not None:
            self.event.synchronize()
        return {name: h.numpy().view(self.np_dtype) for name, h in self.host.items()}


def iter_shards(
    model: torch.nn.Module,
    tokenizer,
    hooks: list[ResolvedHook],
    docs: Iterable[str],
    context_size: int,
    batch_size: int,
    shard_rows: int,
    dtype: str,
    seed: int = 0,
    max_rows: int | None = None,
    rank: int = 0,
    world: int = 1,
    skip_rows: int = 0,
) -> Iterator[Shard]:
    """Yield full shards of `shard_rows` rows, then one last partial shard if rows remain.

    docs: this producer's documents, the global documents rank, rank+world, rank+2*world, ...
    (doc_index records the global index). Stops once `max_rows` rows have been yielded
    (the last shard is cut to fit). skip_rows: rows this producer already committed in an
    earlier, interrupted run; shards are contiguous runs of the row stream, so skipping that
    many rows resumes exactly (batches wholly inside the skip never reach the model). The rows
    of shard i of the stream are shuffled with the seed (seed, i), so a resumed run yields the
    very shards, in the very row order, that an uninterrupted run would.

    The model runs in its own dtype and device. On CUDA the device->host copy of a batch
    overlaps the next batch's forward pass (pinned host memory, a side stream).
    """
    device = next(model.parameters()).device
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    shard_no = skip_rows // shard_rows  # place in this rank's stream of the next shard
    pending: list[Shard] = []
    n_pending = 0
    n_out = 0

    def flush(n: int) -> Shard:
        nonlocal pending, n_pending, shard_no
        merged = Shard(
            acts={h.name: np.concatenate([p.acts[h.name] for p in pending]) for h in hooks},
            tokens=np.concatenate([p.tokens for p in pending]),
            doc_index=np.concatenate([p.doc_index for p in pending]),
            position=np.concatenate([p.position for p in pending]),
        )
        take, rest = _split(merged, n)
        pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        order = np.random.default_rng((seed, shard_no)).permutation(len(take))
        shard_no += 1
        return Shard({k: v[order] for k, v in take.acts.items()}, take.tokens[order], take.doc_index[order], take.position[order])

    def launch(batch) -> tuple[_HostCopy, Shard]:
        """Start the forward pass and the copy of its kept rows; the returned block's acts come from copy.wait()."""
        ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        if device.type == "cuda":
            ids, mask = ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
        acts = capture_activations(model, hooks, ids, mask)
        block = Shard(
            acts={},
            tokens=batch.input_ids[batch.keep].astype(np.int32),
            doc_index=batch.doc_index[batch.keep].astype(np.int64) * world + rank,
            position=batch.position[batch.keep].astype(np.int32),
        )
        return _HostCopy(acts, batch.keep, dtype, copy_stream), block

    def batches():
        nonlocal skip_rows
        for batch in pack_documents(tokenizer, docs, context_size, batch_size):
            n_keep = int(batch.keep.sum())
            if skip_rows >= n_keep:
                skip_rows -= n_keep
                continue
            if skip_rows:  # the resume point falls inside this batch: drop its first skip_rows kept rows
                flat = batch.keep.reshape(-1).copy()
                flat[np.flatnonzero(flat)[:skip_rows]] = False
                batch.keep = flat.reshape(batch.keep.shape)
                skip_rows = 0
            yield batch

    in_flight: tuple[_HostCopy, Shard] | None = None
    for batch in itertools.chain(batches(), [None]):
        launched = launch(batch) if batch is not None else None  # batch i+1 computes while batch i copies
        if in_flight is not None:
            copy, block = in_flight
            block.acts = copy.wait()
            pending.append(block)
            n_pending += len(block)
            while n_pending >= shard_rows:
                n = shard_rows if max_rows is None else min(shard_rows, max_rows - n_out)
                shard = flush(n)
                n_out += len(shard)
                yield shard
                if max_rows is not None and n_out >= max_rows:
                    return
        in_flight = launched
    if n_pending:
        n = n_pending if max_rows is None else min(n_pending, max_rows - n_out)
        if n > 0:
            yield flush(n)


def _split(s: Shard, n: int) -> tuple[Shard, Shard]:
    head = Shard({k: v[:n] for k, v in s.acts.items()}, s.tokens[:n], s.doc_index[:n], s.position[:n])
    tail = Shard({k: v[n:] for k, v in s.acts.items()}, s.tokens[n:], s.doc_index[n:], s.position[n:])
    return head, tail
