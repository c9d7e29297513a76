"""One Tune trial: train one SAE from the buffer, log it to MLflow, register it.

The Ray-facing part is only `tune.report`; the rest is the core (reader, training loop,
evaluation) plus tracking.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from ray import tune

from sae_ray import tracking
from sae_ray.buffer import ActivationBuffer, BufferReader
from sae_ray.config import RunConfig
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.sae import SAEConfig, create_sae
from sae_ray.train.loop import pick_device, train_sae


def trial_name(trial: dict[str, Any]) -> str:
    """e.g. 'topk-d3072-k32@blocks.3.hook_resid_post'."""
    sparsity = f"k{trial['k']}" if trial.get("k") is not None else f"l1_{trial.get('l1_coefficient')}"
    return f"{trial['architecture']}-d{trial['d_sae']}-{sparsity}@{trial['hook']}"


def train_trial(config: dict[str, Any]) -> None:
    """Tune function trainable. config: {"trial": one grid point, "run": RunConfig dump,
    "experiment_id", "parent_run_id", "hooks": {hook name: d_in}}."""
    cfg = RunConfig.model_validate(config["run"])
    trial = config["trial"]
    hook = trial["hook"]
    d_in = config["hooks"][hook]
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)

    sae_cfg = SAEConfig(
        architecture=trial["architecture"],
        d_in=d_in,
        d_sae=trial["d_sae"],
        k=trial.get("k"),
        l1_coefficient=trial.get("l1_coefficient"),
        model_name=cfg.model.name,
        hook_name=hook,
        hook_layer=trial.get("hook_layer", -1),
        context_size=cfg.data.context_size,
        dataset_path=cfg.data.path,
        extra={"dead_tokens_threshold": cfg.train.dead_tokens},
    )
    sae = create_sae(sae_cfg).to(device)

    uri = cfg.tracking_uri()
    client = tracking.client_for(uri)
    run_id = tracking.start_run(uri, config["experiment_id"], trial_name(trial), config["parent_run_id"],
                                tags={"sae_ray.hook": hook, "sae_ray.architecture": trial["architecture"]})
    tracking.log_params(client, run_id, {"trial": trial, "config": config["run"]})

    buffer = ActivationBuffer.open(cfg.buffer_path())
    if cfg.train.wait_for_buffer:
        _wait_complete(buffer)
    reader = BufferReader(buffer, hook, cfg.train.batch_size, seed=cfg.train.seed)
    # Whether this trial streamed (started before production finished) is worth seeing later.
    client.set_tag(run_id, "sae_ray.buffer_rows_at_start", str(buffer.n_rows()))
    client.set_tag(run_id, "sae_ray.buffer_complete_at_start", str(buffer.is_complete()))

    def on_log(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(client, run_id, metrics, step)
        tune.report(metrics)

    try:
        state = train_sae(sae, iter(reader), cfg.train.total_tokens, lr=cfg.train.lr, adam_betas=cfg.train.adam_betas,
                          dead_tokens=cfg.train.dead_tokens, log_every=cfg.train.log_every, on_log=on_log)

        # Final figures on a fixed, reproducible set of rows: the first rows of the lowest committed shard.
        committed = buffer.committed()
        eval_shard = min(committed)
        x = torch.as_tensor(buffer.read_rows(hook, eval_shard, 0, min(cfg.train.eval_rows, committed[eval_shard])))
        x = x.float().to(device)
        final = evaluate_sae(sae, x)
        final["eval_dead_fraction"] = final.pop("dead_fraction")  # never fired on the eval rows
        final["dead_fraction"] = state.dead_fraction  # silent for train.dead_tokens tokens at the end of training
        final.update(tokens_seen=state.tokens_seen, steps=state.step, train_seconds=state.seconds,
                     train_tokens_per_s=state.tokens_seen / max(state.seconds, 1e-9))
        tracking.log_metrics(client, run_id, {f"final/{k}": v for k, v in final.items()}, state.step)

        sae.cfg.extra.update(eval_shard=eval_shard, eval_rows=len(x), fvu=final["fvu"], l0=final["l0"],
                             tokens_seen=state.tokens_seen)
        with tempfile.TemporaryDirectory() as tmp:
            sae.save(tmp)
            client.log_artifacts(run_id, tmp, tracking.SAE_ARTIFACT_PATH)
        version = None
        if cfg.tracking.register_models:
            tags = {
                "architecture": trial["architecture"], "d_sae": trial["d_sae"], "d_in": d_in,
                "expansion_factor": trial["expansion_factor"], "hook": hook,
                "l0": round(final["l0"], 4), "fvu": round(final["fvu"], 6), "dead_fraction": round(final["dead_fraction"], 6),
                "tokens_seen": state.tokens_seen, "eval_shard": eval_shard, "eval_rows": len(x), "run_id": run_id,
            }
            tags.update({p: trial[p] for p in ("k", "l1_coefficient") if trial.get(p) is not None})
            version = tracking.register_sae(client, tracking.registry_name(cfg.model.name, hook), run_id, tags)
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    tune.report({**{f"final_{k}": v for k, v in final.items()}, "mlflow_run_id": run_id,
                 "registered_version": version or ""})


def _wait_complete(buffer: ActivationBuffer, timeout: float = 24 * 3600) -> None:
    import time

    start = time.monotonic()
    while not buffer.is_complete():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"buffer {buffer.path} did not complete within {timeout:.0f}s")
        time.sleep(1.0)
