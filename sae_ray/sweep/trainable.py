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
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.sae import ARCHITECTURES, SAEConfig
from sae_ray.train.loop import pick_device, train_sae
from sae_ray.train.memory import keep_freed_memory

SPARSITY_PARAMS = ("k", "l1_coefficient", "l0_coefficient")


def member_name(trial: dict[str, Any]) -> str:
    """e.g. 'topk-d3072-k32@blocks.3.hook_resid_post'."""
    param = next(p for p in SPARSITY_PARAMS if trial.get(p) is not None)
    value = trial[param] if param == "k" else f"{trial[param]:g}"
    short = {"k": "k", "l1_coefficient": "l1_", "l0_coefficient": "l0_"}[param]
    return f"{trial['architecture']}-d{trial['d_sae']}-{short}{value}@{trial['hook']}"


def stack_name(stack: list[dict[str, Any]]) -> str:
    """e.g. 'topk-d3072-k16,k48@blocks.3.hook_resid_post' for a stack of two."""
    if len(stack) == 1:
        return member_name(stack[0])
    names = [member_name(t) for t in stack]
    prefix = names[0].split("-")[0] + "-" + names[0].split("-")[1]
    return prefix + "-" + ",".join(n.split("-")[2].split("@")[0] for n in names) + "@" + stack[0]["hook"]


def sae_configs(stack: list[dict[str, Any]], cfg: RunConfig, d_in: int) -> list[SAEConfig]:
    return [
        SAEConfig(
            architecture=t["architecture"], d_in=d_in, d_sae=t["d_sae"],
            **{p: t[p] for p in SPARSITY_PARAMS if t.get(p) is not None},
            model_name=cfg.model.name, hook_name=t["hook"], hook_layer=t.get("hook_layer", -1),
            context_size=cfg.data.context_size, dataset_path=cfg.data.path,
            extra={"dead_tokens_threshold": cfg.train.dead_tokens, **cfg.sae.extra.get(t["architecture"], {})},
        )
        for t in stack
    ]


def train_trial(config: dict[str, Any]) -> None:
    """Tune function trainable. config: {"stack": [grid points sharing architecture, d_sae, hook],
    "run": RunConfig dump, "experiment_id", "parent_run_id", "hooks": {hook name: d_in}}."""
    cfg = RunConfig.model_validate(config["run"])
    stack = config["stack"]
    hook = stack[0]["hook"]
    d_in = config["hooks"][hook]
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    cfgs = sae_configs(stack, cfg, d_in)
    sae_cls = ARCHITECTURES[cfgs[0].architecture]
    sae = (sae_cls(cfgs[0]) if len(cfgs) == 1 else sae_cls(cfgs)).to(device)

    uri = cfg.tracking_uri()
    client = tracking.client_for(uri)
    buffer = ActivationBuffer.open(cfg.buffer_path())
    if cfg.train.wait_for_buffer:
        _wait_complete(buffer)
    run_ids = []
    for t in stack:
        run_id = tracking.start_run(uri, config["experiment_id"], member_name(t), config["parent_run_id"], tags={
            "sae_ray.hook": hook, "sae_ray.architecture": t["architecture"], "sae_ray.stack": stack_name(stack),
            # whether this trial streamed (started before production finished) is worth seeing later
            "sae_ray.buffer_rows_at_start": str(buffer.n_rows()),
            "sae_ray.buffer_complete_at_start": str(buffer.is_complete()),
        })
        tracking.log_params(client, run_id, {"trial": t, "config": config["run"]})
        run_ids.append(run_id)
    # Final figures are computed on fixed, reproducible rows: the first rows of the lowest shard
    # committed when the trial starts. Read them now: a windowed buffer may drop that shard later.
    eval_shard, x_eval = _eval_rows(buffer, hook, cfg.train.eval_rows)
    reader_id = f"trial-{run_ids[0]}" if cfg.buffer.max_gb else None  # the coordinator drops shards all readers passed
    reader = BufferReader(buffer, hook, cfg.train.batch_size, seed=cfg.train.seed,
                          on_corrupt=cfg.buffer.on_corrupt, reader_id=reader_id)

    def on_log(step: int, metrics: list[dict[str, float]]) -> None:
        for run_id, m in zip(run_ids, metrics):
            tracking.log_metrics(client, run_id, m, step)
        tune.report({"members": [member_name(t) for t in stack], "per_member": metrics})

    try:
        try:
            state = train_sae(sae, iter(reader), cfg.train, on_log=on_log)
        finally:
            reader.close()
        saes = sae.unstack() if len(cfgs) > 1 else [sae]
        x = x_eval.to(device)
        finals = []
        for i, (t, member, run_id) in enumerate(zip(stack, saes, run_ids)):
            final = evaluate_sae(member, x)
            final["eval_dead_fraction"] = final.pop("dead_fraction")  # never fired on the eval rows
            final["dead_fraction"] = state.dead_fraction[i]  # silent for train.dead_tokens tokens at the end
            final.update(tokens_seen=state.tokens_seen, steps=state.step, train_seconds=state.seconds,
                         train_tokens_per_s=state.tokens_seen / max(state.seconds, 1e-9), input_scale=state.input_scale)
            tracking.log_metrics(client, run_id, {f"final/{k}": v for k, v in final.items()}, state.step)
            member.cfg.extra.update(eval_shard=eval_shard, eval_rows=len(x), fvu=final["fvu"], l0=final["l0"],
                                    tokens_seen=state.tokens_seen)
            with tempfile.TemporaryDirectory() as tmp:
                member.save(tmp)
                client.log_artifacts(run_id, tmp, tracking.SAE_ARTIFACT_PATH)
            version = None
            if cfg.tracking.register_models:
                tags = {
                    "architecture": t["architecture"], "d_sae": t["d_sae"], "d_in": d_in,
                    "expansion_factor": t["expansion_factor"], "hook": hook,
                    "l0": round(final["l0"], 4), "fvu": round(final["fvu"], 6),
                    "dead_fraction": round(final["dead_fraction"], 6), "tokens_seen": state.tokens_seen,
                    "eval_shard": eval_shard, "eval_rows": len(x), "run_id": run_id,
                    **{p: t[p] for p in SPARSITY_PARAMS if t.get(p) is not None},
                }
                version = tracking.register_sae(client, tracking.registry_name(cfg.model.name, hook), run_id, tags)
            client.set_terminated(run_id)
            finals.append({**final, "mlflow_run_id": run_id, "registered_version": version or ""})
    except BaseException:
        for run_id in run_ids:
            client.set_terminated(run_id, status="FAILED")
        raise
    tune.report({"members": [member_name(t) for t in stack], "final": finals})


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
