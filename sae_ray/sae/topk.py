"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_ray.sae.base import SAE, SAEConfig, register
from sae_ray.sae.sparse import SparseLatents, pays, top_k


def top_k_relu(x: Tensor, k: int | Tensor, k_max: int) -> Tensor:
    """x [..., n] -> same shape: ReLU of the k largest entries of the last dim, zeros elsewhere
    (`sparse.top_k` scattered into a dense tensor; k and k_max as there)."""
    indices, values = top_k(x, k, k_max)
    return torch.zeros_like(x).scatter_(-1, indices, values)


@register
class TopKSAE(SAE):
    """Keep the k largest latents per row, zero the rest; unit-norm decoder rows.

        pre   = (x - b_dec) @ W_enc + b_enc                  [B, d_sae]
        f     = ReLU(TopK_k(pre))                            [B, d_sae], <= k nonzero per row
        x_hat = f @ W_dec + b_dec                            [B, d_in]   (decoded sparsely)
        e     = x - x_hat                                    (detached)
        z     = TopK_{k_aux}(pre restricted to dead latents) [B, d_sae]
        auxk  = auxk_coefficient * min(n_dead / k_aux, 1) * mean_b ||z @ W_dec - e||^2
        loss  = mean_b ||x_hat - x||^2 + auxk

    AuxK lets the dead latents (see `SAE.dead_mask`) learn to explain what the
    live ones miss; it uses their raw pre-activations, so latents stuck below
    zero still get a gradient. Knobs in `cfg.extra`: "k_aux" (default d_in // 2,
    one value per stack), "auxk_coefficient" (default 1/32). As in sparsify, `pre_step`
    removes the gradient along each decoder row and `post_step` renormalises the rows. Init: W_dec rows random unit
    vectors, W_enc = W_dec^T, biases zero. Adam betas (0.9, 0.999) (Gao et al.).
    A stack may mix k: each member keeps its own k of the top max(k). As a transcoder
    (`SAE`): pre = x @ W_enc + b_enc, x_hat [B, d_out] (+ x @ W_skip^T) and e against the
    target y; SAELens has no TopK transcoder, so the file names "topk_transcoder", which it refuses.
    """

    architecture = "topk"
    sparsity_param = "k"
    unit_norm_decoder = True
    knobs = (*SAE.knobs, "k_aux", "auxk_coefficient")

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.k is None or not 1 <= cfg.k <= cfg.d_sae:
            raise ValueError(
                f"SAEConfig.k: {cfg.k!r}; the {cls.architecture} architecture needs an integer "
                f"in [1, d_sae={cfg.d_sae}]"
            )
        cls.check_auxk_config(cfg)

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
        self.init_auxk(default_coefficient=1 / 32)

    def activation(self, pre: Tensor) -> Tensor:
        """[(K,) B, d_sae] -> same: ReLU of the k largest entries per row, zeros elsewhere."""
        k = self.k if isinstance(self.k, int) else self.per_row(self.k)
        return top_k_relu(pre, k, self.k_max)

    def sparse_activation(self, pre: Tensor) -> SparseLatents | None:
        """[(K,) B, d_sae] -> the same latents as `activation`, in row form [(K,) B, k_max];
        None where k_max is too large a share of d_sae for sparse decoding to pay (`sparse.pays`)."""
        if not pays(self.k_max, self.cfg.d_sae):
            return None
        k = self.k if isinstance(self.k, int) else self.per_row(self.k)
        return SparseLatents(*top_k(pre, k, self.k_max), pre.shape)

    def aux_losses(self, x: Tensor, target: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor,
                   active=None) -> dict[str, Tensor]:
        """{"auxk": ...} (zero while no latent is dead). target [B, d_out]; pre, f [(K,) B, d_sae]."""
        return {"auxk": self.auxk_loss(target, pre, x_hat)}
