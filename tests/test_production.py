"""Production with real Ray: `run_cache` and the bounded window. The Ray-free parts (progress display,
background writer, the coordinator's ledger) are in test_buffer_ledger.py."""

import hashlib
import time
from collections import Counter

import numpy as np
import pytest
import ray

from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.ledger import committed_rows_by_rank
from sae_ray.config import validate_config
from tiny_models import write_jsonl

HOOK = "blocks.1.hook_resid_post"


# ----------------------------------------------------------------------------- with Ray


def cache_config(tmp_path, model_dir, data, **changes):
    raw = {
        "name": "cache", "workdir": str(tmp_path / "work"), "model": {"name": model_dir},
        "data": {"path": data, "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 10_000_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"count": 2, "num_cpus": 0.5},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [4]},
        "train": {},
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
    """Producers wait while the window is full and go on as the (fake) reader of the one stack,
    registered before it starts, passes shards; the shard of the held-out rows stays."""
    from sae_ray.actors.coordinator import coordinator_name
    from sae_ray.preflight import preflight, window_shards
    from sae_ray.sweep import start_production

    cfg = cache_config(tmp_path, tiny_model_factory("gpt2"), write_jsonl(tmp_path / "docs.jsonl", sample_texts),
                       buffer={"max_gb": 1.0, "shard_rows": 64, "eval_fraction": 0.25},
                       train={"eval_rows": 16}, producers={"count": 1, "num_cpus": 0.5})
    plan = preflight(cfg.with_absolute_paths())
    _, shard_bytes = window_shards(cfg, plan.hooks)
    window = 5.5 * shard_bytes  # at least 6 shards: 1 for the held-out rows, 4 a reader mixes, 1 coming in
    cfg = cfg.model_copy(update={"buffer": cfg.buffer.model_copy(update={"max_gb": window / 1e9})}).with_absolute_paths()
    (reader,) = [s.reader_id for s in plan.stacks]
    refs = start_production(cfg, preflight(cfg), progress_every=None)
    coordinator = ray.get_actor(coordinator_name(cfg.buffer_path()))
    buf = ActivationBuffer.open(cfg.buffer_path())
    assert buf.window_bytes() == int(window)
    seen_live, deadline = [], time.monotonic() + 90
    while not ray.wait(refs, timeout=0.2)[0]:
        assert time.monotonic() < deadline
        live = buf.committed()
        seen_live.append(buf.live_nbytes())
        status = ray.get(coordinator.status.remote())
        assert status["readers"] == [reader]
        buf.write_reader_progress(reader, list(live) + list(buf.dropped()))  # the reader passes what is there
    ray.get(refs)
    assert max(seen_live) <= window + shard_bytes  # a shard is claimed only while the live ones take less
    pinned = buf.production()["pinned"]
    assert buf.is_complete() and len(buf.dropped()) >= 2 and pinned and set(pinned) <= set(buf.committed())
    total = buf.n_rows() + sum(buf.dropped().values())
    assert committed_rows_by_rank(buf, 1) == [total] and total == sum(kept_tokens(cfg.model.name, sample_texts).values())


def test_buffer_errors_cross_a_ray_task_boundary(local_ray):
    """Raised in a Ray task, each buffer error reaches the caller as itself, with all its fields."""
    from sae_ray.buffer import CorruptShardError, FingerprintMismatch, ShardDroppedError, ShardWriteError
    from sae_ray.buffer.writer import ShardWriterError

    def errors():
        return [CorruptShardError("buffer at '/b': shard 3 of array 'tokens' is corrupt", 3, "/b/tokens/c/3", "tokens"),
                ShardWriteError("shard 4: the store refused", 4, "/b/tokens/c/4"),
                ShardDroppedError("shard 5 was dropped", 5),
                FingerprintMismatch("/b", {"dtype": ("float32", "float16")}),
                ShardWriterError("producer 0: writing shard 6 failed", 6)]

    @ray.remote(max_retries=0)
    def fail(i: int):
        raise errors()[i]

    for i, expected in enumerate(errors()):
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(fail.remote(i))
        cause = info.value.cause
        assert type(cause) is type(expected) and cause.__dict__ == expected.__dict__ and str(cause) == str(expected)
        assert isinstance(info.value, type(expected))  # `except CorruptShardError` catches it too
