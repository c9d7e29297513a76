"""The held-out split: training readers never return a held-out document's rows, and the
figures of a trained SAE are measured on exactly those rows. Real Zarr buffers on tmp_path."""

import numpy as np
import pytest
import torch

from sae_ray.buffer import ActivationBuffer, BufferReader
from sae_ray.buffer.split import held_out, held_out_rows

HOOK = "blocks.1.hook_resid_post"
D_IN = 4
SHARD = 64
FRACTION = 0.2


def doc_buffer(path, n_shards=6, fingerprint=None) -> ActivationBuffer:
    """Shards of SHARD rows; row r of the whole buffer belongs to document r // 8, and its
    activation's first value is that document index (so a batch says where its rows came from)."""
    buf = ActivationBuffer.create_or_open(str(path), fingerprint or {"eval_fraction": FRACTION}, {HOOK: D_IN},
                                          SHARD, 16, capacity_rows=n_shards * SHARD)
    for s in range(n_shards):
        docs = (np.arange(s * SHARD, (s + 1) * SHARD) // 8).astype(np.int64)
        acts = np.zeros((SHARD, D_IN), np.float32)
        acts[:, 0] = docs
        objects = buf.write_shard(s, {HOOK: acts}, np.arange(SHARD), docs, np.arange(SHARD) % 8)
        buf.commit_shard(s, SHARD, objects)
    buf.mark_complete()
    return buf


def test_held_out_is_a_fixed_share_of_documents():
    docs = np.arange(200_000, dtype=np.int64)
    mask = held_out(docs, 0.05)
    assert 0.045 < mask.mean() < 0.055
    np.testing.assert_array_equal(mask, held_out(docs.copy(), 0.05))  # the same documents every time
    assert not held_out(docs, 0.05)[::20].all() and mask[::20].mean() < 0.2  # not every 20th: no periodic pattern
    assert (held_out(docs, 0.1) | ~mask).all()  # a larger share keeps the smaller one's documents


def test_training_reader_never_returns_held_out_rows_and_eval_gets_exactly_them(tmp_path):
    buf = doc_buffer(tmp_path / "b")
    all_docs = np.arange(6 * SHARD) // 8
    eval_docs = set(all_docs[held_out(all_docs, FRACTION)].tolist())
    assert eval_docs and len(eval_docs) < len(set(all_docs.tolist()))

    reader = BufferReader(buf, HOOK, 8, prefetch=0, split="train")
    seen = [int(v) for _, batch in zip(range(200), reader) for v in batch[:, 0].tolist()]
    assert seen and not eval_docs & set(seen)  # 200 batches: several epochs, never a held-out row
    assert set(seen) == set(all_docs.tolist()) - eval_docs

    x = held_out_rows(buf, HOOK, 10_000)  # more than there are: all of them, in shard order
    assert sorted(x[:, 0].long().tolist()) == sorted(d for d in all_docs.tolist() if d in eval_docs)
    first = held_out_rows(buf, HOOK, 5)
    assert torch.equal(first, x[:5]) and len(first) == 5  # the first rows, the same for every caller

    everything = BufferReader(buf, HOOK, 8, prefetch=0)  # no split: every row, as before
    assert {int(v) for _, b in zip(range(48), everything) for v in b[:, 0].tolist()} == set(all_docs.tolist())


def test_a_buffer_without_a_split_is_refused_for_training_and_evaluation(tmp_path):
    buf = doc_buffer(tmp_path / "old", fingerprint={"model": "m"})
    for attempt in (lambda: BufferReader(buf, HOOK, 8, split="train"), lambda: held_out_rows(buf, HOOK, 8)):
        with pytest.raises(ValueError, match="no held-out split.*re-produce"):
            attempt()
    with pytest.raises(ValueError, match="split 'test'"):
        BufferReader(doc_buffer(tmp_path / "new"), HOOK, 8, split="test")


def test_a_reader_state_resumes_only_with_the_same_split(tmp_path):
    buf = doc_buffer(tmp_path / "b")
    reader = BufferReader(buf, HOOK, 8, prefetch=0, split="train")
    it = iter(reader)
    [next(it) for _ in range(5)]
    state = reader.state_dict()
    rest = [next(it) for _ in range(5)]
    resumed = BufferReader(buf, HOOK, 8, prefetch=0, split="train", state=state)
    assert all(torch.equal(a, b) for a, b in zip(rest, iter(resumed)))
    with pytest.raises(ValueError, match="split"):
        BufferReader(buf, HOOK, 8, prefetch=0, split="eval", state=state)
