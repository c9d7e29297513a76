"""The held-out split: a fixed share of the documents whose rows no training reader returns.

A document is held out when a hash of its global index falls below `eval_fraction`: the same
documents on every run, producer count and resume, with no periodic pattern in the dataset's
order. The split is by document, so no context of a held-out row is trained on. The fraction
lives in the buffer's fingerprint (`eval_fraction`), so a buffer is only reused with the same
split. Every figure that describes a trained SAE is measured on these rows (`held_out_rows`);
later LM-level evaluation runs on the same documents.
"""

from __future__ import annotations

import numpy as np
import torch

from .store import ActivationBuffer

SPLITS = ("train", "eval")
"""What a reader may return: the training rows, or the held-out ones."""

_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: 2^64 / golden ratio
_BITS = 24


def held_out(doc_index: np.ndarray, eval_fraction: float) -> np.ndarray:
    """doc_index [n] (int64) -> bool [n]: the rows whose document is held out."""
    h = (doc_index.astype(np.uint64) * _MULTIPLIER) >> np.uint64(64 - _BITS)
    return h < np.uint64(round(eval_fraction * (1 << _BITS)))


def eval_fraction(buffer: ActivationBuffer) -> float:
    """The buffer's held-out share of documents; ValueError for a buffer made without a split."""
    fraction = buffer.fingerprint.get("eval_fraction")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(
            f"buffer at {buffer.path!r} has no held-out split (its fingerprint has no eval_fraction), so no "
            "figure of an SAE could be measured on rows it did not train on: re-produce it with this version "
            "(sae-ray cache CONFIG with a new buffer.path or workdir; buffer.eval_fraction sets the split)")
    return float(fraction)


def split_mask(buffer: ActivationBuffer, shard_id: int, split: str) -> np.ndarray:
    """bool [rows of the shard]: the rows of `split` ("train" or "eval") in a committed shard."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not supported; accepted: {', '.join(SPLITS)}")
    mask = held_out(buffer.read_column("doc_index", shard_id), eval_fraction(buffer))
    return mask if split == "eval" else ~mask


def held_out_rows(buffer: ActivationBuffer, hook: str | tuple[str, ...], n: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """float32 [<= n, d_in]: the first `n` held-out rows of the live committed shards in shard id
    order (the same rows for every SAE trained on this buffer once those shards are committed).
    `hook` a tuple of hook names (a transcoder's input and output): a tuple of one such tensor per
    hook, the same rows in the same order, each array read once per shard.

    Fewer when the buffer holds fewer; ValueError when it holds none, or has no split.
    """
    eval_fraction(buffer)
    names = (hook,) if isinstance(hook, str) else tuple(hook)
    parts: list[list[torch.Tensor]] = [[] for _ in names]
    have = 0
    for shard_id in buffer.commit_state().committed:
        if have >= n:
            break
        mask = split_mask(buffer, shard_id, "eval")
        if mask.any():
            keep = torch.from_numpy(mask)
            for name, out in zip(names, parts):
                out.append(buffer.read_tensor(name, shard_id)[keep][: n - have].float())
            have += len(parts[0][-1])
    if not parts[0]:
        raise ValueError(f"buffer at {buffer.path!r}: no held-out rows committed yet (eval_fraction "
                         f"{eval_fraction(buffer)}); produce more rows or raise buffer.eval_fraction")
    rows = tuple(torch.cat(p) for p in parts)
    return rows[0] if isinstance(hook, str) else rows
