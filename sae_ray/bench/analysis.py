"""`sae-ray bench analyze`: the analysis pass with 1, 2, ... Ray workers, side by side in one run.

For each worker count the statistics pass (`sae_ray.actors.analyzer.analyze_shards`) runs over
the same buffer rows; printed: rows encoded per second, the ratio to one worker, and the peak
memory of the driver and of the Ray worker processes together (sampled from /proc every 0.1 s).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _rss_mb(pid: str) -> float:
    """Resident memory of a process in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _workers_rss_mb() -> float:
    """Summed resident memory of the Ray worker processes on this machine (named ray::...)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                total += _rss_mb(pid)
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples the driver's and the Ray workers' resident memory in a thread; `.driver`, `.workers`: peaks in MB."""

    def __enter__(self) -> PeakMemory:
        self.driver = self.workers = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.1):
            self.driver = max(self.driver, _rss_mb(me))
            self.workers = max(self.workers, _workers_rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_analyze_bench(cfg, ref: str, worker_counts: list[int], split: str, top_k: int, samples: int,
                      tracking_uri: str | None = None) -> list[dict]:
    """One row per worker count: workers, rows, seconds, rows_per_s, speedup, driver_mb, workers_mb."""
    import ray

    from sae_ray import tracking
    from sae_ray.actors.analyzer import analyze_shards
    from sae_ray.analysis.run import open_buffer
    from sae_ray.eval.run import load_ref
    from sae_ray.sweep.production import connect_ray

    uri = tracking_uri or cfg.tracking_uri()
    sae, _, _ = load_ref(tracking.client_for(uri), uri, ref, "sae-ray bench analyze")
    buffer = open_buffer(cfg, sae, sae.cfg.hook_name)
    connect_ray(cfg)
    sae = sae.cpu().eval()
    rows = []
    for n in worker_counts:
        with PeakMemory() as peak:
            start = time.perf_counter()
            stats = analyze_shards(sae, buffer, sae.cfg.hook_name, split, top_k, samples, n)
            seconds = time.perf_counter() - start
        rows.append({"workers": n, "rows": stats.rows, "seconds": seconds, "rows_per_s": stats.rows / seconds,
                     "driver_mb": peak.driver, "workers_mb": peak.workers})
    for r in rows:
        r["speedup"] = r["rows_per_s"] / rows[0]["rows_per_s"]
    ray.shutdown()
    return rows


def format_rows(rows: list[dict], d_sae: int | None = None) -> str:
    lines = [f"{'workers':>7} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'vs 1st':>7} {'driver MB':>9} {'workers MB':>10}"]
    for r in rows:
        lines.append(f"{r['workers']:>7} {r['rows']:>9,} {r['seconds']:>8.1f} {r['rows_per_s']:>9,.0f} "
                     f"{r['speedup']:>6.2f}x {r['driver_mb']:>9.0f} {r['workers_mb']:>10.0f}")
    return "\n".join(lines)
