"""The bounded window (buffer.max_gb) inside a whole sweep: real Ray, a tiny gpt2, a Zarr buffer, sqlite MLflow.

The rules: every stack's reader id is registered before any trial starts, so a shard is dropped
only once every trial (started or not) has passed it or is done; the shards of the held-out rows
are kept to the end; configurations that cannot finish are refused before Ray starts. The
Ray-free ledger rules are in test_buffer_ledger.py; the reader's side of the protocol is here.
"""

import json
import os
import threading

import numpy as np
import pytest
import ray

import sae_ray
from sae_ray import tracking
from sae_ray.buffer import ActivationBuffer, BufferReader
from sae_ray.buffer.split import held_out_rows
from sae_ray.config import ConfigError, validate_config
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.preflight import preflight, window_shards
from tiny_models import write_jsonl

HOOK = "blocks.1.hook_resid_post"
D_IN = 32  # the tiny gpt2's width
WINDOW_SHARDS = 8  # what the window holds at least (uncompressed shards; compressed ones are smaller)


def window_config(workdir, model_dir, data, **changes):
    """3 topk stacks (one SAE each) over a buffer of ~35 shards of 128 rows, a window of 8 of them."""
    raw = {
        "name": "window", "workdir": str(workdir), "model": {"name": model_dir},
        "data": {"path": str(data), "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 10_000_000, "shard_rows": 128, "chunk_rows": 32, "eval_fraction": 0.25, "max_gb": 1.0},
        "producers": {"count": 1, "num_cpus": 0.5},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [2, 4, 8], "max_stack": 1},
        # toy SAEs are dense: the monitor would stop them (see test_end_to_end)
        "train": {"total_tokens": 512, "batch_size": 64, "lr": 0.003, "log_every": 4, "eval_rows": 32,
                  "dead_tokens": 256, "init_batches": 2, "monitor": {"enabled": False}},
        "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 1},
    }
    for key, value in changes.items():
        raw[key] = {**raw[key], **value}
    cfg = validate_config(raw)
    if "max_gb" not in changes.get("buffer", {}):  # a window of WINDOW_SHARDS shards
        _, shard_bytes = window_shards(cfg, {HOOK: D_IN})
        cfg = cfg.model_copy(update={"buffer": cfg.buffer.model_copy(
            update={"max_gb": (WINDOW_SHARDS - 0.5) * shard_bytes / 1e9})})
    assert window_shards(cfg, {HOOK: D_IN})[0] == WINDOW_SHARDS or "max_gb" in changes.get("buffer", {})
    return cfg


class DropWatcher(threading.Thread):
    """Watches the buffer while a sweep runs: a shard seen dropped while a registered reader that
    is not done has not passed it is a violation. (Dropped shards are read first, then the
    readers: a reader's passed set only grows and done stays, so what it shows afterwards is at
    least what it had when the shard was dropped.)"""

    def __init__(self, path: str, readers: list[str]):
        super().__init__(daemon=True)
        self.path, self.readers = path, readers
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.drops_while_reading = 0  # drops seen while some trial was still reading
        self.max_live_bytes = 0
        self.checked: set[int] = set()

    def run(self) -> None:
        buf = None
        while not self.stop.wait(0.05):
            try:
                buf = buf or ActivationBuffer.open(self.path)
                dropped = buf.dropped()
                self.max_live_bytes = max(self.max_live_bytes, buf.live_nbytes())
                states = buf.reader_states()
            except (FileNotFoundError, ValueError, KeyError, OSError):
                continue  # not created yet, or a file replaced under us: look again
            for s in set(dropped) - self.checked:
                self.checked.add(s)
                reading = [r for r in self.readers if r in states and not states[r]["done"]]
                self.drops_while_reading += bool(reading)
                for r in self.readers:
                    st = states.get(r)
                    if st is None:
                        self.violations.append(f"shard {s} dropped before reader {r} started")
                    elif not st["done"] and s not in st["passed"]:
                        self.violations.append(f"shard {s} dropped before reader {r} passed it")


def run_watched(cfg):
    from sae_ray.sweep import run_sweep

    plan = preflight(cfg)
    watcher = DropWatcher(cfg.with_absolute_paths().buffer_path(), [s.reader_id for s in plan.stacks])
    watcher.start()
    try:
        result = run_sweep(cfg, plan=plan)
    finally:
        watcher.stop.set()
        watcher.join()
    return result, plan, watcher


def check_sweep(cfg, result, plan, watcher) -> ActivationBuffer:
    """What every windowed sweep must end with; returns the buffer."""
    from ray.util import list_named_actors

    from sae_ray.actors.coordinator import coordinator_name

    assert watcher.violations == []
    buf = ActivationBuffer.open(cfg.buffer_path())
    assert buf.is_complete() and buf.window_bytes() == int(cfg.buffer.max_gb * 1e9)
    assert len(buf.dropped()) > 0  # the whole buffer did not fit: shards were dropped once read
    states = buf.reader_states()
    assert sorted(states) == sorted(s.reader_id for s in plan.stacks) and all(st["done"] for st in states.values())
    assert coordinator_name(cfg.buffer_path()) not in list_named_actors()  # stopped with the sweep
    status = result.production  # its last status
    _, shard_bytes = window_shards(cfg, {HOOK: D_IN})
    assert watcher.max_live_bytes <= cfg.buffer.max_gb * 1e9 + (1 + status["window_overflows"]) * shard_bytes
    pinned = buf.production()["pinned"]
    assert pinned and set(pinned) <= set(buf.committed())  # the held-out shards stayed to the end

    client = tracking.client_for(cfg.tracking_uri())
    name = tracking.registry_name(cfg.model.name, HOOK)
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(result.rows) == len(versions) == len(plan.trials) == 3
    x = held_out_rows(buf, HOOK, cfg.train.eval_rows)  # after the sweep: the rows every trial evaluated on
    for v in versions:
        metrics = client.get_run(v.run_id).data.metrics
        assert metrics["final/tokens_seen"] == cfg.train.total_tokens  # not cut short by the single pass
        assert metrics["final/skipped_rows"] == 0 and metrics["final/skipped_shards"] == 0  # no shard went missing
        sae = sae_ray.load_sae(f"models:/{name}/{v.version}", tracking_uri=cfg.tracking_uri())
        assert int(v.tags["eval_rows"]) == len(x)
        assert evaluate_sae(sae, x)["fvu"] == pytest.approx(metrics["final/fvu"], rel=1e-4, abs=1e-6)
    return buf


# ----------------------------------------------------------------------------- refused before Ray starts


def test_configurations_a_window_cannot_finish_are_refused_before_ray_starts(tmp_path, tiny_model_factory, sample_texts):
    from sae_ray.preflight import available_resources

    ray_before = ray.is_initialized()
    cpus = available_resources()["CPU"]
    model_dir = tiny_model_factory("gpt2")
    data = write_jsonl(tmp_path / "d.jsonl", sample_texts)

    def problems(**changes) -> str:
        with pytest.raises(ConfigError) as e:
            preflight(window_config(tmp_path / "w", model_dir, data, **changes))
        return str(e.value)

    # one pass over the buffer holds fewer training rows than a trial needs
    text = problems(buffer={"n_tokens": 2000, "max_gb": 1.0}, train={"total_tokens": 1600})
    assert "train.total_tokens: value 1,600" in text and "buffer.n_tokens 2,000" in text and "buffer.max_gb 1" in text
    assert "about 1,500 training rows" in text and "buffer.n_tokens >= 2,134" in text

    # one stack at a time, each needing more than the window holds: the first would wait for the others forever
    text = problems(train={"total_tokens": 1536})
    assert "train.total_tokens: value 1,536" in text and f"holds about {WINDOW_SHARDS} shards" in text
    assert "only 1 of the 3 stacks can run at once (resources.max_concurrent_trials is 1)" in text
    assert "resources.max_concurrent_trials >= 3" in text and "buffer.max_gb >=" in text
    # the same with all three at once is fine (the test above runs it), and with few CPUs it is refused again
    preflight(window_config(tmp_path / "w", model_dir, data, train={"total_tokens": 1536},
                            resources={"max_concurrent_trials": 3}))
    text = problems(train={"total_tokens": 1536}, resources={"max_concurrent_trials": None, "cpus_per_trial": 1.0},
                    producers={"num_cpus": cpus - 1.0})
    assert "only 1 of the 3 stacks can run at once" in text and "resources.cpus_per_trial 1" in text

    # a window too small for the held-out shards and one reader's mix
    _, shard_bytes = window_shards(window_config(tmp_path / "w", model_dir, data), {HOOK: D_IN})
    text = problems(buffer={"max_gb": 2.5 * shard_bytes / 1e9})
    assert f"buffer.max_gb: value {2.5 * shard_bytes / 1e9:g}: holds about 3 shards" in text
    assert "at least 6: about 1 with the held-out rows" in text and "4 a reader mixes at once" in text

    # trials that wait for the whole buffer, which waits for them
    assert "train.wait_for_buffer: value True" in problems(train={"wait_for_buffer": True})

    # no trial fits beside the producers, which wait for trials while the window is full
    text = problems(producers={"num_cpus": cpus}, resources={"max_concurrent_trials": None})
    assert "resources.cpus_per_trial: value 0.5: no trial can run beside the producers" in text

    # the whole buffer fits in the window: nothing is ever dropped, nothing is refused
    preflight(window_config(tmp_path / "w", model_dir, data, buffer={"n_tokens": 1000, "max_gb": 1.0},
                            train={"total_tokens": 512}))
    # a cache ignores the window
    from sae_ray.sweep import run_cache  # noqa: F401  (it calls preflight with window=False)

    preflight(window_config(tmp_path / "w", model_dir, data, train={"total_tokens": 1536}), window=False)
    assert ray.is_initialized() == ray_before  # preflight never starts Ray


def test_each_stack_reads_under_its_own_id_known_before_it_starts():
    from sae_ray.buffer.layout import check_reader_id
    from sae_ray.config import SweepConfig
    from sae_ray.sweep.plan import Stack, expand_trials, pack_stacks

    sweep = SweepConfig(architectures=["topk", "batchtopk"], expansion_factor=[2, 4], k=list(range(1, 40)), max_stack=3)
    stacks = pack_stacks(expand_trials(sweep, {HOOK: 32, "transformer.h.0.mlp.c_fc/" + "x" * 180: 32}), 3)
    ids = [s.reader_id for s in stacks]
    assert len(set(ids)) == len(stacks) > 50  # long names cut to the same prefix still differ
    assert all(check_reader_id(r, "buffer") == r for r in ids)
    assert [Stack.from_dict(s.to_dict()).reader_id for s in stacks] == ids  # the trial derives the same id


# ----------------------------------------------------------------------------- the reader's side


def windowed_buffer(path, n_shards: int, shard_rows: int = 16) -> ActivationBuffer:
    buf = ActivationBuffer.create_or_open(str(path), {"test": 1}, {HOOK: 4}, shard_rows, 8, codec="none",
                                          capacity_rows=64 * shard_rows)
    buf.set_window(10**9)
    for s in range(n_shards):
        commit(buf, s)
    return buf


def commit(buf: ActivationBuffer, s: int) -> None:
    n = buf.shard_rows
    buf.write_shard(s, {HOOK: np.full((n, 4), s, np.float32)}, np.arange(n), np.arange(n) + s * n, np.arange(n))
    buf.commit_shard(s, n)


def progress(buf: ActivationBuffer, reader_id: str) -> dict:
    with open(os.path.join(buf.path, "readers", f"{reader_id}.json")) as f:
        return json.load(f)


def wait_until(condition, what: str, polls: int = 400) -> None:
    stop = threading.Event()
    for _ in range(polls):
        if condition():
            return
        stop.wait(0.025)
    raise AssertionError(f"never happened: {what}")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_reader_records_when_it_waits_with_nothing_left_and_when_it_is_done(tmp_path, prefetch):
    buf = windowed_buffer(tmp_path / "b", 2)
    buf.write_reader_progress("trial-x", [0, 1], done=True)  # left by an earlier run of this stack
    reader = BufferReader(buf, HOOK, batch_size=16, shards_in_mix=1, poll_seconds=0.01, reader_id="trial-x",
                          prefetch=prefetch)
    it = iter(reader)
    got = [next(it)]
    assert progress(buf, "trial-x")["done"] is False  # registered again before it reads
    got.append(next(it))  # both shards, nothing carried; the consumer has not asked for more
    assert {int(b[0, 0]) for b in got} == {0, 1}
    stop = threading.Event()
    stop.wait(0.2)
    assert progress(buf, "trial-x")["waiting"] is False  # holding its last batch is not waiting

    asked = []
    consumer = threading.Thread(target=lambda: asked.append(next(it)), daemon=True)
    consumer.start()  # now it asks, and there is nothing: it waits, having read every live shard
    wait_until(lambda: progress(buf, "trial-x")["waiting"], "the reader records that it waits")
    state = progress(buf, "trial-x")
    assert state["seen"] == [0, 1] and state["passed"] == [0, 1] and state["done"] is False
    commit(buf, 2)
    consumer.join(10)
    assert int(asked[0][0, 0]) == 2
    assert progress(buf, "trial-x")["waiting"] is False and progress(buf, "trial-x")["passed"] == [0, 1, 2]

    reader.load_state_dict(reader.state_dict())  # a restart is not the end
    assert progress(buf, "trial-x")["done"] is False
    reader.close()
    state = buf.reader_states()["trial-x"]
    assert state["done"] and state["passed"] == {0, 1, 2}


def test_a_reader_that_times_out_on_a_full_window_says_whom_it_waits_for(tmp_path):
    buf = windowed_buffer(tmp_path / "b", 1)
    buf.set_window(1)  # full
    buf.set_production({"readers": ["trial-x", "trial-late"]})
    reader = BufferReader(buf, HOOK, batch_size=16, shards_in_mix=1, poll_seconds=0.01, timeout_seconds=0.2,
                          reader_id="trial-x", prefetch=0)
    with pytest.raises(TimeoutError, match=r"window is full .* readers not started: \['trial-late'\]"):
        list(reader)


# ----------------------------------------------------------------------------- whole sweeps


def test_more_stacks_than_can_run_at_once_finish_within_the_window(tmp_path, tiny_model_factory, sample_texts,
                                                                   local_ray):
    """3 stacks one at a time: the trials that have not started hold every shard, so the first
    ones train within the window; the last one's passed shards are dropped."""
    cfg = window_config(tmp_path / "work", tiny_model_factory("gpt2"), write_jsonl(tmp_path / "d.jsonl", sample_texts * 3))
    result, plan, watcher = run_watched(cfg)
    check_sweep(cfg, result, plan, watcher)


def test_all_stacks_at_once_stream_more_than_the_window_holds(tmp_path, tiny_model_factory, sample_texts, local_ray):
    """3 stacks at once, each training on twice what the window holds: shards are dropped while
    the trials read, each only once all three have passed it."""
    cfg = window_config(tmp_path / "work", tiny_model_factory("gpt2"), write_jsonl(tmp_path / "d.jsonl", sample_texts * 3),
                        train={"total_tokens": 1536}, resources={"max_concurrent_trials": 3})
    held_rows = WINDOW_SHARDS * cfg.buffer.shard_rows * (1 - cfg.buffer.eval_fraction)
    assert cfg.train.total_tokens > 2 * held_rows * 0.99
    result, plan, watcher = run_watched(cfg)
    buf = check_sweep(cfg, result, plan, watcher)
    assert watcher.drops_while_reading > 0  # the window moved while the trials trained
    assert sum(buf.dropped().values()) > held_rows  # more passed through the window than it holds
