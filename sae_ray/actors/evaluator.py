"""The sweep's LM-level evaluation as Ray tasks: one per hook, placed like a producer (it runs
the model), each calling `sae_ray.eval.run.evaluate_runs`. A thin shell: the work is there."""

from __future__ import annotations

from typing import Any

import ray

from sae_ray.config import RunConfig


@ray.remote(max_retries=1)
def _evaluate(cfg: dict, hook: str, runs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    from sae_ray.devices import pick_device
    from sae_ray.eval.run import evaluate_runs

    run_cfg = RunConfig.model_validate(cfg)
    return evaluate_runs(run_cfg, hook, runs, device=str(pick_device(run_cfg.model.device)),
                         log=lambda line: print(f"[sae-ray] {hook}: {line}", flush=True))


def evaluate_sweep(cfg: RunConfig, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{mlflow run id: headline LM figures} for the summary rows that trained an SAE (l0 not None),
    one task per hook (eval.num_cpus, else a producer's CPUs; a producer's GPU share and custom
    resources); {} when
    eval.lm is off."""
    if not cfg.eval.lm:
        return {}
    by_hook: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        if row["l0"] is not None and row["mlflow_run_id"]:
            by_hook.setdefault(row["hook"], []).append((row["mlflow_run_id"], row["version"] or ""))
    task = _evaluate.options(num_cpus=cfg.eval.num_cpus or cfg.producers.num_cpus, num_gpus=cfg.producers.num_gpus,
                             resources=dict(cfg.producers.resources) or None)  # runs the model: where producers run
    refs = [task.remote(cfg.model_dump(mode="json"), hook, runs) for hook, runs in by_hook.items()]
    out: dict[str, dict[str, Any]] = {}
    for part in ray.get(refs):
        out.update(part)
    return out
