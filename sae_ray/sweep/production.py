"""Ray wiring for production: the buffer's coordinator and producers, and `sae-ray cache`.

`start_production(cfg, plan)` creates (or reopens) the buffer and starts the coordinator and
the producers; a sweep calls it and trains while they write. `run_cache(cfg)` is `sae-ray
cache`: production alone, with a progress line, waited for. Both take a config whose paths are
absolute (`RunConfig.with_absolute_paths`, done where the config is loaded).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.ledger import committed_rows_by_rank
from sae_ray.config import ConfigError, RunConfig
from sae_ray.preflight import (
    Plan,
    available_resources,
    preflight,
    resource_problems,
    window_problems,
)

_PRODUCTION: dict[str, list] = {}
"""Coordinator name -> [coordinator, *producers] of the production this driver runs ([coordinator]
once the producers are done)."""


LOOPBACK = "127.0.0.1"
"""Where a local Ray started by sae-ray serves its dashboard."""


def connect_ray(cfg: RunConfig, address: str | None = None) -> None:
    """Join the cluster in `address` or RAY_ADDRESS (a `ray job submit` entrypoint has it); else start a
    local Ray. Then check that the config's producers and trials fit what Ray has (a cluster's
    resources are known only once joined): ConfigError before any work is scheduled."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        # a local Ray of our own serves its dashboard on loopback only; Ray 2.60 has no setting for
        # the rest (it turns a node address of 127.0.0.1 into the machine's, and binds its gRPC
        # servers to every interface): tests/test_loopback.py lists them
        local = {} if address else {"dashboard_host": LOOPBACK,
                                    "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}}
        ray.init(address=address or "local", log_to_driver=True, **local)
    problems = resource_problems(cfg)
    if problems:
        raise ConfigError(problems, "preflight")


def start_production(cfg: RunConfig, plan: Plan, bounded: bool = True, progress_every: float | None = 10.0) -> list:
    """Create (or reopen) the buffer and start the coordinator and the producers; returns the
    producers' `run` refs ([] when the buffer is already complete).

    bounded: apply buffer.max_gb (the streaming window; a cache run keeps everything).
    progress_every: print a progress line this often from a background thread (None: don't).
    A producer whose process dies is restarted (producers.max_restarts) and resumes after the
    rows it committed; the coordinator restarts without limit and rebuilds from the buffer.

    With the window, every stack's reader id (`Stack.reader_id`) is registered with the
    coordinator before any trial starts, so a shard is dropped only once every trial, started
    or not, has passed it (or finished); the shards with the first train.eval_rows held-out
    rows are kept for the trials' final evaluation; the progress of readers of an earlier run
    that are not this run's is forgotten (a resumed sweep's own readers keep theirs: a finished
    trial's says done). The window's rules are checked again against the resources of the Ray
    this process has joined (`preflight.window_problems`): ConfigError before anything starts.
    """
    from sae_ray.actors.coordinator import coordinator_name, start_coordinator
    from sae_ray.actors.producer import ActivationProducer
    from sae_ray.actors.watch import watch_in_background

    b = cfg.buffer
    max_gb = b.max_gb if bounded else None
    if max_gb is not None:  # a cluster's resources are known only now
        problems = window_problems(cfg, plan.hooks, len(plan.stacks), available_resources())
        if problems:
            raise ConfigError(problems, "preflight")
    buffer = ActivationBuffer.create_or_open(cfg.buffer_path(), plan.fingerprint, plan.hooks, b.shard_rows,
                                             b.chunk_rows, b.dtype, codec=b.codec, codec_level=b.codec_level)
    if buffer.is_complete():
        _check_not_consumed(buffer)
        print(f"[sae-ray] reusing complete buffer {buffer.path} ({buffer.n_rows():,} rows)")
        return []
    name = coordinator_name(cfg.buffer_path())
    for handle in _PRODUCTION.pop(name, []):  # an earlier production of this buffer from this driver stops here
        ray.kill(handle, no_restart=True)
    n = cfg.producers.count
    done = rows_committed_by_rank(buffer, n)
    if any(done):
        print(f"[sae-ray] resuming buffer {buffer.path}: {sum(done):,} rows already committed")
    # A new run: the claims and finished ranks of an earlier, dead run are void (its processes are gone).
    buffer.set_production({**buffer.production(), "producers": n, "claims": {}, "finished": []})
    buffer.set_window(None if max_gb is None else int(max_gb * 1e9))  # readers of a window read each shard once
    readers = tuple(s.reader_id for s in plan.stacks) if max_gb else ()  # each trial reads the window once
    if max_gb is not None:  # a resumed sweep's readers keep theirs (a finished trial's says done)
        buffer.clear_reader_progress(keep=readers)
    coordinator = start_coordinator(cfg.buffer_path(), b.n_tokens, n, max_gb, max(1, len(readers)), readers,
                                    cfg.train.eval_rows)
    p = cfg.producers
    options = dict(num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_restarts=p.max_restarts, max_task_retries=-1,
                   resources=dict(p.resources) or None)
    producers = [ActivationProducer.options(**options).remote(cfg.model_dump(mode="json"), rank, n, name)
                 for rank in range(n)]
    held = _PRODUCTION[name] = [coordinator, *producers]  # held while producing, so that Ray keeps (and restarts) them
    refs = [pr.run.remote() for pr in producers]

    def release() -> None:
        """Once the producers are done their resources go back to the trials: each finished one is
        killed now (a dropped handle frees its CPUs only whenever the last reference goes); the
        coordinator (no CPUs) stays held, so a `status()` asked just then still gets an answer."""
        if _PRODUCTION.get(name) is held:
            _PRODUCTION[name] = held[:1]
            finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for producer, ref in zip(producers, refs):
                if ref in finished:
                    ray.kill(producer, no_restart=True)

    watch_in_background(coordinator, refs, progress_every, on_done=release)
    return refs


def end_production(buffer_path: str) -> dict[str, Any]:
    """The sweep of this buffer is over: kill the coordinator (and any producer) this driver
    still holds for it, and return the coordinator's last `status()` ({} if it held none). An
    idle coordinator polls its readers' progress files; a driver that runs sweep after sweep (a
    notebook, `sae-ray bench sweep`) would otherwise keep one per buffer."""
    from sae_ray.actors.coordinator import coordinator_name

    held = _PRODUCTION.pop(coordinator_name(buffer_path), [])
    status = ray.get(held[0].status.remote(), timeout=30) if held else {}
    for handle in held:
        ray.kill(handle, no_restart=True)
    return status


def _check_not_consumed(buffer: ActivationBuffer) -> None:
    """A complete buffer whose bounded window dropped shards was a stream: most of its rows are gone."""
    dropped = buffer.dropped()
    if dropped:
        raise ConfigError([
            f"buffer.path: value {buffer.path!r}: a complete buffer produced with a bounded window (buffer.max_gb); "
            f"{len(dropped)} of its shards ({sum(dropped.values()):,} rows) were dropped once read, so it cannot be "
            "reused: choose another buffer.path (or workdir), or delete this one"], "buffer")


def rows_committed_by_rank(buffer: ActivationBuffer, n_producers: int) -> list[int]:
    """Rows each producer rank already committed (a shard's rows all come from one rank: doc_index % n),
    shards dropped by the bounded window included."""
    before = buffer.production().get("producers")
    if buffer.committed() and before != n_producers:
        raise ConfigError([
            f"producers.count: value {n_producers}: the unfinished buffer {buffer.path} was produced by {before} "
            f"producers; resume it with producers.count={before} (the documents are split by producer count)"], "buffer")
    return committed_rows_by_rank(buffer, n_producers)


def run_cache(cfg: RunConfig, address: str | None = None, plan: Plan | None = None) -> list[dict[str, Any]]:
    """Produce the buffer only (`sae-ray cache`): preflight, create or reopen the buffer, run the
    producers with a progress line, wait. Returns per producer: rank, rows, shards, seconds,
    tokens_per_s (rows/s of that producer), resumed_after_rows. A complete buffer is reused at once
    ([]); an unfinished one is resumed. buffer.max_gb does not apply: a cache keeps every shard.
    """
    from sae_ray.actors.coordinator import coordinator_name
    from sae_ray.actors.watch import watch

    start = time.perf_counter()
    cfg = cfg.with_absolute_paths()
    plan = plan or preflight(cfg, address=address, window=False)  # raises before Ray starts
    try:
        buffer = ActivationBuffer.open(cfg.buffer_path())
    except (FileNotFoundError, ValueError):
        buffer = None  # absent, or its creation was interrupted: start_production creates or repairs it
    if buffer is not None and buffer.is_complete():
        _check_not_consumed(buffer)
        print(f"[sae-ray] reusing complete buffer {buffer.path} ({buffer.n_rows():,} rows)")
        return []
    if cfg.buffer.max_gb is not None:
        print(f"[sae-ray] buffer.max_gb={cfg.buffer.max_gb} is ignored by cache: a cache keeps every shard")
    connect_ray(cfg, address)
    name = coordinator_name(cfg.buffer_path())
    refs = start_production(cfg, plan, bounded=False, progress_every=None)
    held = list(_PRODUCTION.get(name, []))  # our own handles: the coordinator lives until we are done with it
    try:
        stats = watch(held[0], refs) if refs else []
    except BaseException:
        _PRODUCTION.pop(name, None)
        for handle in held:  # a failed run stops writing at once
            ray.kill(handle, no_restart=True)
        raise
    with_rates(stats)
    rows = sum(s["rows"] for s in stats)
    print(f"[sae-ray] buffer {cfg.buffer_path()}: {rows:,} rows produced in {time.perf_counter() - start:.0f}s")
    return stats


def with_rates(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Producer results with tokens_per_s (rows per second of that producer) added, in place."""
    for s in stats:
        s["tokens_per_s"] = s["rows"] / max(s["seconds"], 1e-9)
    return stats
