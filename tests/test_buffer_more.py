"""The buffer's integrity, stores, write failures, reader prefetch/resume, bounded window,
info, import and commands: on real Zarr stores in tmp_path and memory://, no mocks."""

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import threading
import time
import uuid

import fsspec
import numpy as np
import pytest
import torch

from sae_ray.buffer import (
    ActivationBuffer,
    BufferReader,
    CorruptShardError,
    ShardWriteError,
    buffer_info,
    format_info,
    import_activations,
)
from sae_ray.buffer.commands import add_buffer_commands
from damage import KINDS, damage, flip_byte

HOOK = "blocks.3.hook_resid_post"
D_IN = 8
SHARD = 16
CHUNK = 4
FP = {"model": "tiny-gpt", "dataset": "toy"}


def make(path, codec="zstd", capacity_rows=0, shard_rows=SHARD, chunk_rows=CHUNK, d_in=D_IN, dtype="float32"):
    return ActivationBuffer.create_or_open(str(path), FP, {HOOK: d_in}, shard_rows=shard_rows, chunk_rows=chunk_rows,
                                           dtype=dtype, capacity_rows=capacity_rows, codec=codec)


def write_commit(buf, shard_id, n, acts=None):
    """Rows whose column 0 holds the global row id (shard_id * shard_rows + i)."""
    ids = shard_id * buf.shard_rows + np.arange(n)
    if acts is None:
        acts = np.random.default_rng(shard_id).standard_normal((n, buf.hooks[HOOK])).astype(np.float32)
        acts[:, 0] = ids
    buf.ensure_capacity(shard_id + 1)
    buf.write_shard(shard_id, {HOOK: acts}, ids, ids, ids % 5)
    buf.commit_shard(shard_id, n)
    return acts


def complete_buffer(path, sizes, **kw):
    buf = make(path, capacity_rows=len(sizes) * SHARD, **kw)
    data = {s: write_commit(buf, s, n) for s, n in enumerate(sizes)}
    buf.mark_complete()
    return buf, data


def row_ids(batches):
    return [int(i) for b in batches for i in b[:, 0].tolist()]


def take(it, n):
    return [next(it) for _ in range(n)]


def shard_file(path, shard_id):
    return os.path.join(str(path), "acts", HOOK, "c", str(shard_id), "0")


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "BufferReader-prefetch" and t.is_alive()]


# ---------------------------------------------------------------- checksums


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_shard_raises_naming_shard_and_file(tmp_path, kind):
    path = tmp_path / "buf"
    buf, data = complete_buffer(path, [SHARD, SHARD, SHARD])
    f = shard_file(path, 1)
    damage(f, kind)
    fresh = ActivationBuffer.open(str(path))
    for start, stop in [(0, None), (2, 5)]:  # whole shard, and a partial read through the index
        with pytest.raises(CorruptShardError, match=r"shard 1 .*is corrupt") as e:
            fresh.read_rows(HOOK, 1, start, stop)
        assert e.value.shard_id == 1 and e.value.key == f and f in str(e.value)
        assert isinstance(e.value, ValueError)
    np.testing.assert_array_equal(fresh.read_rows(HOOK, 0), data[0])  # the others are fine
    np.testing.assert_array_equal(fresh.read_rows(HOOK, 2), data[2])


def test_column_corruption_detected(tmp_path):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, SHARD])
    flip_byte(os.path.join(path, "tokens", "c", "1"), 3)
    with pytest.raises(CorruptShardError, match=r"shard 1 of array 'tokens'"):
        ActivationBuffer.open(str(path)).read_tokens(1)


def test_all_zero_shard_still_has_objects(tmp_path):
    """Empty chunks are written too, so a missing object always means damage."""
    path = tmp_path / "buf"
    buf = make(path, capacity_rows=SHARD)
    buf.write_shard(0, {HOOK: np.zeros((SHARD, D_IN), np.float32)}, np.zeros(SHARD, int), np.zeros(SHARD, int), np.zeros(SHARD, int))
    buf.commit_shard(0, SHARD)
    for name in ("acts/" + HOOK + "/c/0/0", "tokens/c/0", "doc_index/c/0", "position/c/0"):
        assert os.path.getsize(os.path.join(path, *name.split("/"))) > 0
    assert not buf.read_rows(HOOK, 0).any()


def test_reader_corrupt_fail_and_skip(tmp_path):
    path = tmp_path / "buf"
    sizes = [SHARD, SHARD, 10, SHARD]
    complete_buffer(path, sizes)
    flip_byte(shard_file(path, 2), 12)
    buf = ActivationBuffer.open(str(path))

    for prefetch in (0, 2):  # the thread hands the error to the consumer
        it = iter(BufferReader(buf, HOOK, batch_size=4, shards_in_mix=1, on_corrupt="fail", prefetch=prefetch))
        with pytest.raises(CorruptShardError, match="shard 2") as e:
            take(it, 20)
        assert e.value.key == shard_file(path, 2)

    reader = BufferReader(buf, HOOK, batch_size=4, shards_in_mix=1, on_corrupt="skip", prefetch=0)
    with pytest.warns(RuntimeWarning, match=r"skipped shard 2 \(10 rows; 10 rows skipped so far\)"):
        batches = take(iter(reader), 12)  # one epoch: 48 good rows
    assert sorted(row_ids(batches)) == [s * SHARD + i for s in (0, 1, 3) for i in range(SHARD)]
    assert reader.rows_skipped == 10 and reader.rows_read == 48
    with pytest.raises(ValueError, match="on_corrupt 'ignore'.*fail, skip"):
        BufferReader(buf, HOOK, batch_size=4, on_corrupt="ignore")


# ---------------------------------------------------------------- fsspec stores


@pytest.fixture
def memory_url():
    url = f"memory://sae-ray-test-{uuid.uuid4().hex}/buf"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_store_round_trip(memory_url):
    buf = make(memory_url, capacity_rows=2 * SHARD)
    with pytest.raises(FileNotFoundError):
        ActivationBuffer.open(memory_url + "-absent")
    data = {s: write_commit(buf, s, n) for s, n in [(0, SHARD), (1, 7), (2, SHARD)]}
    buf.set_production({"producers": 2})
    buf.mark_complete()

    fresh = ActivationBuffer.open(memory_url)
    assert fresh.committed() == {0: SHARD, 1: 7, 2: SHARD} and fresh.is_complete()
    assert fresh.production() == {"producers": 2} and fresh.fingerprint == FP
    for s, acts in data.items():
        np.testing.assert_array_equal(fresh.read_rows(HOOK, s), acts)
    np.testing.assert_array_equal(fresh.read_tokens(1), np.arange(SHARD, SHARD + 7))
    assert make(memory_url).committed() == fresh.committed()  # reopen with create_or_open

    batches = take(iter(BufferReader(fresh, HOOK, batch_size=13, prefetch=1)), 3)
    assert sorted(row_ids(batches)) == sorted(i for s, n in fresh.committed().items() for i in range(s * SHARD, s * SHARD + n))

    before = fresh.live_nbytes()
    assert before > 0 and fresh.shard_nbytes(1) > 0
    fresh.drop_shard(1)
    assert fresh.committed() == {0: SHARD, 2: SHARD} and fresh.dropped() == {1: 7}
    assert fresh.shard_nbytes(1) == 0 and fresh.live_nbytes() < before

    fresh.set_window(1 << 20)
    assert fresh.window_bytes() == 1 << 20 and fresh.is_windowed()
    fresh.write_reader_progress("trial-0", [0, 2], epoch=0)
    assert fresh.reader_progress() == {"trial-0": {0, 2}}
    info = buffer_info(memory_url)
    assert (info["rows"], info["shards_committed"], info["shards_dropped"], info["complete"]) == (2 * SHARD, 2, 1, True)

    # a corrupt object in an fsspec store is caught as well
    fs, root = fsspec.core.url_to_fs(memory_url)
    key = f"{root}/acts/{HOOK}/c/2/0"
    raw = bytearray(fs.cat_file(key))
    raw[15] ^= 0xFF
    fs.pipe_file(key, bytes(raw))
    with pytest.raises(CorruptShardError, match=rf"shard 2 .*{key}"):
        fresh.read_rows(HOOK, 2)


# ---------------------------------------------------------------- write refusal


@contextlib.contextmanager
def read_only_tree(path):
    """Make every file and directory under ``path`` unwritable, for real: chmod for a
    normal user; for root (which ignores modes) the immutable attribute, if the
    filesystem has one."""
    if os.geteuid() != 0:
        modes = {}
        for root, dirs, files in os.walk(path):
            for p in [root] + [os.path.join(root, f) for f in files]:
                modes[p] = os.stat(p).st_mode
                os.chmod(p, 0o555 if os.path.isdir(p) else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                os.chmod(p, mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        pytest.skip("running as root and the filesystem has no immutable attribute: cannot refuse writes for real")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def listing(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def test_read_only_store_refuses_write_committed_intact(tmp_path):
    path = tmp_path / "buf"
    buf = make(path, capacity_rows=4 * SHARD)
    data = {s: write_commit(buf, s, SHARD) for s in (0, 1)}
    before = listing(path)
    acts = np.ones((SHARD, D_IN), np.float32)
    ids = np.arange(SHARD)
    with read_only_tree(path):
        with pytest.raises(ShardWriteError, match=r"shard 2: the store refused to write array 'acts/.*c/2/0 \(PermissionError") as e:
            buf.write_shard(2, {HOOK: acts}, ids, ids, ids)
        assert isinstance(e.value.__cause__, OSError) and e.value.shard_id == 2
        assert isinstance(e.value, OSError)
        fresh = ActivationBuffer.open(str(path))
        for s, a in data.items():
            np.testing.assert_array_equal(fresh.read_rows(HOOK, s), a)
    assert listing(path) == before
    buf.write_shard(2, {HOOK: acts}, ids, ids, ids)  # writable again: the same shard goes through
    buf.commit_shard(2, SHARD)
    np.testing.assert_array_equal(buf.read_rows(HOOK, 2), acts)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 1 MiB tmpfs; skipped where mounting is not allowed (non-root, containers)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_refuses_write_committed_intact(tiny_filesystem):
    path = tiny_filesystem / "buf"
    rows, d = 1024, 64  # ~290 KiB per shard uncompressed: three fit in 1 MiB, a fourth does not
    buf = make(path, codec="none", shard_rows=rows, chunk_rows=256, d_in=d)
    data = {}
    for s in range(3):
        data[s] = np.random.default_rng(s).standard_normal((rows, d)).astype(np.float32)
        write_commit(buf, s, rows, acts=data[s])
    buf.ensure_capacity(4)
    before = listing(path)
    ids = np.arange(rows)
    big = np.random.default_rng(9).standard_normal((rows, d)).astype(np.float32)
    with pytest.raises(ShardWriteError, match=r"shard 3: the store refused .*No space left on device") as e:
        buf.write_shard(3, {HOOK: big}, ids, ids, ids)
    assert e.value.__cause__ is not None
    after = listing(path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing committed changed
    assert not [k for k in after if k not in before and "zarr.json" not in k]  # no partial objects left
    fresh = ActivationBuffer.open(str(path))
    assert fresh.committed() == {0: rows, 1: rows, 2: rows}
    for s, a in data.items():
        np.testing.assert_array_equal(fresh.read_rows(HOOK, s), a)
    buf.drop_shard(0)  # a bounded window frees room: the same shard now goes through
    buf.write_shard(3, {HOOK: big}, ids, ids, ids)
    buf.commit_shard(3, rows)
    np.testing.assert_array_equal(ActivationBuffer.open(str(path)).read_rows(HOOK, 3), big)


# ---------------------------------------------------------------- reader: prefetch and resume

SIZES = [SHARD, SHARD, SHARD, 9, SHARD]  # 73 rows; batch 6 leaves remainders to carry


def test_prefetch_same_stream_and_thread_stops(tmp_path):
    buf, _ = complete_buffer(tmp_path / "buf", SIZES)
    ref = take(iter(BufferReader(buf, HOOK, batch_size=6, shards_in_mix=2, prefetch=0)), 30)
    assert not prefetch_threads()
    for depth in (1, 2):
        got = take(iter(BufferReader(buf, HOOK, batch_size=6, shards_in_mix=2, prefetch=depth)), 30)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    gc.collect()

    reader = BufferReader(buf, HOOK, batch_size=6, shards_in_mix=2, prefetch=2)
    it = iter(reader)
    next(it)
    assert len(prefetch_threads()) == 1
    del it  # garbage collected: the thread stops
    gc.collect()
    deadline = time.monotonic() + 5
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()

    it = iter(reader)
    next(it)
    it2 = iter(reader)  # a new iterator stops the previous one
    next(it2)
    assert len(prefetch_threads()) == 1
    reader.close()
    assert not prefetch_threads()
    with pytest.raises(StopIteration):
        next(it2)


@pytest.mark.parametrize("n", [0, 1, 3, 6, 12, 13, 25])
def test_resume_exact(tmp_path, n):
    buf, _ = complete_buffer(tmp_path / "buf", SIZES)
    total = 36  # three epochs of ~12 batches
    never_stopped = BufferReader(buf, HOOK, batch_size=6, seed=3, shards_in_mix=2, prefetch=0)
    ref = take(iter(never_stopped), total)

    first = BufferReader(buf, HOOK, batch_size=6, seed=3, shards_in_mix=2, prefetch=2)
    it = iter(first)
    got = take(it, n)
    time.sleep(0.05)  # let the thread read ahead: the state must not follow it
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["rows_read"] == 6 * n

    resumed = BufferReader(ActivationBuffer.open(str(tmp_path / "buf")), HOOK, batch_size=6, seed=3, shards_in_mix=2,
                           prefetch=n % 2 * 2, state=state)
    got += take(iter(resumed), total - n)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert resumed.rows_read == 6 * total and resumed.epoch == never_stopped.epoch == 2

    other = BufferReader(buf, HOOK, batch_size=6, seed=3, shards_in_mix=2)
    other.load_state_dict(state)
    assert torch.equal(next(iter(other)), ref[n])
    with pytest.raises(ValueError, match="batch_size=6 but this reader has batch_size=7"):
        BufferReader(buf, HOOK, batch_size=7, seed=3, shards_in_mix=2, state=state)


# ---------------------------------------------------------------- bounded window


def test_drop_shard_never_read_and_bytes_shrink(tmp_path):
    path = tmp_path / "buf"
    buf, data = complete_buffer(path, [SHARD, SHARD, SHARD, SHARD])
    live = buf.live_nbytes()
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if "/c/" in os.path.join(r, f) or os.path.basename(r) == "c")
    assert live == on_disk
    n1 = buf.shard_nbytes(1)
    buf.drop_shard(1)
    assert buf.committed() == {0: SHARD, 2: SHARD, 3: SHARD} and buf.dropped() == {1: SHARD}
    assert buf.live_nbytes() == live - n1 and buf.shard_nbytes(1) == 0
    assert not os.path.exists(shard_file(path, 1)) and not os.path.exists(os.path.join(path, "tokens", "c", "1"))
    assert buf.n_rows() == 3 * SHARD and buf.is_windowed()
    buf.drop_shard(1)  # again: finishes an interrupted drop, changes nothing else
    with pytest.raises(KeyError, match="shard 7: only committed shards can be dropped"):
        buf.drop_shard(7)
    with pytest.raises(KeyError, match="shard 1 was dropped"):
        buf.read_rows(HOOK, 1)
    with pytest.raises(ValueError, match="dropped; shard ids are never reused"):
        buf.write_shard(1, {HOOK: data[0]}, np.arange(SHARD), np.arange(SHARD), np.arange(SHARD))
    with pytest.raises(ValueError, match="dropped; shard ids are never reused"):
        buf.commit_shard(1, SHARD)

    # a windowed buffer is read once: every live row exactly once, then the iterator ends
    reader = BufferReader(ActivationBuffer.open(str(path)), HOOK, batch_size=8, shards_in_mix=2, reader_id="trial-a")
    batches = list(reader)
    assert sorted(row_ids(batches)) == [s * SHARD + i for s in (0, 2, 3) for i in range(SHARD)]
    assert buf.reader_progress() == {"trial-a": {0, 2, 3}}

    # a reader that had the shard in its pool when it was dropped skips it, never returns it
    buf2, _ = complete_buffer(tmp_path / "b2", [SHARD, SHARD, SHARD])
    r2 = BufferReader(buf2, HOOK, batch_size=8, shards_in_mix=1, prefetch=0)
    it = iter(r2)
    first = take(it, 2)  # one shard
    pending = [s for s in range(3) if s * SHARD not in {i // SHARD * SHARD for i in row_ids(first)}]
    buf2.drop_shard(pending[0])
    with pytest.warns(RuntimeWarning, match=f"skipped shard {pending[0]}"):
        rest = list(it)
    assert {i // SHARD for i in row_ids(first + rest)} == {0, 1, 2} - {pending[0]}
    assert r2.rows_skipped == SHARD


def test_windowed_streaming_with_progress_and_drops(tmp_path):
    path = str(tmp_path / "buf")
    coord = make(path, capacity_rows=6 * SHARD)
    coord.set_window(10 * 1024 * 1024)
    assert coord.window_bytes() == 10 * 1024 * 1024 and coord.is_windowed()
    for s in (0, 1):
        write_commit(coord, s, SHARD)
    reader = BufferReader(ActivationBuffer.open(path), HOOK, batch_size=8, shards_in_mix=1, poll_seconds=0.02,
                          timeout_seconds=10, reader_id="trial-0", prefetch=1)
    it = iter(reader)
    seen = row_ids(take(it, 4))  # shards 0 and 1, whole: nothing carried
    assert sorted(seen) == list(range(2 * SHARD))
    progress = json.loads(open(os.path.join(path, "readers", "trial-0.json")).read())
    assert progress["passed"] == [0, 1] and progress["epoch"] == 0
    assert coord.reader_progress() == {"trial-0": {0, 1}}

    for s in set.intersection(*coord.reader_progress().values()):  # what a coordinator does
        coord.drop_shard(s)
    assert coord.live_nbytes() == 0

    def produce():
        for s in (2, 3, 4):
            time.sleep(0.05)
            write_commit(coord, s, SHARD)
        coord.mark_complete()

    t = threading.Thread(target=produce)
    t.start()
    rest = list(it)  # waits for the new shards, then ends: single epoch
    t.join()
    assert sorted(row_ids(rest)) == list(range(2 * SHARD, 5 * SHARD))
    assert reader.epoch == 0 and reader.rows_read == 5 * SHARD
    assert coord.reader_progress()["trial-0"] == {0, 1, 2, 3, 4}  # passed this epoch, dropped or not
    assert reader.state_dict()["finished"] is True
    done = BufferReader(coord, HOOK, batch_size=8, shards_in_mix=1, reader_id="trial-0", state=reader.state_dict())
    assert list(done) == [] and coord.reader_progress()["trial-0"] == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="reader_id 'a/b'"):
        BufferReader(coord, HOOK, batch_size=8, reader_id="a/b")


def test_reader_progress_excludes_carried_shards(tmp_path):
    buf, _ = complete_buffer(tmp_path / "buf", [SHARD, SHARD, SHARD])
    reader = BufferReader(buf, HOOK, batch_size=5, shards_in_mix=1, reader_id="r", prefetch=0)
    it = iter(reader)
    take(it, 3)  # 15 of shard A's 16 rows: one row carried, shard A not yet passed
    assert buf.reader_progress() == {"r": set()}
    state = reader.state_dict()
    carried = {s for s, _ in state["carry"]}
    assert len(state["carry"]) == 1
    take(it, 3)  # 30 rows: A's last row and 14 of B's
    assert buf.reader_progress()["r"] == {s for s in range(3)} - {s for s, _ in reader.state_dict()["carry"]} - set(reader.state_dict()["pool"])
    assert carried <= buf.reader_progress()["r"]


# ---------------------------------------------------------------- info


def test_info_figures(tmp_path):
    z = make(tmp_path / "z", codec="zstd", shard_rows=1024, chunk_rows=256, d_in=64)
    x = np.zeros((1024, 64), np.float32)
    x[:, :4] = np.random.default_rng(0).standard_normal((1024, 4))
    write_commit(z, 0, 1024, acts=x)
    write_commit(z, 1, 1024, acts=x)
    z.drop_shard(1)
    info = buffer_info(tmp_path / "z")
    assert info["rows"] == 1024 and info["shards_committed"] == 1 and info["shards_dropped"] == 1
    assert info["codec"] == "zstd" and info["codec_level"] == 1 and info["dtype"] == "float32"
    assert info["hooks"] == {HOOK: 64} and info["fingerprint"] == FP and info["complete"] is False
    assert info["bytes_uncompressed"] == 1024 * (64 * 4 + 4 + 8 + 4)
    assert info["bytes_on_disk"] == z.live_nbytes()
    assert info["compression_ratio"] > 3 and info["per_array"][f"acts/{HOOK}"]["compression_ratio"] > 3

    n = make(tmp_path / "n", codec="none", shard_rows=1024, chunk_rows=256, d_in=64)
    write_commit(n, 0, 1024)
    n.mark_complete()
    info = buffer_info(str(tmp_path / "n"))
    assert 0.97 < info["compression_ratio"] <= 1.0  # only shard indexes and checksums on top
    text = format_info(info)
    assert "complete" in text and "codec       none" in text and HOOK in text and "1,024" in text


# ---------------------------------------------------------------- import


def read_all(buf, hook=HOOK):
    c = buf.committed()
    return (np.concatenate([buf.read_rows(hook, s) for s in c]),
            *(np.concatenate([buf.read_column(col, s) for s in c]) for col in ("tokens", "doc_index", "position")))


def test_import_npy_rows_and_sequences(tmp_path):
    rows = np.random.default_rng(0).standard_normal((50, D_IN)).astype(np.float32)
    np.save(tmp_path / f"{HOOK}.npy", rows)
    buf = import_activations(tmp_path / f"{HOOK}.npy", tmp_path / "a", shard_rows=SHARD, chunk_rows=CHUNK)
    assert buf.is_complete() and buf.hooks == {HOOK: D_IN} and buf.dtype == "float32"
    assert buf.committed() == {0: 16, 1: 16, 2: 16, 3: 2}
    acts, tokens, doc, pos = read_all(buf)
    np.testing.assert_array_equal(acts, rows)
    assert (tokens == -1).all() and (doc == -1).all() and (pos == -1).all()
    src = buf.fingerprint["source"]
    assert src["kind"] == "npy" and src["path"] == str(tmp_path / f"{HOOK}.npy") and src["rows"] == 50
    assert "source order" in buf.production()["row_order"]
    again = import_activations(tmp_path / f"{HOOK}.npy", tmp_path / "a", shard_rows=SHARD, chunk_rows=CHUNK)
    assert again.committed() == buf.committed()  # reused

    seqs = np.random.default_rng(1).standard_normal((5, 10, D_IN)).astype(np.float16)
    np.save(tmp_path / "seqs.npy", seqs)
    buf = import_activations(tmp_path / "seqs.npy", tmp_path / "b", hook="h", shard_rows=SHARD, chunk_rows=CHUNK,
                             codec="lz4", fingerprint_extra={"model": "m"})
    assert buf.hooks == {"h": D_IN} and buf.dtype == "float16" and buf.codec == "lz4" and buf.fingerprint["model"] == "m"
    acts, tokens, doc, pos = read_all(buf, "h")
    np.testing.assert_array_equal(acts, seqs.reshape(50, D_IN))
    np.testing.assert_array_equal(doc, np.arange(50) // 10)
    np.testing.assert_array_equal(pos, np.arange(50) % 10)
    as_bf16 = import_activations(tmp_path / "seqs.npy", tmp_path / "c", hook="h", shard_rows=SHARD, chunk_rows=CHUNK, dtype="bfloat16")
    assert torch.equal(as_bf16.read_tensor("h", 0), torch.from_numpy(seqs.reshape(50, D_IN)[:16]).bfloat16())


def test_import_safetensors(tmp_path):
    from safetensors.torch import save_file

    a = torch.randn(4, 6, D_IN).bfloat16()
    b = torch.randn(4, 6, 3).bfloat16()
    tok = torch.arange(24).reshape(4, 6)
    save_file({HOOK: a, "blocks.5.hook_mlp_out": b, "token_ids": tok}, str(tmp_path / "acts.safetensors"))
    buf = import_activations(tmp_path / "acts.safetensors", tmp_path / "buf", shard_rows=SHARD, chunk_rows=CHUNK)
    assert buf.hooks == {HOOK: D_IN, "blocks.5.hook_mlp_out": 3} and buf.dtype == "bfloat16"
    assert buf.n_rows() == 24 and buf.fingerprint["source"]["kind"] == "safetensors"
    got = torch.cat([buf.read_tensor(HOOK, s) for s in buf.committed()])
    assert torch.equal(got.view(torch.int16), a.reshape(24, D_IN).view(torch.int16))
    got = torch.cat([buf.read_tensor("blocks.5.hook_mlp_out", s) for s in buf.committed()])
    assert torch.equal(got.view(torch.int16), b.reshape(24, 3).view(torch.int16))
    _, tokens, doc, pos = read_all(buf)
    np.testing.assert_array_equal(tokens, np.arange(24))
    np.testing.assert_array_equal(pos, np.arange(24) % 6)

    one = import_activations(tmp_path / "acts.safetensors", tmp_path / "one", hook="blocks.5.hook_mlp_out",
                             shard_rows=SHARD, chunk_rows=CHUNK, dtype="float32")
    assert one.hooks == {"blocks.5.hook_mlp_out": 3} and one.dtype == "float32"
    with pytest.raises(ValueError, match="no float tensor 'nope'"):
        import_activations(tmp_path / "acts.safetensors", tmp_path / "x", hook="nope")


def test_import_saelens_datasets_cache(tmp_path):
    from datasets import Array2D, Dataset, Features, Sequence, Value

    ctx = 7
    acts = np.random.default_rng(2).standard_normal((6, ctx, D_IN)).astype(np.float16)
    tokens = np.random.default_rng(3).integers(0, 50_000, (6, ctx)).astype(np.int32)
    features = Features({HOOK: Array2D(shape=(ctx, D_IN), dtype="float16"),
                         "token_ids": Sequence(Value("int32"), length=ctx)})  # SAELens CacheActivationsRunner's layout
    Dataset.from_dict({HOOK: acts, "token_ids": tokens}, features=features).save_to_disk(str(tmp_path / "cache"))
    buf = import_activations(tmp_path / "cache", tmp_path / "buf", shard_rows=SHARD, chunk_rows=CHUNK)
    assert buf.hooks == {HOOK: D_IN} and buf.dtype == "float16" and buf.n_rows() == 42
    got, tok, doc, pos = read_all(buf)
    np.testing.assert_array_equal(got, acts.reshape(42, D_IN))
    np.testing.assert_array_equal(tok, tokens.reshape(42))
    np.testing.assert_array_equal(doc, np.arange(42) // ctx)
    assert buf.fingerprint["source"]["kind"] == "datasets"

    flat = np.random.default_rng(4).standard_normal((20, 5)).astype(np.float32)
    Dataset.from_dict({"resid": flat}).save_to_disk(str(tmp_path / "flat"))
    buf = import_activations(tmp_path / "flat", tmp_path / "flatbuf", shard_rows=SHARD, chunk_rows=CHUNK, codec="none")
    got, tok, *_ = read_all(buf, "resid")
    np.testing.assert_array_equal(got, flat)
    assert (tok == -1).all()
    with pytest.raises(ValueError, match="not a Hugging Face datasets"):
        import_activations(tmp_path, tmp_path / "nope")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unknown source kind"):
        import_activations(tmp_path / "x.csv", tmp_path / "nope")


# ---------------------------------------------------------------- commands


def test_buffer_commands(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sae-ray")
    add_buffer_commands(parser.add_subparsers(dest="command", required=True))
    np.save(tmp_path / "h.npy", np.zeros((2000, 32), np.float32))
    args = parser.parse_args(["buffer", "import", str(tmp_path / "h.npy"), str(tmp_path / "buf"),
                              "--shard-rows", "1024", "--chunk-rows", "256", "--codec", "lz4"])
    assert args.fn(args) == 0
    assert "2,000 in 2 shards" in capsys.readouterr().out
    args = parser.parse_args(["buffer", "info", str(tmp_path / "buf"), "--json"])
    assert args.fn(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 2000 and info["codec"] == "lz4" and info["compression_ratio"] > 1
    args = parser.parse_args(["buffer", "import", str(tmp_path / "h.npy"), str(tmp_path / "b2"), "--shard-rows", "10", "--chunk-rows", "4"])
    assert args.fn(args) == 2
    assert "multiple of chunk_rows" in capsys.readouterr().err


# ---------------------------------------------------------------- pinned batches


def test_pin_memory_is_refused_without_cuda_and_pins_with_it(tmp_path):
    buf, data = complete_buffer(tmp_path / "b", [SHARD, SHARD])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            BufferReader(buf, HOOK, 8, pin_memory=True)
        return
    pinned = take(iter(BufferReader(buf, HOOK, 8, pin_memory=True)), 4)
    plain = take(iter(BufferReader(buf, HOOK, 8)), 4)
    assert all(b.is_pinned() for b in pinned) and not any(b.is_pinned() for b in plain)
    assert all(torch.equal(a, b) for a, b in zip(pinned, plain))
