"""Node failure drill on a real multi-node Ray (`cluster_utils.Cluster`): the raylet of the node
running the producer is SIGKILLed by pid mid-production."""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from sae_ray.sweep import run_sweep
from tests.test_end_to_end import sweep_config
from tests.test_multinode import no_lm_eval
from tests.tiny_models import write_jsonl


def _pids_named(prefix: bytes) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix):
                out.append(int(pid))
        except OSError:
            continue
    return out


def _parent(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return -1


def test_a_producer_node_that_dies_mid_sweep_is_replaced_by_a_surviving_node(tmp_path, tiny_model_factory, sample_texts):
    """Node failure drill: once the producer has committed a shard, its node dies: SIGKILL (by pid)
    of the node's raylet and of the producer's worker. The producer restarts on the other node with
    the resource, resumes after its committed rows, writes the rest, and the buffer ends equal to an
    undisturbed reference's; the sweep's SAE trains on all of it and registers once."""
    import os
    import signal
    import threading

    import numpy as np

    from sae_ray.buffer import ActivationBuffer
    from sae_ray.sweep import run_cache

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    first = c.add_node(num_cpus=1, resources={"producer": 1})
    second = c.add_node(num_cpus=1, resources={"producer": 1})
    c.add_node(num_cpus=2, resources={"trainer": 2})
    c.wait_for_nodes()
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 6)

    def config(name: str, delay: float):
        return no_lm_eval(sweep_config(
            tmp_path / name, tiny_model_factory("gpt2"), data,
            producers={"count": 1, "num_cpus": 1, "resources": {"producer": 1}, "debug_delay_s": delay},
            resources={"cpus_per_trial": 1, "trial_resources": {"trainer": 1}},
            sae={"architectures": ["topk"], "k": [4], "max_stack": 1},
            buffer={"n_tokens": 4000, "path": str(tmp_path / name / "buffer")}))

    ray.init(address=c.address, log_to_driver=False)
    try:
        run_cache(config("reference", 0.0))
        cfg = config("drill", 0.2)
        killed: list[str] = []
        stop = threading.Event()

        def kill_when_a_shard_is_committed():
            while not stop.wait(0.1):
                try:
                    committed = ActivationBuffer.open(cfg.buffer_path()).commit_state().committed
                except Exception:  # noqa: BLE001 - not there yet, or being written: look again
                    continue
                if committed:
                    raylets = {n.all_processes["raylet"][0].process.pid: n.node_id for n in (first, second)}
                    for pid in _pids_named(b"ray::ActivationProducer"):
                        parent = _parent(pid)  # a worker is the child of its node's raylet
                        if parent in raylets:  # the node dies: its raylet and the workers it started
                            os.kill(parent, signal.SIGKILL)
                            os.kill(pid, signal.SIGKILL)
                            killed.append(raylets[parent])
                            return

        watcher = threading.Thread(target=kill_when_a_shard_is_committed, daemon=True)
        watcher.start()
        try:
            result = run_sweep(cfg)
        finally:
            stop.set()
        assert killed, "the producer finished before a shard was committed: the drill did not happen"
        survivor = second.node_id if killed[0] == first.node_id else first.node_id
        assert [p["node_id"] for p in result.producer_stats] == [survivor]
        stats = result.producer_stats[0]
        assert stats["resumed_after_rows"] > 0 and stats["rows"] > 0  # it went on after the committed rows
        assert len(result.rows) == 1 and result.rows[0]["version"] and result.rows[0]["tokens_seen"] == cfg.train.total_tokens
        ref, got = ActivationBuffer.open(config("reference", 0.0).buffer_path()), ActivationBuffer.open(cfg.buffer_path())
        # the same shards in the same stream order; the id the dead producer had claimed is never
        # reused, so the shards after it have other ids than the reference's
        got_ids, ref_ids = sorted(got.committed()), sorted(ref.committed())
        assert [got.committed()[i] for i in got_ids] == [ref.committed()[i] for i in ref_ids]
        for g, r in zip(got_ids, ref_ids):
            for column in ("tokens", "doc_index", "position"):
                assert np.array_equal(got.read_column(column, g), ref.read_column(column, r))
            assert np.array_equal(got.read_rows(HOOK, g), ref.read_rows(HOOK, r))
        print(f"drill: killed node {killed[0][:8]}, producer resumed on {survivor[:8]} after "
              f"{stats['resumed_after_rows']} rows and wrote {stats['rows']} more")
    finally:
        ray.shutdown()
        c.shutdown()


HOOK = "blocks.1.hook_resid_post"


def test_a_trial_node_that_dies_mid_training_is_replaced_then_a_lost_resource_fails_in_bounded_time(
        tmp_path, tiny_model_factory, sample_texts):
    """Trial node failure drill, then the case no surviving node can cover.

    1. Two trainer nodes {trainer: 1}; once the trial has two checkpoints its node dies (SIGKILL of
       the raylet and of the trial's worker, by pid). Tune restarts the trial from its checkpoint
       on the other trainer node: one version, train.total_tokens tokens, in the same MLflow run.
    2. A second sweep on the one trainer node left; it dies too. No alive node offers `trainer`
       any more: the sweep fails after resources.lost_resource_timeout_s naming the resource and
       what the nodes offer, with no MLflow run left RUNNING."""
    import json
    import signal
    import threading

    import pytest

    from sae_ray import tracking
    from sae_ray.sweep import SweepError
    from tests.test_kill_drills import checkpoints

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1, resources={"producer": 1})
    trainers = [c.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    c.wait_for_nodes()
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)

    def config(name: str, **resources):
        return no_lm_eval(sweep_config(
            tmp_path / name, tiny_model_factory("gpt2"), data,
            producers={"count": 1, "num_cpus": 1, "resources": {"producer": 1}},
            resources={"cpus_per_trial": 1, "trial_resources": {"trainer": 1}, **resources},
            sae={"architectures": ["topk"], "k": [4], "max_stack": 1},
            train={"total_tokens": 64_000, "batch_size": 64, "checkpoint_every": 6_400, "log_every": 50,
                   "eval_rows": 100, "wait_for_buffer": True},
            buffer={"path": str(tmp_path / name / "buffer")}))

    def kill_trial_node(workdir: Path, stop: threading.Event, killed: list[str]) -> None:
        """At the trial's second checkpoint (see test_kill_drills: by then Tune has recorded the
        first), kill the node running it: its raylet and the trial's worker."""
        raylets = {n.all_processes["raylet"][0].process.pid: n.node_id for n in trainers}
        while not stop.wait(0.05):
            found = checkpoints(workdir)
            if len(found) >= 2:
                worker = json.loads(found[-1].read_text())["extra"]["pid"]
                raylet = _parent(worker)
                assert raylet in raylets, "the trial's worker is not the child of a trainer node's raylet"
                os.kill(raylet, signal.SIGKILL)
                os.kill(worker, signal.SIGKILL)
                killed.append(raylets[raylet])
                return

    ray.init(address=c.address, log_to_driver=False)
    try:
        cfg = config("drill")
        stop, killed = threading.Event(), []
        threading.Thread(target=kill_trial_node, args=(cfg.workdir_path(), stop, killed), daemon=True).start()
        try:
            result = run_sweep(cfg)
        finally:
            stop.set()
        assert killed, "the trial finished before its second checkpoint: the drill did not happen"
        (survivor,) = [n.node_id for n in trainers if n.node_id != killed[0]]
        (row,) = result.rows
        assert row["node_id"] == survivor and row["version"] and row["tokens_seen"] == cfg.train.total_tokens
        client = tracking.client_for(cfg.tracking_uri())
        run = client.get_run(row["mlflow_run_id"])
        assert run.info.status == "FINISHED" and int(run.data.tags["sae_ray.resumed_at_tokens"]) > 0
        assert run.data.tags["sae_ray.node_id"] == survivor
        versions = client.search_model_versions(f"name = '{tracking.registry_name(cfg.model.name, HOOK)}'")
        assert [v.run_id for v in versions] == [row["mlflow_run_id"]]  # registered once
        print(f"drill: killed trainer node {killed[0][:8]} at a checkpoint; the trial resumed on {survivor[:8]} "
              f"at {run.data.tags['sae_ray.resumed_at_tokens']} tokens and ended with {row['tokens_seen']:,}")

        # 2. the last trainer node dies: nothing can run the trial any more
        trainers[:] = [n for n in trainers if n.node_id == survivor]
        cfg = config("lost", lost_resource_timeout_s=5)
        stop, killed = threading.Event(), []
        threading.Thread(target=kill_trial_node, args=(cfg.workdir_path(), stop, killed), daemon=True).start()
        try:
            with pytest.raises(SweepError) as e:
                run_sweep(cfg)
        finally:
            stop.set()
        assert killed == [survivor]
        message = str(e.value)
        assert message.startswith("resources.trial_resources: {'trainer': 1.0}: no node offers 'trainer'")
        assert "producer: 1" in message and "lost_resource_timeout_s" in message  # what the nodes offer, and why it gave up
        client = tracking.client_for(cfg.tracking_uri())
        runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
        assert runs and "RUNNING" not in {r.info.status for r in runs}
    finally:
        ray.shutdown()
        c.shutdown()
