"""Gated SAE (Rajamanoharan et al. 2024): which latents fire and how much, decided apart."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_ray.sae.base import SAE, SAEConfig, register


@register
class GatedSAE(SAE):
    """A gate path picks the active latents, a magnitude path sets their size; both
    share the encoder directions, so the L1 penalty on the gate causes no shrinkage.

        h      = (x - b_dec) @ W_enc                    [B, d_sae]   shared by both paths
        π_gate = h + b_gate
        π_mag  = h * exp(r_mag) + b_mag                 = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag
        f      = 1[π_gate > 0] * ReLU(π_mag)            [B, d_sae]
        x_hat  = f @ W_dec + b_dec                      [B, d_in]
        l1     = sparsity_scale * λ * mean_b sum_i ReLU(π_gate)_i ||W_dec[i]||    λ = l1_coefficient
        aux    = mean_b ||ReLU(π_gate) @ sg(W_dec) + sg(b_dec) - x||^2            sg: no gradient
        loss   = mean_b ||x_hat - x||^2 + l1 + aux

    The gate gets no gradient through the step; `aux` (reconstruction from the gate
    alone, through a frozen decoder) and `l1` train it. Decoder rows are kept at unit
    norm (`pre_step` / `post_step`), as Rajamanoharan et al.: with a free decoder the
    penalty keeps shrinking it (the frozen-decoder aux term does not push back) and
    training drifts; ||W_dec[i]|| (= 1 while training) stays in `l1` as SAELens
    writes it. Parameters as SAELens: W_enc [d_in, d_sae], b_gate, r_mag, b_mag
    [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (no b_enc). Init: W_dec rows random
    unit vectors, W_enc = W_dec^T, b_gate = r_mag = b_mag = b_dec = 0. Adam betas
    (0, 0.999) as the GDM recipe (dictionary_learning's gated trainer). As a transcoder
    (`SAE`): h = x @ W_enc, x_hat and the aux reconstruction [B, d_out] (each + x @ W_skip^T,
    frozen in aux) against the target y; SAELens has no gated transcoder, so the file names
    "gated_transcoder", which it refuses.
    """

    architecture = "gated"
    sparsity_param = "l1_coefficient"
    target_start = 5.0  # the standard SAE's start: the same decoder-norm-weighted L1 form
    unit_norm_decoder = True
    adam_betas = (0.0, 0.999)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.l1_coefficient is None or cfg.l1_coefficient < 0:
            raise ValueError(
                f"SAEConfig.l1_coefficient: {cfg.l1_coefficient!r}; the gated architecture needs a number >= 0"
            )

    def __init__(self, cfg: SAEConfig | list[SAEConfig]):
        super().__init__(cfg)
        self.hyper("l1_coefficient", [c.l1_coefficient for c in self.cfgs])
        del self.b_enc
        zeros = torch.zeros(self.shape(self.cfg.d_sae), dtype=self.W_dec.dtype)
        self.b_gate = nn.Parameter(zeros.clone())
        self.r_mag = nn.Parameter(zeros.clone())
        self.b_mag = nn.Parameter(zeros.clone())

    def _bias(self, b: Tensor) -> Tensor:
        """A [(K,) n] per-latent vector shaped to broadcast against [(K,) B, n]."""
        return b if self.n_stack is None else b.unsqueeze(-2)

    def pre_acts(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> h [(K,) B, d_sae]: (x - b_dec) @ W_enc, before either path's bias."""
        return self.centred_encode(x, None)

    def activation(self, pre: Tensor) -> Tensor:
        """h [(K,) B, d_sae] -> f = 1[π_gate > 0] * ReLU(π_mag), same shape."""
        gate = (pre + self._bias(self.b_gate)) > 0
        mag = pre * self._bias(self.r_mag).exp() + self._bias(self.b_mag)
        return gate * mag.relu()

    def aux_losses(self, x: Tensor, target: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor,
                   active=None) -> dict[str, Tensor]:
        """{"l1": ..., "aux": ...}; x [B, d_in]; target [B, d_out]; pre = h, f [(K,) B, d_sae]."""
        gate = (pre + self._bias(self.b_gate)).relu()
        l1 = (gate @ self.W_dec.norm(dim=-1).unsqueeze(-1)).squeeze(-1).mean(-1)
        x_gate = self.affine(gate, self.W_dec.detach(), self.b_dec.detach())
        if self.cfg.skip:
            x_gate = x_gate + self.skip_out(x).detach()
        aux = (x_gate - target).pow(2).sum(-1).mean(-1)
        return {"l1": self.sparsity_scale * self.l1_coefficient * l1, "aux": aux}
