"""Test data for SAE training: rows built from a fixed dictionary, so an SAE has something to find."""

from __future__ import annotations

import torch


def sparse_data(n: int, seed: int, d_in: int = 32, n_feat: int = 32, p: float = 0.05,
                scale: float = 4.0, offset: float = 1.0) -> torch.Tensor:
    """[n, d_in]: sparse non-negative codes @ a fixed random unit dictionary of n_feat atoms,
    times scale, plus offset. Each atom fires with probability p, with magnitude U(0.5, 1.5)."""
    D = torch.randn(n_feat, d_in, generator=torch.Generator().manual_seed(1234))
    D /= D.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, n_feat, generator=g) < p) * (torch.rand(n, n_feat, generator=g) + 0.5)
    return codes @ D * scale + offset
