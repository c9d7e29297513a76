"""Production without crashes: progress display, the background writer, the coordinator's ledger
(claims, restarts from disk, bounded window) Ray-free, then `run_cache` and the window with real Ray."""

import hashlib
import threading
import time
from collections import Counter

import numpy as np
import pytest
import ray

from sae_ray.actors.ledger import WAIT, ShardLedger, committed_rows_by_rank
from sae_ray.actors.writer import ShardWriter, ShardWriterError
from sae_ray.buffer import ActivationBuffer
from sae_ray.config import validate_config
from sae_ray.progress import RateMeter, eta_seconds, format_duration, format_progress
from tiny_models import write_jsonl

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


# ----------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cache_config(tmp_path, model_dir, data, **changes):
    raw = {
        "name": "cache", "workdir": str(tmp_path / "work"), "model": {"name": model_dir},
        "data": {"path": data, "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 10_000_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"count": 2, "num_cpus": 0.5},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [4]},
    }
    for key, value in changes.items():
        raw[key] = {**raw[key], **value}
    return validate_config(raw)


def summarize(shards, world: int) -> dict:
    """What a buffer holds, independent of shard ids: the token multiset, the sorted hashes of every row
    (activations, token, document, position) and each producer rank's rows in order.
    shards: (acts [n, d], tokens, doc_index, position) in each rank's order of production."""
    tokens, hashes, streams = Counter(), [], {r: [] for r in range(world)}
    for acts, tok, doc, pos in shards:
        rows = [hashlib.sha1(acts[i].tobytes() + np.array([tok[i], doc[i], pos[i]], np.int64).tobytes()).hexdigest()
                for i in range(len(tok))]
        tokens.update(tok.tolist())
        hashes.extend(rows)
        streams[int(doc[0]) % world].extend(rows)
    return {"tokens": tokens, "rows": sorted(hashes), "streams": streams}


def buffer_contents(path: str, world: int) -> dict:
    buf = ActivationBuffer.open(path)
    assert buf.is_complete()
    return summarize(((buf.read_rows(HOOK, s), buf.read_tokens(s), buf.read_column("doc_index", s),
                       buf.read_column("position", s)) for s in buf.committed()), world)  # ascending ids: each rank in order


def reference_contents(cfg, texts: list[str]) -> dict:
    """A crash-free production of `cfg` by the producers' own core (iter_shards per rank), in this process."""
    from sae_ray.activations.hooks import resolve_hook
    from sae_ray.activations.model import load_model
    from sae_ray.activations.produce import iter_shards

    model, tok = load_model(cfg.model.name)
    hooks = [resolve_hook(model, h.layer, h.site, h.module) for h in cfg.hooks]
    world, d = cfg.producers.count, cfg.data
    shards = [s for rank in range(world)
              for s in iter_shards(model, tok, hooks, texts[rank::world], d.context_size, d.batch_size, cfg.buffer.shard_rows,
                                   cfg.buffer.dtype, seed=cfg.train.seed + rank, rank=rank, world=world)]
    return summarize(((s.acts[HOOK], s.tokens, s.doc_index, s.position) for s in shards), world)


def assert_same(got: dict, ref: dict) -> None:
    assert got["tokens"] == ref["tokens"]
    assert len(got["rows"]) == len(ref["rows"]) and got["rows"] == ref["rows"]
    assert got["streams"] == ref["streams"]  # even the order of each producer's rows


def kept_tokens(model_dir, texts) -> Counter:
    """The multiset of non-special token ids of `texts`: what a complete buffer must hold."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    return Counter(t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] if t not in special)


def test_run_cache_produces_shows_progress_and_reuses(tmp_path, tiny_model_factory, sample_texts, local_ray, capsys):
    from sae_ray.sweep import run_cache

    model_dir = tiny_model_factory("gpt2")
    cfg = cache_config(tmp_path, model_dir, write_jsonl(tmp_path / "docs.jsonl", sample_texts),
                       buffer={"n_tokens": 10_000_000, "max_gb": 1e-6})  # a cache ignores the window
    stats = run_cache(cfg)
    out = capsys.readouterr().out
    assert "max_gb" in out and "tok/s" in out and "rows" in out

    buf = ActivationBuffer.open(cfg.buffer_path())
    expected = kept_tokens(model_dir, sample_texts)
    assert buf.is_complete() and buf.dropped() == {}
    assert Counter(int(t) for s in buf.committed() for t in buf.read_tokens(s)) == expected
    assert_same(buffer_contents(cfg.buffer_path(), 2), reference_contents(cfg, sample_texts))
    assert sorted(s["rank"] for s in stats) == [0, 1]
    assert sum(s["rows"] for s in stats) == buf.n_rows() and all(s["tokens_per_s"] > 0 for s in stats)
    assert buf.production()["claims"] == {} and buf.production()["finished"] == [0, 1]

    assert run_cache(cfg) == []  # complete: reused at once
    assert "reusing complete buffer" in capsys.readouterr().out


def test_bounded_window_with_ray(tmp_path, tiny_model_factory, sample_texts, local_ray):
    """Producers wait while the window is full and go on as the (fake) readers pass shards."""
    from sae_ray.actors.coordinator import coordinator_name
    from sae_ray.preflight import preflight
    from sae_ray.sweep import start_production

    cfg = cache_config(tmp_path, tiny_model_factory("gpt2"), write_jsonl(tmp_path / "docs.jsonl", sample_texts),
                       buffer={"max_gb": 1e-9, "shard_rows": 256}, producers={"count": 1, "num_cpus": 0.5})
    cfg = cfg.with_absolute_paths()
    refs = start_production(cfg, preflight(cfg), progress_every=None)
    coordinator = ray.get_actor(coordinator_name(cfg.buffer_path()))
    buf = ActivationBuffer.open(cfg.buffer_path())
    assert buf.window_bytes() == 1
    seen_live, deadline = [], time.monotonic() + 90
    while not ray.wait(refs, timeout=0.2)[0]:
        assert time.monotonic() < deadline
        live = buf.committed()
        seen_live.append(len(live))
        buf.write_reader_progress("trial-0", list(live) + list(buf.dropped()))  # the reader passes what is there
        status = ray.get(coordinator.status.remote())
        assert status["live_shards"] <= 1
    ray.get(refs)
    assert max(seen_live) <= 1  # a 1-byte window holds one shard at a time
    assert buf.is_complete() and len(buf.committed()) <= 1 and len(buf.dropped()) >= 2
    total = buf.n_rows() + sum(buf.dropped().values())
    assert committed_rows_by_rank(buf, 1) == [total] and total == sum(kept_tokens(cfg.model.name, sample_texts).values())
