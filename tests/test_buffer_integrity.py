"""The buffer knows its own bytes: every kind of damage to a committed shard (its objects, its
commit record, its array's metadata) is caught on read with CorruptShardError naming the shard
and the array, and listed by `sae-ray buffer info PATH --verify`. Real Zarr stores, no mocks."""

import copy
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from sae_ray.buffer import (
    ActivationBuffer,
    BufferReader,
    CorruptShardError,
    FingerprintMismatch,
    ShardDroppedError,
    ShardWriteError,
)
from sae_ray.buffer.writer import ShardWriterError
from sae_ray.cli import main
from damage import KINDS, damage, flip_byte

HOOK = "blocks.3.hook_resid_post"
ACTS = f"acts/{HOOK}"
D_IN = 8
SHARD = 16
CHUNK = 4
FP = {"model": "tiny-gpt", "dataset": "toy"}


def make(path, codec="zstd"):
    return ActivationBuffer.create_or_open(str(path), FP, {HOOK: D_IN}, shard_rows=SHARD, chunk_rows=CHUNK, codec=codec)


def complete_buffer(path, sizes, codec="zstd"):
    """Shards of `sizes` rows; column 0 of acts and the tokens hold the global row id."""
    buf = make(path, codec)
    buf.ensure_capacity(len(sizes))
    data = {}
    for s, n in enumerate(sizes):
        ids = s * SHARD + np.arange(n)
        acts = np.random.default_rng(s).standard_normal((n, D_IN)).astype(np.float32)
        acts[:, 0] = ids
        objects = buf.write_shard(s, {HOOK: acts}, ids, ids, ids % 5)
        buf.commit_shard(s, n, objects)
        data[s] = acts
    buf.mark_complete()
    return buf, data


def obj(path, name, shard_id):
    """Local path of shard `shard_id`'s object of array `name`."""
    tail = [str(shard_id), "0"] if name.startswith("acts/") else [str(shard_id)]
    return os.path.join(str(path), *name.split("/"), "c", *tail)


def edit_json(path, change):
    with open(path) as f:
        doc = json.load(f)
    change(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def swap(a, b):
    tmp = a + ".swap"
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def verify_lines(path, capsys):
    """`sae-ray buffer info PATH --verify`: (exit code, its output lines)."""
    code = main(["buffer", "info", str(path), "--verify"])
    return code, capsys.readouterr().out.splitlines()


def assert_corrupt(read, shard_id, array, match=None):
    with pytest.raises(CorruptShardError, match=match) as e:
        read()
    err = e.value
    assert err.shard_id == shard_id and err.array == array
    assert f"shard {shard_id} of array {array!r} is corrupt" in str(err)
    return err


def problem_lines(lines, shard, array):
    return [line for line in lines if line.strip().startswith(f"shard {shard}  {array}  ")]


# ---------------------------------------------------------------- the damage people hit


@pytest.mark.parametrize("codec", ["zstd", "none"])  # none: same sizes, only the hash tells them apart
def test_objects_swapped_between_shards(tmp_path, capsys, codec):
    path = tmp_path / "buf"
    buf, data = complete_buffer(path, [SHARD, SHARD, SHARD], codec)
    swap(obj(path, ACTS, 1), obj(path, ACTS, 2))  # each a valid shard object, in the wrong place
    fresh = ActivationBuffer.open(str(path))
    for s in (1, 2):
        err = assert_corrupt(lambda: fresh.read_rows(HOOK, s), s, ACTS, r"truncated or replaced|another shard's object")
        assert err.key == obj(path, ACTS, s)
    np.testing.assert_array_equal(fresh.read_rows(HOOK, 0), data[0])
    code, lines = verify_lines(path, capsys)
    assert code == 1
    assert problem_lines(lines, 1, ACTS) and problem_lines(lines, 2, ACTS) and not problem_lines(lines, 0, ACTS)
    assert "verify      2 problem(s):" in lines


def test_committed_row_count_inflated_in_attributes(tmp_path, capsys):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, 10, SHARD])
    edit_json(path / "zarr.json", lambda d: d["attributes"]["committed"]["1"].update(rows=SHARD))  # 6 rows past the data
    fresh = ActivationBuffer.open(str(path))
    for read, array in [(lambda: fresh.read_rows(HOOK, 1), ACTS), (lambda: fresh.read_tokens(1), "tokens")]:
        err = assert_corrupt(read, 1, array, r"commit record \(rows 16\) does not match the record's own hash")
        assert err.key == str(path / "zarr.json")
    code, lines = verify_lines(path, capsys)
    assert code == 1 and len(problem_lines(lines, 1, "record")) == 1 and "verify      1 problem(s):" in lines
    # a sound record copied onto another shard is caught as well: the record's hash covers its shard id
    edit_json(path / "zarr.json", lambda d: d["attributes"]["committed"].update({"1": d["attributes"]["committed"]["0"]}))
    assert_corrupt(lambda: fresh.read_rows(HOOK, 1), 1, ACTS, "does not match the record's own hash")


def inner_chunks(doc, shape):
    doc["codecs"][0]["configuration"]["chunk_shape"] = shape


@pytest.mark.parametrize("field, change, found", [
    ("data_type", lambda d: d.update(data_type="int32"), '"int32" in zarr.json, "float32" at creation'),  # ~1e9 values
    ("row_shape", lambda d: d.update(shape=[d["shape"][0], D_IN // 2]), f'[{D_IN // 2}] in zarr.json, [{D_IN}] at creation'),
    ("codecs", lambda d: inner_chunks(d, [2, D_IN]), f"[2, {D_IN}]"),
])
def test_acts_metadata_changed_in_zarr_json(tmp_path, capsys, field, change, found):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, SHARD])
    edit_json(path / "acts" / HOOK / "zarr.json", change)
    fresh = ActivationBuffer.open(str(path))
    for s in (0, 1):
        err = assert_corrupt(lambda: fresh.read_rows(HOOK, s), s, ACTS, f"{field}: .*")
        assert err.key == str(path / "acts" / HOOK / "zarr.json") and found in str(err)
    fresh.read_tokens(0)  # the other arrays are fine
    code, lines = verify_lines(path, capsys)
    assert code == 1 and len(problem_lines(lines, "*", ACTS)) == 1 and field in problem_lines(lines, "*", ACTS)[0]


def test_checksums_switched_off_and_an_object_deleted(tmp_path, capsys):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, SHARD])
    edit_json(path / "zarr.json", lambda d: d["attributes"].update(checksums=False))
    os.remove(obj(path, ACTS, 1))  # zarr alone would read it back as zeros
    fresh = ActivationBuffer.open(str(path))
    err = assert_corrupt(lambda: fresh.read_rows(HOOK, 1), 1, ACTS, r"is missing \(its commit record has \d+ bytes\)")
    assert err.key == obj(path, ACTS, 1)
    code, lines = verify_lines(path, capsys)
    assert code == 1 and problem_lines(lines, 1, ACTS) and problem_lines(lines, "*", "attributes")


@pytest.mark.parametrize("damage", ["flipped", "truncated", "swapped", "deleted"])
def test_tokens_column_damage(tmp_path, capsys, damage):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, SHARD])
    f = obj(path, "tokens", 1)
    if damage == "flipped":
        flip_byte(f, 3)
    elif damage == "truncated":
        os.truncate(f, os.path.getsize(f) - 1)
    elif damage == "swapped":
        swap(f, obj(path, "tokens", 0))
    else:
        os.remove(f)
    fresh = ActivationBuffer.open(str(path))
    err = assert_corrupt(lambda: fresh.read_tokens(1), 1, "tokens")
    assert err.key == f
    fresh.read_rows(HOOK, 1)  # the acts of that shard are fine
    code, lines = verify_lines(path, capsys)
    assert code == 1 and problem_lines(lines, 1, "tokens")


@pytest.mark.parametrize("array", ["doc_index", "position", ACTS])
@pytest.mark.parametrize("kind", KINDS)
def test_damage_detected_before_still_detected_and_listed(tmp_path, capsys, array, kind):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, SHARD, SHARD])
    f = obj(path, array, 1)
    damage(f, kind)
    fresh = ActivationBuffer.open(str(path))
    read = (lambda: fresh.read_rows(HOOK, 1, 2, 5)) if array == ACTS else (lambda: fresh.read_column(array, 1, 2, 5))
    assert assert_corrupt(read, 1, array).key == f  # a partial read checks the whole object too
    code, lines = verify_lines(path, capsys)
    assert code == 1 and len([line for line in lines if line.startswith("  shard ")]) == 1 and problem_lines(lines, 1, array)


def test_clean_buffer_verifies_ok(tmp_path, capsys):
    path = tmp_path / "buf"
    buf, _ = complete_buffer(path, [SHARD, 7, SHARD])
    buf.drop_shard(1)  # dropped shards are not checked: they are gone on purpose
    assert buf.verify() == []
    code, lines = verify_lines(path, capsys)
    assert code == 0 and "verify      OK: 2 committed shards x 4 arrays match their commit records" in lines
    assert main(["buffer", "info", str(path), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    assert main(["buffer", "info", str(path)]) == 0 and "verify" not in capsys.readouterr().out  # only when asked


# ---------------------------------------------------------------- commits, readers, older buffers


def test_commit_record_from_the_writer_or_read_back_is_the_same(tmp_path):
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    ids = np.arange(SHARD)
    acts = {HOOK: np.ones((SHARD, D_IN), np.float32)}
    for buf in (a, b):
        buf.ensure_capacity(2)
    a.commit_shard(0, SHARD, a.write_shard(0, acts, ids, ids, ids))  # digests passed from the producer
    objects = b.write_shard(0, acts, ids, ids, ids)
    b.commit_shard(0, SHARD)  # read back and hashed by the committing side
    attrs = [json.loads((p / "zarr.json").read_text())["attributes"]["committed"]["0"] for p in (tmp_path / "a", tmp_path / "b")]
    assert attrs[0] == attrs[1] and attrs[0]["objects"] == objects and attrs[0]["rows"] == SHARD
    b.commit_shard(0, SHARD, objects)  # a retried commit is a no-op
    with pytest.raises(ValueError, match="already committed with 16 rows"):
        b.commit_shard(0, 8)
    wrong = {**objects, "tokens": {**objects["tokens"], "nbytes": objects["tokens"]["nbytes"] + 1}}
    a.write_shard(1, acts, ids, ids, ids)
    with pytest.raises(ValueError, match=r"array 'tokens' was written with \d+ bytes but the store holds"):
        a.commit_shard(1, SHARD, wrong)
    with pytest.raises(ValueError, match="objects must describe exactly the arrays"):
        a.commit_shard(1, SHARD, {"tokens": objects["tokens"]})
    assert a.committed() == {0: SHARD}


def test_reader_skip_counts_shards_and_rows(tmp_path):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, 10, SHARD, 12])
    swap(obj(path, ACTS, 1), obj(path, ACTS, 3))
    reader = BufferReader(ActivationBuffer.open(str(path)), HOOK, batch_size=4, shards_in_mix=1, on_corrupt="skip", prefetch=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [next(iter_) for iter_ in [iter(reader)] for _ in range(8)]  # one epoch: the 32 good rows
    assert sorted(int(i) for b in batches for i in b[:, 0]) == [s * SHARD + i for s in (0, 2) for i in range(SHARD)]
    assert (reader.shards_skipped, reader.rows_skipped) == (2, 22)
    assert len([w for w in caught if "skipped shard" in str(w.message)]) == 2
    state = reader.state_dict()
    assert state["shards_skipped"] == 2
    resumed = BufferReader(ActivationBuffer.open(str(path)), HOOK, batch_size=4, shards_in_mix=1, on_corrupt="skip",
                           prefetch=0, state={k: v for k, v in state.items() if k != "shards_skipped"})  # older states
    assert resumed.shards_skipped == 0


def test_reader_with_every_shard_damaged_raises_instead_of_spinning(tmp_path):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, SHARD])
    edit_json(path / "acts" / HOOK / "zarr.json", lambda d: d.update(data_type="int32"))
    reader = BufferReader(ActivationBuffer.open(str(path)), HOOK, batch_size=4, on_corrupt="skip", prefetch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"every shard of epoch 0 was skipped as damaged \(2 shards, 32 rows"):
            next(iter(reader))


class CountingBuffer(ActivationBuffer):
    """Counts reads of the group's attributes."""

    reads = 0

    def _attrs(self):
        type(self).reads += 1
        return super()._attrs()


def test_reader_reads_the_attributes_once_between_mixes(tmp_path):
    complete_buffer(tmp_path / "buf", [SHARD, SHARD, SHARD, SHARD])
    buf = CountingBuffer.open(str(tmp_path / "buf"))
    state = buf.commit_state()
    assert state.committed == {s: SHARD for s in range(4)} and state.complete and not state.windowed
    assert state.dropped == {} and state.window_bytes is None
    reader = BufferReader(buf, HOOK, batch_size=SHARD, shards_in_mix=1, prefetch=0)
    it = iter(reader)
    CountingBuffer.reads = 0
    next(it)  # the first mix: one top-up (one read), one shard read (one read for its record)
    assert CountingBuffer.reads == 2
    for _ in range(3):  # the pool holds the other three shards: no top-up, one read per shard
        next(it)
    assert CountingBuffer.reads == 2 + 3


def test_older_format_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD])
    edit_json(path / "zarr.json", lambda d: d["attributes"].update(format_version=1))
    with pytest.raises(ValueError, match=r"format_version 1; this code reads only 2 .*Re-produce the buffer") as e:
        ActivationBuffer.open(str(path))
    assert str(path) in str(e.value)
    assert main(["buffer", "info", str(path), "--verify"]) == 2


def test_errors_rebuild_with_all_their_fields():
    """copy.deepcopy rebuilds an exception through its __reduce__, as pickling across Ray does
    (test_production checks a real Ray task)."""
    errors = [
        CorruptShardError("shard 3 is corrupt", 3, "/b/acts/h/c/3/0", "acts/h"),
        ShardWriteError("shard 4: refused", 4, "/b/tokens/c/4"),
        ShardDroppedError("shard 5 was dropped", 5),
        FingerprintMismatch("/b", {"dtype": ("float32", "float16")}),
        ShardWriterError("producer 0: writing shard 6 failed", 6),
    ]
    for e in errors:
        back = copy.deepcopy(e)
        assert type(back) is type(e) and str(back) == str(e) and back.__dict__ == e.__dict__


def test_verify_changes_nothing(tmp_path):
    """verify only reads: the verified copy stays byte-identical to the original."""
    path = tmp_path / "buf"
    complete_buffer(path, [SHARD, SHARD])
    shutil.copytree(path, tmp_path / "copy")
    ActivationBuffer.open(str(tmp_path / "copy")).verify()
    for root, _, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), path)
            assert open(os.path.join(path, rel), "rb").read() == open(os.path.join(tmp_path, "copy", rel), "rb").read()
