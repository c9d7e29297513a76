"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_ray.sae.base import SAE, SAEConfig, register


@register
class TopKSAE(SAE):
    """Keep the k largest latents per row, zero the rest; unit-norm decoder rows.

        pre   = (x - b_dec) @ W_enc + b_enc                  [B, d_sae]
        f     = TopK_k(ReLU(pre))                            [B, d_sae], <= k nonzero per row
        x_hat = f @ W_dec + b_dec                            [B, d_in]
        e     = x - x_hat                                    (detached)
        z     = TopK_{k_aux}(pre restricted to dead latents) [B, d_sae]
        auxk  = auxk_coefficient * min(n_dead / k_aux, 1) * mean_b ||z @ W_dec - e||^2
        loss  = mean_b ||x_hat - x||^2 + auxk

    AuxK lets the dead latents (see `SAE.dead_mask`) learn to explain what the
    live ones miss; it uses their raw pre-activations, so latents stuck below
    zero still get a gradient. Knobs in `cfg.extra`: "k_aux" (default d_in // 2),
    "auxk_coefficient" (default 1/32), "dead_tokens_threshold" (default 10M).
    As in sparsify, `pre_step` removes the gradient along each decoder row and
    `post_step` renormalises the rows. Init: W_dec rows random unit vectors,
    W_enc = W_dec^T, biases zero.
    """

    architecture = "topk"
    sparsity_param = "k"
    unit_norm_decoder = True

    def __init__(self, cfg: SAEConfig):
        if cfg.k is None or not 1 <= cfg.k <= cfg.d_sae:
            raise ValueError(
                f"SAEConfig.k: {cfg.k!r}; the topk architecture needs an integer "
                f"in [1, d_sae={cfg.d_sae}]"
            )
        super().__init__(cfg)
        self.k = int(cfg.k)
        self.k_aux = max(1, int(cfg.extra.get("k_aux", cfg.d_in // 2)))
        self.auxk_coefficient = float(cfg.extra.get("auxk_coefficient", 1 / 32))

    def activation(self, pre: Tensor) -> Tensor:
        """[B, d_sae] -> [B, d_sae]: ReLU of the k largest entries per row, zeros elsewhere."""
        top = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    def aux_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        """{"auxk": ...} (zero while no latent is dead). x, x_hat [B, d_in]; pre, f [B, d_sae]."""
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0 or self.auxk_coefficient == 0:
            return {"auxk": x_hat.new_zeros(())}
        top = pre.masked_fill(~dead, -torch.inf).topk(min(self.k_aux, n_dead), dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
        e = (x - x_hat).detach()
        auxk = (z @ self.W_dec - e).pow(2).sum(-1).mean()
        scale = min(n_dead / self.k_aux, 1.0)
        return {"auxk": self.auxk_coefficient * scale * auxk}
