"""One Tune trial: train a stack of SAEs (or one) from the buffer, log each to MLflow, register each.

The Ray-facing part is only `tune.report` and `tune.get_checkpoint`; the rest is the core
(reader, training loop, evaluation) plus tracking. Every SAE of the stack gets its own MLflow
child run and registered version, exactly as if it had been trained alone.

Survival: every `train.checkpoint_every` tokens the trial reports a checkpoint
(`sae_ray.train.checkpoint`: the loop's state, the reader's position, the MLflow run ids).
A trial Tune restarts (its worker died: `resources.max_failures`; or the sweep is resumed
after its driver died) goes on from the last one, in the same MLflow runs, and ends with
exactly `train.total_tokens` tokens. Without a checkpoint it starts over, in the runs it had
opened (found by the Tune trial id). Registration is idempotent (`tracking.register_sae`).

Transcoders (`sae.transcoder`): the reader yields (input, output) pairs of the same rows, the final
figures are measured on held-out rows against the output (`evaluate_sae(member, x, target=y)`), and
each is registered under its input hook, its output hook in the tags (`Trial.tags`).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import ray
import torch
from ray import tune

from sae_ray import tracking
from sae_ray.buffer import ActivationBuffer, BufferReader
from sae_ray.buffer.split import held_out_rows
from sae_ray.config import RunConfig
from sae_ray.devices import pick_device
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.formats import save_saelens
from sae_ray.sae import create_sae
from sae_ray.sweep.plan import Stack
from sae_ray.sweep.search import report_scalars, trial_setup
from sae_ray.train.checkpoint import load_checkpoint, save_checkpoint
from sae_ray.train.loop import train_sae
from sae_ray.train.memory import keep_freed_memory


def train_trial(config: dict[str, Any]) -> None:
    """Tune function trainable. config: `sweep.search.param_space` ("stacks", "stack_index",
    "draw"), "run": RunConfig dump, "experiment_id", "parent_run_id"."""
    cfg, stack = trial_setup(config)
    plan_stack = Stack.from_dict(config["stacks"][config["stack_index"]])  # its reader id was registered
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
    resume, reader_state = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            resume = load_checkpoint(path)
        run_ids, reader_state = resume[0]["extra"]["run_ids"], resume[0]["extra"]["reader"]
        for run_id in run_ids:  # continue the runs the dead attempt left
            tracking.retry(lambda: client.update_run(run_id, status="RUNNING"))  # noqa: B023 (called at once)
            client.set_tag(run_id, "sae_ray.resumed_at_tokens", str(resume[0]["tokens_seen"]))
    else:
        run_ids = [_open_run(cfg, client, config, stack, i, buffer) for i in range(len(stack.trials))]
    node_id = ray.get_runtime_context().get_node_id()  # where this attempt runs (a restart may move it)
    for run_id in run_ids:
        client.set_tag(run_id, "sae_ray.node_id", node_id)
    reader_id = plan_stack.reader_id if cfg.buffer.max_gb else None  # registered up front: the coordinator drops shards all readers passed

    names = [t.name for t in stack.trials]
    last: dict[str, float] = {}  # the flat figures ASHA and Optuna read (sweep.search)

    def on_log(step: int, metrics: list[dict[str, float]]) -> None:
        """metrics: one dict per member still training, "member" its index in the stack."""
        for m in metrics:
            tracking.log_metrics(client, run_ids[m["member"]], {k: v for k, v in m.items() if k != "member"}, step)
        last.update(report_scalars(metrics, last))
        tune.report({"members": names, "per_member": metrics, **last})

    def on_checkpoint(state: dict, tensors: dict) -> None:
        state["extra"] = {"run_ids": run_ids, "reader": reader.state_dict(), "pid": os.getpid()}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, state, tensors)
            tune.report({"members": names, "checkpoint_tokens": state["tokens_seen"], **last},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    ended: set[str] = set()
    try:
        # training never sees the held-out documents; the final figures are measured on them
        reader = BufferReader(buffer, stack.reader_hooks, cfg.train.batch_size, seed=cfg.train.seed, on_corrupt=cfg.buffer.on_corrupt,
                              reader_id=reader_id, split="train", state=reader_state,
                              pin_memory=device.type == "cuda")
        try:
            state = train_sae(sae, iter(reader), cfg.train, on_log=on_log, targets=[t.target_l0 for t in stack.trials],
                              on_checkpoint=on_checkpoint, resume=resume)
        finally:
            reader.close()
        trained = [] if state.sae is None else (state.sae.unstack() if state.sae.n_stack else [state.sae])
        member_of = dict(zip(state.members, trained))  # original index -> its trained SAE (survivors only)
        rows = held_out_rows(buffer, stack.reader_hooks, cfg.train.eval_rows)
        x, y = (rows, None) if stack.hook_out is None else rows  # y: a transcoder's target, its output hook's rows
        x, y = x.to(device), None if y is None else y.to(device)
        finals = []
        for i, (t, run_id) in enumerate(zip(stack.trials, run_ids)):
            quality = {"verdict": state.verdicts[i], "reasons": "; ".join(state.reasons[i])}
            # the coefficient where the L0 controller left it (None for the k architectures)
            aim = {"target_l0": t.target_l0, "coefficient": state.coefficients[i]}
            # train_dead_fraction: silent for train.dead_tokens training tokens at the end (what the monitor watched)
            common = dict(tokens_seen=state.member_tokens[i], train_dead_fraction=state.dead_fraction[i], steps=state.step,
                          train_seconds=state.seconds, input_scale=state.input_scale, output_scale=state.output_scale,
                          train_tokens_per_s=state.member_tokens[i] / max(state.seconds, 1e-9),
                          skipped_shards=reader.shards_skipped, skipped_rows=reader.rows_skipped)  # on_corrupt: skip
            client.set_tag(run_id, "sae_ray.verdict", quality["verdict"])
            if quality["reasons"]:
                client.set_tag(run_id, "sae_ray.reasons", quality["reasons"])
            if i not in member_of:  # stopped by the monitor: not evaluated, saved or registered
                tracking.log_metrics(client, run_id, {f"final/{k}": v for k, v in common.items()}, state.step)
                client.set_tag(run_id, "sae_ray.stopped", quality["reasons"])
                client.set_terminated(run_id, status="FAILED")
                ended.add(run_id)
                finals.append({**common, **quality, **aim, "l0": None, "fvu": None, "dead_fraction": None,
                               "mlflow_run_id": run_id, "registered_version": "", "node_id": node_id})
                continue
            member = member_of[i]
            final = evaluate_sae(member, x, target=y)
            final.update(common)  # dead_fraction: never fired on the held-out rows
            tracking.log_metrics(client, run_id, {f"final/{k}": v for k, v in final.items()}, state.step)
            member.cfg.extra.update(eval_split="held-out", eval_rows=len(x), fvu=final["fvu"], l0=final["l0"],
                                    tokens_seen=final["tokens_seen"], verdict=quality["verdict"])
            if t.target_l0 is not None:
                member.cfg.extra["target_l0"] = t.target_l0
            with tempfile.TemporaryDirectory() as tmp:
                save_saelens(member, tmp)
                client.log_artifacts(run_id, tmp, tracking.SAE_ARTIFACT_PATH)
            version = None
            if cfg.tracking.register_models:
                tags = {
                    **t.tags(), "model": cfg.model.name,
                    **({} if t.hook_layer is None else {"layer": t.hook_layer}), "l0": round(final["l0"], 4), "fvu": round(final["fvu"], 6),
                    "dead_fraction": round(final["dead_fraction"], 6), "tokens_seen": final["tokens_seen"],
                    "eval_split": "held-out", "eval_rows": len(x), "run_id": run_id, **quality,
                    **({} if aim["coefficient"] is None else {t.sparsity_param: round(aim["coefficient"], 6)}),
                }
                version = tracking.register_sae(client, tracking.registry_name(cfg.model.name, hook), run_id, tags)
            client.set_terminated(run_id)
            ended.add(run_id)
            finals.append({**final, **quality, **aim, "mlflow_run_id": run_id, "registered_version": version or "",
                           "node_id": node_id})
    except BaseException as e:
        # SystemExit: Ray ends the worker of a stopped job or a killed trial with SIGTERM -> sys.exit
        status = "KILLED" if isinstance(e, (SystemExit, KeyboardInterrupt)) else "FAILED"
        for run_id in run_ids:
            if run_id not in ended:
                client.set_terminated(run_id, status=status)
        raise
    tune.report({"members": names, "final": finals, **report_scalars(finals, last)})


def _open_run(cfg: RunConfig, client, config: dict[str, Any], stack: Stack, i: int, buffer: ActivationBuffer) -> str:
    """The MLflow child run of member i: the one an earlier attempt of this Tune trial opened
    (found by the trial id and member), else a new one with its params."""
    t = stack.trials[i]
    key = {"sae_ray.tune_trial": tune.get_context().get_trial_id() or "", "sae_ray.member": str(i)}
    found = tracking.find_run(client, config["experiment_id"], {"mlflow.parentRunId": config["parent_run_id"], **key})
    if found:
        tracking.retry(lambda: client.update_run(found, status="RUNNING"))
        client.set_tag(found, "sae_ray.restarted", "no checkpoint yet: trained again from the start")
        return found
    run_id = tracking.start_run(cfg.tracking_uri(), config["experiment_id"], t.name, config["parent_run_id"], tags={
        **key, "sae_ray.hook": t.hook, "sae_ray.architecture": t.architecture, "sae_ray.stack": stack.name,
        **({} if t.hook_out is None else {"sae_ray.hook_out": t.hook_out, "sae_ray.sae_kind": t.kind}),
        # whether this trial streamed (started before production finished) is worth seeing later
        "sae_ray.buffer_rows_at_start": str(buffer.n_rows()),
        "sae_ray.buffer_complete_at_start": str(buffer.is_complete()),
    })
    tracking.log_params(client, run_id, {"trial": {**t.tags(), "hook_layer": t.hook_layer},
                                         "config": cfg.model_dump(mode="json")})
    return run_id


def _wait_complete(buffer: ActivationBuffer, timeout: float = 24 * 3600) -> None:
    start = time.monotonic()
    while not buffer.is_complete():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"buffer {buffer.path} did not complete within {timeout:.0f}s")
        time.sleep(1.0)
