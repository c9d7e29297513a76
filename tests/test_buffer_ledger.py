"""The Ray-free parts of production (sae_ray.buffer): the progress display, the background writer,
the coordinator's ledger (claims, restarts from disk, bounded window), on real buffers in tmp_path."""

import threading
import time

import numpy as np
import pytest

from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.ledger import WAIT, ShardLedger, committed_rows_by_rank
from sae_ray.buffer.progress import RateMeter, eta_seconds, format_duration, format_progress
from sae_ray.buffer.writer import ShardWriter, ShardWriterError

HOOK = "blocks.1.hook_resid_post"


# ----------------------------------------------------------------------------- progress


def test_rate_meter_uses_recent_samples():
    now = [0.0]
    meter = RateMeter(window_s=10, clock=lambda: now[0])
    assert meter.rate() == 0.0
    for t, rows in [(0, 0), (5, 100), (10, 200), (20, 1200), (25, 2200)]:
        now[0] = t
        meter.add(rows)
    # the window keeps (10, 200) onwards: (2200 - 200) / 15 s
    assert meter.rate() == pytest.approx(2000 / 15)


def test_progress_line():
    assert eta_seconds(500, 1000, 10.0) == 50
    assert eta_seconds(0, 1000, 0.0) is None and eta_seconds(2000, 1000, 0.0) == 0.0
    assert [format_duration(s) for s in (None, 42, 185, 7620)] == ["?", "42s", "3m05s", "2h07m"]
    status = {"rows_committed": 250_000, "target_rows": 1_000_000, "shards_committed": 4, "tokens_per_s": 12_345.6,
              "eta_s": 61.0, "n_producers": 2, "producers_finished": 0, "complete": False}
    line = format_progress(status, width=20)
    assert line == "[#####---------------]  25.0%  250,000/1,000,000 rows  4 shards  12,346 tok/s  ETA 1m01s  producers 0/2 done"
    assert "\n" not in line
    done = format_progress({**status, "complete": True, "producers_finished": 2, "waiting_for_readers": True}, width=4)
    assert done.startswith("[####] 100.0%") and "done" in done and "waiting for readers" in done


# ----------------------------------------------------------------------------- the background writer


class FakeShard:
    def __init__(self, n: int, tag: int):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n


def test_writer_claims_writes_and_commits_in_order():
    log, ids = [], iter(range(100))
    writer = ShardWriter(write=lambda sid, s: log.append(("write", sid, s.tag)),
                         claim=lambda: next(ids), commit=lambda sid, n: log.append(("commit", sid, n)), max_queue=2)
    for tag in range(5):
        assert writer.put(FakeShard(10 + tag, tag))
    writer.close()
    assert log == [x for i in range(5) for x in (("write", i, i), ("commit", i, 10 + i))]
    assert (writer.rows, writer.shards) == (60, 5)


def test_writer_queue_is_bounded_and_the_producer_never_waits_otherwise():
    release = threading.Event()
    writer = ShardWriter(write=lambda sid, s: release.wait(), claim=iter(range(100)).__next__,
                         commit=lambda sid, n: None, max_queue=2, poll_s=0.05)
    t0 = time.monotonic()
    for tag in range(3):  # one being written, two queued
        assert writer.put(FakeShard(1, tag))
    assert time.monotonic() - t0 < 1.0
    blocked = threading.Thread(target=writer.put, args=(FakeShard(1, 3),))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # the queue is full
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    writer.close()
    assert writer.shards == 4


def test_writer_waits_while_the_window_is_full_and_stops_when_no_more_shards_are_wanted():
    answers = iter([WAIT, WAIT, 0, None])
    committed = []
    writer = ShardWriter(write=lambda sid, s: None, claim=lambda: next(answers), commit=lambda sid, n: committed.append(sid),
                         poll_s=0.01)
    assert writer.put(FakeShard(5, 0))
    assert writer.put(FakeShard(5, 1))  # claim says None: no more shards
    deadline = time.monotonic() + 5
    while writer.put(FakeShard(5, 2)):
        assert time.monotonic() < deadline
    writer.close()
    assert committed == [0] and writer.rows == 5


def test_a_failed_write_names_the_shard_and_reaches_the_producer():
    committed = []

    def write(sid, s):
        if sid == 2:
            raise OSError("read-only file system")

    writer = ShardWriter(write=write, claim=iter(range(100)).__next__, commit=lambda sid, n: committed.append(sid),
                         max_queue=1, poll_s=0.01, where="producer 0: ")
    with pytest.raises(ShardWriterError, match=r"producer 0: writing shard 2 \(7 rows\) failed.*read-only file system"):
        for tag in range(100):
            writer.put(FakeShard(7, tag))
        writer.close()
    assert committed == [0, 1]


# ----------------------------------------------------------------------------- the ledger, Ray-free


def make_buffer(path, shard_rows=4, d=3) -> ActivationBuffer:
    buf = ActivationBuffer.create_or_open(str(path), {"test": 1}, {HOOK: d}, shard_rows, 2, codec="none")
    buf.set_production({"producers": 2})
    return buf


def write(buf: ActivationBuffer, shard_id: int, rank: int, n: int, world: int = 2) -> None:
    """Rows of `rank` (doc_index % world == rank), acts = shard id."""
    buf.write_shard(shard_id, {HOOK: np.full((n, buf.hooks[HOOK]), shard_id, np.float32)}, np.arange(n),
                    np.arange(n, dtype=np.int64) * world + rank, np.arange(n))


def test_claims_are_per_rank_and_a_new_claim_frees_the_old_one(tmp_path):
    buf = make_buffer(tmp_path / "b")
    ledger = ShardLedger(buf, n_tokens=4 * 4, n_producers=2)  # at most 4 shards
    assert ledger.producer_started(0, pid=11) == 0
    assert (ledger.claim(0), ledger.claim(1)) == (0, 1)
    assert ledger.status()["claims"] == {0: 0, 1: 1}
    # rank 0 died after claiming 0; its restart claims again: 0 is freed, never handed out again
    assert ledger.claim(0) == 2
    assert ledger.claims == {0: 2, 1: 1}
    write(buf, 2, 0, 4)
    ledger.commit(0, 2, 4)
    write(buf, 1, 1, 3)
    ledger.commit(1, 1, 3)
    assert ledger.claims == {} and ledger.rows_by_rank() == [4, 3]
    assert (ledger.claim(0), ledger.claim(1)) == (3, 4)
    write(buf, 3, 0, 4)
    ledger.commit(0, 3, 4)
    assert ledger.claim(0) is None  # 3 committed + rank 1's claim on 4: the 4 shards are spoken for
    # producer_started frees a dead attempt's claim at once
    assert ledger.producer_started(1, pid=12) == 3 and ledger.claims == {}
    assert ledger.claim(1) == 5


def test_a_rebuilt_ledger_carries_on_from_the_buffer(tmp_path):
    buf = make_buffer(tmp_path / "b")
    buf.set_production({"producers": 3})
    ledger = ShardLedger(buf, n_tokens=100, n_producers=3)
    ids = [ledger.claim(r) for r in (0, 1)]
    write(buf, ids[0], 0, 4, world=3)
    ledger.commit(0, ids[0], 4)
    ledger.producer_finished(0)

    again = ShardLedger(ActivationBuffer.open(buf.path), n_tokens=100, n_producers=3)  # the coordinator restarted
    assert again.claims == {1: 1} and again.finished == {0}
    assert again.committed == {0: 4} and again.rows_by_rank() == [4, 0, 0]
    assert again.claim(2) == 2  # shard 1, which rank 1 still holds, is not handed out twice
    write(buf, 1, 1, 2, world=3)
    again.commit(1, 1, 2)
    again.commit(1, 1, 2)  # a commit retried after the restart is harmless
    again.producer_finished(1)
    assert not buf.is_complete()
    again.producer_finished(2)
    assert buf.is_complete() and again.status()["rows_committed"] == 6 and again.claims == {}
    assert committed_rows_by_rank(buf, 3) == [4, 2, 0]


def test_a_crash_between_commit_and_clearing_the_claim_leaves_no_stale_claim(tmp_path):
    buf = make_buffer(tmp_path / "b")
    ledger = ShardLedger(buf, n_tokens=3 * 4, n_producers=2)  # at most 3 shards
    assert (ledger.claim(0), ledger.claim(1)) == (0, 1)
    write(buf, 0, 0, 4)
    buf.commit_shard(0, 4)  # the coordinator died here: committed, but rank 0's claim on 0 still recorded
    assert buf.production()["claims"] == {"0": 0, "1": 1}

    again = ShardLedger(ActivationBuffer.open(buf.path), n_tokens=3 * 4, n_producers=2)
    assert again.status()["claims"] == {1: 1}  # the committed shard is not also shown as claimed
    assert again.claim(0) == 2 and again.claims == {0: 2, 1: 1}  # ids stay fresh


def test_bounded_window_waits_for_every_reader_and_drops_what_all_have_passed(tmp_path):
    buf = make_buffer(tmp_path / "b", shard_rows=4, d=64)
    ledger = ShardLedger(buf, n_tokens=1000, n_producers=2, max_gb=1e-9, min_readers=2)  # 1 byte: one shard fills it
    sid = ledger.claim(0)
    write(buf, sid, 0, 4)
    ledger.commit(0, sid, 4)
    assert buf.live_nbytes() > 0
    assert ledger.claim(0) == WAIT and ledger.status()["waiting_for_readers"]
    buf.write_reader_progress("trial-a", [sid])
    assert ledger.claim(0) == WAIT  # only one of the two readers has registered
    buf.write_reader_progress("trial-b", [])
    assert ledger.claim(1) == WAIT  # trial-b has not passed shard 0
    buf.write_reader_progress("trial-b", [sid])
    nxt = ledger.claim(1)
    assert nxt == 1 and buf.dropped() == {0: 4} and buf.committed() == {}
    write(buf, nxt, 1, 3)
    ledger.commit(1, nxt, 3)
    # the dropped shard still counts for its rank (a resume must not redo it), and for progress
    assert ledger.rows_by_rank() == [4, 3] and committed_rows_by_rank(buf, 2) == [4, 3]
    assert ledger.status()["rows_committed"] == 7 and ledger.status()["shards_dropped"] == 1
    rebuilt = ShardLedger(ActivationBuffer.open(buf.path), n_tokens=1000, n_producers=2, max_gb=1e-9, min_readers=2)
    assert rebuilt.rows_by_rank() == [4, 3] and rebuilt.n_shards() == 2


def test_without_a_window_nothing_is_ever_dropped(tmp_path):
    buf = make_buffer(tmp_path / "b")
    ledger = ShardLedger(buf, n_tokens=1000, n_producers=2)
    for i in range(3):
        sid = ledger.claim(0)
        write(buf, sid, 0, 4)
        ledger.commit(0, sid, 4)
        buf.write_reader_progress("trial-a", range(i + 1))
    assert buf.dropped() == {} and len(buf.committed()) == 3


# ----------------------------------------------------------------------------- the window in a sweep, Ray-free


def test_a_registered_reader_that_has_not_started_holds_every_shard(tmp_path):
    """Reader ids registered up front (one per stack): a trial that has not started yet has passed
    nothing, so nothing is dropped until it has; a reader that is done holds nothing."""
    buf = make_buffer(tmp_path / "b", shard_rows=4, d=64)
    ledger = ShardLedger(buf, n_tokens=1000, n_producers=2, max_gb=1e-9, readers=["trial-a", "trial-b"])
    assert (ledger.claim(0), ledger.claim(1)) == (0, 1)  # nothing committed yet: the window is empty
    for rank in (0, 1):
        write(buf, rank, rank, 4)
        ledger.commit(rank, rank, 4)
    assert ledger.claim(0) == WAIT
    buf.write_reader_progress("trial-a", [0, 1])
    buf.write_reader_progress("someone-else", [0, 1])  # an extra reader counts too, but cannot stand in for trial-b
    assert ledger.claim(0) == WAIT and buf.dropped() == {}  # trial-b has not started: it still needs both
    buf.write_reader_progress("trial-b", [1])
    assert ledger.claim(0) == WAIT and buf.dropped() == {1: 4} and list(buf.committed()) == [0]
    buf.write_reader_progress("trial-b", [], done=True)  # finished (or failed): it needs nothing more
    assert ledger.claim(1) == 2 and buf.dropped() == {0: 4, 1: 4}
    assert ledger.status()["readers"] == ["trial-a", "trial-b"]
    rebuilt = ShardLedger(ActivationBuffer.open(buf.path), n_tokens=1000, n_producers=2, max_gb=1e-9)
    assert rebuilt.readers == ("trial-a", "trial-b") and rebuilt.min_readers == 2  # the registration is on disk


def split_buffer(path, shard_rows=8, eval_fraction=0.5) -> ActivationBuffer:
    buf = ActivationBuffer.create_or_open(str(path), {"eval_fraction": eval_fraction}, {HOOK: 64}, shard_rows, 2,
                                          codec="none")
    buf.set_production({"producers": 1})
    return buf


def write_docs(buf: ActivationBuffer, shard_id: int, docs: np.ndarray) -> None:
    """One row per document index in `docs`; acts = shard id * 100 + row."""
    n = len(docs)
    acts = (shard_id * 100 + np.arange(n, dtype=np.float32))[:, None].repeat(64, axis=1)
    buf.write_shard(shard_id, {HOOK: acts}, np.arange(n), docs.astype(np.int64), np.zeros(n, np.int32))


def test_the_window_keeps_the_shards_of_the_held_out_rows_every_trial_evaluates_on(tmp_path):
    from sae_ray.buffer.split import held_out, held_out_rows

    buf = split_buffer(tmp_path / "b")
    docs = np.arange(10_000)
    out, kept = docs[held_out(docs, 0.5)], docs[~held_out(docs, 0.5)]
    # shard 0: 2 held-out rows, shard 1: 3, shards 2..: none; eval_rows 4 needs shards 0 and 1
    plan = [np.r_[out[:2], kept[:6]], np.r_[out[2:5], kept[6:11]], *[kept[11 + 8 * i: 19 + 8 * i] for i in range(4)]]
    probe = split_buffer(tmp_path / "probe")
    probe.ensure_capacity(1)
    write_docs(probe, 0, plan[0])
    probe.commit_shard(0, 8)
    window = 2.5 * probe.live_nbytes() / 1e9  # room for 2 pinned shards and 1 more
    ledger = ShardLedger(buf, n_tokens=10_000, n_producers=1, max_gb=window, readers=["trial-a"], eval_rows=4)
    ledger.producer_started(0)
    sid = ledger.claim(0)
    write_docs(buf, sid, plan[sid])
    ledger.commit(0, sid, 8)
    assert ledger.pinned == {0}  # 2 held-out rows so far: every live shard is needed
    before = None
    for _ in range(5):
        buf.write_reader_progress("trial-a", sorted({*buf.committed(), *buf.dropped()}))  # passes all it sees
        sid = ledger.claim(0)
        assert sid != WAIT
        write_docs(buf, sid, plan[sid])
        ledger.commit(0, sid, 8)
        if sid == 1:
            before = held_out_rows(buf, HOOK, 4)
    assert ledger.pinned == {0, 1} and buf.production()["pinned"] == [0, 1]
    assert sorted(buf.dropped()) == [2, 3, 4] and sorted(buf.committed()) == [0, 1, 5]  # passed by all, never pinned
    assert torch_equal(held_out_rows(buf, HOOK, 4), before)  # the same rows as before anything was dropped
    buf.write_reader_progress("trial-a", [], done=True)
    ledger.drop_passed()
    assert sorted(buf.committed()) == [0, 1]  # kept to the end, even once every reader is done
    rebuilt = ShardLedger(ActivationBuffer.open(buf.path), n_tokens=10_000, n_producers=1, max_gb=window, eval_rows=4)
    assert rebuilt.pinned == {0, 1}


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_a_full_window_nobody_can_leave_hands_out_one_more_shard(tmp_path):
    """Every reader has read every live shard and waits for a new one, and the shards it still
    carries rows of fill the window: one more shard goes out (else nothing would ever move)."""
    buf = make_buffer(tmp_path / "b", shard_rows=4, d=64)
    ledger = ShardLedger(buf, n_tokens=1000, n_producers=2, max_gb=1e-9, readers=["trial-a", "trial-b"])
    sid = ledger.claim(0)
    write(buf, sid, 0, 4)
    ledger.commit(0, sid, 4)
    buf.write_reader_progress("trial-a", [], waiting=True, seen=[0])  # carries rows of shard 0
    assert ledger.claim(0) == WAIT  # trial-b has not started: it will pass shard 0 once it does
    buf.write_reader_progress("trial-b", [0])
    assert ledger.claim(0) == WAIT  # trial-b is still reading: it may want more before it waits
    buf.write_reader_progress("trial-b", [0], waiting=True, seen=[0])
    sid = ledger.claim(0)
    assert sid == 1 and ledger.status()["window_overflows"] == 1 and buf.dropped() == {}
    assert ledger.claim(1) == WAIT  # shard 1 is being written: no second one
    write(buf, sid, 0, 4)
    ledger.commit(0, sid, 4)
    assert ledger.claim(1) == WAIT  # trial-a has not seen shard 1 yet
    buf.write_reader_progress("trial-a", [0, 1])  # mixed the carried rows with shard 1's
    buf.write_reader_progress("trial-b", [0, 1])
    assert ledger.claim(1) == 2 and sorted(buf.dropped()) == [0, 1] and ledger.status()["window_overflows"] == 1


def test_stopping_a_window_drops_what_every_reader_passed_and_keeps_the_rest(tmp_path):
    buf = make_buffer(tmp_path / "b", shard_rows=4, d=64)
    ledger = ShardLedger(buf, n_tokens=1000, n_producers=2, max_gb=1.0, readers=["trial-a", "trial-b"])
    for sid in range(3):
        assert ledger.claim(0) == sid
        write(buf, sid, 0, 4)
        ledger.commit(0, sid, 4)
    buf.write_reader_progress("trial-a", [], done=True)
    buf.write_reader_progress("trial-b", [0, 1])  # failed hard: never recorded itself done
    ledger.stop()
    assert sorted(buf.dropped()) == [0, 1] and list(buf.committed()) == [2] and ledger.claim(0) is None


def test_a_new_run_forgets_the_readers_it_does_not_register(tmp_path):
    buf = make_buffer(tmp_path / "b")
    buf.write_reader_progress("trial-old-plan", [0])  # a stack of an earlier sweep: would hold shards forever
    buf.write_reader_progress("trial-a", [0, 1], done=True)  # finished before the driver died: stays done
    buf.clear_reader_progress(keep=["trial-a", "trial-b"])
    assert buf.reader_states() == {"trial-a": {"passed": {0, 1}, "done": True, "waiting": False, "seen": None}}
