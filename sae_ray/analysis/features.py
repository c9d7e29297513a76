"""Per-latent statistics of an SAE over buffer rows, one shard at a time. No Ray.

`shard_stats(sae, buffer, hook, shard_id, ...)` encodes one shard's rows and returns a
`FeatureStats`; `FeatureStats.merge` combines two, so a pass fans out over shards and merges
on the driver (`sae_ray.actors.analyzer`). What a FeatureStats holds stays bounded whatever the
number of rows: per latent,

    fired, act_sum, max_act      [d_sae]          rows where f > 0, their summed activation, the max
    hist                         [d_sae, H]       firing rows per log-spaced activation bin (HIST_EDGES)
    top_values, top_rows         [d_sae, k]       the k largest activations and their global rows
    sample_keys/values/rows      [d_sae, s]       a uniform sample of the firing rows: each firing
                                                  (row, latent) gets a seeded random key, and the s
                                                  largest keys are kept, which merges exactly

so its size is d_sae x (3 + H + 2k + 3s) numbers, about 8 bytes each: 65,536 latents, H 80, k 20,
s 40 take 127 MB, whatever the rows. Encoding works in chunks of CHUNK_ELEMENTS / d_sae rows, so
the [rows, d_sae] activations never exceed CHUNK_ELEMENTS floats either. A task holds one
FeatureStats and one chunk; the driver merges each task's as it arrives. A global row is shard_id * buffer.shard_rows + row in shard.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.split import split_mask
from sae_ray.sae import SAE

HIST_EDGES = torch.logspace(-4, 4, 81)
"""[H + 1] activation bin edges, 10 per decade from 1e-4 to 1e4 (values outside go to the end bins)."""
CHUNK_ELEMENTS = 1 << 24
"""Most activations ([rows, d_sae] floats) encoded at once: 64 MB."""
SPLITS = ("eval", "all")
"""Rows an analysis may encode: the held-out documents, or every row."""


@dataclass
class FeatureStats:
    """Mergeable per-latent statistics (see the module docstring for shapes)."""

    rows: int
    fired: Tensor
    act_sum: Tensor
    max_act: Tensor
    hist: Tensor
    top_values: Tensor
    top_rows: Tensor
    sample_keys: Tensor
    sample_values: Tensor
    sample_rows: Tensor

    @classmethod
    def empty(cls, d_sae: int, top_k: int, samples: int) -> FeatureStats:
        h = len(HIST_EDGES) - 1
        return cls(0, torch.zeros(d_sae, dtype=torch.int64), torch.zeros(d_sae, dtype=torch.float64),
                   torch.zeros(d_sae), torch.zeros(d_sae, h, dtype=torch.int64),
                   torch.full((d_sae, top_k), -1.0), torch.full((d_sae, top_k), -1, dtype=torch.int64),
                   torch.full((d_sae, samples), -1.0), torch.full((d_sae, samples), -1.0),
                   torch.full((d_sae, samples), -1, dtype=torch.int64))

    def add(self, f: Tensor, rows: Tensor, generator: torch.Generator) -> None:
        """f [n, d_sae] activations (>= 0) of the global rows `rows` [n] (int64)."""
        d_sae = f.shape[1]
        on = f > 0
        self.rows += f.shape[0]
        self.fired += on.sum(0)
        self.act_sum += f.double().sum(0)
        self.max_act = torch.maximum(self.max_act, f.max(0).values)
        latent = on.nonzero(as_tuple=True)[1]  # in the row-major order of f[on]
        values = f[on]
        bins = (torch.bucketize(values, HIST_EDGES) - 1).clamp(0, self.hist.shape[1] - 1)
        self.hist += torch.bincount(latent * self.hist.shape[1] + bins,
                                    minlength=d_sae * self.hist.shape[1]).reshape(self.hist.shape)
        row_ids = rows[:, None].expand_as(f)
        self.top_values, self.top_rows = _keep_largest(self.top_values, self.top_rows, f, row_ids)
        keys = torch.where(on, torch.rand(f.shape, generator=generator), torch.full_like(f, -1.0))
        self.sample_keys, (self.sample_values, self.sample_rows) = _keep_largest_by(
            self.sample_keys, (self.sample_values, self.sample_rows), keys, (torch.where(on, f, -1.0), row_ids))

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both sets of rows."""
        top_values, top_rows = _keep_largest(self.top_values, self.top_rows, other.top_values.T, other.top_rows.T)
        keys, (values, rows) = _keep_largest_by(self.sample_keys, (self.sample_values, self.sample_rows),
                                                other.sample_keys.T, (other.sample_values.T, other.sample_rows.T))
        return FeatureStats(self.rows + other.rows, self.fired + other.fired, self.act_sum + other.act_sum,
                            torch.maximum(self.max_act, other.max_act), self.hist + other.hist,
                            top_values, top_rows, keys, values, rows)

    def to_tensors(self) -> dict[str, Tensor]:
        """The pieces as tensors (for Ray, which moves tensors without copies)."""
        return {f.name: getattr(self, f.name) if f.name != "rows" else torch.tensor(self.rows) for f in fields(self)}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> FeatureStats:
        return cls(**{k: int(v) if k == "rows" else v for k, v in t.items()})

    def summary(self) -> dict[str, Tensor]:
        """stats.safetensors of an analysis (sae_ray.analysis.report)."""
        n = max(self.rows, 1)
        return {"frequency": (self.fired.double() / n).float(),
                "mean_act": (self.act_sum / self.fired.clamp(min=1)).float(),
                "max_act": self.max_act.clone(), "hist_counts": self.hist.clone(), "hist_edges": HIST_EDGES.clone()}


def _keep_largest(values: Tensor, rows: Tensor, new_values: Tensor, new_rows: Tensor) -> tuple[Tensor, Tensor]:
    """values, rows [d_sae, k]; new_* [n, d_sae] -> the k largest per latent, largest first."""
    keys, (rows,) = _keep_largest_by(values, (rows,), new_values, (new_rows,))
    return keys, rows


def _keep_largest_by(keys: Tensor, kept: tuple[Tensor, ...], new_keys: Tensor,
                     new: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """keys and each of kept [d_sae, k]; new_keys and each of new [n, d_sae]: per latent the k
    entries of largest key (empty slots hold key -1), largest first; `kept` follows its keys."""
    all_keys = torch.cat([keys, new_keys.T.to(keys.dtype)], dim=1)
    top = all_keys.topk(keys.shape[1], dim=1)
    return top.values, tuple(torch.cat([a, b.T.to(a.dtype)], dim=1).gather(1, top.indices) for a, b in zip(kept, new))


@torch.no_grad()
def shard_stats(sae: SAE, buffer: ActivationBuffer, hook: str, shard_id: int, split: str, top_k: int,
                samples: int, seed: int = 0) -> FeatureStats:
    """The statistics of one committed shard's rows of `split` ("eval": held-out; "all")."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: accepted {', '.join(SPLITS)}")
    x = buffer.read_tensor(hook, shard_id).float()
    rows = torch.arange(len(x), dtype=torch.int64) + shard_id * buffer.shard_rows
    if split == "eval":
        mask = torch.from_numpy(split_mask(buffer, shard_id, "eval"))
        x, rows = x[mask], rows[mask]
    stats = FeatureStats.empty(sae.cfg.d_sae, top_k, samples)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + shard_id)
    step = max(1, CHUNK_ELEMENTS // sae.cfg.d_sae)
    for start in range(0, len(x), step):
        stats.add(sae.encode(x[start:start + step]).float(), rows[start:start + step], generator)
    return stats


@torch.no_grad()
def latent_values(sae: SAE, buffer: ActivationBuffer, hook: str, shard_id: int, rows: np.ndarray,
                  latents: np.ndarray) -> np.ndarray:
    """[n] float32: latent latents[i] at global row rows[i] (all rows of this shard)."""
    local = torch.from_numpy(rows - shard_id * buffer.shard_rows)
    out = np.empty(len(rows), dtype=np.float32)
    order = torch.argsort(local)
    unique, inverse = torch.unique(local[order], return_inverse=True)
    x = buffer.read_tensor(hook, shard_id)[unique].float()
    lat = torch.from_numpy(latents)[order]
    step = max(1, CHUNK_ELEMENTS // sae.cfg.d_sae)
    picked = torch.empty(len(rows))
    for start in range(0, len(unique), step):
        f = sae.encode(x[start:start + step]).float()
        sel = (inverse >= start) & (inverse < start + step)
        picked[sel] = f[inverse[sel] - start, lat[sel]]
    out[order.numpy()] = picked.numpy()
    return out
