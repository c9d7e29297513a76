"""The analysis pass as Ray tasks: one per shard, at most `workers` at a time. A thin shell: the
work is `sae_ray.analysis.features` (statistics of a shard, values at given rows)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import ray
import torch

from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.progress import format_duration


@ray.remote(num_cpus=1, max_retries=1)
def _shard_stats(sae_ref, path: str, hook: str, shard_id: int, split: str, top_k: int, samples: int, seed: int):
    from sae_ray.analysis.features import shard_stats

    torch.set_num_threads(1)
    return shard_stats(sae_ref, ActivationBuffer.open(path), hook, shard_id, split, top_k, samples, seed).to_tensors()


@ray.remote(num_cpus=1, max_retries=1)
def _latent_values(sae_ref, path: str, hook: str, shard_id: int, rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
    from sae_ray.analysis.features import latent_values

    torch.set_num_threads(1)
    return latent_values(sae_ref, ActivationBuffer.open(path), hook, shard_id, rows, latents)


def _bounded(jobs: list[Callable[[], ray.ObjectRef]], workers: int, label: str, weights: list[int],
             on_result: Callable[[int, object], None]) -> None:
    """Run `jobs` (each returns a task's ref) with at most `workers` in flight, handing each result
    to on_result(job index, result) as it arrives (so the driver holds one at a time). Prints a
    progress line with an ETA to stderr as tasks finish."""
    refs: dict[ray.ObjectRef, int] = {}
    start, done, done_weight, total, nxt = time.perf_counter(), 0, 0, max(sum(weights), 1), 0
    while nxt < len(jobs) or refs:
        while nxt < len(jobs) and len(refs) < workers:
            refs[jobs[nxt]()] = nxt
            nxt += 1
        ready, _ = ray.wait(list(refs), num_returns=1)
        i = refs.pop(ready[0])
        on_result(i, ray.get(ready[0]))
        done, done_weight = done + 1, done_weight + weights[i]
        rate = done_weight / max(time.perf_counter() - start, 1e-9)
        print(f"\r[sae-ray] {label} {done}/{len(jobs)} shards  {done_weight:,}/{total:,} rows  {rate:,.0f} rows/s  "
              f"ETA {format_duration((total - done_weight) / rate if rate else None)}",
              end="" if done < len(jobs) else "\n", file=sys.stderr, flush=True)


def analyze_shards(sae, buffer: ActivationBuffer, hook: str, split: str, top_k: int, samples: int,
                   workers: int, seed: int = 0):
    """The merged `FeatureStats` of every committed shard (one Ray task per shard)."""
    from sae_ray.analysis.features import FeatureStats

    shards = list(buffer.commit_state().committed)
    sae_ref = ray.put(sae)
    jobs = [lambda s=s: _shard_stats.remote(sae_ref, buffer.path, hook, s, split, top_k, samples, seed) for s in shards]
    total = [FeatureStats.empty(sae.cfg.d_sae, top_k, samples)]

    def merge(_: int, part) -> None:
        total[0] = total[0].merge(FeatureStats.from_tensors(part))
    _bounded(jobs, workers, "analyze", [buffer.shard_rows] * len(shards), merge)
    return total[0]


def values_at(sae, buffer: ActivationBuffer, hook: str, rows: np.ndarray, latents: np.ndarray, workers: int) -> np.ndarray:
    """[n] the activation of latents[i] at global row rows[i] (one Ray task per shard touched)."""
    out = np.full(len(rows), np.nan, dtype=np.float32)
    shard_of = rows // buffer.shard_rows
    shards = sorted(set(shard_of.tolist()))
    if not shards:
        return out
    sae_ref = ray.put(sae)
    picks = [np.flatnonzero(shard_of == s) for s in shards]
    jobs = [lambda s=s, p=p: _latent_values.remote(sae_ref, buffer.path, hook, s, rows[p], latents[p])
            for s, p in zip(shards, picks)]

    def put(i: int, values) -> None:
        out[picks[i]] = values
    _bounded(jobs, workers, "contexts", [len(p) for p in picks], put)
    return out
