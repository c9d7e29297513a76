"""SAE quality metrics: FVU, L0, dead latents; the one home of their formulas. Pure torch.

The functions take a leading stack dim K where the SAE has one (x stays [B, d]). For a transcoder
x is the target it reconstructs (its output-space activation), not its input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sae_ray.sae.base import SAE


def sse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Summed squared error over rows and dimensions, in float32.

    x [B, d]; x_hat [B, d], [K, B, d] (a stack) or anything that broadcasts to x, e.g. a
    mean [d] -> scalar ([K]): sum_b sum_j (x - x_hat)^2.
    """
    return (x.float() - x_hat.float()).pow(2).sum((-2, -1))


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained over a whole batch, in float32.

    x [B, d], x_hat [B, d] ([K, B, d] for a stack) -> scalar ([K]):
    sse(x, x_hat) / sse(x, x.mean(0)). 0 is a perfect reconstruction; 1 is no better
    than the batch mean.
    """
    return sse(x, x_hat) / sse(x, x.float().mean(0))


def l0(f: Tensor) -> Tensor:
    """f [B, d_sae] ([K, B, d_sae] for a stack) -> scalar ([K]): mean number of nonzero latents per row."""
    return (f != 0).sum(-1).float().mean(-1)


def dead_mask(tokens_since_fired: Tensor, dead_tokens: int) -> Tensor:
    """tokens_since_fired [d_sae] ([K, d_sae]) -> bool, same shape: latents that have not
    fired in the last `dead_tokens` tokens."""
    return tokens_since_fired >= dead_tokens


def dead_fraction(tokens_since_fired: Tensor, dead_tokens: int) -> Tensor:
    """tokens_since_fired [d_sae] ([K, d_sae]) -> scalar ([K]): share of latents that have
    not fired in the last `dead_tokens` tokens (`dead_mask`)."""
    return dead_mask(tokens_since_fired, dead_tokens).float().mean(-1)


@torch.no_grad()
def evaluate_sae(sae: SAE, x: Tensor, target: Tensor | None = None, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction and sparsity of `sae` on rows x [N, d_in], in float32. target [N, d_out]:
    what it reconstructs, row for row (a transcoder needs it; an SAE's default is x itself).

    Returns
      mse:           mean over rows of the summed squared error against the target
      fvu:           total squared error / total squared distance of the target to its mean over all N rows
      l0:            mean number of nonzero latents per row
      dead_fraction: fraction of latents that fired on none of the rows
    The SAE runs in eval mode on its own device and dtype, `batch_size` rows at a time.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("evaluate_sae: x has no rows")
    if target is None and sae.cfg.is_transcoder:
        raise ValueError(
            f"evaluate_sae: this is a transcoder (SAEConfig.d_out={sae.cfg.d_out}); pass target "
            "[N, d_out], the activation it reconstructs, row for row with x"
        )
    y = x if target is None else target
    if y.shape[0] != n or y.shape[-1] != sae.cfg.d_target:
        raise ValueError(
            f"evaluate_sae: target has shape {list(y.shape)}; expected [N={n}, d_out={sae.cfg.d_target}]"
        )
    param = sae.W_enc
    was_training = sae.training
    sae.eval()
    try:
        total = torch.zeros(y.shape[1], dtype=torch.float64)
        for batch in y.split(batch_size):
            total += batch.to(param.device).float().sum(0).cpu().double()
        mean = (total / n).float().to(param.device)

        err = var = active = 0.0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=param.device)
        for batch, goal in zip(x.split(batch_size), y.split(batch_size)):
            xb = batch.to(param.device).float()
            yb = goal.to(param.device).float()
            f = sae.encode(xb.to(param.dtype))
            x_hat = sae.decode(f, xb).float()
            err += sse(yb, x_hat).item()
            var += sse(yb, mean).item()
            nonzero = f != 0
            active += nonzero.sum().item()
            fired |= nonzero.any(dim=0)
    finally:
        sae.train(was_training)
    return {
        "mse": err / n,
        "fvu": err / var if var > 0 else float("nan"),
        "l0": active / n,
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }
