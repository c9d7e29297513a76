"""`ray job submit` of jobs/sweep.py against a real `ray start` cluster on loopback."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sae_ray import tracking
from tiny_models import write_jsonl

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node bound to 127.0.0.1 with token auth; stopped by the test."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        yield ray, env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


def _ray_job(ray, env, dashboard, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([ray, "job", *args[:1], "--address", dashboard, *args[1:]], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_job_submit_logs_stop_and_resubmit(tmp_path, tiny_model_factory, sample_texts, ray_cluster):
    """The cluster user's loop: `ray job submit --runtime-env-json` (working_dir and pip), watch with
    `ray job logs`, `ray job stop` mid-training: every MLflow run of the stopped job ends KILLED,
    none RUNNING. Submitting the same job again resumes the sweep, which ends with each SAE
    registered once."""
    ray, env, gcs_address, dashboard = ray_cluster
    config = {
        "name": "job", "workdir": str(tmp_path / "work"),
        "model": {"name": tiny_model_factory("llama")},
        "data": {"path": write_jsonl(tmp_path / "docs.jsonl", sample_texts * 6), "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 2, "site": "resid_post"}],
        "buffer": {"n_tokens": 4000, "shard_rows": 256, "chunk_rows": 64},
        # slow production (trials stream it), so that the stop lands mid-training
        "producers": {"num_cpus": 0.5, "debug_delay_s": 0.1},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [4, 8]},
        "train": {"total_tokens": 32_768, "batch_size": 64, "eval_rows": 64, "log_every": 5},
        "resources": {"cpus_per_trial": 0.5},
        "eval": {"lm": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    # pip: a package the cluster's Python already has, so Ray's pip environment installs nothing from the network
    runtime_env = json.dumps({"working_dir": str(REPO), "pip": ["pyyaml"], "env_vars": {"SAE_RAY_JOB_TEST": "1"}})
    entrypoint = ["--", "python", "jobs/sweep.py", str(path), "--set", "train.lr=0.001"]
    out = _ray_job(ray, env, dashboard, "submit", "--no-wait", "--runtime-env-json", runtime_env, *entrypoint)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (job_id,) = re.findall(r"Job '([^']+)' submitted successfully", out.stdout + out.stderr)

    logs = ""
    for _ in range(600):  # `ray job logs` until a trial reports progress (its child run is open)
        logs = _ray_job(ray, env, dashboard, "logs", job_id).stdout
        if re.search(r"\] tokens +[\d,]+", logs):
            break
        status = _ray_job(ray, env, dashboard, "status", job_id).stdout
        assert "FAILED" not in status and "SUCCEEDED" not in status, logs[-3000:]
        time.sleep(0.5)
    else:
        raise AssertionError("no trial progress in the job's logs:\n" + logs[-3000:])
    assert "[sae-ray] 2 SAEs in 2 trials" in logs  # the entrypoint's own lines reach `ray job logs`

    out = _ray_job(ray, env, dashboard, "stop", job_id)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "was stopped" in _ray_job(ray, env, dashboard, "status", job_id).stdout

    client = tracking.client_for(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sae-ray").experiment_id
    (parent,) = client.search_runs([experiment], "tags.sae_ray.kind = 'sweep'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED" and "ray job stop" in parent.data.tags["sae_ray.closed"]
    assert children and {c.info.status for c in children} == {"KILLED"}
    # joined the cluster (its GCS port), not a local Ray of its own; --set reached the entrypoint
    assert parent.data.tags["sae_ray.ray_address"].rsplit(":", 1)[1] == gcs_address.rsplit(":", 1)[1]
    assert parent.data.params["train.lr"] == "0.001"

    out = _ray_job(ray, env, dashboard, "submit", "--runtime-env-json", runtime_env, *entrypoint, timeout=600)
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming sweep 'job'" in out.stdout + out.stderr
    (again,) = client.search_runs([experiment], "tags.sae_ray.kind = 'sweep'")  # the same sweep, resumed
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    versions = client.search_model_versions(f"name = '{tracking.registry_name(config['model']['name'], 'blocks.2.hook_resid_post')}'")
    assert sorted(v.tags["k"] for v in versions) == ["4", "8"]  # each SAE registered once
    assert {v.tags["tokens_seen"] for v in versions} == {str(config["train"]["total_tokens"])}
