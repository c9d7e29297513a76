"""ActivationProducer: a model on one device, writing whole shards into the buffer.

A thin shell over `sae_ray.activations.produce.iter_shards`: claim an id from the
coordinator, write the shard once, commit it.
"""

from __future__ import annotations

import itertools
import time

import ray

from sae_ray.activations.corpus import resolve_dataset_path
from sae_ray.activations.hooks import resolve_hook
from sae_ray.activations.model import load_model
from sae_ray.activations.produce import iter_shards
from sae_ray.activations.text import load_documents
from sae_ray.buffer import ActivationBuffer
from sae_ray.config import RunConfig
from sae_ray.train.loop import pick_device


@ray.remote
class ActivationProducer:
    def __init__(self, cfg: dict, rank: int, world: int, coordinator, skip_rows: int = 0):
        self.cfg = RunConfig.model_validate(cfg)
        self.rank, self.world, self.coordinator = rank, world, coordinator
        self.skip_rows = skip_rows  # rows this rank committed in an earlier, interrupted run

    def run(self) -> dict:
        """Produce until the data ends or the coordinator wants no more shards; returns counts."""
        cfg = self.cfg
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
        mine = itertools.islice(docs, self.rank, None, self.world)
        rows = shards = 0
        for shard in iter_shards(model, tokenizer, hooks, mine, d.context_size, d.batch_size,
                                 cfg.buffer.shard_rows, cfg.buffer.dtype, seed=cfg.train.seed + self.rank,
                                 rank=self.rank, world=self.world, skip_rows=self.skip_rows):
            shard_id = ray.get(self.coordinator.claim_shard.remote())
            if shard_id is None:
                break
            buffer.write_shard(shard_id, shard.acts, shard.tokens, shard.doc_index, shard.position)
            ray.get(self.coordinator.commit_shard.remote(shard_id, len(shard)))
            rows += len(shard)
            shards += 1
        ray.get(self.coordinator.producer_finished.remote(self.rank))
        seconds = time.perf_counter() - start
        return {"rank": self.rank, "rows": rows, "shards": shards, "seconds": seconds}
