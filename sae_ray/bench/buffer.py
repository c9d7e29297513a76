"""`sae-ray bench buffer`: does the buffer keep up with the model and with the trainers?

Measured side by side in one run, on real activations of a real model:

1. producer tokens/s with buffer writes on (background writer, Zarr shards, commits)
   against the same forward passes with writes off;
2. trainer steps/s fed by a `BufferReader` against the same SAE fed the same rows from memory;
3. buffer read MB/s against a numpy memmap of the same rows, and the compression ratio
   of each codec on those rows.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_ray.activations.corpus import resolve_dataset_path
from sae_ray.activations.hooks import resolve_hook
from sae_ray.activations.model import load_model
from sae_ray.activations.produce import iter_shards
from sae_ray.activations.text import load_documents
from sae_ray.buffer import ActivationBuffer, BufferReader
from sae_ray.buffer.info import buffer_info
from sae_ray.bench.speed import sync
from sae_ray.buffer.writer import ShardWriter
from sae_ray.config import TrainConfig
from sae_ray.devices import pick_device
from sae_ray.sae import SAEConfig, create_sae
from sae_ray.train.loop import train_sae


def _produce(model, tok, hook, docs, rows, shard_rows, context_size, batch_size, buffer: ActivationBuffer | None):
    """Run the producer's path over `docs` until `rows` rows; write them when a buffer is given. Returns seconds."""
    counter = itertools.count()

    def claim():
        shard_id = next(counter)
        buffer.ensure_capacity(shard_id + 1)
        return shard_id

    writer = None
    if buffer is not None:
        written: dict[int, dict] = {}  # shard id -> its objects' sizes and hashes, as the producer commits them

        def write(i: int, s) -> None:
            written[i] = buffer.write_shard(i, s.acts, s.tokens, s.doc_index, s.position)

        writer = ShardWriter(write, claim, lambda i, n: buffer.commit_shard(i, n, written.pop(i)))
    start = time.perf_counter()
    for shard in iter_shards(model, tok, [hook], docs, context_size, batch_size, shard_rows, "float32", max_rows=rows):
        if writer is not None:
            writer.put(shard)
    if writer is not None:
        writer.close()
    return time.perf_counter() - start


def run_buffer_bench(model_name: str, rows: int = 65_536, shard_rows: int = 16_384, layer: int = 3,
                     context_size: int = 128, batch_size: int = 32, train_steps: int = 40, train_batch: int = 1024,
                     expansion: int = 8, workdir: str | None = None, device: str = "cpu") -> dict:
    """The three measurements, printed and returned as {"producer", "trainer", "read", "compression"}.
    device: where the model and the SAE run ("cpu", "cuda", "auto"); on CUDA the trainer's batches
    come from the reader in pinned memory, as a trial's do."""
    dev = pick_device(device)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="sae-ray-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    try:
        model, tok = load_model(model_name, device=str(dev))
        hook = resolve_hook(model, layer=layer, site="resid_post")
        d_in = model.config.hidden_size
        docs = list(load_documents(resolve_dataset_path("builtin:python-docs", tmp)))
        print(f"model {model_name} on {dev}, {hook.name} (d_in={d_in}); {rows:,} rows per run, shards of "
              f"{shard_rows:,}; torch threads {torch.get_num_threads()}")

        # 1. producer: writes off, then on (same documents, same forward passes); a warm-up pass first.
        _produce(model, tok, hook, docs, shard_rows // 4, shard_rows, context_size, batch_size, None)
        off = _produce(model, tok, hook, docs, rows, shard_rows, context_size, batch_size, None)
        buf = ActivationBuffer.create_or_open(str(tmp / "zstd"), {"bench": "buffer"}, {hook.name: d_in}, shard_rows, min(4096, shard_rows))
        on = _produce(model, tok, hook, docs, rows, shard_rows, context_size, batch_size, buf)
        buf.mark_complete()
        out["producer"] = {"tokens_per_s_writes_off": rows / off, "tokens_per_s_writes_on": rows / on, "ratio": off / on}
        print(f"\n1. producer  writes off {rows / off:8,.0f} tok/s   writes on {rows / on:8,.0f} tok/s   "
              f"ratio {off / on:.3f}  (goal >= 0.95)")

        # 2. trainer: the same SAE and steps, fed by the buffer reader vs from memory.
        n = train_steps * train_batch
        reader = BufferReader(buf, hook.name, train_batch, seed=0)
        it = iter(reader)
        rows_in_memory = torch.cat([next(it) for _ in range(train_steps)]).to(dev)  # the reader's exact batches
        reader.close()
        cfg = TrainConfig(total_tokens=n, batch_size=train_batch, log_every=10**9, lr_warmup_steps=1, device=str(dev))
        pin = dev.type == "cuda"

        def timed(batches) -> float:
            torch.manual_seed(0)
            sae = create_sae(SAEConfig("topk", d_in, expansion * d_in, k=32)).to(dev)
            start = time.perf_counter()
            train_sae(sae, batches, cfg)
            sync(dev)
            return time.perf_counter() - start

        timed(iter(rows_in_memory.split(train_batch)[:3]))  # warm-up
        mem = timed(iter(rows_in_memory.split(train_batch)))
        reader = BufferReader(buf, hook.name, train_batch, seed=0, pin_memory=pin)
        try:
            from_buffer = timed(iter(reader))
        finally:
            reader.close()
        out["trainer"] = {"steps_per_s_memory": train_steps / mem, "steps_per_s_buffer": train_steps / from_buffer,
                          "ratio": mem / from_buffer}
        print(f"2. trainer   memory {train_steps / mem:8.2f} steps/s   buffer {train_steps / from_buffer:8.2f} steps/s   "
              f"ratio {mem / from_buffer:.3f}  (goal >= 0.95; topk d_sae={expansion * d_in}, batch {train_batch})")

        # 3. raw reads: every row once through the reader vs a numpy memmap of the same rows, same shard order.
        all_rows = np.concatenate([buf.read_rows(hook.name, s) for s in buf.committed()])
        mm_path = tmp / "rows.npy"
        np.save(mm_path, all_rows)
        mb = all_rows.nbytes / 2**20
        reader = BufferReader(buf, hook.name, 4096, seed=1)
        start = time.perf_counter()
        it = iter(reader)
        for _ in range(len(all_rows) // 4096):
            next(it)
        t_buf = time.perf_counter() - start
        reader.close()
        mm = np.load(mm_path, mmap_mode="r")
        start = time.perf_counter()
        for s in np.random.default_rng(1).permutation(len(buf.committed())):
            chunk = np.array(mm[s * shard_rows : (s + 1) * shard_rows])
            torch.from_numpy(chunk[np.random.default_rng(s).permutation(len(chunk))])
        t_mm = time.perf_counter() - start
        out["read"] = {"buffer_mb_s": mb / t_buf, "memmap_mb_s": mb / t_mm, "ratio": t_mm / t_buf}
        print(f"3. reads     buffer {mb / t_buf:8.1f} MB/s   numpy memmap {mb / t_mm:8.1f} MB/s   ratio {t_mm / t_buf:.3f}")
        acts_ratio = lambda path: buffer_info(path)["per_array"][f"acts/{hook.name}"]["compression_ratio"]  # noqa: E731
        ratios = {"zstd": acts_ratio(str(tmp / "zstd"))}
        for codec in ("lz4", "none"):
            b = ActivationBuffer.create_or_open(str(tmp / codec), {"bench": codec}, {hook.name: d_in}, shard_rows, min(4096, shard_rows),
                                                codec=codec)
            for s in buf.committed():
                b.ensure_capacity(s + 1)
                objects = b.write_shard(s, {hook.name: buf.read_rows(hook.name, s)}, buf.read_tokens(s),
                                        buf.read_column("doc_index", s), buf.read_column("position", s))
                b.commit_shard(s, buf.committed()[s], objects)
            ratios[codec] = acts_ratio(str(tmp / codec))
        out["compression"] = ratios
        print("   compression ratio of the activations (uncompressed / on disk, float32): "
              + "   ".join(f"{c} {r:.2f}x" for c, r in ratios.items()))
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
