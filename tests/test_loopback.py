"""What a local Ray started by sae-ray listens on, read from `ss -ltnp` while it runs (in a child
process, so that it starts its own Ray).

sae-ray starts it with its dashboard on 127.0.0.1, and the dashboard listens there only
(asserted). Ray 2.60 has no setting for the rest: `ray.init(_node_ip_address="127.0.0.1")` is
turned into the machine's address (`services.resolve_ip_for_localhost`), and its gRPC servers
(GCS, raylet, core workers) and agent ports bind every interface (later Ray binds the node
address: ray-project/ray#59852). Those are listed (`-s` prints them), not asserted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import json, os, subprocess, sys, time
    import ray
    from sae_ray.config import validate_config
    from sae_ray.sweep.production import connect_ray

    cfg = validate_config({"model": {"name": "m"}, "data": {"path": "d"}, "hooks": [{"layer": 1, "site": "resid_post"}]})
    connect_ray(cfg)

    @ray.remote(num_cpus=0)
    def ping():
        return os.getpid()

    workers = ray.get([ping.remote() for _ in range(2)])  # start workers too
    time.sleep(3)  # let the agents open their ports
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    mine = {os.getpid(), *workers}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if session in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").replace("\\0", " "):
                mine.add(int(pid))
        except OSError:
            pass
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    port = int(ray._private.worker.global_worker.node.address_info["webui_url"].rsplit(":", 1)[1])
    gcs = ray._private.worker.global_worker.node.address_info["gcs_address"]
    print(json.dumps({"pids": sorted(mine), "ss": out, "dashboard_port": port, "gcs_address": gcs}))
    ray.shutdown()
""")


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed: apt-get install iproute2")
def test_a_local_ray_serves_its_dashboard_on_loopback_only():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    pids = set(report["pids"])
    ours = []
    for line in report["ss"].splitlines():
        fields = line.split()
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            ours.append(fields[3])
    assert not report["gcs_address"].startswith("127.0.0.1:")  # Ray replaces a loopback node address (see above)
    assert ours, "found no listener of the Ray session: the check saw nothing"
    dashboard = [a for a in ours if a.endswith(f":{report['dashboard_port']}")]
    assert dashboard == [f"127.0.0.1:{report['dashboard_port']}"], dashboard
    print("listening beyond loopback (Ray, no setting):", sorted(a for a in ours if not a.startswith("127.0.0.1:")))
