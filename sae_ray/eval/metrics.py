"""SAE quality metrics: FVU, L0, dead and dense latents. Pure torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sae_ray.sae.base import SAE


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained over a whole batch, in float32.

    x, x_hat [N, d] -> scalar: sum((x - x_hat)^2) / sum((x - x.mean(0))^2).
    0 is a perfect reconstruction; 1 is no better than the batch mean.
    """
    x, x_hat = x.float(), x_hat.float()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def l0(f: Tensor) -> Tensor:
    """f [N, d_sae] -> scalar: mean number of nonzero latents per row."""
    return (f != 0).sum(-1).float().mean()


class FiringTracker:
    """Per latent: tokens since it last fired, and how many tokens it fired on.

    Counting starts at zero, so a latent that never fired has
    `tokens_since_fired` equal to all the tokens seen.
    """

    def __init__(self, d_sae: int, device: str | torch.device = "cpu"):
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        """[d_sae] tokens since each latent last fired."""
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long, device=device)
        """[d_sae] tokens each latent fired on."""
        self.n_tokens = 0
        """Tokens seen."""

    @torch.no_grad()
    def update(self, f: Tensor) -> None:
        """f [B, d_sae] latents of B tokens; nonzero means fired."""
        fired = f.reshape(-1, f.shape[-1]) != 0
        self.tokens_since_fired += fired.shape[0]
        self.tokens_since_fired[fired.any(dim=0)] = 0
        self.fire_counts += fired.sum(dim=0)
        self.n_tokens += fired.shape[0]

    def dead_fraction(self, threshold_tokens: int) -> float:
        """Fraction of latents that have not fired in the last `threshold_tokens` tokens."""
        return (self.tokens_since_fired >= threshold_tokens).float().mean().item()

    def density(self) -> Tensor:
        """[d_sae] fraction of tokens each latent fired on."""
        return self.fire_counts.float() / max(self.n_tokens, 1)

    def dense_fraction(self, min_density: float) -> float:
        """Fraction of latents that fire on more than `min_density` of tokens."""
        return (self.density() > min_density).float().mean().item()


@torch.no_grad()
def evaluate_sae(sae: SAE, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction and sparsity of `sae` on rows x [N, d_in], in float32.

    Returns
      mse:           mean over rows of the summed squared error
      fvu:           total squared error / total squared distance to the mean of all N rows
      l0:            mean number of nonzero latents per row
      dead_fraction: fraction of latents that fired on none of the rows
    The SAE runs in eval mode on its own device and dtype, `batch_size` rows at a time.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("evaluate_sae: x has no rows")
    param = sae.W_enc
    was_training = sae.training
    sae.eval()
    try:
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for batch in x.split(batch_size):
            total += batch.to(param.device).float().sum(0).cpu().double()
        mean = (total / n).float().to(param.device)

        sse = var = active = 0.0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=param.device)
        for batch in x.split(batch_size):
            xb = batch.to(param.device).float()
            f = sae.encode(xb.to(param.dtype))
            x_hat = sae.decode(f).float()
            sse += (xb - x_hat).pow(2).sum().item()
            var += (xb - mean).pow(2).sum().item()
            nonzero = f != 0
            active += nonzero.sum().item()
            fired |= nonzero.any(dim=0)
    finally:
        sae.train(was_training)
    return {
        "mse": sse / n,
        "fvu": sse / var if var > 0 else float("nan"),
        "l0": active / n,
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }
