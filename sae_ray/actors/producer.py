"""ActivationProducer: a model on one device, writing whole shards into the buffer.

A thin shell over `sae_ray.activations.produce.iter_shards` and `ShardWriter`: the forward
passes fill shards, a background thread claims an id from the coordinator for each, writes it
once and commits it. When its process dies Ray restarts it (`producers.max_restarts`) and
retries `run`; `run` asks the coordinator how many rows this rank already committed (read
from the buffer) and resumes exactly after them. Each commit carries the sizes and sha256 of
the shard's objects as written (`write_shard`'s answer); the data itself never reaches the
coordinator.

`producers.debug_delay_s` (a debugging option; crash drills use it) sleeps per document
read and between writing and committing each shard, so that a kill lands mid-shard.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator

import ray

from sae_ray.activations.corpus import resolve_dataset_path
from sae_ray.activations.hooks import resolve_hook
from sae_ray.activations.model import load_model
from sae_ray.activations.produce import iter_shards
from sae_ray.activations.text import load_documents
from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.writer import ShardWriter
from sae_ray.config import RunConfig
from sae_ray.devices import pick_device


def _slowed(docs: Iterable[str], delay_s: float) -> Iterator[str]:
    for doc in docs:
        time.sleep(delay_s)
        yield doc


@ray.remote
class ActivationProducer:
    def __init__(self, cfg: dict, rank: int, world: int, coordinator: str):
        """coordinator: the BufferCoordinator's actor name (a name, not a handle: Ray restarts an
        actor only if its constructor arguments are plain values)."""
        self.cfg = RunConfig.model_validate(cfg)
        self.rank, self.world, self.coordinator_name = rank, world, coordinator

    def run(self) -> dict:
        """Produce until the data ends or the coordinator wants no more shards; returns counts."""
        cfg, rank = self.cfg, self.rank
        coordinator = _lookup(self.coordinator_name)
        skip_rows = ray.get(coordinator.producer_started.remote(rank, os.getpid()))
        device = pick_device(cfg.model.device)
        model, tokenizer = load_model(
            cfg.model.name, cfg.model.revision, cfg.model.dtype, str(device), cfg.model.trust_remote_code
        )
        hooks = [resolve_hook(model, h.layer, h.site, h.module) for h in cfg.hooks]
        start = time.perf_counter()  # tokens/s counts the forward passes and writes, not the model load
        buffer = ActivationBuffer.open(cfg.buffer_path())
        d = cfg.data
        docs = load_documents(resolve_dataset_path(d.path, cfg.workdir_path()), d.text_column, d.split, d.name, streaming=d.streaming,
                              trust_remote_code=cfg.model.trust_remote_code)
        docs = itertools.islice(docs, d.max_documents)
        mine = itertools.islice(docs, rank, None, self.world)
        delay = cfg.producers.debug_delay_s
        if delay:
            mine = _slowed(mine, delay)
        written: dict[int, dict] = {}  # shard id -> its objects' sizes and hashes, until committed

        def write(shard_id: int, s) -> None:
            written[shard_id] = buffer.write_shard(shard_id, s.acts, s.tokens, s.doc_index, s.position)

        def commit(shard_id: int, n: int) -> None:
            if delay:
                time.sleep(delay)
            ray.get(coordinator.commit_shard.remote(rank, shard_id, n, written.pop(shard_id)))

        writer = ShardWriter(write=write, claim=lambda: ray.get(coordinator.claim_shard.remote(rank)), commit=commit,
                             max_queue=cfg.producers.write_queue, where=f"producer {rank}, buffer {buffer.path!r}: ")
        try:
            for shard in iter_shards(model, tokenizer, hooks, mine, d.context_size, d.batch_size,
                                     cfg.buffer.shard_rows, cfg.buffer.dtype, seed=cfg.train.seed + rank,
                                     rank=rank, world=self.world, skip_rows=skip_rows):
                if not writer.put(shard):
                    break
            writer.close()
        except BaseException:
            writer.abort()
            raise
        ray.get(coordinator.producer_finished.remote(rank))
        seconds = time.perf_counter() - start
        return {"rank": rank, "rows": writer.rows, "shards": writer.shards, "seconds": seconds,
                "resumed_after_rows": skip_rows, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


def _lookup(name: str, timeout: float = 120.0):
    """The named coordinator; retried because a (re)starting coordinator registers its name a moment later."""
    start = time.monotonic()
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.monotonic() - start > timeout:
                raise
            time.sleep(0.5)
