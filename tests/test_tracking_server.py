"""Sweeps that track to a real MLflow server on loopback, as a cluster would: one on sqlite, and
one on a throwaway PostgreSQL cluster with proxied artifacts (`sae_ray.tracking.server`), where
four trials register their SAEs at once; then lookups through the server.

The PostgreSQL fixture needs the server binaries (`initdb`, `pg_ctl`: Debian's `postgresql`
package puts them in /usr/lib/postgresql/*/bin) and a driver (psycopg[binary]: SQLAlchemy 2.1's default for postgresql://); without them those
tests skip, saying what to install. initdb and postgres refuse to run as root: as root, the
cluster is created and run as an unprivileged user (postgres, else nobody) through setpriv or
runuser, in a directory under /tmp that user owns.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sae_ray
from sae_ray import tracking
from sae_ray.config import validate_config
from sae_ray.sweep import run_sweep
from sae_ray.tracking.server import (TrackingServerError, add_tracking_server_command, redact, start_tracking_server,
                                     tracking_server_command)
from tiny_models import write_jsonl

PASSWORD = "s3cret-pw"
USER = "sae"
DATABASE = "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a throwaway PostgreSQL cluster -----------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned directories (newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
                      if Path(p).parts[-3].split(".")[0].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def as_user_prefix() -> tuple[list[str], int | None, int | None]:
    """How to run a command as an unprivileged user: (prefix, uid, gid); ([], None, None) when not root.
    Tries setpriv, then runuser, for the users postgres and nobody; skips saying why when none works."""
    if os.geteuid() != 0:
        return [], None, None
    tried = []
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        candidates = []
        if shutil.which("setpriv"):
            candidates.append(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"])
        if shutil.which("runuser"):
            candidates.append(["runuser", "-u", name, "--"])
        for prefix in candidates:
            probe = subprocess.run([*prefix, "id", "-u"], capture_output=True, text=True)
            if probe.returncode == 0 and probe.stdout.strip() == str(user.pw_uid):
                return prefix, user.pw_uid, user.pw_gid
            tried.append(f"{prefix[0]} as {name}: {(probe.stderr or probe.stdout).strip()[:200]}")
    pytest.skip("running as root, and no way found to run initdb/postgres as an unprivileged user "
                f"(tried {tried or 'no postgres/nobody user, no setpriv/runuser'})")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster on a free loopback port, user `sae` with a password (md5), database `mlflow`;
    yields (host, port). Stopped (pg_ctl stop -m fast) and deleted afterwards."""
    import sqlalchemy

    driver = sqlalchemy.engine.make_url("postgresql://").get_dialect().driver  # psycopg with SQLAlchemy 2.1
    pytest.importorskip(driver, reason=f"the PostgreSQL driver {driver} is missing: pip install "
                                       + {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary"}.get(driver, driver))
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                    "apt-get install postgresql")
    prefix, uid, gid = as_user_prefix()
    root = Path(tempfile.mkdtemp(prefix="sae-ray-pg-"))  # not under pytest's tmp: that is root's, mode 0700
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    pwfile = root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if uid is not None:
        for path in (root, sockets, pwfile):
            os.chown(path, uid, gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    port = free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, env=env, cwd=root, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=md5", f"--pwfile={pwfile}",
            "--encoding=UTF8", "--locale=C", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        started = True
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE],
                       check=True, capture_output=True, env={**env, "PGPASSWORD": PASSWORD}, timeout=60)
        yield "127.0.0.1", port
    finally:
        if started:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "fast", "-w"],
                           capture_output=True, env=env, cwd=root, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def db_uri(host: str, port: int, password: str = PASSWORD) -> str:
    return f"postgresql://{USER}:{password}@{host}:{port}/{DATABASE}"


@pytest.fixture(scope="module")
def pg_artifacts(tmp_path_factory) -> Path:
    """The directory the PostgreSQL-backed server stores artifacts in."""
    return tmp_path_factory.mktemp("pg-server-artifacts")


@pytest.fixture(scope="module")
def pg_server(postgres, pg_artifacts):
    """An MLflow server (2 worker processes) on the PostgreSQL cluster, artifacts proxied into
    pg_artifacts; yields it (a TrackingServer: .uri, .process, .log)."""
    server = start_tracking_server(db_uri(*postgres), str(pg_artifacts), port=free_port(), workers=2,
                                   log=pg_artifacts.parent / "pg-server.log")
    try:
        yield server
    finally:
        server.stop()


# -- the command line, no server --------------------------------------------------------------------

def test_tracking_server_command_proxies_artifacts_and_binds_loopback(tmp_path):
    cmd = tracking_server_command("postgresql://u:p@db:5432/mlflow", str(tmp_path / "a"))
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    flags = dict(zip(cmd[4:], cmd[5:]))
    assert flags["--backend-store-uri"] == "postgresql://u:p@db:5432/mlflow"
    assert "--serve-artifacts" in cmd and flags["--artifacts-destination"] == str((tmp_path / "a").resolve())
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "5000"
    assert tracking_server_command("sqlite:///x.db", "s3://bucket/arts", host="10.0.0.5", port=6000)[-4:] == \
        ["--host", "10.0.0.5", "--port", "6000"]  # a host given (a node's private address) is passed on
    assert redact("postgresql://sae:pw@h:1/db") == "postgresql://sae:***@h:1/db"
    assert redact("postgresql://h/db") == "postgresql://h/db"


# -- a sweep on a sqlite server ---------------------------------------------------------------------

@pytest.fixture
def mlflow_server(tmp_path):
    server = start_tracking_server(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "server-artifacts"),
                                   port=free_port(), workers=1, log=tmp_path / "server.log")
    try:
        yield server.uri
    finally:
        server.stop()


def test_sweep_tracks_to_a_remote_server(tmp_path, tiny_model_factory, sample_texts, mlflow_server, local_ray):
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
    result = run_sweep(cfg)
    assert not (tmp_path / "work" / "mlflow.db").exists()  # nothing went to the embedded default
    client = tracking.client_for(mlflow_server)
    name = tracking.registry_name(model_dir, "blocks.1.hook_resid_post")
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == result.rows[0]["mlflow_run_id"]
    # by version: this short run is "warn" (fairly dense), and best-fvu goes only to an ok SAE
    sae = sae_ray.load_sae(f"models:/{name}/{version.version}", tracking_uri=mlflow_server)
    assert sae.cfg.k == 4 and sae.W_dec.shape == (64, 32)


# -- PostgreSQL -------------------------------------------------------------------------------------

KS = [2, 3, 4, 5, 6, 7, 8, 9]


def test_sweep_of_concurrent_trials_on_postgres(tmp_path, tiny_model_factory, sample_texts, pg_server, pg_artifacts,
                                                local_ray):
    """8 SAEs in 4 trials (stacks of 2) that run at once on 2 CPUs, all tracking to the server:
    every version registered once (none lost when trials register at the same moment), every run
    FINISHED, every SAE stored through the server's artifact proxy and loadable by its models:/ URI."""
    model_dir = tiny_model_factory("gpt2")
    cfg = validate_config({
        "name": "pg", "workdir": str(tmp_path / "work"),
        "model": {"name": model_dir},
        "data": {"path": write_jsonl(tmp_path / "docs.jsonl", sample_texts * 2), "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 100_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"count": 1, "num_cpus": 0.25},
        "sae": {"architectures": ["topk"], "expansion_factor": [2], "k": KS, "max_stack": 2},
        "train": {"total_tokens": 2048, "batch_size": 128, "eval_rows": 64, "log_every": 4, "monitor": {"enabled": False}},
        "resources": {"cpus_per_trial": 0.25},
        "tracking": {"uri": pg_server.uri},
    })
    result = run_sweep(cfg)
    assert not (tmp_path / "work" / "mlflow.db").exists() and not (tmp_path / "work" / "mlartifacts").exists()
    assert len(result.rows) == len(KS)
    client = tracking.client_for(pg_server.uri)
    name = tracking.registry_name(model_dir, "blocks.1.hook_resid_post")
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, len(KS) + 1))
    assert sorted(v.run_id for v in versions) == sorted(r["mlflow_run_id"] for r in result.rows)  # each SAE once
    assert sorted(int(v.tags["k"]) for v in versions) == KS

    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's proxy, not a local path
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == len(KS) + 1  # the sweep's parent run and one per SAE
    assert {r.info.status for r in runs} == {"FINISHED"}
    children = [r for r in runs if r.info.run_id != result.parent_run_id]
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in children)
    # the four trials ran at once: each one's runs started before any trial's runs ended
    trials = {}
    for r in children:
        start, end = trials.get(r.data.tags["sae_ray.tune_trial"], (float("inf"), 0))
        trials[r.data.tags["sae_ray.tune_trial"]] = (min(start, r.info.start_time), max(end, r.info.end_time))
    assert len(trials) == len(KS) // 2
    assert max(s for s, _ in trials.values()) < min(e for _, e in trials.values()), trials

    # the artifacts live where the server put them, and come back through it
    by_k = {int(v.tags["k"]): v for v in versions}
    for k in (KS[0], KS[-1]):
        v = by_k[k]
        files = {a.path for a in client.list_artifacts(v.run_id, tracking.SAE_ARTIFACT_PATH)}
        assert {f"{tracking.SAE_ARTIFACT_PATH}/cfg.json", f"{tracking.SAE_ARTIFACT_PATH}/sae_weights.safetensors"} <= files
        sae = sae_ray.load_sae(f"models:/{name}/{v.version}", tracking_uri=pg_server.uri)
        assert sae.cfg.k == k and sae.W_dec.shape == (64, 32)
    assert len(list(pg_artifacts.rglob("sae_weights.safetensors"))) == len(KS)  # written by the server alone


def test_simultaneous_registrations_lose_no_version(pg_server):
    """16 SAEs registered into one new model at the same instant (threads released together):
    versions 1..16, one per run. The server retries its version-number race on the database's
    unique key; `register_sae` takes the 'already exists' of the model's creation race."""
    uri, name, n = pg_server.uri, "race-model__blocks.0.hook_resid_post", 16
    experiment_id = tracking.ensure_experiment(uri, "registration-race", None)
    run_ids = [tracking.start_run(uri, experiment_id, f"sae-{i}") for i in range(n)]
    barrier = threading.Barrier(n)

    def register(run_id: str) -> str:
        client = tracking.client_for(uri)
        barrier.wait()
        return tracking.register_sae(client, name, run_id, {"architecture": "topk", "d_in": 8, "model": "race-model"})

    with ThreadPoolExecutor(n) as pool:
        versions = list(pool.map(register, run_ids))
    assert sorted(int(v) for v in versions) == list(range(1, n + 1))
    listed = tracking.client_for(uri).search_model_versions(f"name = '{name}'")
    assert sorted(v.run_id for v in listed) == sorted(run_ids)
    assert {v.run_id: v.version for v in listed} == dict(zip(run_ids, versions))


def test_a_wrong_password_is_one_clear_message_in_seconds(postgres, tmp_path, capsys):
    host, port = postgres
    bad = db_uri(host, port, password="not-the-password")
    start = time.monotonic()
    with pytest.raises(TrackingServerError) as e:
        start_tracking_server(bad, str(tmp_path / "artifacts"), port=free_port())
    message = str(e.value)
    assert time.monotonic() - start < 10
    assert redact(bad) in message and "password authentication failed" in message
    assert "not-the-password" not in message

    # nothing listening: the same, at once
    closed = db_uri(host, free_port())
    with pytest.raises(TrackingServerError, match="cannot connect") as e:
        start_tracking_server(closed, str(tmp_path / "artifacts"), port=free_port())
    assert redact(closed) in str(e.value) and PASSWORD not in str(e.value)

    # the command: exit code 2 and the message, no server started
    parser = argparse.ArgumentParser()
    add_tracking_server_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tracking-server", "--db", bad, "--artifacts", str(tmp_path / "cli"), "--port", str(free_port())])
    assert args.fn(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --db: value ") and redact(bad) in err and "not-the-password" not in err
    assert not (tmp_path / "cli").exists()


def test_the_server_answers_health_and_hides_the_password(pg_server):
    with urllib.request.urlopen(f"{pg_server.uri}/health", timeout=5) as response:
        assert response.status == 200
    assert PASSWORD not in " ".join(pg_server.process.args)  # handed over in the environment, not shown by ps


def test_preflight_names_a_postgresql_tracking_uri_that_refuses_the_password(postgres, tmp_path, capsys):
    """tracking.uri straight on PostgreSQL (MLflow's own database store, no server): the port
    answers but the password is wrong. Preflight says so in one line, within seconds, before
    anything is created; the right password passes."""
    import yaml

    from sae_ray.cli import main
    from sae_ray.preflight import tracking_problems

    host, port = postgres
    bad = db_uri(host, port, password="not-the-password")
    base = {"name": "pg", "workdir": str(tmp_path / "work"), "model": {"name": "some/model"},
            "data": {"path": "docs.jsonl"}, "hooks": [{"layer": 1, "site": "resid_post"}]}
    start = time.monotonic()
    (problem,) = tracking_problems(validate_config({**base, "tracking": {"uri": bad}}))
    assert time.monotonic() - start < 10
    assert problem.startswith(f"tracking.uri: value {redact(bad)!r}: cannot connect")
    assert "password authentication failed" in problem and "not-the-password" not in problem
    assert tracking_problems(validate_config({**base, "tracking": {"uri": db_uri(host, port),
                                                                   "artifact_location": str(tmp_path / "art")}})) == []

    path = tmp_path / "pg.yaml"
    path.write_text(yaml.safe_dump({**base, "tracking": {"uri": bad}}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tracking.uri" in err and "password authentication failed" in err and "not-the-password" not in err
    assert "Traceback" not in err and not (tmp_path / "work").exists()
