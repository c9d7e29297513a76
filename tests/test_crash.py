"""Crash recovery for real: SIGKILL a producer mid-shard, SIGKILL the coordinator, SIGKILL the whole
`run_cache` process group, and a store that refuses a write. Every finished buffer is compared with
a crash-free reference production of the same config: the multiset of token ids, the sorted hashes of
every row (activations, token, document, position), and each producer's rows in order."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

from sae_ray.actors.coordinator import coordinator_name
from sae_ray.buffer import ActivationBuffer
from sae_ray.config import validate_config
from sae_ray.preflight import preflight
from test_production import HOOK, assert_same, buffer_contents, reference_contents
from tiny_models import write_jsonl

DELAY = 0.06  # producers.debug_delay_s: seconds per document read and between writing and committing a shard


def make_config(workdir, model_dir, data, count=2, debug_delay_s=0.0):
    return validate_config({
        "name": "crash", "workdir": str(workdir), "model": {"name": model_dir},
        "data": {"path": data, "context_size": 24, "batch_size": 2},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 10_000_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"count": count, "num_cpus": 0.5, "max_restarts": 2, "write_queue": 2,
                      "debug_delay_s": debug_delay_s},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [4]},
    }).with_absolute_paths()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_factory, sample_texts):
    """(model dir, data file, texts, tmp dir, crash-free reference contents)."""
    tmp = tmp_path_factory.mktemp("crash")
    texts = sample_texts * 2
    model_dir, data = tiny_model_factory("gpt2"), write_jsonl(tmp / "docs.jsonl", texts)
    reference = reference_contents(make_config(tmp / "reference", model_dir, data), texts)
    return model_dir, data, tmp, reference


def total(reference) -> int:
    return len(reference["rows"])


def start(cfg):
    """start_production; returns (refs, coordinator handle)."""
    from sae_ray.sweep.production import _PRODUCTION, start_production

    refs = start_production(cfg, preflight(cfg), progress_every=None)
    return refs, _PRODUCTION[coordinator_name(cfg.buffer_path())][0]


def wait_for(coordinator, condition, what: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = ray.get(coordinator.status.remote())
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last status {status}"
        time.sleep(0.01)


def test_producer_killed_mid_shard_resumes_exactly(setup, local_ray):
    model_dir, data, tmp, reference = setup
    cfg = make_config(tmp / "producer_kill", model_dir, data, debug_delay_s=DELAY)
    refs, coordinator = start(cfg)
    # Kill rank 0 once it has committed a few shards and has just claimed another: the kill lands while
    # that shard is being written (its commit is >= 60 ms away) and while the next one fills in memory.
    previous, deadline = "unknown", time.monotonic() + 300  # generous: a busy machine is slow to start
    while True:
        status = ray.get(coordinator.status.remote())
        claim = status["claims"].get(0)
        if previous != "unknown" and claim is not None and claim != previous and status["rows_by_rank"][0] >= 256:
            break
        assert time.monotonic() < deadline and not status["complete"], status
        previous = claim
        time.sleep(0.005)
    pid, claim = status["producer_pids"][0], status["claims"][0]
    os.kill(pid, signal.SIGKILL)
    stats = ray.get(refs, timeout=120)

    rank0 = next(s for s in stats if s["rank"] == 0)
    assert rank0["pid"] != pid  # Ray restarted it and retried run()
    assert rank0["resumed_after_rows"] == status["rows_by_rank"][0] > 0  # exactly after the rows it had committed
    buf = ActivationBuffer.open(cfg.buffer_path())
    assert claim not in buf.committed()  # the dead attempt's claim was freed, not committed
    assert buf.production()["claims"] == {}
    assert_same(buffer_contents(cfg.buffer_path(), 2), reference)


def test_coordinator_killed_restarts_from_disk(setup, local_ray):
    model_dir, data, tmp, reference = setup
    cfg = make_config(tmp / "coordinator_kill", model_dir, data, debug_delay_s=DELAY)
    refs, coordinator = start(cfg)
    status = wait_for(coordinator, lambda s: s["shards_committed"] >= 3 and s["claims"] and not s["complete"],
                      "a few commits")
    os.kill(status["pid"], signal.SIGKILL)
    stats = ray.get(refs, timeout=120)
    after = ray.get(coordinator.status.remote())
    assert after["pid"] != status["pid"]  # a new coordinator process, rebuilt from the buffer's attributes
    assert after["complete"] and after["rows_committed"] == total(reference)
    assert all(s["resumed_after_rows"] == 0 for s in stats)  # the producers themselves never restarted
    assert_same(buffer_contents(cfg.buffer_path(), 2), reference)


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import ray
    from sae_ray.config import load_config
    from sae_ray.sweep import run_cache
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_cache(load_config({config!r}))
""")


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout.split()
    return [int(p) for p, s in zip(out[::2], out[1::2]) if int(s) == sid]


def test_whole_run_killed_resumes_on_the_next_run(setup, local_ray, tmp_path, capsys):
    from sae_ray.sweep import run_cache

    model_dir, data, tmp, reference = setup
    cfg = make_config(tmp_path / "work", model_dir, data)  # the resume below runs at full speed
    config = tmp_path / "cache.yaml"  # the killed run has slow producers
    config.write_text(yaml.safe_dump(make_config(tmp_path / "work", model_dir, data, debug_delay_s=DELAY).model_dump(mode="json")))
    script = SCRIPT.format(tests=str(Path(__file__).parent), config=str(config))
    # its own Ray, in its own process group: the driver, Ray's daemons and the actors all die at once
    run = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # generous: a busy machine starts Ray slowly
        while True:  # kill once a few shards are committed
            assert run.poll() is None, run.stdout.read()[-3000:]
            try:
                if len(ActivationBuffer.open(cfg.buffer_path()).committed()) >= 4:
                    break
            except (FileNotFoundError, ValueError):
                pass
            assert time.monotonic() < deadline, "no commits from the cache run"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGKILL)
    finally:
        run.wait(30)
        for _ in range(100):  # whatever of that run outlived the kill (none expected)
            left = session_pids(run.pid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
    buf = ActivationBuffer.open(cfg.buffer_path())
    rows_before, committed_before = buf.n_rows(), set(buf.committed())
    # ids claimed but not committed when the kill landed (the kill may fall between a commit and the
    # clearing of its claim, so a claimed id can also be committed: that one is finished, not a hole)
    holes = set(map(int, buf.production()["claims"].values())) - committed_before
    assert not buf.is_complete() and 0 < rows_before < total(reference)

    stats = run_cache(cfg)  # the same config again: it resumes
    assert f"resuming buffer {cfg.buffer_path()}: {rows_before:,} rows already committed" in capsys.readouterr().out
    assert sum(s["resumed_after_rows"] for s in stats) == rows_before
    assert sum(s["rows"] for s in stats) == total(reference) - rows_before
    committed_after = set(ActivationBuffer.open(cfg.buffer_path()).committed())
    assert committed_before <= committed_after and not holes & committed_after  # holes are never reused
    assert_same(buffer_contents(cfg.buffer_path(), 2), reference)


def test_a_store_that_refuses_a_write_fails_the_run_naming_the_shard(setup, local_ray, sample_texts, tmp_path):
    from sae_ray.activations.hooks import resolve_hook
    from sae_ray.activations.model import load_model
    from sae_ray.activations.produce import iter_shards
    from sae_ray.sweep import run_cache

    model_dir = setup[0]
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    cfg = make_config(tmp_path / "work", model_dir, data, count=1)
    plan = preflight(cfg)
    b = cfg.buffer
    ActivationBuffer.create_or_open(cfg.buffer_path(), plan.fingerprint, plan.hooks, b.shard_rows, b.chunk_rows, b.dtype)
    blocker = Path(cfg.buffer_path(), "tokens", "c", "2")  # where shard 2 of `tokens` goes: a directory instead
    (blocker / "x").mkdir(parents=True)

    outcome = {}

    def run():
        try:
            outcome["stats"] = run_cache(cfg, plan=plan)
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "run_cache hung on a refused write"
    assert "error" in outcome, outcome
    assert "shard 2" in str(outcome["error"]) and "tokens" in str(outcome["error"])

    buf = ActivationBuffer.open(cfg.buffer_path())
    assert buf.committed() == {0: 128, 1: 128} and not buf.is_complete()
    # the committed shards are intact: exactly the first two shards of a crash-free production
    model, tok = load_model(model_dir)
    ref = list(iter_shards(model, tok, [resolve_hook(model, 1, "resid_post")], sample_texts, 24, 2, 128, "float32",
                           seed=cfg.train.seed))[:2]
    for sid, shard in enumerate(ref):
        np.testing.assert_array_equal(buf.read_rows(HOOK, sid), shard.acts[HOOK])
        np.testing.assert_array_equal(buf.read_tokens(sid), shard.tokens)
