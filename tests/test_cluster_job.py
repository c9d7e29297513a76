"""`ray job submit` of jobs/sweep.py against a real `ray start` cluster on loopback."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
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


def test_job_submit_runs_the_sweep_on_the_cluster(tmp_path, tiny_model_factory, sample_texts, ray_cluster):
    ray, env, gcs_address, dashboard = ray_cluster
    config = {
        "name": "job", "workdir": str(tmp_path / "work"),
        "model": {"name": tiny_model_factory("llama")},
        "data": {"path": write_jsonl(tmp_path / "docs.jsonl", sample_texts), "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 2, "site": "resid_post"}],
        "buffer": {"n_tokens": 100_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"num_cpus": 0.5},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [4]},
        "train": {"total_tokens": 1024, "batch_size": 128, "eval_rows": 64},
        "resources": {"cpus_per_trial": 0.5},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([ray, "job", "submit", "--address", dashboard, "--working-dir", str(REPO), "--",
                          "python", "jobs/sweep.py", str(path), "--set", "train.lr=0.001"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr

    client = tracking.client_for(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("sae-ray").experiment_id],
                                   "tags.sae_ray.kind = 'sweep'")
    # joined the cluster (its GCS port), not a local Ray of its own
    assert parent.data.tags["sae_ray.ray_address"].rsplit(":", 1)[1] == gcs_address.rsplit(":", 1)[1]
    assert parent.data.params["train.lr"] == "0.001"  # --set reached the entrypoint
    versions = client.search_model_versions(f"name = '{tracking.registry_name(config['model']['name'], 'blocks.2.hook_resid_post')}'")
    assert len(versions) == 1 and versions[0].tags["k"] == "4"
