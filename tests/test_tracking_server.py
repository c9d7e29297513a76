"""A sweep that tracks to a real MLflow server on loopback (as a cluster would), then a lookup through it."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import ray

import sae_ray
from sae_ray import tracking
from sae_ray.config import validate_config
from sae_ray.sweep import run_sweep
from tiny_models import write_jsonl


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("mlflow server exited")
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not come up")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sweep_tracks_to_a_remote_server(tmp_path, tiny_model_factory, sample_texts, mlflow_server):
    model_dir = tiny_model_factory("gpt2")
    cfg = validate_config({
        "name": "remote", "workdir": str(tmp_path / "work"),
        "model": {"name": model_dir},
        "data": {"path": write_jsonl(tmp_path / "docs.jsonl", sample_texts), "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 100_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"num_cpus": 0.5},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [4]},
        "train": {"total_tokens": 1024, "batch_size": 128, "eval_rows": 64},
        "resources": {"cpus_per_trial": 0.5},
        "tracking": {"uri": mlflow_server},
    })
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(cfg)
    finally:
        ray.shutdown()
    assert not (tmp_path / "work" / "mlflow.db").exists()  # nothing went to the embedded default
    client = tracking.client_for(mlflow_server)
    name = tracking.registry_name(model_dir, "blocks.1.hook_resid_post")
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == result.rows[0]["mlflow_run_id"]
    # by version: this short run is "warn" (fairly dense), and best-fvu goes only to an ok SAE
    sae = sae_ray.load_sae(f"models:/{name}/{version.version}", tracking_uri=mlflow_server)
    assert sae.cfg.k == 4 and sae.W_dec.shape == (64, 32)
