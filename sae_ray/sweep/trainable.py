"""One Tune trial: train a stack of SAEs (or one) from the buffer, log each to MLflow, register each.

The Ray-facing part is only `tune.report`; the rest is the core (reader, training loop,
evaluation) plus tracking. Every SAE of the stack gets its own MLflow child run and
registered version, exactly as if it had been trained alone.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from ray import tune

from sae_ray import tracking
from sae_ray.buffer import ActivationBuffer, BufferReader
from sae_ray.config import RunConfig
from sae_ray.devices import pick_device
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.formats import save_saelens
from sae_ray.sae import create_sae
from sae_ray.sweep.plan import Stack
from sae_ray.train.loop import train_sae
from sae_ray.train.memory import keep_freed_memory


def train_trial(config: dict[str, Any]) -> None:
    """Tune function trainable. config: {"stack": `Stack.to_dict()` (trials sharing architecture,
    d_sae, hook), "run": RunConfig dump, "experiment_id", "parent_run_id"}."""
    cfg = RunConfig.model_validate(config["run"])
    stack = Stack.from_dict(config["stack"])
    hook = stack.hook
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    cfgs = stack.sae_configs(cfg)
    sae = create_sae(cfgs[0] if len(cfgs) == 1 else cfgs).to(device)

    uri = cfg.tracking_uri()
    client = tracking.client_for(uri)
    buffer = ActivationBuffer.open(cfg.buffer_path())
    if cfg.train.wait_for_buffer:
        _wait_complete(buffer)
    run_ids = []
    for t in stack.trials:
        run_id = tracking.start_run(uri, config["experiment_id"], t.name, config["parent_run_id"], tags={
            "sae_ray.hook": hook, "sae_ray.architecture": t.architecture, "sae_ray.stack": stack.name,
            # whether this trial streamed (started before production finished) is worth seeing later
            "sae_ray.buffer_rows_at_start": str(buffer.n_rows()),
            "sae_ray.buffer_complete_at_start": str(buffer.is_complete()),
        })
        tracking.log_params(client, run_id, {"trial": {**t.tags(), "hook_layer": t.hook_layer}, "config": config["run"]})
        run_ids.append(run_id)
    # Final figures are computed on fixed, reproducible rows: the first rows of the lowest shard
    # committed when the trial starts. Read them now: a windowed buffer may drop that shard later.
    eval_shard, x_eval = _eval_rows(buffer, hook, cfg.train.eval_rows)
    reader_id = f"trial-{run_ids[0]}" if cfg.buffer.max_gb else None  # the coordinator drops shards all readers passed
    reader = BufferReader(buffer, hook, cfg.train.batch_size, seed=cfg.train.seed,
                          on_corrupt=cfg.buffer.on_corrupt, reader_id=reader_id)

    names = [t.name for t in stack.trials]

    def on_log(step: int, metrics: list[dict[str, float]]) -> None:
        for run_id, m in zip(run_ids, metrics):
            tracking.log_metrics(client, run_id, m, step)
        tune.report({"members": names, "per_member": metrics})

    try:
        try:
            state = train_sae(sae, iter(reader), cfg.train, on_log=on_log)
        finally:
            reader.close()
        saes = sae.unstack() if len(cfgs) > 1 else [sae]
        x = x_eval.to(device)
        finals = []
        for i, (t, member, run_id) in enumerate(zip(stack.trials, saes, run_ids)):
            final = evaluate_sae(member, x)
            final["eval_dead_fraction"] = final.pop("dead_fraction")  # never fired on the eval rows
            final["dead_fraction"] = state.dead_fraction[i]  # silent for train.dead_tokens tokens at the end
            final.update(tokens_seen=state.tokens_seen, steps=state.step, train_seconds=state.seconds,
                         train_tokens_per_s=state.tokens_seen / max(state.seconds, 1e-9), input_scale=state.input_scale,
                         skipped_shards=reader.shards_skipped, skipped_rows=reader.rows_skipped)  # buffer.on_corrupt: skip
            tracking.log_metrics(client, run_id, {f"final/{k}": v for k, v in final.items()}, state.step)
            member.cfg.extra.update(eval_shard=eval_shard, eval_rows=len(x), fvu=final["fvu"], l0=final["l0"],
                                    tokens_seen=state.tokens_seen)
            with tempfile.TemporaryDirectory() as tmp:
                save_saelens(member, tmp)
                client.log_artifacts(run_id, tmp, tracking.SAE_ARTIFACT_PATH)
            version = None
            if cfg.tracking.register_models:
                tags = {
                    **t.tags(), "l0": round(final["l0"], 4), "fvu": round(final["fvu"], 6),
                    "dead_fraction": round(final["dead_fraction"], 6), "tokens_seen": state.tokens_seen,
                    "eval_shard": eval_shard, "eval_rows": len(x), "run_id": run_id,
                }
                version = tracking.register_sae(client, tracking.registry_name(cfg.model.name, hook), run_id, tags)
            client.set_terminated(run_id)
            finals.append({**final, "mlflow_run_id": run_id, "registered_version": version or ""})
    except BaseException:
        for run_id in run_ids:
            client.set_terminated(run_id, status="FAILED")
        raise
    tune.report({"members": names, "final": finals})


def _eval_rows(buffer: ActivationBuffer, hook: str, n: int, timeout: float = 600.0) -> tuple[int, torch.Tensor]:
    """(shard id, float32 [<= n, d_in]): the first rows of the lowest committed shard, once there is one."""
    start = time.monotonic()
    while not (committed := buffer.committed()):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"buffer {buffer.path}: no shard committed within {timeout:.0f}s")
        time.sleep(0.5)
    shard = min(committed)
    return shard, torch.as_tensor(buffer.read_rows(hook, shard, 0, min(n, committed[shard]))).float()


def _wait_complete(buffer: ActivationBuffer, timeout: float = 24 * 3600) -> None:
    start = time.monotonic()
    while not buffer.is_complete():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"buffer {buffer.path} did not complete within {timeout:.0f}s")
        time.sleep(1.0)
