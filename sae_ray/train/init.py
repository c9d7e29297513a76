"""What the loop learns from the first batches before training: the input scale and b_dec
(a transcoder's output scale and b_dec come from its targets, the same way)."""

from __future__ import annotations

import torch
from torch import Tensor

MEDIAN_ROWS = 4096
"""Rows the geometric median is computed on (Weiszfeld iterations cost O(rows * d_in) each)."""


@torch.no_grad()
def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """[N, d] -> [d]: the point with the least summed Euclidean distance to the rows of x.

    Weiszfeld's iterations (as SAELens and dictionary_learning), from the mean, in float64:
    m <- sum_i w_i x_i / sum_i w_i with w_i = 1 / ||x_i - m||. Stops when m moves less than
    tol * (1 + ||m||). Returned in x's dtype.
    """
    points = x.double()
    m = points.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (points - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * points).sum(0) / w.sum()
        moved = (new - m).norm().item()
        m = new
        if moved <= tol * (1.0 + m.norm().item()):
            break
    return m.to(x.dtype)


@torch.no_grad()
def expected_norm_scale(batches: list[Tensor]) -> float:
    """s = sqrt(d / E||x||^2) over every row of `batches` (each [B, d]: d_in for inputs, d_out for a
    transcoder's targets), so that x*s has mean squared norm d (about unit size per coordinate).
    1.0 for all-zero data."""
    rows = sum(b.shape[0] for b in batches)
    sq = sum(b.double().pow(2).sum().item() for b in batches)
    d_in = batches[0].shape[-1]
    return (d_in * rows / sq) ** 0.5 if sq > 0 else 1.0


def first_rows(batches: list[Tensor], n: int) -> Tensor:
    """The first n rows of the concatenated batches: [min(n, total rows), d_in]."""
    out, have = [], 0
    for b in batches:
        if have >= n:
            break
        out.append(b[: n - have])
        have += out[-1].shape[0]
    return torch.cat(out)


@torch.no_grad()
def init_b_dec(sae: torch.nn.Module, sample: Tensor, method: str) -> None:
    """Set b_dec ([d_out], or [K, d_out] for a stack: every member the same) from sample [N, d_out]:
    what the SAE reconstructs (its inputs; a transcoder's targets, as b_dec is output-space).

    method: "geometric_median", "mean" or "zeros".
    """
    if method == "geometric_median":
        center = geometric_median(sample.float())
    elif method == "mean":
        center = sample.float().mean(0)
    elif method == "zeros":
        center = torch.zeros(sample.shape[-1])
    else:
        raise ValueError(f"train.b_dec_init: {method!r}; use 'geometric_median', 'mean' or 'zeros'")
    sae.b_dec.copy_(center.to(sae.b_dec).expand_as(sae.b_dec))
