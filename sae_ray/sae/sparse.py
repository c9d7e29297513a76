"""Sparse decoding for the k-sparse architectures (TopK, BatchTopK, Matryoshka, and AuxK).

A k-sparse SAE keeps k of d_sae latents per row, but a dense decoder pays for all of them:

    dense    x_hat = f @ W_dec                   f [B, d_sae], mostly zeros: 2*B*d_sae*d_out FLOPs
    sparse   x_hat[b] = sum_j v[b, j] * W_dec[i[b, j]]    (i, v) [B, k]:   2*B*k*d_out FLOPs

and the same holds for its backward (dW_dec = f^T @ dx_hat touches only the k rows each token
used; df = dx_hat @ W_dec^T is needed only at those k entries). `torch.nn.functional.embedding_bag`
with `per_sample_weights` computes exactly the sparse sum, with both gradients, on CPU and CUDA,
without materialising the [B, k, d_out] gathered rows. A stack of K SAEs decodes in the same one
call: member s's latents are rows s*d_sae ... of W_dec flattened to [K*d_sae, d_out]. d_out is
the width of the reconstruction: d_in for an SAE; a transcoder's decoder is read the same way
(its b_dec and skip connection are added by the caller, `SAE.offset`).

`SparseLatents` holds the active latents in one of two forms:

    row form    indices, values [(K,) B, k]: row b's entries are latents indices[b] (TopK, AuxK)
    flat form   indices, values [(K,) N]:    entries index the flattened [(K,) B*d_sae] latents,
                                             as row * d_sae + latent, ascending (BatchTopK)

An entry whose value is 0 (a masked rank of a stack that mixes k) decodes to nothing and gets no
gradient, as in the dense product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


DENSITY_LIMIT = 1 / 16
"""The sparse decoder is used where k <= DENSITY_LIMIT * d_sae (`pays`). Measured on CPU with
`sae-ray bench train` (d_in 384 and 768): at k = d_sae / 12 the two decoders run even, below it
the sparse one wins (1.3x at d_sae / 24, 2.3x at d_sae / 192), above it the dense matmul does."""


def pays(k: int, d_sae: int) -> bool:
    """Whether decoding k active latents of d_sae sparsely is faster than the dense product."""
    return k <= DENSITY_LIMIT * d_sae


class SparseLatents(NamedTuple):
    """The active latents of a batch (see the module docstring for the two forms)."""

    indices: Tensor
    """Row form: latent index [(K,) B, k]. Flat form: row * d_sae + latent [(K,) N], ascending."""

    values: Tensor
    """Their activations, the shape of `indices`; carries the gradient to the encoder."""

    shape: torch.Size
    """The dense latents' shape [(K,) B, d_sae]."""

    @property
    def flat(self) -> bool:
        """True for the flat form."""
        return self.indices.dim() == len(self.shape) - 1

    def dense(self) -> Tensor:
        """The dense latents [(K,) B, d_sae] (zeros elsewhere), differentiable in `values`."""
        *lead, B, m = self.shape
        out = self.values.new_zeros(*lead, B * m) if self.flat else self.values.new_zeros(self.shape)
        return out.scatter(-1, self.indices, self.values).view(self.shape)

    def decode(self, W_dec: Tensor, below: int | None = None) -> Tensor:
        """sum over each row's entries of value * W_dec[latent], without b_dec.

        W_dec [(K,) d_sae, d_out] -> [(K,) B, d_out], in W_dec's dtype. below: only the entries of
        latents < below (the first `below` latents alone, as Matryoshka's prefixes decode)."""
        *lead, B, m = self.shape
        K = lead[0] if lead else 1
        d_out = W_dec.shape[-1]
        weight = W_dec.reshape(K * m, d_out)
        values = self.values.to(W_dec.dtype)
        first = torch.arange(K, device=W_dec.device) * m  # member s's latents start at row s * d_sae
        if not self.flat:  # row form: one bag per (member, row), k entries each
            latents = self.indices.reshape(K, B, -1)
            if below is not None:
                values = values * (latents < below).view_as(values)
            ids = (latents + first.view(K, 1, 1)).view(K * B, -1)
            out = F.embedding_bag(ids, weight, mode="sum", per_sample_weights=values.reshape(K * B, -1))
            return out.view(*lead, B, d_out)
        flat = self.indices.reshape(K, -1)
        rows, latents = flat // m, flat % m
        if below is not None:
            values = values * (latents < below).view_as(values)
        bag = (rows + torch.arange(K, device=W_dec.device).view(K, 1) * B).reshape(-1)  # ascending
        counts = torch.bincount(bag, minlength=K * B)
        offsets = counts.cumsum(0) - counts
        ids = (latents + first.view(K, 1)).reshape(-1)
        out = F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=values.reshape(-1))
        return out.view(*lead, B, d_out)


def top_k(x: Tensor, k: int | Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """x [..., n] -> (indices, values) [..., k_max]: the k largest entries of the last dim, ReLU'd.

    k: an int (then k_max = k), or an integer tensor broadcastable to x.shape[:-1] + (1,) giving
    each row its own k <= k_max (a stack: k [K, 1, 1] against x [K, B, n]). Then the top k_max
    are taken once, sorted, and ranks >= k get value 0: the same latents as each row's own top-k.
    """
    if isinstance(k, int):
        top = x.topk(k, dim=-1, sorted=False)
        return top.indices, top.values.relu()
    top = x.topk(k_max, dim=-1, sorted=True)
    keep = torch.arange(k_max, device=x.device) < k
    return top.indices, torch.where(keep, top.values.relu(), 0)
