"""Kill drills with real processes, a real Ray, Zarr buffer and MLflow store: a trial worker
SIGKILLed mid-training goes on from its checkpoint; a driver SIGKILLed mid-sweep is resumed by
running the same command again. Each SAE ends with train.total_tokens tokens, one registry
version, every MLflow run FINISHED, and figures equal to an uninterrupted reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray
import yaml

from sae_ray import tracking
from sae_ray.sweep import run_cache, run_sweep
from test_end_to_end import sweep_config, write_jsonl


@pytest.fixture
def local_ray():
    """Per test, unlike conftest's per module: the driver drill starts its own Ray in a
    subprocess, which must not share the two cores with one this process still holds."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def drill_config(tmp_path, tiny_model_factory, sample_texts, workdir="work", **changes):
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)
    train = {"total_tokens": 64_000, "batch_size": 64, "checkpoint_every": 6_400, "log_every": 50, "eval_rows": 100,
             "wait_for_buffer": True, **changes.pop("train", {})}
    return sweep_config(tmp_path / workdir, tiny_model_factory("gpt2"), data,
                        sae={"architectures": ["topk"], "k": [4, 8], "max_stack": 2},  # one stack of two on CPU
                        producers={"count": 1},
                        buffer={"path": str(tmp_path / "buffer")}, train=train, **changes)


def checkpoints(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("tune/*/*/checkpoint_*/state.json"))


def kill_at_second_checkpoint(workdir: Path, pid_of, stop: threading.Event) -> list[int]:
    """In a thread: wait for a trial's second checkpoint, then SIGKILL pid_of(state.json). Not the
    first: Tune records a checkpoint only once the driver has taken the report that carried it,
    so a kill just after the first one was written may find it not yet recorded (the trial then
    starts over, in its own runs); by the second, the first has been taken."""
    killed: list[int] = []

    def watch():
        while not stop.wait(0.05):
            found = checkpoints(workdir)
            if len(found) >= 2:
                pid = pid_of(json.loads(found[-1].read_text()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return

    threading.Thread(target=watch, daemon=True).start()
    return killed


def assert_complete(cfg, rows, n_saes):
    client = tracking.client_for(cfg.tracking_uri())
    assert len(rows) == n_saes and [r["tokens_seen"] for r in rows] == [cfg.train.total_tokens] * n_saes
    name = tracking.registry_name(cfg.model.name, rows[0]["hook"])
    versions = client.search_model_versions(f"name = '{name}'")
    by_run = [v.run_id for v in versions]
    assert sorted(by_run) == sorted(set(by_run)), "an SAE was registered twice"
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id], max_results=100)
    assert {r.info.status for r in runs} == {"FINISHED"}
    return client, runs


def test_a_trial_worker_killed_mid_training_goes_on_from_its_checkpoint(tmp_path, tiny_model_factory, sample_texts,
                                                                        local_ray):
    cfg = drill_config(tmp_path, tiny_model_factory, sample_texts)
    run_cache(cfg)  # the whole buffer first: both runs read the same batches in the same order
    reference = {r["sae"]: r for r in run_sweep(cfg.model_copy(update={"workdir": str(tmp_path / "reference")})).rows}

    stop = threading.Event()
    killed = kill_at_second_checkpoint(tmp_path / "work", lambda state: state["extra"]["pid"], stop)
    try:
        rows = run_sweep(cfg).rows
    finally:
        stop.set()
    assert killed, "the trial finished before its second checkpoint: the drill did not happen"
    client, runs = assert_complete(cfg, rows, 2)
    resumed = [r for r in runs if "sae_ray.resumed_at_tokens" in r.data.tags]
    assert len(resumed) == 2 and all(int(r.data.tags["sae_ray.resumed_at_tokens"]) >= 6_400 for r in resumed)
    for row in rows:  # the same data order and state: the same SAE as without the kill
        assert row["fvu"] == pytest.approx(reference[row["sae"]]["fvu"], rel=1e-4, abs=1e-6)
        assert row["l0"] == pytest.approx(reference[row["sae"]]["l0"], rel=1e-4)


def test_a_killed_driver_is_resumed_by_running_the_same_command_again(tmp_path, tiny_model_factory, sample_texts):
    cfg = drill_config(tmp_path, tiny_model_factory, sample_texts)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "sae_ray.cli", "run", str(path)]
    env = {**os.environ, "RAY_ADDRESS": ""}

    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    killed = kill_at_second_checkpoint(tmp_path / "work", lambda state: driver.pid, stop)
    try:
        driver.wait(timeout=300)
    finally:
        stop.set()
    assert killed == [driver.pid] and driver.returncode == -signal.SIGKILL

    client = tracking.client_for(cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    left = client.search_runs([experiment])
    assert any(r.info.status == "RUNNING" for r in left)  # what a dead driver leaves behind
    parent = json.loads((tmp_path / "work" / "sweeps" / "e2e.json").read_text())["parent_run_id"]

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep 'e2e'" in again.stdout
    summary = json.loads(Path(client.download_artifacts(parent, "summary.json", str(tmp_path))).read_text())
    _, runs = assert_complete(cfg, summary["trials"], 2)
    assert len([r for r in runs if r.data.tags.get("sae_ray.kind") == "sweep"]) == 1  # the parent run was reused
    assert len(runs) == 3  # and the children too: no duplicate run for a resumed SAE



def test_resuming_with_a_config_that_changed_what_the_trials_train_is_refused_by_name(tmp_path, tiny_model_factory,
                                                                                      sample_texts):
    from sae_ray.sweep import SweepError
    from sae_ray.sweep.resume import open_sweep, write_record

    cfg = drill_config(tmp_path, tiny_model_factory, sample_texts)
    write_record(cfg, "running", "parent", "tune/path")
    assert open_sweep(cfg, fresh=False)["parent_run_id"] == "parent"
    more_producers = cfg.model_copy(update={"producers": cfg.producers.model_copy(update={"count": 2})})
    assert open_sweep(more_producers, fresh=False) is not None  # the driver starts producers anew
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.01})})
    with pytest.raises(SweepError) as e:
        open_sweep(changed, fresh=False)
    assert "train.lr: 0.003 -> 0.01" in str(e.value) and "--fresh" in str(e.value)
    assert open_sweep(changed, fresh=True) is None
    write_record(cfg, "finished", "parent", "tune/path")
    assert open_sweep(changed, fresh=False) is None  # a finished sweep is not resumed: a rerun is a new sweep
    record = tmp_path / "work" / "sweeps" / "e2e.json"
    record.write_text("{not json")
    with pytest.raises(SweepError, match=f"sweep record {record} is damaged"):
        open_sweep(cfg, fresh=False)
    assert open_sweep(cfg, fresh=True) is None
