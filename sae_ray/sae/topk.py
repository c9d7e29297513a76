"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_ray.sae.base import SAE, SAEConfig, register


def top_k_relu(x: Tensor, k: int | Tensor, k_max: int) -> Tensor:
    """x [..., n] -> same shape: ReLU of the k largest entries of the last dim, zeros elsewhere.

    k: an int, or an integer tensor broadcastable to x.shape[:-1] + (1,) giving each row
    its own k <= k_max (a stack: k [K, 1, 1] against x [K, B, n]). Then the top k_max are
    taken once, sorted, and ranks >= k dropped: the same latents as each row's own top-k.
    """
    if isinstance(k, int):
        top = x.topk(k, dim=-1, sorted=False)
        values = top.values.relu()
    else:
        top = x.topk(k_max, dim=-1, sorted=True)
        keep = torch.arange(k_max, device=x.device) < k
        values = torch.where(keep, top.values.relu(), 0)
    return torch.zeros_like(x).scatter_(-1, top.indices, values)


@register
class TopKSAE(SAE):
    """Keep the k largest latents per row, zero the rest; unit-norm decoder rows.

        pre   = (x - b_dec) @ W_enc + b_enc                  [B, d_sae]
        f     = ReLU(TopK_k(pre))                            [B, d_sae], <= k nonzero per row
        x_hat = f @ W_dec + b_dec                            [B, d_in]
        e     = x - x_hat                                    (detached)
        z     = TopK_{k_aux}(pre restricted to dead latents) [B, d_sae]
        auxk  = auxk_coefficient * min(n_dead / k_aux, 1) * mean_b ||z @ W_dec - e||^2
        loss  = mean_b ||x_hat - x||^2 + auxk

    AuxK lets the dead latents (see `SAE.dead_mask`) learn to explain what the
    live ones miss; it uses their raw pre-activations, so latents stuck below
    zero still get a gradient. Knobs in `cfg.extra`: "k_aux" (default d_in // 2,
    one value per stack), "auxk_coefficient" (default 1/32), "dead_tokens_threshold"
    (default 10M). As in sparsify, `pre_step` removes the gradient along each
    decoder row and `post_step` renormalises the rows. Init: W_dec rows random unit
    vectors, W_enc = W_dec^T, biases zero. Adam betas (0.9, 0.999) (Gao et al.).
    A stack may mix k: each member keeps its own k of the top max(k).
    """

    architecture = "topk"
    sparsity_param = "k"
    unit_norm_decoder = True

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.k is None or not 1 <= cfg.k <= cfg.d_sae:
            raise ValueError(
                f"SAEConfig.k: {cfg.k!r}; the {cls.architecture} architecture needs an integer "
                f"in [1, d_sae={cfg.d_sae}]"
            )

    def __init__(self, cfg: SAEConfig | list[SAEConfig]):
        super().__init__(cfg)
        ks = [c.k for c in self.cfgs]
        self.k_max = max(ks)
        """The largest k of the stack (k of a single SAE)."""
        # a stack whose members share k takes the single-k path (an int)
        self.k: int | Tensor
        if len(set(ks)) == 1:
            self.k = ks[0]
        else:
            self.hyper("k", ks, torch.long)
        self.k_aux = max(1, int(self.same_extra("k_aux", self.cfg.d_in // 2)))
        self.hyper("auxk_coefficient", [float(v) for v in self.each_extra("auxk_coefficient", 1 / 32)])

    def activation(self, pre: Tensor) -> Tensor:
        """[(K,) B, d_sae] -> same: ReLU of the k largest entries per row, zeros elsewhere."""
        k = self.k if isinstance(self.k, int) else self.per_row(self.k)
        return top_k_relu(pre, k, self.k_max)

    def aux_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        """{"auxk": ...} (zero while no latent is dead). x [B, d_in]; pre, f [(K,) B, d_sae]."""
        return {"auxk": self.auxk_loss(x, pre, x_hat)}

    def auxk_loss(self, x: Tensor, pre: Tensor, x_hat: Tensor) -> Tensor:
        """Weighted AuxK, scalar ([K] for a stack). x [B, d_in]; pre [(K,) B, d_sae]; x_hat [(K,) B, d_in]."""
        dead = self.dead_mask.unsqueeze(-2)  # [(K,) 1, d_sae]
        n_dead = dead.sum((-2, -1))  # [(K,)]
        most = int(n_dead.max())
        if most == 0:
            return x_hat.new_zeros(self.shape())
        top = pre.masked_fill(~dead, -torch.inf).topk(min(self.k_aux, most), dim=-1, sorted=False)
        # a member with fewer dead latents than that picked some live ones (at -inf): drop them
        values = top.values.masked_fill(top.values == -torch.inf, 0)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, values)
        e = (x - x_hat).detach()
        auxk = (z @ self.W_dec - e).pow(2).sum(-1).mean(-1)
        scale = (n_dead.to(auxk.dtype) / self.k_aux).clamp(max=1.0)
        return self.auxk_coefficient * scale * auxk
