"""The Zarr activation buffer and its reader, on real stores in tmp_path."""

import hashlib
import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from sae_ray.buffer import ActivationBuffer, BufferReader, FingerprintMismatch

HOOK = "blocks.3.hook_resid_post"
HOOK2 = "blocks.5.hook_mlp_out"
D_IN = 8
SHARD = 16
CHUNK = 4
FP = {"model": "tiny-gpt", "revision": "main", "context_size": 32, "dataset": "toy"}


def make(path, dtype="float32", codec="zstd", capacity_rows=0, fingerprint=FP, hooks=None):
    return ActivationBuffer.create_or_open(
        str(path), fingerprint, hooks or {HOOK: D_IN}, shard_rows=SHARD, chunk_rows=CHUNK,
        dtype=dtype, capacity_rows=capacity_rows, codec=codec,
    )


def shard_data(buf, shard_id, n, dtype=np.float32):
    """Rows whose column 0, token and doc_index all hold the global row id."""
    ids = shard_id * SHARD + np.arange(n)
    acts = {}
    for h, d in buf.hooks.items():
        a = np.random.default_rng(shard_id).standard_normal((n, d)).astype(dtype)
        a[:, 0] = ids
        acts[h] = a
    return acts, ids.astype(np.int32), ids.astype(np.int64), (ids % 7).astype(np.int32)


def write_commit(buf, shard_id, n):
    if buf.dtype == "bfloat16":
        acts, *cols = shard_data(buf, shard_id, n)
        data = ({h: torch.from_numpy(a).bfloat16() for h, a in acts.items()}, *cols)
    else:
        data = shard_data(buf, shard_id, n, np.dtype(buf.dtype))
    buf.write_shard(shard_id, *data)
    buf.commit_shard(shard_id, n)
    return data


def listing(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# ---------------------------------------------------------------- store


def test_write_commit_reopen_sees_only_committed(tmp_path):
    path = tmp_path / "buf"
    buf = make(path, hooks={HOOK: D_IN, HOOK2: 4})
    buf.ensure_capacity(4)
    written = {s: write_commit(buf, s, n) for s, n in [(0, SHARD), (1, SHARD), (2, 5)]}
    buf.write_shard(3, *shard_data(buf, 3, SHARD))  # written, never committed

    fresh = ActivationBuffer.open(str(path))
    assert fresh.committed() == {0: SHARD, 1: SHARD, 2: 5}
    assert fresh.n_rows() == 2 * SHARD + 5
    assert fresh.hooks == {HOOK: D_IN, HOOK2: 4} and fresh.fingerprint == FP
    assert (fresh.shard_rows, fresh.chunk_rows, fresh.dtype) == (SHARD, CHUNK, "float32")
    assert not fresh.is_complete()
    for s, (acts, tokens, doc, pos) in written.items():
        for h in (HOOK, HOOK2):
            np.testing.assert_array_equal(fresh.read_rows(h, s), acts[h])
        np.testing.assert_array_equal(fresh.read_tokens(s), tokens)
        np.testing.assert_array_equal(fresh.read_column("doc_index", s), doc)
        np.testing.assert_array_equal(fresh.read_column("position", s), pos)
    np.testing.assert_array_equal(fresh.read_rows(HOOK, 2, 1, 3), written[2][0][HOOK][1:3])
    with pytest.raises(KeyError, match="shard 3 is not committed"):
        fresh.read_rows(HOOK, 3)
    with pytest.raises(IndexError, match="has 5 rows"):
        fresh.read_rows(HOOK, 2, 0, 6)
    buf.mark_complete()
    assert fresh.is_complete()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_round_trip_exact(tmp_path, dtype):
    buf = make(tmp_path / "b", dtype=dtype, capacity_rows=SHARD)
    acts, *_ = write_commit(buf, 0, SHARD)
    out = ActivationBuffer.open(str(tmp_path / "b")).read_rows(HOOK, 0)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, acts[HOOK])
    t = buf.read_tensor(HOOK, 0)
    assert t.dtype == getattr(torch, dtype) and torch.equal(t, torch.from_numpy(acts[HOOK]))


def test_bfloat16_bit_exact(tmp_path):
    path = tmp_path / "bf"
    buf = make(path, dtype="bfloat16", capacity_rows=2 * SHARD)
    x = torch.randn(SHARD, D_IN, dtype=torch.bfloat16) * 1e3
    x[0, :3] = torch.tensor([float("inf"), -0.0, 1e-40])  # odd bit patterns survive too
    ids = np.arange(SHARD)
    buf.write_shard(0, {HOOK: x}, ids, ids, ids)  # torch bf16 tensor in
    bits = x[:5].view(torch.int16).numpy().view(np.uint16)
    buf.write_shard(1, {HOOK: bits}, ids[:5], ids[:5], ids[:5])  # or numpy uint16 bits in
    buf.commit_shard(0, SHARD)
    buf.commit_shard(1, 5)

    fresh = ActivationBuffer.open(str(path))
    y = fresh.read_tensor(HOOK, 0)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))
    assert torch.equal(fresh.read_tensor(HOOK, 1).view(torch.int16), x[:5].view(torch.int16))
    as_np = fresh.read_rows(HOOK, 1)  # numpy has no bfloat16: exact float32 values
    assert as_np.dtype == np.float32
    assert torch.equal(torch.from_numpy(as_np), x[:5].float())
    meta = json.loads((path / "acts" / HOOK / "zarr.json").read_text())
    assert meta["data_type"] == "uint16" and meta["attributes"]["logical_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="float32.*bfloat16"):
        buf.write_shard(2, {HOOK: np.zeros((2, D_IN), np.float32)}, ids[:2], ids[:2], ids[:2])


def test_reopen_same_fingerprint_keeps_data_different_raises_untouched(tmp_path):
    path = tmp_path / "buf"
    buf = make(path, capacity_rows=SHARD)
    acts, *_ = write_commit(buf, 0, 10)

    again = make(path, fingerprint={**FP, "context_size": 32})
    assert again.committed() == {0: 10}
    np.testing.assert_array_equal(again.read_rows(HOOK, 0), acts[HOOK])

    before = listing(path)
    with pytest.raises(FingerprintMismatch, match="context_size: stored 32, given 64") as e:
        make(path, fingerprint={**FP, "context_size": 64})
    assert str(path) in str(e.value) and e.value.differences == {"context_size": (32, 64)}
    with pytest.raises(FingerprintMismatch, match="tokenizer"):
        make(path, fingerprint={**FP, "tokenizer": "x"})
    with pytest.raises(FingerprintMismatch, match="dtype: stored 'float32', given 'float16'"):
        make(path, dtype="float16")
    with pytest.raises(FingerprintMismatch, match="hooks"):
        make(path, hooks={HOOK: D_IN + 1})
    assert listing(path) == before


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ActivationBuffer.open(str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="junk.*not an activation buffer"):
        make(tmp_path / "junk")
    assert os.listdir(tmp_path / "junk") == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    make(tmp_path / "empty")  # an empty directory is fine


def test_write_shard_validation(tmp_path):
    buf = make(tmp_path / "b", capacity_rows=SHARD)
    acts, tok, doc, pos = shard_data(buf, 0, 4)
    with pytest.raises(ValueError, match="exactly the hooks"):
        buf.write_shard(0, {"blocks.0.hook_x": acts[HOOK]}, tok, doc, pos)
    with pytest.raises(ValueError, match=r"shape \(4, 3\), expected \(4, 8\)"):
        buf.write_shard(0, {HOOK: acts[HOOK][:, :3]}, tok, doc, pos)
    with pytest.raises(ValueError, match="dtype float16; this buffer stores float32"):
        buf.write_shard(0, {HOOK: acts[HOOK].astype(np.float16)}, tok, doc, pos)
    with pytest.raises(ValueError, match="tokens must be a 1-D integer"):
        buf.write_shard(0, acts, tok.astype(np.float32), doc, pos)
    with pytest.raises(ValueError, match="position has 3 rows"):
        buf.write_shard(0, acts, tok, doc, pos[:3])
    with pytest.raises(ValueError, match=r"ensure_capacity\(2\)"):
        buf.write_shard(1, acts, tok, doc, pos)
    buf.write_shard(0, acts, tok, doc, pos)
    buf.commit_shard(0, 4)
    with pytest.raises(ValueError, match="already committed"):
        buf.write_shard(0, acts, tok, doc, pos)
    with pytest.raises(ValueError, match="hook name"):
        make(tmp_path / "c", hooks={"a/b": 3})
    with pytest.raises(ValueError, match="multiple of chunk_rows"):
        ActivationBuffer.create_or_open(str(tmp_path / "d"), FP, {HOOK: 4}, shard_rows=10, chunk_rows=4)


def test_ensure_capacity_seen_by_writer_opened_before(tmp_path):
    path = tmp_path / "buf"
    coord = make(path, capacity_rows=1)  # rounded up to one shard
    assert coord.capacity_rows() == SHARD
    producer = ActivationBuffer.open(str(path))
    producer.write_shard(0, *shard_data(producer, 0, SHARD))  # caches the arrays at 1 shard
    coord.ensure_capacity(3)
    coord.ensure_capacity(2)  # never shrinks
    assert coord.capacity_rows() == 3 * SHARD
    meta = json.loads((path / "tokens" / "zarr.json").read_text())
    assert meta["shape"] == [3 * SHARD]
    acts, *_ = data = shard_data(producer, 2, 7)
    producer.write_shard(2, *data)
    coord.commit_shard(2, 7)
    np.testing.assert_array_equal(coord.read_rows(HOOK, 2), acts[HOOK])


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_sharding_and_codec(tmp_path, codec):
    path = tmp_path / "buf"
    buf = ActivationBuffer.create_or_open(str(path), FP, {HOOK: D_IN}, shard_rows=SHARD, chunk_rows=CHUNK,
                                          capacity_rows=2 * SHARD, codec=codec, codec_level=3)
    assert (buf.codec, buf.codec_level) == (codec, 3)
    acts, tok, *_ = write_commit(buf, 1, 10)
    meta = json.loads((path / "acts" / HOOK / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [SHARD, D_IN]
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [CHUNK, D_IN]
    inner = {c["name"]: c.get("configuration") for c in sharding["configuration"]["codecs"]}
    if codec == "none":
        assert list(inner) == ["bytes", "crc32c"]
    else:  # compressed, then checksummed
        assert list(inner) == ["bytes", "blosc", "crc32c"]
        assert inner["blosc"] == {**inner["blosc"], "cname": codec, "clevel": 3, "shuffle": "shuffle", "blocksize": 1 << 20}
    assert [c["name"] for c in sharding["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert (attrs["codec"], attrs["codec_level"]) == (codec, 3)
    again = make(path, codec="zstd")  # reopening keeps the stored codec
    assert (again.codec, again.codec_level) == (codec, 3)
    # one file per shard: only shard 1 was written
    assert sorted(os.listdir(path / "acts" / HOOK / "c")) == ["1"]
    fresh = ActivationBuffer.open(str(path))
    np.testing.assert_array_equal(fresh.read_rows(HOOK, 1), acts[HOOK])
    np.testing.assert_array_equal(fresh.read_tokens(1), tok)


# ---------------------------------------------------------------- reader


def complete_buffer(path, sizes, dtype="float32"):
    buf = make(path, dtype=dtype, capacity_rows=len(sizes) * SHARD)
    for s, n in enumerate(sizes):
        write_commit(buf, s, n)
    buf.mark_complete()
    return buf


def row_ids(batch):
    return batch[:, 0].long().tolist()


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reader_one_epoch_every_row_once(tmp_path, dtype):
    sizes = [SHARD, SHARD, SHARD, 8]  # 56 rows = 7 batches of 8
    buf = complete_buffer(tmp_path / "buf", sizes, dtype=dtype)
    expected = sorted(s * SHARD + i for s, n in enumerate(sizes) for i in range(n))

    reader = BufferReader(ActivationBuffer.open(str(tmp_path / "buf")), HOOK, batch_size=8, seed=0, shards_in_mix=2)
    it = iter(reader)
    epoch0 = take(it, 7)
    assert all(b.shape == (8, D_IN) and b.dtype == torch.float32 for b in epoch0)
    assert sorted(sum(map(row_ids, epoch0), [])) == expected
    assert reader.rows_read == 56 and reader.epoch == 0
    epoch1 = take(it, 7)
    assert sorted(sum(map(row_ids, epoch1), [])) == expected
    assert reader.epoch == 1
    assert sum(map(row_ids, epoch0), []) != sum(map(row_ids, epoch1), [])

    other = take(iter(BufferReader(buf, HOOK, batch_size=8, seed=1, shards_in_mix=2)), 7)
    assert sum(map(row_ids, other), []) != sum(map(row_ids, epoch0), [])
    same = take(iter(BufferReader(buf, HOOK, batch_size=8, seed=0, shards_in_mix=2)), 7)
    assert all(torch.equal(a, b) for a, b in zip(same, epoch0))


def test_reader_uncommitted_shard_invisible_and_tiny_buffer_wraps(tmp_path):
    buf = make(tmp_path / "buf", capacity_rows=2 * SHARD)
    write_commit(buf, 0, 5)
    buf.write_shard(1, *shard_data(buf, 1, SHARD))  # never committed
    buf.mark_complete()
    reader = BufferReader(buf, HOOK, batch_size=8, shards_in_mix=4)
    batches = take(iter(reader), 3)  # 24 rows from a 5-row buffer
    ids = sum(map(row_ids, batches), [])
    assert set(ids) == set(range(5))
    assert reader.epoch >= 4


def test_reader_streams_then_times_out(tmp_path):
    path = str(tmp_path / "buf")
    coord = make(path, capacity_rows=2 * SHARD)
    write_commit(coord, 0, SHARD)
    reader = BufferReader(ActivationBuffer.open(path), HOOK, batch_size=8, poll_seconds=0.02, timeout_seconds=5.0)
    it = iter(reader)
    first = take(it, 2)
    assert sorted(sum(map(row_ids, first), [])) == list(range(SHARD))

    def produce_later():
        time.sleep(0.2)
        producer = ActivationBuffer.open(path)
        producer.write_shard(1, *shard_data(producer, 1, SHARD))
        coord.commit_shard(1, SHARD)

    t = threading.Thread(target=produce_later)
    t.start()
    later = take(it, 2)  # blocks until shard 1 is committed
    t.join()
    assert sorted(sum(map(row_ids, later), [])) == list(range(SHARD, 2 * SHARD))
    assert reader.epoch == 0 and reader.rows_read == 32

    reader.timeout_seconds = 0.2
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no new shard committed to buffer at .*buf"):
        next(it)
    assert time.monotonic() - t0 < 3


def test_reader_rejects_bad_arguments(tmp_path):
    buf = make(tmp_path / "buf")
    with pytest.raises(KeyError, match="no hook 'blocks.9'"):
        BufferReader(buf, "blocks.9", batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        BufferReader(buf, HOOK, batch_size=0)
