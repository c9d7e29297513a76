"""Ray wiring for a sweep: the buffer's producers and coordinator, then one Tune trial per SAE.

`run_sweep(cfg)` is what `sae-ray run` and `jobs/sweep.py` call. It validates everything
(preflight) before Ray starts, connects to a cluster when one is given (RAY_ADDRESS, or
`address=`) and otherwise starts a local Ray.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from sae_ray import tracking
from sae_ray.buffer import ActivationBuffer
from sae_ray.config import RunConfig, pack_stacks
from sae_ray.preflight import Plan, preflight
from sae_ray.sweep.trainable import member_name, stack_name, train_trial

SUMMARY_COLUMNS = ["sae", "architecture", "d_sae", "k", "l1_coefficient", "l0_coefficient", "l0", "fvu",
                   "dead_fraction", "tokens_seen", "train_tokens_per_s", "version"]


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    """One summary row per trial (see SUMMARY_COLUMNS)."""
    producer_stats: list[dict[str, Any]] = field(default_factory=list)
    """Per producer: rows, shards, seconds, tokens_per_s (empty when the buffer was reused)."""
    parent_run_id: str = ""
    seconds: float = 0.0


class ProgressPrinter(tune.Callback):
    """One console line per reported step of each trial, instead of Tune's wide tables."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for name, m in zip(result.get("members", []), result.get("per_member", [])):
            print(f"[{name}] tokens {int(m['tokens']):>9,}  fvu {m['fvu']:.3f}  l0 {m['l0']:7.1f}  "
                  f"dead {m['dead_fraction']:.3f}  {m['tokens_per_s']:,.0f} tok/s", flush=True)
        for name, m in zip(result.get("members", []), result.get("final", [])):
            print(f"[{name}] done: fvu {m['fvu']:.4f}  l0 {m['l0']:.1f}  "
                  f"registered version {m['registered_version'] or '-'}", flush=True)


class ProductionWatcher(tune.Callback):
    """Fail the sweep as soon as a producer fails, rather than leave trials waiting for shards that never come."""

    def __init__(self, producing: list):
        self.pending = list(producing)

    def on_step_begin(self, iteration, trials, **info):
        if self.pending:
            ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            ray.get(ready)  # re-raises a producer's error here, in the driver


def connect_ray(address: str | None = None) -> None:
    """Join the cluster in `address` or RAY_ADDRESS (a `ray job submit` entrypoint has it); else start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}} if not address else None)


def start_production(cfg: RunConfig, plan: Plan, bounded: bool = True, progress_every: float | None = 10.0) -> list:
    """Create (or reopen) the buffer and start the coordinator and the producers; returns the
    producers' `run` refs ([] when the buffer is already complete).

    bounded: apply buffer.max_gb (the streaming window; a cache run keeps everything).
    progress_every: print a progress line this often from a background thread (None: don't).
    A producer whose process dies is restarted (producers.max_restarts) and resumes after the
    rows it committed; the coordinator restarts without limit and rebuilds from the buffer.
    """
    from sae_ray.actors.coordinator import coordinator_name, start_coordinator
    from sae_ray.actors.producer import TEST_DELAY_ENV, ActivationProducer
    from sae_ray.actors.watch import watch_in_background

    b = cfg.buffer
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
    max_gb = b.max_gb if bounded else None
    buffer.set_window(None if max_gb is None else int(max_gb * 1e9))  # readers of a window read each shard once
    readers = len(pack_stacks(plan.trials, cfg.sae.max_stack)) if max_gb else 1
    coordinator = start_coordinator(cfg.buffer_path(), b.n_tokens, n, max_gb, readers)
    p = cfg.producers
    options = dict(num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_restarts=p.max_restarts, max_task_retries=-1)
    if os.environ.get(TEST_DELAY_ENV):
        options["runtime_env"] = {"env_vars": {TEST_DELAY_ENV: os.environ[TEST_DELAY_ENV]}}
    producers = [ActivationProducer.options(**options).remote(cfg.model_dump(mode="json"), rank, n, name)
                 for rank in range(n)]
    held = _PRODUCTION[name] = [coordinator, *producers]  # held while producing, so that Ray keeps (and restarts) them
    refs = [pr.run.remote() for pr in producers]

    def release() -> None:  # once the producers are done, their resources go back to the trials
        if _PRODUCTION.get(name) is held:
            del _PRODUCTION[name]

    watch_in_background(coordinator, refs, progress_every, on_done=release)
    return refs


_PRODUCTION: dict[str, list] = {}
"""Coordinator name -> [coordinator, *producers] of the production this driver runs."""


def _check_not_consumed(buffer: ActivationBuffer) -> None:
    """A complete buffer whose bounded window dropped shards was a stream: most of its rows are gone."""
    dropped = buffer.dropped()
    if dropped:
        raise ValueError(
            f"buffer.path: value {buffer.path!r}: a complete buffer produced with a bounded window (buffer.max_gb); "
            f"{len(dropped)} of its shards ({sum(dropped.values()):,} rows) were dropped once read, so it cannot be "
            "reused: choose another buffer.path (or workdir), or delete this one")


def rows_committed_by_rank(buffer: ActivationBuffer, n_producers: int) -> list[int]:
    """Rows each producer rank already committed (a shard's rows all come from one rank: doc_index % n),
    shards dropped by the bounded window included."""
    from sae_ray.actors.ledger import committed_rows_by_rank

    before = buffer.production().get("producers")
    if buffer.committed() and before != n_producers:
        raise ValueError(
            f"producers.count: value {n_producers}: the unfinished buffer {buffer.path} was produced by {before} "
            f"producers; resume it with producers.count={before} (the documents are split by producer count)")
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
    plan = plan or preflight(cfg)  # raises before Ray starts
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
    connect_ray(address)
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
    for s in stats:
        s["tokens_per_s"] = s["rows"] / max(s["seconds"], 1e-9)
    rows = sum(s["rows"] for s in stats)
    print(f"[sae-ray] buffer {cfg.buffer_path()}: {rows:,} rows produced in {time.perf_counter() - start:.0f}s")
    return stats


def run_sweep(cfg: RunConfig, address: str | None = None, plan: Plan | None = None) -> SweepResult:
    start = time.perf_counter()
    cfg = cfg.with_absolute_paths()
    plan = plan or preflight(cfg)  # raises before Ray starts
    workdir = cfg.workdir_path()
    workdir.mkdir(parents=True, exist_ok=True)

    uri = cfg.tracking_uri()
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.artifact_location())
    client = tracking.client_for(uri)
    parent_run_id = tracking.start_run(uri, experiment_id, cfg.name, tags={"sae_ray.kind": "sweep"})
    tracking.log_params(client, parent_run_id, cfg.model_dump(mode="json"))
    stacks = pack_stacks(plan.trials, cfg.sae.max_stack)
    print(f"[sae-ray] {len(plan.trials)} SAEs in {len(stacks)} trials on {list(plan.hooks)}; MLflow {uri} run {parent_run_id}")

    try:
        connect_ray(address)
        client.set_tag(parent_run_id, "sae_ray.ray_address", ray.get_runtime_context().gcs_address)
        producing = start_production(cfg, plan)
        r = cfg.resources
        trainable = tune.with_resources(train_trial, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
        param_space = {
            "stack": tune.grid_search(stacks),
            "run": cfg.model_dump(mode="json"),
            "hooks": plan.hooks,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=r.max_concurrent_trials,
                                        trial_name_creator=lambda t: stack_name(t.config["stack"]),
                                        trial_dirname_creator=lambda t: f"{t.trial_id}"),
            run_config=tune.RunConfig(name=f"{cfg.name}-{parent_run_id[:8]}", storage_path=str(workdir / "tune"),
                                      verbose=0, callbacks=[ProgressPrinter(), ProductionWatcher(producing)]),
        )
        results = tuner.fit()
        if cfg.buffer.max_gb:  # a window: producers may be waiting for readers that have finished
            from sae_ray.actors.coordinator import stop_production

            stop_production(cfg.buffer_path())
        producer_stats = ray.get(producing)
        for s in producer_stats:
            s["tokens_per_s"] = s["rows"] / max(s["seconds"], 1e-9)
        errors = [str(r.error) for r in results if r.error is not None]
        rows = [_summary_row(t, m) for r in results if r.error is None
                for t, m in zip(r.config["stack"], (r.metrics or {}).get("final", []))]
        rows.sort(key=lambda row: (row["architecture"], row["d_sae"], row["k"] or 0, row["l1_coefficient"] or 0,
                                   row["l0_coefficient"] or 0))
        _log_summary(client, parent_run_id, rows, producer_stats, cfg)
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(stacks)} trials failed; first error:\n{errors[0]}")
        client.set_terminated(parent_run_id)
    except BaseException:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    return SweepResult(rows, producer_stats, parent_run_id, time.perf_counter() - start)


def _summary_row(trial: dict, m: dict) -> dict[str, Any]:
    return {
        "sae": member_name(trial), "architecture": trial["architecture"], "d_sae": trial["d_sae"],
        "k": trial.get("k"), "l1_coefficient": trial.get("l1_coefficient"), "l0_coefficient": trial.get("l0_coefficient"),
        "hook": trial["hook"], "l0": m["l0"], "fvu": m["fvu"], "dead_fraction": m["dead_fraction"],
        "tokens_seen": m["tokens_seen"], "train_tokens_per_s": m["train_tokens_per_s"],
        "version": m["registered_version"], "mlflow_run_id": m["mlflow_run_id"],
    }


def format_table(rows: list[dict[str, Any]], columns: list[str] = SUMMARY_COLUMNS) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, body)])


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    """L0 (log scale) against FVU, one series per architecture and hook: the sparsity/fidelity frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["architecture"], r["hook"]) for r in rows}):
        pts = sorted((r["l0"], r["fvu"]) for r in rows if (r["architecture"], r["hook"]) == key)
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]} @ {key[1]}")
    ax.set(xscale="log", xlabel="L0 (active latents per token)", ylabel="FVU", title="SAE sweep: L0 vs FVU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_summary(client, run_id: str, rows: list[dict], producer_stats: list[dict], cfg: RunConfig) -> None:
    """The sweep's summary table in the parent run, plus aliases for the best SAE per registered model."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        plot_frontier(rows, Path(tmp, "frontier.png"))
        Path(tmp, "summary.txt").write_text(format_table(rows) + "\n")
        Path(tmp, "summary.json").write_text(json.dumps({"trials": rows, "producers": producer_stats}, indent=2, default=str))
        client.log_artifacts(run_id, tmp)
    if producer_stats:
        total_rows = sum(s["rows"] for s in producer_stats)
        tracking.log_metrics(client, run_id, {
            "buffer_rows": total_rows,
            "producer_tokens_per_s": sum(s["tokens_per_s"] for s in producer_stats),
        }, 0)
    if cfg.tracking.register_models:
        for hook in {row["hook"] for row in rows}:
            mine = [row for row in rows if row["hook"] == hook and row["version"] and row["fvu"] is not None]
            if mine:
                best = min(mine, key=lambda row: row["fvu"])
                name = tracking.registry_name(cfg.model.name, hook)
                tracking.retry(lambda: client.set_registered_model_alias(name, "best-fvu", best["version"]))
