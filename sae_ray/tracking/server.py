"""A shared MLflow tracking server on a real database, with proxied artifacts. No Ray.

A cluster's trials cannot share a sqlite file; they share an HTTP tracking server instead
(`tracking.uri: http://HOST:PORT`). This module runs one the way sae-ray expects it:

    mlflow server --backend-store-uri postgresql://USER:PASSWORD@HOST:PORT/DB \
                  --serve-artifacts --artifacts-destination DIR --host 127.0.0.1 --port 5000

- Runs, metrics and the model registry live in the database (PostgreSQL, or any database
  SQLAlchemy and MLflow take). The database is checked with one connection before the server
  starts, so a wrong password or an unreachable database is one message within seconds, naming
  the URI with its password replaced by `***`.
- Artifacts are proxied (`--serve-artifacts`): clients upload and download them through the
  server (`mlflow-artifacts:/...` URIs), and only the server writes to `--artifacts-destination`
  (a local directory, or s3://..., gs://...). Trials on other machines need no access to it.
- The server binds 127.0.0.1 unless told otherwise. MLflow's server has no authentication:
  anyone who can reach the port can read and change every run. On a cluster, bind the head
  node's private address (`--host ADDRESS`), reachable inside the cluster's network only;
  MLflow 3 answers only requests whose Host header is localhost or a private IP unless
  `--allowed-hosts` names more (e.g. a DNS name the nodes use).
- The database password is handed to the server in its environment
  (MLFLOW_BACKEND_STORE_URI), not on its command line, where `ps` would show it.

`sae-ray tracking-server --db URI --artifacts DIR` runs it in the foreground;
`start_tracking_server` runs it in the background (tests, notebooks) and waits until it answers.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "pymysql": "pymysql",
           "pyodbc": "pyodbc"}
"""The pip package of each database driver module (what the error says to install). SQLAlchemy 2.1
takes psycopg (3) for a plain postgresql:// URI; postgresql+psycopg2:// asks for psycopg2."""


class TrackingServerError(RuntimeError):
    """The tracking server cannot start: its database refuses or cannot be reached, its port is
    taken, or it exited or did not answer in time. The message names the database URI without
    its password and says what to change."""


class TrackingServer(NamedTuple):
    """A tracking server started by `start_tracking_server`."""

    process: subprocess.Popen
    """The `mlflow server` process."""
    uri: str
    """What clients use as tracking URI (`tracking.uri`), e.g. http://127.0.0.1:5000."""
    log: Path
    """The file the server's stdout and stderr go to."""

    def stop(self, timeout: float = 30) -> None:
        """Terminate the server and its workers (SIGTERM to its process group, SIGKILL after
        `timeout` seconds) and wait for it."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)  # its own session: the group is the server and its workers
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()


def redact(uri: str) -> str:
    """`uri` with its password replaced by '***': postgresql://sae:secret@db/mlflow -> postgresql://sae:***@db/mlflow."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<a URI that cannot be parsed>"
    if parts.password is None:
        return uri
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def _scrub(text: str, uri: str) -> str:
    """`text` with the password of `uri` (as written and URL-decoded) replaced by '***'."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        return text
    if password:
        from urllib.parse import unquote

        for secret in {password, unquote(password)}:
            text = text.replace(secret, "***")
    return text


def tracking_server_command(db: str, artifacts: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                            workers: int | None = None, allowed_hosts: str | None = None) -> list[str]:
    """The `mlflow server` command line: runs and the registry in database `db` (a SQLAlchemy URI,
    e.g. postgresql://USER:PASSWORD@HOST:5432/DB), artifacts proxied by the server into `artifacts`
    (a directory, made absolute, or an s3:// / gs:// URL), listening on host:port.

    workers: server worker processes (MLflow's default: 4). allowed_hosts: MLflow 3's
    --allowed-hosts, the Host headers it answers besides localhost and private IPs.
    """
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", db,
           "--serve-artifacts", "--artifacts-destination", _artifacts_destination(artifacts),
           "--host", host, "--port", str(int(port))]
    if workers is not None:
        cmd += ["--workers", str(int(workers))]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def _artifacts_destination(artifacts: str) -> str:
    """A URL as it is; a local path (or file: URI) made absolute."""
    if "://" in artifacts and not artifacts.startswith("file:"):
        return artifacts
    path = Path(urlsplit(artifacts).path if artifacts.startswith("file:") else artifacts)
    return str(path.expanduser().resolve())


def _environment(cmd: list[str]) -> tuple[list[str], dict[str, str]]:
    """`cmd` with its --backend-store-uri moved into the environment (MLFLOW_BACKEND_STORE_URI)
    when it holds a password, so that the process list does not show it; and that environment."""
    env = dict(os.environ)
    cmd = list(cmd)
    i = cmd.index("--backend-store-uri")
    db = cmd[i + 1]
    if redact(db) != db:
        del cmd[i : i + 2]
        env["MLFLOW_BACKEND_STORE_URI"] = db
    return cmd, env


def check_database(db: str, timeout: float = 5) -> None:
    """Raise TrackingServerError naming `--db` (without its password) when `database_problem` finds one."""
    problem = database_problem(db, timeout)
    if problem:
        raise TrackingServerError(f"--db: value {redact(db)!r}: {problem}")


def database_problem(db: str, timeout: float = 5) -> str | None:
    """Connect to database `db` once (SQLAlchemy, `SELECT 1`); None if that works, else why not, in
    words that never hold the password: wrong user or password, no such database, nothing
    listening, a host that does not answer within `timeout` seconds, or no driver installed.
    One home for this check: `sae-ray tracking-server --db` and preflight's `tracking.uri` use it."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(db)
    except Exception as e:
        return f"not a database URI ({_scrub(str(e), db)}); expected e.g. postgresql://USER:PASSWORD@HOST:5432/DB"
    backend = url.get_backend_name()
    connect_args = {}
    if backend in ("postgresql", "mysql"):
        connect_args["connect_timeout"] = max(2, int(round(timeout)))  # libpq counts whole seconds, 2 at least
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    except ModuleNotFoundError as e:
        return f"the database driver {e.name!r} is not installed (pip install {DRIVERS.get(e.name or '', e.name)})"
    except Exception as e:
        return _scrub(str(e), db)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.DBAPIError as e:
        reason = " ".join(_scrub(str(e.orig), db).split()) if e.orig is not None else _scrub(str(e), db)
        return f"cannot connect to the database: {reason}"
    except Exception as e:
        return f"cannot connect to the database: {type(e).__name__}: {' '.join(_scrub(str(e), db).split())}"
    finally:
        engine.dispose()
    return None


def _is_wildcard(host: str) -> bool:
    """Whether `host` means every interface ("" or an unspecified address)."""
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to `host`."""
    if _is_wildcard(host):
        return "[::1]" if ":" in host else "127.0.0.1"
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host  # a name


def _port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (the port is taken), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_tracking_server(db: str, artifacts: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                          timeout: float = 120, workers: int | None = None, allowed_hosts: str | None = None,
                          log: str | Path | None = None) -> TrackingServer:
    """Start `mlflow server` (`tracking_server_command`) in the background and wait, at most
    `timeout` seconds, until its /health answers; returns the process and its URI. Stop it with
    `.stop()`.

    The database is checked first (`check_database`), and the port: either problem is a
    TrackingServerError at once. A server that exits or does not answer in time is one too,
    with the last lines of its output (which goes to `log`, default a temporary file).
    The first start on an empty database creates MLflow's tables, which takes a few seconds.
    """
    check_database(db)
    problem = _port_problem(host, port)
    if problem:
        raise TrackingServerError(f"--port: value {port}: {problem}; choose another port (or stop what listens there)")
    cmd, env = _environment(tracking_server_command(db, artifacts, host, port, workers, allowed_hosts))
    if not artifacts.startswith(tuple(f"{s}://" for s in ("s3", "gs", "gcs", "abfss", "wasbs", "hdfs", "http", "https"))):
        Path(_artifacts_destination(artifacts)).mkdir(parents=True, exist_ok=True)
    if log is None:
        fd, name = tempfile.mkstemp(prefix="sae-ray-mlflow-server-", suffix=".log")
        os.close(fd)
        log = name
    log = Path(log)
    uri = f"http://{_client_host(host)}:{port}"
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = TrackingServer(process, uri, log)
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise TrackingServerError(f"the MLflow tracking server on database {redact(db)!r} exited with code {code} "
                                      f"before it answered; its last lines ({log}):\n{_scrub(_tail(log), db)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    _warm_up(uri, workers or 4, max(5.0, deadline - time.monotonic()))
                    return server
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise TrackingServerError(f"the MLflow tracking server on database {redact(db)!r} did not answer at "
                                      f"{uri}/health within {timeout:g} s; its last lines ({log}):\n{_scrub(_tail(log), db)}")
        time.sleep(0.25)


def _warm_up(uri: str, workers: int, timeout: float) -> None:
    """Ask every worker for an experiment list once, so that each has opened its database store:
    a worker's first request takes seconds (MLflow opens the store lazily), which a client with a
    short timeout (preflight's) would take for a dead server. 2 x workers requests at once reach
    every worker with high probability; errors are ignored (the server is up: /health answered)."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(_):
        try:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=timeout).close()
        except (OSError, urllib.error.URLError):
            pass

    with ThreadPoolExecutor(2 * workers) as pool:
        list(pool.map(ask, range(2 * workers)))


def cmd_tracking_server(args) -> int:
    """`sae-ray tracking-server`: check the database, then run the server in the foreground until
    it exits or Ctrl-C. Exit code 2 with one message when the database or port is wrong."""
    try:
        check_database(args.db)
        problem = _port_problem(args.host, args.port)
        if problem:
            raise TrackingServerError(f"--port: value {args.port}: {problem}; choose another port (or stop what listens there)")
    except TrackingServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd, env = _environment(tracking_server_command(args.db, args.artifacts, args.host, args.port,
                                                    args.workers, args.allowed_hosts))
    destination = _artifacts_destination(args.artifacts)
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
    uri = f"http://{_client_host(args.host)}:{args.port}"
    print(f"MLflow tracking server: database {redact(args.db)}, artifacts {destination} (proxied)", file=sys.stderr)
    print(f"point runs at it with   tracking.uri: {uri}" + ("" if not _is_wildcard(args.host) else
          "   (from other machines: this machine's address instead of 127.0.0.1)"), file=sys.stderr)
    if not _is_loopback(args.host):
        print("warning: MLflow's server has no authentication: whoever reaches this port can read and change "
              "every run; keep it inside the cluster's network", file=sys.stderr)
    import signal

    process = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame=None):  # MLflow passes SIGINT/SIGTERM on to its workers and stops
        if process.poll() is None:
            process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # a terminal's Ctrl-C reached the server too; a `kill -INT` did not
                forward(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_tracking_server_command(subparsers) -> argparse.ArgumentParser:
    """Add `tracking-server --db URI --artifacts DIR [--host] [--port]` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "tracking-server", help="run a shared MLflow tracking server on a database (PostgreSQL), artifacts proxied",
        description="Run `mlflow server` in the foreground with runs and the registry in a database and artifacts "
                    "proxied through the server: the tracking.uri a cluster's trials share. The database is checked "
                    "first. MLflow's server has no authentication: keep the default --host 127.0.0.1, or bind an "
                    "address inside the cluster's private network only.")
    p.add_argument("--db", required=True, metavar="URI",
                   help="SQLAlchemy database URI, e.g. postgresql://USER:PASSWORD@HOST:5432/DB (the database must exist)")
    p.add_argument("--artifacts", required=True, metavar="DIR",
                   help="where the server stores artifacts: a directory, or an s3:// / gs:// URL")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=None, help="server worker processes (default: MLflow's, 4)")
    p.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                   help="comma-separated Host headers the server answers besides localhost and private IPs "
                        "(MLflow 3's --allowed-hosts), e.g. mlflow.internal:5000")
    p.set_defaults(fn=cmd_tracking_server)
    return p
