"""Turn documents into shards of activation rows. Knows nothing of Ray or Zarr.

A producer runs the model over packed contexts, keeps the rows at non-special
positions, and collects them until it holds a whole shard; the shard's rows are then
shuffled (across the many sequences it holds) and handed to the caller to write.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sae_ray.activations.hooks import ResolvedHook, capture_activations
from sae_ray.activations.text import pack_documents

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """[n, d] tensor -> numpy in the buffer's storage dtype (bfloat16 -> uint16 bits)."""
    t = t.to(TORCH_DTYPES[dtype])
    if dtype == "bfloat16":
        return t.view(torch.uint16).cpu().numpy() if hasattr(torch, "uint16") else t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()


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
    many rows resumes exactly (batches wholly inside the skip never reach the model).
    """
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    pending: list[Shard] = []
    n_pending = 0
    n_out = 0

    def flush(n: int) -> Shard:
        nonlocal pending, n_pending
        merged = Shard(
            acts={h.name: np.concatenate([p.acts[h.name] for p in pending]) for h in hooks},
            tokens=np.concatenate([p.tokens for p in pending]),
            doc_index=np.concatenate([p.doc_index for p in pending]),
            position=np.concatenate([p.position for p in pending]),
        )
        take, rest = _split(merged, n)
        pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        order = rng.permutation(len(take))
        return Shard({k: v[order] for k, v in take.acts.items()}, take.tokens[order], take.doc_index[order], take.position[order])

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
        acts = capture_activations(
            model, hooks, torch.from_numpy(batch.input_ids).to(device), torch.from_numpy(batch.attention_mask).to(device)
        )
        keep = torch.from_numpy(batch.keep)
        block = Shard(
            acts={name: to_storage(a[keep.to(a.device)], dtype) for name, a in acts.items()},
            tokens=batch.input_ids[batch.keep].astype(np.int32),
            doc_index=batch.doc_index[batch.keep].astype(np.int64) * world + rank,
            position=batch.position[batch.keep].astype(np.int32),
        )
        pending.append(block)
        n_pending += len(block)
        while n_pending >= shard_rows:
            n = shard_rows if max_rows is None else min(shard_rows, max_rows - n_out)
            shard = flush(n)
            n_out += len(shard)
            yield shard
            if max_rows is not None and n_out >= max_rows:
                return
    if n_pending:
        n = n_pending if max_rows is None else min(n_pending, max_rows - n_out)
        if n > 0:
            yield flush(n)


def _split(s: Shard, n: int) -> tuple[Shard, Shard]:
    head = Shard({k: v[:n] for k, v in s.acts.items()}, s.tokens[:n], s.doc_index[:n], s.position[:n])
    tail = Shard({k: v[n:] for k, v in s.acts.items()}, s.tokens[n:], s.doc_index[n:], s.position[n:])
    return head, tail
