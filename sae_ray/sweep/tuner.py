"""Ray Tune wiring for a sweep: production started, one Tune trial per stack, the report.

`run_sweep(cfg)` is what `sae-ray run` and `jobs/sweep.py` call:

1. preflight (unless given a plan): every problem is found before Ray starts;
2. the sweep record (`sweep.resume`): an unfinished sweep of this config is resumed (its
   parent MLflow run and Tune experiment), unless `fresh`; else the parent MLflow run is
   new, with the whole resolved config as params;
3. Ray: joins RAY_ADDRESS or `address`, else starts a local Ray;
4. production starts (`sweep.production`); trials start as soon as shards are committed;
5. Tune runs `train_trial` once per `Stack` of the plan, or as `sweep.search` draws them
   (`sweep.search`), restarting a trial whose worker died from its checkpoint
   (`resources.max_failures`), failing the sweep once the custom resources it needs have been
   gone from every alive node for `resources.lost_resource_timeout_s`; a resumed sweep restores the experiment (`Tuner.restore`):
   finished trials are not run again, the others go on from their checkpoints;
6. with a bounded window, the producers are told to stop once the trials are done;
7. child runs still RUNNING (a trial the scheduler stopped, a worker that died for good)
   are closed as KILLED with the reason; the summary rows (one per SAE), the report and the
   aliases go into the parent run; a failed trial fails the sweep with one line per failure;
   the record is marked finished.

If the driver dies of an error, the parent run and every child run still open end FAILED. If
it gets SIGTERM (`ray job stop` sends it, and SIGKILL RAY_JOB_STOP_WAIT_TIME_S = 3 s later),
the signal handler first ends them all KILLED, then raises `SweepStopped`; the record stays
"running", so running the same config again resumes the sweep.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune

from sae_ray import tracking
from sae_ray.config import RunConfig
from sae_ray.preflight import Plan, available_resources, custom_resource_problem, preflight
from sae_ray.sweep import SweepError, SweepStopped
from sae_ray.sweep import resume
from sae_ray.sweep.plan import sort_rows, summary_row
from sae_ray.actors.evaluator import evaluate_sweep
from sae_ray.sweep.production import connect_ray, end_production, start_production, with_rates
from sae_ray.sweep.search import param_space as search_space
from sae_ray.sweep.search import stack_of, trial_name, trial_resources, tune_parts
from sae_ray.sweep.trainable import train_trial
from sae_ray.tracking.report import log_summary


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    """One summary row per SAE (`plan.summary_row`)."""
    producer_stats: list[dict[str, Any]] = field(default_factory=list)
    """Per producer: rows, shards, seconds, tokens_per_s (empty when the buffer was reused)."""
    parent_run_id: str = ""
    seconds: float = 0.0
    production: dict[str, Any] = field(default_factory=dict)
    """The buffer coordinator's last `status()` (committed rows, window, drops, window_overflows);
    empty when the buffer was reused."""


class ProgressPrinter(tune.Callback):
    """One console line per reported step of each trial, instead of Tune's wide tables."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        names = result.get("members", [])
        for m in result.get("per_member", []):
            print(f"[{names[m['member']]}] tokens {int(m['tokens']):>9,}  fvu {m['fvu']:.3f}  l0 {m['l0']:7.1f}  "
                  f"dead {m['dead_fraction']:.3f}  {m['tokens_per_s']:,.0f} tok/s", flush=True)
        for name, m in zip(names, result.get("final", [])):
            if m["verdict"] == "stopped":
                print(f"[{name}] stopped: {m['reasons']}", flush=True)
                continue
            why = f" ({m['reasons']})" if m["reasons"] else ""
            print(f"[{name}] done: fvu {m['fvu']:.4f}  l0 {m['l0']:.1f}  {m['verdict']}{why}  "
                  f"registered version {m['registered_version'] or '-'}", flush=True)


class ProductionWatcher(tune.Callback):
    """Fail the sweep as soon as a producer fails, rather than leave trials waiting for shards that never come."""

    def __init__(self, producing: list):
        self.pending = list(producing)

    def __getstate__(self) -> dict:
        """Tune saves its callbacks with the experiment; a producer's ref means nothing to a later
        driver (a resumed sweep gets its own watcher), so it is not saved."""
        return {"pending": []}

    def on_step_begin(self, iteration, trials, **info):
        if self.pending:
            ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            ray.get(ready)  # re-raises a producer's error here, in the driver


class ResourceWatcher(tune.Callback):
    """Fail the sweep once no alive node has offered a custom resource it still needs for
    `resources.lost_resource_timeout_s` (the nodes with it died, and none joined), naming the
    resource and what the nodes offer, rather than leave Ray waiting for it for ever: the trials'
    `resources.trial_resources` always, the producers' `producers.resources` while they produce."""

    CHECK_EVERY_S = 1.0
    """Seconds between two looks at the cluster's nodes."""

    def __init__(self, cfg: RunConfig, producing: list):
        needs = [("resources.trial_resources", dict(cfg.resources.trial_resources), None),
                 ("producers.resources", dict(cfg.producers.resources), list(producing))]
        self.needs = [n for n in needs if n[1]]  # no custom resources (a local Ray): nothing to watch
        self.timeout = cfg.resources.lost_resource_timeout_s
        self.missing_since: dict[str, float] = {}
        self.checked = 0.0

    def __getstate__(self) -> dict:
        """As ProductionWatcher's: the producers' refs are not saved with the experiment."""
        return {**self.__dict__, "needs": [(f, c, None if refs is None else []) for f, c, refs in self.needs]}

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if not self.needs or self.timeout is None or now - self.checked < self.CHECK_EVERY_S:
            return
        self.checked = now
        nodes = available_resources()["nodes"]
        for field, custom, producing in self.needs:
            if producing is not None:  # the producers' resources matter only while they produce
                producing[:] = ray.wait(producing, num_returns=len(producing), timeout=0)[1]
                if not producing:
                    continue
            problem = custom_resource_problem(field, custom, nodes)
            if not problem:
                self.missing_since.pop(field, None)
                continue
            if now - self.missing_since.setdefault(field, now) >= self.timeout:
                raise SweepError(f"{problem}, for {self.timeout:g} s (resources.lost_resource_timeout_s): the nodes that "
                                 "had it are gone and none joined; run the same config again to resume the sweep once a "
                                 "node offers it")


def run_sweep(cfg: RunConfig, address: str | None = None, plan: Plan | None = None, fresh: bool = False) -> SweepResult:
    """Run (or resume) the sweep of `cfg`; `fresh`: start a new sweep even if one of this config
    did not finish (that one's open runs are closed as KILLED; nothing is deleted)."""
    start = time.perf_counter()
    cfg = cfg.with_absolute_paths()
    plan = plan or preflight(cfg, address=address)  # raises before Ray starts
    record = resume.open_sweep(cfg, fresh)  # raises if an unfinished sweep's config differs
    workdir = cfg.workdir_path()
    workdir.mkdir(parents=True, exist_ok=True)

    uri = cfg.tracking_uri()
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.artifact_location())
    client = tracking.client_for(uri)
    old = resume.unfinished(cfg) if fresh else None
    if record is not None:
        parent_run_id, tune_path = record["parent_run_id"], record["tune_path"]
        tracking.retry(lambda: client.update_run(parent_run_id, status="RUNNING"))
        print(f"[sae-ray] resuming sweep {cfg.name!r}: MLflow run {parent_run_id}, Tune experiment {tune_path}")
    else:
        parent_run_id = tracking.start_run(uri, experiment_id, cfg.name, tags={"sae_ray.kind": "sweep"})
        tracking.log_params(client, parent_run_id, cfg.model_dump(mode="json"))
        tune_path = str(workdir / "tune" / f"{cfg.name}-{parent_run_id[:8]}")
        if old is not None:  # --fresh: the unfinished sweep is closed, not deleted
            why = f"superseded by --fresh sweep {parent_run_id}"
            tracking.close_open_runs(client, experiment_id, old["parent_run_id"], "KILLED", why)
            client.set_tag(old["parent_run_id"], "sae_ray.closed", why)
            client.set_terminated(old["parent_run_id"], status="KILLED")
    resume.write_record(cfg, "running", parent_run_id, tune_path)
    print(f"[sae-ray] {len(plan.trials)} SAEs in {len(plan.stacks)} trials on {list(plan.hooks)}; "
          f"MLflow {uri} run {parent_run_id}")

    def close_all(status: str, why: str) -> None:
        """End the parent run and every child run still open as `status`, with `why`."""
        tracking.close_open_runs(client, experiment_id, parent_run_id, status, why)
        client.set_tag(parent_run_id, "sae_ray.closed", why)
        client.set_terminated(parent_run_id, status=status)

    stop_reason = "the sweep was stopped (SIGTERM, e.g. ray job stop); run the same config again to resume it"
    stopped: list[bool] = []

    def stop() -> None:
        stopped.append(True)
        close_all("KILLED", stop_reason)

    try:
        connect_ray(cfg, address)
        # after ray.init, which sets a SIGTERM handler of its own (sys.exit)
        with _on_sigterm(stop, stop_reason):
            client.set_tag(parent_run_id, "sae_ray.ray_address", ray.get_runtime_context().gcs_address)
            producing = start_production(cfg, plan)
            trainable = tune.with_resources(train_trial, trial_resources(cfg))
            param_space = {**search_space(cfg, plan.stacks), "run": cfg.model_dump(mode="json"),
                           "experiment_id": experiment_id, "parent_run_id": parent_run_id}
            callbacks = [ProgressPrinter(), ProductionWatcher(producing), ResourceWatcher(cfg, producing)]
            if record is not None and tune.Tuner.can_restore(tune_path):
                # callbacks are not saved with the experiment; the restored run gets this driver's
                tuner = tune.Tuner.restore(tune_path, trainable, param_space=param_space,
                                           resume_unfinished=True, resume_errored=True)
                tuner._local_tuner.get_run_config().callbacks = callbacks  # Tune has no public setter
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space,
                    # reuse_actors: a trial starts in the worker the last one left (torch and sae-ray
                    # already imported, memory kept), not in a fresh process; every trial asks the same
                    tune_config=tune.TuneConfig(**tune_parts(cfg)._asdict(), reuse_actors=True,
                                                trial_name_creator=lambda t: trial_name(t.config),
                                                trial_dirname_creator=lambda t: f"{t.trial_id}"),
                    run_config=tune.RunConfig(
                        name=tune_path.rsplit("/", 1)[1], storage_path=tune_path.rsplit("/", 1)[0], verbose=0, callbacks=callbacks,
                        failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
                )
            results = tuner.fit()
            if cfg.buffer.max_gb:  # a window: producers may be waiting for readers that have finished
                from sae_ray.actors.coordinator import stop_production

                stop_production(cfg.buffer_path())
            producer_stats = with_rates(ray.get(producing))
            production = end_production(cfg.buffer_path())  # the buffer is done: its coordinator is not needed
            tracking.close_open_runs(client, experiment_id, parent_run_id, "KILLED",
                                     "its trial ended without closing it (stopped by the scheduler, or its worker died)")
            failed = [r for r in results if r.error is not None]
            rows = sort_rows([summary_row(t, m) for r in results if r.error is None
                              for t, m in zip(stack_of(r.config).trials, _finals(r.metrics or {}, len(stack_of(r.config).trials)))])
            if cfg.eval.lm and rows:  # LM-level figures of every trained SAE: one task per hook (eval.lm)
                print(f"[sae-ray] LM-level evaluation of {sum(r['l0'] is not None for r in rows)} SAEs on "
                      f"{cfg.eval.tokens:,} held-out tokens per hook")
                lm = evaluate_sweep(cfg, rows)
                for row in rows:
                    row.update(lm.get(row["mlflow_run_id"], {}))
            log_summary(client, parent_run_id, rows, producer_stats, cfg.model.name, cfg.tracking.register_models)
            if failed:
                lines = [f"  {stack_of(r.config).name}: {error_line(r.error)}" for r in failed]
                raise SweepError(f"{len(failed)} of {len(results)} trials failed:\n" + "\n".join(lines))
            client.set_terminated(parent_run_id)
            resume.write_record(cfg, "finished", parent_run_id, tune_path)
    except BaseException as e:
        if stopped:  # its runs are closed already; Tune may have wrapped the SweepStopped in an error of its own
            if isinstance(e, SweepStopped):
                raise
            raise SweepStopped(stop_reason) from e
        try:
            close_all("FAILED", f"the sweep failed: {error_line(e)}")
        except Exception as e2:  # noqa: BLE001 - the tracking store is down too: the first error is the one to see
            print(f"[sae-ray] could not close the sweep's MLflow runs: {error_line(e2)}", flush=True)
        raise
    return SweepResult(rows, producer_stats, parent_run_id, time.perf_counter() - start, production)


@contextmanager
def _on_sigterm(on_stop: Callable[[], None], why: str) -> Iterator[None]:
    """While inside: SIGTERM calls on_stop() and raises SweepStopped(why), instead of ending the
    process at once with nothing closed. Only the main thread can take signals (a notebook's
    sweep in a thread keeps the default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM ends the process at once
        try:
            on_stop()
        except Exception as e:  # noqa: BLE001 - stop anyway; a resumed sweep reopens its runs
            print(f"[sae-ray] could not close the sweep's MLflow runs: {error_line(e)}", flush=True)
        raise SweepStopped(why)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)


def _finals(metrics: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """A finished trial's per-SAE final figures; for a trial the scheduler (ASHA) stopped before
    its end, n rows that say so (no figures: it was not evaluated or registered)."""
    if "final" in metrics:
        return metrics["final"]
    tokens = int(metrics.get("tokens") or 0)
    return [{"l0": None, "fvu": None, "dead_fraction": None, "tokens_seen": tokens, "train_tokens_per_s": None,
             "verdict": "stopped", "reasons": f"scheduler: trailing at {tokens:,} tokens", "target_l0": None,
             "coefficient": None, "registered_version": "", "mlflow_run_id": ""} for _ in range(n)]


def error_line(error: BaseException) -> str:
    """The root cause of a trial's error as one line, `Type: message` (Ray wraps it in
    RayTaskError / TuneError layers whose text is a whole remote traceback)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None) or error.__cause__
        if not isinstance(cause, BaseException):
            break
        error = cause
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"
